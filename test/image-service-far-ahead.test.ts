/**
 * Far-ahead reads: a qcow2 block still ahead of the prefetch stream is read
 * from the segment at its rank (one ranged read, checksums verified), and
 * from the image when the segment's bytes fail their checksum.
 */
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import type { BlockCache } from '../src/agent/block-cache.js';
import { ImageService } from '../src/agent/image-service.js';
import { Prefetcher } from '../src/agent/prefetcher.js';
import { blockChecksum } from '../src/format/segment.js';
import type { DiskImage } from '../src/image/types.js';
import type { Storage } from '../src/storage/types.js';

const BS = 4096;
const BLOCKS = 16;
/** Image blocks in the map (ranks 0..4). */
const SET = [2, 3, 4, 5, 9];
const DATA_OFFSET = 8192;

function setup(format: 'qcow2' | 'raw', corruptRank?: number) {
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
    layers: () => [{ name: 'disk', format, virtualSize: bytes.length, fileSize: bytes.length, allocatedBytes: bytes.length }],
    identityLayers: () => [{ format, stamp: '1:1', metadata: 'cd'.repeat(32) }],
    owner: async () => 'ab'.repeat(32),
    close: async () => undefined,
  };
  const segmentData = Buffer.concat(SET.map((b) => bytes.subarray(b * BS, (b + 1) * BS)));
  const checksums = SET.map((_, rank) => blockChecksum(segmentData.subarray(rank * BS, (rank + 1) * BS)));
  const stored = Buffer.from(segmentData);
  if (corruptRank !== undefined) stored[corruptRank * BS] ^= 0xff;
  const segmentReads: Array<[number, number]> = [];
  const storage = {
    read: async (_key: string, offset: number, length: number): Promise<Buffer> => {
      segmentReads.push([offset, length]);
      // The stream's first chunk (rank 0) never returns: every other block stays ahead.
      if (offset === DATA_OFFSET) return new Promise<Buffer>(() => undefined);
      return Buffer.from(stored.subarray(offset - DATA_OFFSET, offset - DATA_OFFSET + length));
    },
  } as unknown as Storage;
  const rank = (block: number): number => SET.filter((b) => b < block).length;
  const prefetcher = new Prefetcher(
    storage,
    { blockSize: BS, blockCount: BLOCKS, blocksSet: SET.length, isSet: (b) => SET.includes(b), rank, select: (r) => SET[r]! },
    { key: 'disk.bcseg', blockSize: BS, blockCount: SET.length, dataOffset: DATA_OFFSET, checkBlock: (r, d) => blockChecksum(d).equals(checksums[r]!) },
    { store: async () => undefined, has: () => false },
    { chunkBytes: BS, depth: 1 },
  );
  const cached = new Map<string, Buffer>();
  const cache: BlockCache = {
    blockSize: BS,
    has: (space, block) => cached.has(`${space}/${block}`),
    get: async (space, block) => cached.get(`${space}/${block}`),
    put: async (space, block, data) => void cached.set(`${space}/${block}`, Buffer.from(data)),
    putMany: async (space, entries) => {
      for (const { block, data } of entries) cached.set(`${space}/${block}`, Buffer.from(data));
    },
    markBooted: () => undefined,
  };
  const service = new ImageService('disk', image, cache, {
    bootPolicy: { idleMs: 60_000, windowMs: 600_000, minReads: 1 },
    mapBlockSize: BS,
    cacheMisses: true,
    counters: { hits: 0, misses: 0 },
    onBootEnd: () => undefined,
  });
  service.setPrefetcher(prefetcher);
  void prefetcher.start();
  return { bytes, service, imageReads, segmentReads };
}

describe('far-ahead reads', () => {
  it('reads qcow2 blocks ahead of the stream from the segment in one ranged read', async () => {
    const { bytes, service, imageReads, segmentReads } = setup('qcow2');
    const data = await service.readUnrecorded(3 * BS, 3 * BS);
    expect(data.equals(bytes.subarray(3 * BS, 6 * BS))).toBe(true);
    expect(imageReads).toEqual([]);
    expect(segmentReads).toEqual([
      [DATA_OFFSET, BS], // the stalled stream
      [DATA_OFFSET + BS, 3 * BS], // ranks 1..3
    ]);
    // Blocks not in the segment still come from the image.
    expect((await service.readUnrecorded(6 * BS, 2 * BS)).equals(bytes.subarray(6 * BS, 8 * BS))).toBe(true);
    expect(imageReads).toEqual([[6 * BS, 2 * BS]]);
  });

  it('falls back to the image when a segment block fails its checksum', async () => {
    const { bytes, service, imageReads } = setup('qcow2', 4);
    expect((await service.readUnrecorded(9 * BS, BS)).equals(bytes.subarray(9 * BS, 10 * BS))).toBe(true);
    expect(imageReads).toEqual([[9 * BS, BS]]);
  });

  it('reads raw images from the image (the segment read gains nothing there)', async () => {
    const { bytes, service, imageReads } = setup('raw');
    expect((await service.readUnrecorded(3 * BS, BS)).equals(bytes.subarray(3 * BS, 4 * BS))).toBe(true);
    expect(imageReads).toEqual([[3 * BS, BS]]);
  });
});
