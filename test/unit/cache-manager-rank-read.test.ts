/**
 * Reads of blocks the prefetch stream has not reached yet:
 *   - on demand: the block's chunk starts at once, out of order, and the read
 *     waits for it (no storage read of its own; the stream skips the chunk);
 *   - far ahead (past the demand bound): a qcow2 block is read from the
 *     segment at its rank (one ranged read, checksums verified), and from the
 *     image when the segment's bytes fail their checksum.
 */
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { memoryCache } from '../helpers/memory-cache.js';
import { BufferPool } from '../../src/agent/buffer-pool.js';
import { CacheManager } from '../../src/agent/cache-manager.js';
import { Prefetcher } from '../../src/agent/prefetcher.js';
import { blockChecksum } from '../../src/format/segment.js';
import type { DiskImage } from '../../src/image/types.js';
import type { Storage } from '../../src/storage/types.js';
import { StorageIOError } from '../../src/errors.js';

const BS = 4096;
const BLOCKS = 16;
/** Image blocks in the map (ranks 0..4). */
const SET = [2, 3, 4, 5, 9];
const DATA_OFFSET = 8192;

interface SetupOptions {
  corruptRank?: number;
  /** Segment blocks per chunk (default 1). */
  chunkBlocks?: number;
  /** Default 0: demand off, so reads ahead take the far-ahead path. */
  demandDepth?: number;
  /** The stream's first chunk never returns (default true): every other block stays ahead. */
  stallFirst?: boolean;
  /** Segment reads at this data offset fail. */
  failAt?: number;
  /** Chunk buffers shared with other streams. */
  buffers?: BufferPool;
}

/** Reads by offset (the stream's first read and a guest read's may come in either order). */
const sorted = (reads: Array<[number, number]>): Array<[number, number]> => [...reads].sort((a, b) => a[0] - b[0]);

function setup(format: 'qcow2' | 'raw', options: SetupOptions = {}) {
  const { corruptRank, chunkBlocks = 1, demandDepth = 0, stallFirst = true, failAt, buffers } = options;
  const bytes = randomBytes(BLOCKS * BS);
  const imageReads: Array<[number, number]> = [];
  const image: DiskImage = {
    format,
    name: 'disk',
    virtualSize: bytes.length,
    identity: 'ab'.repeat(32),
    read: async (offset, length) => {
      imageReads.push([offset, length]);
      return Buffer.from(bytes.subarray(offset, offset + length));
    },
    extents: async () => [],
    layers: () => [
      { name: 'disk', format, virtualSize: bytes.length, fileSize: bytes.length, allocatedBytes: bytes.length, stamp: '1:1', metadata: 'cd'.repeat(32) },
    ],
    close: async () => undefined,
  };
  const segmentData = Buffer.concat(SET.map((b) => bytes.subarray(b * BS, (b + 1) * BS)));
  const checksums = SET.map((_, rank) => blockChecksum(segmentData.subarray(rank * BS, (rank + 1) * BS)));
  const stored = Buffer.from(segmentData);
  if (corruptRank !== undefined) stored[corruptRank * BS] ^= 0xff;
  const segmentReads: Array<[number, number]> = [];
  const readSegment = async (offset: number, length: number): Promise<Buffer> => {
    segmentReads.push([offset, length]);
    if (stallFirst && offset === DATA_OFFSET) return new Promise<Buffer>(() => undefined);
    if (offset === failAt) throw new StorageIOError('injected storage read error', { file: 'disk.bcseg' });
    return Buffer.from(stored.subarray(offset - DATA_OFFSET, offset - DATA_OFFSET + length));
  };
  const storage = {
    read: async (_key: string, offset: number, length: number) => readSegment(offset, length),
    openSource: async () => ({ name: 'disk.bcseg', size: DATA_OFFSET + stored.length, stamp: '1:1', read: readSegment, close: async () => undefined }),
  } as unknown as Storage;
  const rank = (block: number): number => SET.filter((b) => b < block).length;
  const prefetcher = new Prefetcher(
    storage,
    { blockSize: BS, blockCount: BLOCKS, blocksSet: SET.length, isSet: (b) => SET.includes(b), rank, select: (r) => SET[r]! },
    { key: 'disk.bcseg', blockSize: BS, blockCount: SET.length, dataOffset: DATA_OFFSET, checkBlock: (r, d) => blockChecksum(d).equals(checksums[r]!) },
    { storeMany: async () => undefined, has: () => false },
    { chunkBytes: chunkBlocks * BS, depth: 1, demandDepth, ...(buffers ? { buffers } : {}) },
  );
  const { cache } = memoryCache(BS);
  const service = new CacheManager('disk', image, cache, {
    bootPolicy: { idleMs: 60_000, windowMs: 600_000, minReads: 1, maxShare: 0, maxShareFloor: 0 },
    cacheMisses: true,
    counters: { cache: 0, prefetch: 0, storage: 0 },
    onBootEnd: () => undefined,
  });
  service.setPrefetcher(prefetcher);
  const streamed = prefetcher.start();
  return { bytes, service, imageReads, segmentReads, prefetcher, streamed };
}

describe('rank reads (far ahead of the stream)', () => {
  it('reads qcow2 blocks ahead of the stream from the segment in one ranged read', async () => {
    const { bytes, service, imageReads, segmentReads } = setup('qcow2');
    const data = await service.readUnrecorded(3 * BS, 3 * BS);
    expect(data.equals(bytes.subarray(3 * BS, 6 * BS))).toBe(true);
    expect(imageReads).toEqual([]);
    expect(sorted(segmentReads)).toEqual([
      [DATA_OFFSET, BS], // the stalled stream
      [DATA_OFFSET + BS, 3 * BS], // ranks 1..3
    ]);
    // Blocks not in the segment still come from the image.
    expect((await service.readUnrecorded(6 * BS, 2 * BS)).equals(bytes.subarray(6 * BS, 8 * BS))).toBe(true);
    expect(imageReads).toEqual([[6 * BS, 2 * BS]]);
  });

  it('falls back to the image when a segment block fails its checksum', async () => {
    const { bytes, service, imageReads } = setup('qcow2', { corruptRank: 4 });
    expect((await service.readUnrecorded(9 * BS, BS)).equals(bytes.subarray(9 * BS, 10 * BS))).toBe(true);
    expect(imageReads).toEqual([[9 * BS, BS]]);
  });

  it('reads raw images from the image (the segment read gains nothing there)', async () => {
    const { bytes, service, imageReads } = setup('raw');
    expect((await service.readUnrecorded(3 * BS, BS)).equals(bytes.subarray(3 * BS, 4 * BS))).toBe(true);
    expect(imageReads).toEqual([[3 * BS, BS]]);
  });
});

describe('demanded chunks', () => {
  it('starts the chunk of a block the stream has not reached, and serves the read from it', async () => {
    // Chunks of 2 blocks: ranks 0-1 (stalled), 2-3, 4. Block 9 is rank 4, block 4 rank 2.
    const { bytes, service, imageReads, segmentReads, prefetcher } = setup('raw', { chunkBlocks: 2, demandDepth: 2 });
    expect((await service.readUnrecorded(9 * BS, BS)).equals(bytes.subarray(9 * BS, 10 * BS))).toBe(true);
    expect((await service.readUnrecorded(4 * BS, 2 * BS)).equals(bytes.subarray(4 * BS, 6 * BS))).toBe(true);
    expect(imageReads).toEqual([]);
    expect(sorted(segmentReads)).toEqual([
      [DATA_OFFSET, 2 * BS], // the stalled stream
      [DATA_OFFSET + 2 * BS, 2 * BS], // ranks 2-3, on demand
      [DATA_OFFSET + 4 * BS, BS], // rank 4, on demand
    ]);
    expect(prefetcher.progress().chunksDemanded).toBe(2);
  });

  it('never reads a chunk twice: the stream skips chunks started on demand', async () => {
    const { bytes, service, segmentReads, prefetcher, streamed } = setup('raw', { chunkBlocks: 2, demandDepth: 1, stallFirst: false });
    const read = service.readUnrecorded(9 * BS, BS);
    await streamed;
    expect((await read).equals(bytes.subarray(9 * BS, 10 * BS))).toBe(true);
    const offsets = segmentReads.map(([offset]) => offset).sort((a, b) => a - b);
    expect(offsets).toEqual([DATA_OFFSET, DATA_OFFSET + 2 * BS, DATA_OFFSET + 4 * BS]);
    expect(prefetcher.progress()).toMatchObject({ state: 'done', blocksLoaded: SET.length, chunksDemanded: 1 });
  });

  it('keeps at most demandDepth chunks in flight on demand; past that, reads go to the image', async () => {
    const { bytes, service, imageReads, prefetcher } = setup('raw', { chunkBlocks: 1, demandDepth: 1 });
    const [a, b] = await Promise.all([service.readUnrecorded(9 * BS, BS), service.readUnrecorded(3 * BS, BS)]);
    expect(a.equals(bytes.subarray(9 * BS, 10 * BS))).toBe(true);
    expect(b.equals(bytes.subarray(3 * BS, 4 * BS))).toBe(true);
    expect(prefetcher.progress().chunksDemanded).toBe(1);
    expect(imageReads).toEqual([[3 * BS, BS]]);
  });

  it('serves the read from the image when its demanded chunk fails, and the stream ends failed', async () => {
    const { bytes, service, imageReads, prefetcher, streamed } = setup('raw', { chunkBlocks: 1, demandDepth: 1, stallFirst: false, failAt: DATA_OFFSET + 4 * BS });
    expect((await service.readUnrecorded(9 * BS, BS)).equals(bytes.subarray(9 * BS, 10 * BS))).toBe(true);
    expect(imageReads).toEqual([[9 * BS, BS]]);
    await streamed;
    expect(prefetcher.progress()).toMatchObject({ state: 'failed', error: expect.stringMatching(/injected storage read error/) });
  });
});

describe('shared chunk buffers', () => {
  it('streams through the pool and gives every buffer back, so the next stream allocates none', async () => {
    const pool = new BufferPool(2 * BS, 4);
    await pool.prefault();
    expect(pool.stats()).toEqual({ bufferBytes: 2 * BS, maxIdle: 4, idle: 4, allocated: 4 });
    for (let stream = 0; stream < 2; stream++) {
      // Chunks of 2 blocks, demand on: the stream and a demanded chunk each hold a buffer.
      const { bytes, service, prefetcher, streamed } = setup('raw', { chunkBlocks: 2, demandDepth: 2, stallFirst: false, buffers: pool });
      expect((await service.readUnrecorded(9 * BS, BS)).equals(bytes.subarray(9 * BS, 10 * BS))).toBe(true);
      await streamed;
      expect(prefetcher.progress()).toMatchObject({ state: 'done', blocksLoaded: SET.length });
      expect(pool.stats()).toEqual({ bufferBytes: 2 * BS, maxIdle: 4, idle: 4, allocated: 4 });
    }
  });
});
