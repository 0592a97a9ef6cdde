/**
 * DiskImage.owner: which layer of a backing chain supplies a guest range
 * (the cache space of its blocks), on qemu-img-made chains.
 */
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chainSpaces, computeIdentity } from '../../src/image/identity.js';
import { openImage } from '../../src/image/open.js';
import type { DiskImage } from '../../src/image/types.js';
import { qemuImg, qemuIo, removeTmpDir, tmpDir } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir: string;
const opened: DiskImage[] = [];

async function open(name: string): Promise<DiskImage> {
  const image = await openImage(join(dir, name));
  opened.push(image);
  return image;
}

/** The owner identity of the top layer alone (identity.ts). */
function layerOwner(image: DiskImage, i = 0): string {
  const info = image.layers()[i]!;
  return computeIdentity(info.format, info.virtualSize, [image.identityLayers()[i]!]);
}

beforeAll(async () => {
  dir = await tmpDir('bc-owner-');
  await writeFile(join(dir, 'base.raw'), randomBytes(4 * MiB));
  await qemuImg(['convert', '-q', '-f', 'raw', '-O', 'qcow2', join(dir, 'base.raw'), join(dir, 'base.qcow2')]);
  // Overlay larger than its base: [4M, 6M) reads as zeros past the base's end.
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'top.qcow2'), '6M']);
  await qemuIo(join(dir, 'top.qcow2'), 'qcow2', ['write -P 0xaa 0 64k', 'write -z 128k 64k', 'write -P 0xab 4M 64k']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(dir, 'raw-top.qcow2'), '4M']);
  await qemuIo(join(dir, 'raw-top.qcow2'), 'qcow2', ['write -P 0xcc 64k 64k']);
  // Extended L2: 2 KiB subclusters, one written inside a 4 KiB range.
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'base.raw', '-F', 'raw', join(dir, 'ext.qcow2'), '4M']);
  await qemuIo(join(dir, 'ext.qcow2'), 'qcow2', ['write -P 0xdd 2k 2k']);
  // Three layers: mid over base, top over mid.
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'mid.qcow2'), '4M']);
  await qemuIo(join(dir, 'mid.qcow2'), 'qcow2', ['write -P 0x11 1M 64k']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', join(dir, 'top3.qcow2'), '4M']);
});

afterAll(async () => {
  for (const image of opened) await image.close();
  await removeTmpDir(dir);
});

describe('DiskImage.owner', () => {
  it('is the identity of a raw image and of a qcow2 image without backing file', async () => {
    const raw = await open('base.raw');
    const qcow2 = await open('base.qcow2');
    expect(await raw.owner(0, 4096)).toBe(raw.identity);
    expect(await qcow2.owner(MiB, 4096)).toBe(qcow2.identity);
    expect(chainSpaces(qcow2)).toEqual([qcow2.identity]);
  });

  it('names the layer that supplies the range: overlay clusters, backing clusters, zeros past the backing end', async () => {
    const base = await open('base.qcow2');
    const top = await open('top.qcow2');
    const own = layerOwner(top);
    expect(own).not.toBe(top.identity);
    expect(await top.owner(0, 4096)).toBe(own); // data cluster
    expect(await top.owner(128 * KiB, 64 * KiB)).toBe(own); // zero cluster
    expect(await top.owner(4 * MiB, 4096)).toBe(own);
    // Unallocated in the overlay: the base's identity, as when the base is opened alone.
    expect(await top.owner(64 * KiB, 64 * KiB)).toBe(base.identity);
    expect(await top.owner(2 * MiB, 4096)).toBe(base.identity);
    // Past the base's end: zeros decided by the overlay and the base's size, i.e. the chain.
    expect(await top.owner(5 * MiB, 4096)).toBe(top.identity);
    // Mixed ranges have no single owner.
    expect(await top.owner(60 * KiB, 8 * KiB)).toBeUndefined();
    expect(await top.owner(4 * MiB - 4096, 8192)).toBeUndefined();
    expect(chainSpaces(top)).toEqual(expect.arrayContaining([top.identity, own, base.identity]));
  });

  it('works over a raw backing file', async () => {
    const base = await open('base.raw');
    const top = await open('raw-top.qcow2');
    expect(await top.owner(0, 4096)).toBe(base.identity);
    expect(await top.owner(64 * KiB, 4096)).toBe(layerOwner(top));
  });

  it('is undefined when subclusters of different layers share the range (extended L2)', async () => {
    const base = await open('base.raw');
    const ext = await open('ext.qcow2');
    expect(await ext.owner(0, 4096)).toBeUndefined();
    expect(await ext.owner(2 * KiB, 2 * KiB)).toBe(layerOwner(ext));
    expect(await ext.owner(4 * KiB, 4 * KiB)).toBe(base.identity);
  });

  it('recurses through a three-layer chain', async () => {
    const base = await open('base.qcow2');
    const top = await open('top3.qcow2');
    expect(await top.owner(0, 4096)).toBe(base.identity);
    expect(await top.owner(MiB, 4096)).toBe(layerOwner(top, 1));
  });
});
