import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildImageIndex, verifyImageIndex, verifyImageIndexFile } from '../../src/core/image-index.js';
import { UsageError } from '../../src/errors.js';
import { ImageIndex } from '../../src/format/image-index.js';
import { openImage } from '../../src/image/open.js';
import type { DiskImage, ImageExtent } from '../../src/image/types.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bootcache-idx-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const sha = (b: Uint8Array): Buffer => createHash('sha256').update(b).digest();

/**
 * An in-memory image whose extents are given, so zero and unallocated
 * ranges can be told apart from data (a raw file is all data). Reads of a
 * non-data range fail: the index must not read them.
 */
function memoryImage(bytes: Buffer, extents: ImageExtent[], identity = 'c'.repeat(64)): DiskImage & { reads: number } {
  const image = {
    format: 'qcow2' as const,
    name: 'mem.qcow2',
    virtualSize: bytes.length,
    identity,
    reads: 0,
    async read(offset: number, length: number): Promise<Buffer> {
      image.reads++;
      const end = offset + length;
      // A read may straddle data and zeros (a block larger than a cluster), but must touch data.
      if (!extents.some((e) => e.kind === 'data' && offset < e.offset + e.length && e.offset < end)) {
        throw new Error(`read of [${offset}, ${end}) touches no data extent`);
      }
      return Buffer.from(bytes.subarray(offset, end));
    },
    async extents(offset: number, length: number): Promise<ImageExtent[]> {
      return extents
        .filter((e) => e.offset < offset + length && offset < e.offset + e.length)
        .map((e) => {
          const start = Math.max(e.offset, offset);
          return { ...e, offset: start, length: Math.min(e.offset + e.length, offset + length) - start };
        });
    },
    layers: () => [],
    async close() {},
  };
  return image;
}

const KiB = 1024;

describe('buildImageIndex', () => {
  // 64 blocks of 4 KiB: data in 0-7 (block 3 all zeros), zero extent 8-15, unallocated 16-31,
  // data 32-63 with block 40 random and the rest zeros, and a partial last block.
  const blockSize = 4096;
  const bytes = Buffer.alloc(64 * blockSize - 1000);
  randomBytes(8 * blockSize).copy(bytes, 0);
  bytes.fill(0, 3 * blockSize, 4 * blockSize);
  randomBytes(blockSize).copy(bytes, 40 * blockSize);
  bytes.fill(0x5a, 63 * blockSize);
  const extents: ImageExtent[] = [
    { offset: 0, length: 8 * blockSize, kind: 'data', depth: 0 },
    { offset: 8 * blockSize, length: 8 * blockSize, kind: 'zero', depth: 0 },
    { offset: 16 * blockSize, length: 16 * blockSize, kind: 'unallocated', depth: 1 },
    { offset: 32 * blockSize, length: bytes.length - 32 * blockSize, kind: 'data', depth: 1 },
  ];
  const dataBlocks = [0, 1, 2, 4, 5, 6, 7, 40, 63];
  const padded = (b: number): Buffer => {
    const block = Buffer.alloc(blockSize);
    bytes.copy(block, 0, b * blockSize, Math.min(bytes.length, (b + 1) * blockSize));
    return block;
  };

  it('has a digest for exactly the blocks that are not all zeros, each the SHA-256 of the block (the last one zero-padded)', async () => {
    const image = memoryImage(bytes, extents);
    const out = join(dir, 'a.bcidx');
    const built = await buildImageIndex(image, out, { previous: './v1.qcow2', readChunkBytes: 16 * KiB });
    expect(built).toMatchObject({ blockCount: 64, dataBlocks: 9, zeroBlocks: 55, blocksRead: 40, previous: './v1.qcow2' });
    const index = await ImageIndex.open(out);
    expect(index.previous).toBe('./v1.qcow2');
    expect(index.matches(image)).toBe(true);
    for (let b = 0; b < 64; b++) {
      if (dataBlocks.includes(b)) expect(index.digestOf(b), `block ${b}`).toEqual(sha(padded(b)));
      else expect(index.digestOf(b), `block ${b}`).toBeUndefined();
    }
    await index.close();
    expect((await verifyImageIndexFile(image, out)).ok).toBe(true);
    // Nothing but the index is left in the directory (no temporary file).
    expect((await readdir(dir)).filter((f) => f.startsWith('.'))).toEqual([]);
  });

  it('gives the same digests whatever the read size, and blocks of 512 B and 64 KiB', async () => {
    const image = memoryImage(bytes, extents);
    for (const blockSize of [512, 65536]) {
      const outs = [];
      for (const readChunkBytes of [blockSize, 1024 * KiB]) {
        const out = join(dir, `bs-${blockSize}-${readChunkBytes}.bcidx`);
        await buildImageIndex(image, out, { blockSize, readChunkBytes });
        outs.push(await ImageIndex.open(out));
      }
      expect(outs[0]!.header.digestTableSha256).toBe(outs[1]!.header.digestTableSha256);
      const index = outs[0]!;
      for (let b = 0; b < index.blockCount; b++) {
        const block = Buffer.alloc(blockSize);
        bytes.copy(block, 0, b * blockSize, Math.min(bytes.length, (b + 1) * blockSize));
        expect(index.digestOf(b)).toEqual(block.equals(Buffer.alloc(blockSize)) ? undefined : sha(block));
      }
      await Promise.all(outs.map((o) => o.close()));
    }
  });

  it('a raw file and the same bytes with extents give the same table', async () => {
    const path = join(dir, 'same.raw');
    await writeFile(path, bytes);
    const raw = await openImage(path);
    try {
      await buildImageIndex(raw, join(dir, 'raw.bcidx'));
      await buildImageIndex(memoryImage(bytes, extents), join(dir, 'mem.bcidx'));
      const [a, b] = await Promise.all([ImageIndex.open(join(dir, 'raw.bcidx')), ImageIndex.open(join(dir, 'mem.bcidx'))]);
      expect(a.header.bitmapSha256).toBe(b.header.bitmapSha256);
      expect(a.header.digestTableSha256).toBe(b.header.digestTableSha256);
      expect(a.identity).not.toBe(b.identity);
      await Promise.all([a.close(), b.close()]);
    } finally {
      await raw.close();
    }
  });

  it('refuses a bad block size or previous key before writing anything', async () => {
    const image = memoryImage(bytes, extents);
    await expect(buildImageIndex(image, join(dir, 'x.bcidx'), { blockSize: 3000 })).rejects.toThrow(UsageError);
    await expect(buildImageIndex(image, join(dir, 'x.bcidx'), { previous: '/abs.qcow2' })).rejects.toThrow(/absolute/);
    expect((await readdir(dir)).includes('x.bcidx')).toBe(false);
  });

  it('a failed read leaves no file behind', async () => {
    const image = memoryImage(bytes, extents);
    image.read = async () => {
      throw new Error('storage fault');
    };
    await expect(buildImageIndex(image, join(dir, 'fault.bcidx'))).rejects.toThrow(/storage fault/);
    expect((await readdir(dir)).filter((f) => f.includes('fault'))).toEqual([]);
  });
});

describe('verifyImageIndex', () => {
  const blockSize = 4096;
  const make = (): Buffer => {
    const bytes = Buffer.alloc(32 * blockSize);
    randomBytes(16 * blockSize).copy(bytes, 0);
    return bytes;
  };
  const allData: ImageExtent[] = [{ offset: 0, length: 32 * blockSize, kind: 'data', depth: 0 }];

  it('names changed blocks (digest), new data (missing) and blocks that became zeros (extra)', async () => {
    const bytes = make();
    const out = join(dir, 'v.bcidx');
    await buildImageIndex(memoryImage(bytes, allData), out);
    bytes[5 * blockSize + 7] ^= 1; // changed
    bytes.fill(0, 9 * blockSize, 10 * blockSize); // became zeros
    bytes[20 * blockSize] = 1; // new data
    const report = await verifyImageIndexFile(memoryImage(bytes, allData, 'd'.repeat(64)), out);
    expect(report.ok).toBe(false);
    expect(report.checks).toEqual({ header: 'pass', identity: 'fail', size: 'pass', table: 'pass', digests: 'fail' });
    expect(report).toMatchObject({ digestMismatches: 1, missingDigests: 1, extraDigests: 1, imageDataBlocks: 16, indexDataBlocks: 16 });
    expect(report.mismatches).toEqual([
      { block: 5, imageOffset: 5 * blockSize, reason: 'digest' },
      { block: 9, imageOffset: 9 * blockSize, reason: 'extra' },
      { block: 20, imageOffset: 20 * blockSize, reason: 'missing' },
    ]);
  });

  it('lists the first mismatches in block order when extras come before the scan ones', async () => {
    const bytes = make();
    const out = join(dir, 'order.bcidx');
    await buildImageIndex(memoryImage(bytes, allData), out);
    bytes.fill(0, 0, 2 * blockSize); // blocks 0, 1: extra
    for (let b = 2; b < 16; b++) bytes[b * blockSize] ^= 1; // 14 digest mismatches
    const report = await verifyImageIndexFile(memoryImage(bytes, allData), out, { maxMismatches: 3 });
    expect(report.mismatches.map((m) => [m.block, m.reason])).toEqual([[0, 'extra'], [1, 'extra'], [2, 'digest']]);
    expect(report.digestMismatches).toBe(14);
  });

  it('skips the digests of a disk of another size', async () => {
    const bytes = make();
    const out = join(dir, 'size.bcidx');
    await buildImageIndex(memoryImage(bytes, allData), out);
    const index = await ImageIndex.open(out);
    const report = await verifyImageIndex(memoryImage(bytes.subarray(0, 16 * blockSize), [{ ...allData[0]!, length: 16 * blockSize }]), index);
    expect(report.checks).toMatchObject({ size: 'fail', digests: 'skip' });
    expect(report.ok).toBe(false);
    await index.close();
  });
});
