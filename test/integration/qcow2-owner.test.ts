/**
 * ImageSpaces.owner: which layer of a backing chain supplies a guest range
 * (the cache space of its blocks), on qemu-img-made chains; computed from
 * the image's extents (their depth) and layers (their identity inputs).
 */
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chainSpaces, ImageSpaces } from '../../src/agent/cache/spaces.js';
import { computeIdentity } from '../../src/image/identity.js';
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
  return computeIdentity(info.format, info.virtualSize, [info]);
}

/** The owner of [offset, offset+length) of `image`. */
function owner(image: DiskImage, offset: number, length: number): Promise<string | undefined> {
  return new ImageSpaces(image).owner(offset, length);
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
  // A deep chain, each layer longer than its backing file: a 4M base with data,
  // zero and unallocated clusters; a 5M middle; a 6M top with a compressed cluster.
  await qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'deep-base.qcow2'), '4M']);
  await qemuIo(join(dir, 'deep-base.qcow2'), 'qcow2', ['write -P 0x21 0 1M', 'write -z 256k 64k', 'write -P 0x22 3M 512k']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'deep-base.qcow2', '-F', 'qcow2', join(dir, 'deep-mid.qcow2'), '5M']);
  await qemuIo(join(dir, 'deep-mid.qcow2'), 'qcow2', ['write -P 0x31 512k 128k', 'write -z 2M 64k', 'write -P 0x32 4M 64k', 'write -z 4352k 64k']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'deep-mid.qcow2', '-F', 'qcow2', join(dir, 'deep-top.qcow2'), '6M']);
  await qemuIo(join(dir, 'deep-top.qcow2'), 'qcow2', [
    'write -P 0x41 0 64k', 'write -c -P 0x42 576k 64k', 'write -z 3M 64k', 'write -P 0x43 4544k 64k', 'write -P 0x44 5632k 64k',
  ]);
});

afterAll(async () => {
  for (const image of opened) await image.close();
  await removeTmpDir(dir);
});

/**
 * owner() of every range of `size` bytes from `start`, every `step` bytes, as
 * run-length encoded labels: chainN = identity of the sub-chain from layer N
 * (the layer opened alone with its backing files), ownN = layer N alone,
 * '-' = no single owner.
 */
async function ownerMap(image: DiskImage, files: string[], start: number, size: number, step: number): Promise<string> {
  const spaces = new ImageSpaces(image);
  const labels = new Map<string, string>();
  for (let i = files.length - 1; i >= 0; i--) {
    labels.set(layerOwner(image, i), `own${i}`);
    labels.set((await open(files[i]!)).identity, `chain${i}`);
  }
  const runs: Array<[string, number]> = [];
  for (let off = start; off < image.virtualSize; off += step) {
    const space = await spaces.owner(off, Math.min(size, image.virtualSize - off));
    const label = space === undefined ? '-' : (labels.get(space) ?? `unknown ${space}`);
    const last = runs[runs.length - 1];
    if (last && last[0] === label) last[1]++;
    else runs.push([label, 1]);
  }
  return runs.map(([label, n]) => `${label}*${n}`).join(' ');
}

/**
 * The answers of DiskImage.owner() before the cache-space mapping moved out of
 * the image readers (issue 19), pinned: the cache space of a block must not change.
 */
describe('ImageSpaces.owner, pinned over whole chains', () => {
  const cases: Array<{ top: string; files: string[]; start: number; size: number; step: number; want: string }> = [
    { top: 'top.qcow2', files: ['top.qcow2', 'base.qcow2'], start: 0, size: 4 * KiB, step: 4 * KiB,
      want: 'own0*16 chain1*16 own0*16 chain1*976 own0*16 chain0*496' },
    { top: 'top.qcow2', files: ['top.qcow2', 'base.qcow2'], start: 0, size: 64 * KiB, step: 64 * KiB,
      want: 'own0*1 chain1*1 own0*1 chain1*61 own0*1 chain0*31' },
    { top: 'top.qcow2', files: ['top.qcow2', 'base.qcow2'], start: 2 * KiB, size: 12 * KiB, step: 8 * KiB,
      want: 'own0*7 -*1 chain1*7 -*1 own0*7 -*1 chain1*487 -*1 own0*7 -*1 chain0*248' },
    { top: 'raw-top.qcow2', files: ['raw-top.qcow2', 'base.raw'], start: 0, size: 4 * KiB, step: 4 * KiB,
      want: 'chain1*16 own0*16 chain1*992' },
    { top: 'ext.qcow2', files: ['ext.qcow2', 'base.raw'], start: 0, size: 1 * KiB, step: 1 * KiB,
      want: 'chain1*2 own0*2 chain1*4092' },
    { top: 'ext.qcow2', files: ['ext.qcow2', 'base.raw'], start: 0, size: 4 * KiB, step: 4 * KiB,
      want: '-*1 chain1*1023' },
    { top: 'top3.qcow2', files: ['top3.qcow2', 'mid.qcow2', 'base.qcow2'], start: 0, size: 4 * KiB, step: 4 * KiB,
      want: 'chain2*256 own1*16 chain2*752' },
    { top: 'deep-mid.qcow2', files: ['deep-mid.qcow2', 'deep-base.qcow2'], start: 0, size: 4 * KiB, step: 4 * KiB,
      want: 'chain1*128 own0*32 chain1*352 own0*16 chain1*496 own0*16 chain0*48 own0*16 chain0*176' },
    { top: 'deep-top.qcow2', files: ['deep-top.qcow2', 'deep-mid.qcow2', 'deep-base.qcow2'], start: 0, size: 4 * KiB, step: 4 * KiB,
      want: 'own0*16 chain2*112 own1*16 own0*16 chain2*352 own1*16 chain2*240 own0*16 chain2*240 own1*16 chain1*48 own1*16 chain1*32 own0*16 chain1*128 chain0*128 own0*16 chain0*112' },
    { top: 'deep-top.qcow2', files: ['deep-top.qcow2', 'deep-mid.qcow2', 'deep-base.qcow2'], start: 0, size: 64 * KiB, step: 64 * KiB,
      want: 'own0*1 chain2*7 own1*1 own0*1 chain2*22 own1*1 chain2*15 own0*1 chain2*15 own1*1 chain1*3 own1*1 chain1*2 own0*1 chain1*8 chain0*8 own0*1 chain0*7' },
    { top: 'deep-top.qcow2', files: ['deep-top.qcow2', 'deep-mid.qcow2', 'deep-base.qcow2'], start: 2 * KiB, size: 12 * KiB, step: 8 * KiB,
      want: 'own0*7 -*1 chain2*55 -*1 own1*7 -*1 own0*7 -*1 chain2*175 -*1 own1*7 -*1 chain2*119 -*1 own0*7 -*1 chain2*119 -*1 own1*7 -*1 chain1*23 -*1 own1*7 -*1 chain1*15 -*1 own0*7 -*1 chain1*63 -*1 chain0*63 -*1 own0*7 -*1 chain0*56' },
    { top: 'deep-top.qcow2', files: ['deep-top.qcow2', 'deep-mid.qcow2', 'deep-base.qcow2'], start: 0, size: 1 * MiB, step: 1 * MiB,
      want: '-*1 chain2*1 -*4' },
    { top: 'deep-top.qcow2', files: ['deep-top.qcow2', 'deep-mid.qcow2', 'deep-base.qcow2'], start: 4 * MiB - 2 * KiB, size: 4 * KiB, step: 4 * KiB,
      want: '-*1 own1*15 -*1 chain1*47 -*1 own1*15 -*1 chain1*31 -*1 own0*15 -*1 chain1*127 -*1 chain0*127 -*1 own0*15 -*1 chain0*112' },
  ];
  for (const c of cases) {
    it(`${c.top}: ranges of ${c.size} bytes every ${c.step} from ${c.start}`, async () => {
      const image = await open(c.top);
      expect(await ownerMap(image, c.files, c.start, c.size, c.step)).toBe(c.want);
    });
  }
});

describe('ImageSpaces.owner', () => {
  it('is the identity of a raw image and of a qcow2 image without backing file', async () => {
    const raw = await open('base.raw');
    const qcow2 = await open('base.qcow2');
    expect(await owner(raw, 0, 4096)).toBe(raw.identity);
    expect(await owner(qcow2, MiB, 4096)).toBe(qcow2.identity);
    expect(chainSpaces(qcow2)).toEqual([qcow2.identity]);
  });

  it('names the layer that supplies the range: overlay clusters, backing clusters, zeros past the backing end', async () => {
    const base = await open('base.qcow2');
    const top = await open('top.qcow2');
    const own = layerOwner(top);
    expect(own).not.toBe(top.identity);
    expect(await owner(top, 0, 4096)).toBe(own); // data cluster
    expect(await owner(top, 128 * KiB, 64 * KiB)).toBe(own); // zero cluster
    expect(await owner(top, 4 * MiB, 4096)).toBe(own);
    // Unallocated in the overlay: the base's identity, as when the base is opened alone.
    expect(await owner(top, 64 * KiB, 64 * KiB)).toBe(base.identity);
    expect(await owner(top, 2 * MiB, 4096)).toBe(base.identity);
    // Past the base's end: zeros decided by the overlay and the base's size, i.e. the chain.
    expect(await owner(top, 5 * MiB, 4096)).toBe(top.identity);
    // Mixed ranges have no single owner.
    expect(await owner(top, 60 * KiB, 8 * KiB)).toBeUndefined();
    expect(await owner(top, 4 * MiB - 4096, 8192)).toBeUndefined();
    expect(chainSpaces(top)).toEqual(expect.arrayContaining([top.identity, own, base.identity]));
  });

  it('works over a raw backing file', async () => {
    const base = await open('base.raw');
    const top = await open('raw-top.qcow2');
    expect(await owner(top, 0, 4096)).toBe(base.identity);
    expect(await owner(top, 64 * KiB, 4096)).toBe(layerOwner(top));
  });

  it('is undefined when subclusters of different layers share the range (extended L2)', async () => {
    const base = await open('base.raw');
    const ext = await open('ext.qcow2');
    expect(await owner(ext, 0, 4096)).toBeUndefined();
    expect(await owner(ext, 2 * KiB, 2 * KiB)).toBe(layerOwner(ext));
    expect(await owner(ext, 4 * KiB, 4 * KiB)).toBe(base.identity);
  });

  it('recurses through a three-layer chain', async () => {
    const base = await open('base.qcow2');
    const top = await open('top3.qcow2');
    expect(await owner(top, 0, 4096)).toBe(base.identity);
    expect(await owner(top, MiB, 4096)).toBe(layerOwner(top, 1));
  });
});
