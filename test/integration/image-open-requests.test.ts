/**
 * Opening an image costs few storage requests: the format probe, the raw
 * identity sample and the qcow2 header are served from one read of the
 * image's first 64 KiB (each read is a round trip on an object store), which
 * keeps serving reads inside it (a raw image's boot sector) while the image
 * is open.
 */
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FileByteSource, fileSourceOpener } from '../../src/image/file-source.js';
import { openImageFromSource } from '../../src/image/open.js';
import type { ByteSource } from '../../src/image/types.js';
import { qemuImg, removeTmpDir, tmpDir } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir: string;

beforeAll(async () => {
  dir = await tmpDir('bc-open-requests-');
  await writeFile(join(dir, 'disk.raw'), randomBytes(MiB));
  await qemuImg(['convert', '-q', '-f', 'raw', '-O', 'qcow2', join(dir, 'disk.raw'), join(dir, 'disk.qcow2')]);
});

afterAll(async () => {
  await removeTmpDir(dir);
});

/** A file source that records every read (readInto included) as [offset, length]. */
async function recorded(name: string): Promise<{ source: ByteSource; reads: Array<[number, number]> }> {
  const inner = await FileByteSource.open(join(dir, name));
  const reads: Array<[number, number]> = [];
  const source: ByteSource = {
    name: inner.name,
    size: inner.size,
    stamp: inner.stamp,
    read: (offset, length) => (reads.push([offset, length]), inner.read(offset, length)),
    readInto: (offset, length, target, targetOffset) => (reads.push([offset, length]), inner.readInto(offset, length, target, targetOffset)),
    close: () => inner.close(),
  };
  return { source, reads };
}

describe('image open requests', () => {
  it('opens a raw image with two reads (head and tail sample), serves the head from memory, the rest from storage', async () => {
    const { source, reads } = await recorded('disk.raw');
    const image = await openImageFromSource(source, fileSourceOpener, {}, []);
    expect(image.format).toBe('raw');
    expect(reads).toEqual([[0, 64 * KiB], [MiB - 64 * KiB, 64 * KiB]]);
    const bytes = await readFile(join(dir, 'disk.raw'));
    expect((await image.read(0, 512)).equals(bytes.subarray(0, 512))).toBe(true);
    expect((await image.read(60 * KiB, 4 * KiB)).equals(bytes.subarray(60 * KiB, 64 * KiB))).toBe(true);
    expect(reads).toHaveLength(2);
    // Past the head (even by one byte): storage.
    expect((await image.read(60 * KiB, 4 * KiB + 1)).equals(bytes.subarray(60 * KiB, 64 * KiB + 1))).toBe(true);
    expect(reads).toHaveLength(3);
    await image.close();
  });

  it('reads a qcow2 header from the same first read as the probe', async () => {
    const { source, reads } = await recorded('disk.qcow2');
    const image = await openImageFromSource(source, fileSourceOpener, {}, []);
    expect(image.format).toBe('qcow2');
    expect(reads[0]).toEqual([0, 64 * KiB]);
    // Nothing else inside the first 64 KiB (header, extensions) was read again.
    expect(reads.slice(1).filter(([offset, length]) => offset + length <= 64 * KiB)).toEqual([]);
    await image.close();
  });
});
