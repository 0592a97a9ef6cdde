/**
 * The prefetch stream's writes into the cache: one slice's store at a time
 * (the thread pool keeps room for the boot's own I/O), every good block
 * stored, and a failed store fails the stream, which stops its other chunks.
 */
import { randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { Prefetcher, type PrefetchSegment, type PrefetchSink } from '../../src/agent/prefetcher.js';
import { blockChecksum } from '../../src/format/segment.js';
import type { Storage } from '../../src/storage/types.js';

const BS = 512;
/** Segment blocks: 4 chunks of 256 blocks, 4 slices each. */
const RANKS = 1024;
const DATA_OFFSET = 4096;

/** Image block of each rank: every other block of the image. */
const blockOf = (rank: number): number => rank * 2;

/**
 * A stream over a random segment. `crcTable`: the segment offers its CRC-32s
 * (storedCrc32) and checkBlock must not be needed; `damagedRank`: that
 * block's data is flipped after its checksum was taken.
 */
function stream(sink: PrefetchSink, options: { crcTable?: boolean; damagedRank?: number; checkedVersion?: string } = {}): Prefetcher {
  const segment = randomBytes(RANKS * BS);
  const checksums = Array.from({ length: RANKS }, (_, r) => blockChecksum(segment.subarray(r * BS, (r + 1) * BS)));
  if (options.damagedRank !== undefined) segment[options.damagedRank * BS + 7]! ^= 0x10;
  const segmentInfo: PrefetchSegment = {
    key: 'disk.bcseg',
    blockSize: BS,
    blockCount: RANKS,
    dataOffset: DATA_OFFSET,
    ...(options.checkedVersion === undefined ? {} : { version: options.checkedVersion }),
    checkBlock: (r, d) => {
      if (options.crcTable) throw new Error('checkBlock called on a CRC-32 segment');
      return blockChecksum(d).equals(checksums[r]!);
    },
  };
  if (options.crcTable) segmentInfo.storedCrc32 = (r) => checksums[r]!.readUInt32LE(0);
  const read = async (offset: number, length: number): Promise<Buffer> => {
    await new Promise((resolve) => setTimeout(resolve, 1));
    return Buffer.from(segment.subarray(offset - DATA_OFFSET, offset - DATA_OFFSET + length));
  };
  const storage = {
    read: async (_key: string, offset: number, length: number) => read(offset, length),
    openSource: async () => ({ name: 'disk.bcseg', size: DATA_OFFSET + segment.length, stamp: '1:1', version: 'v2', read, close: async () => undefined }),
  } as unknown as Storage;
  return new Prefetcher(
    storage,
    {
      blockSize: BS,
      blockCount: 2 * RANKS,
      blocksSet: RANKS,
      isSet: (block) => block % 2 === 0 && block < 2 * RANKS,
      rank: (block) => block / 2,
      select: blockOf,
    },
    segmentInfo,
    sink,
    { chunkBytes: 256 * BS, depth: 4 },
  );
}

describe('prefetch stream stores', () => {
  it('keeps one store in flight while four chunks are read at once, and stores every block', async () => {
    let inFlight = 0;
    let most = 0;
    const stored = new Set<number>();
    const prefetcher = stream({
      has: (block) => stored.has(block),
      storeMany: async (entries) => {
        inFlight++;
        most = Math.max(most, inFlight);
        await new Promise((resolve) => setTimeout(resolve, 2));
        for (const { block } of entries) stored.add(block);
        inFlight--;
      },
    });
    await prefetcher.start();
    expect(prefetcher.progress()).toMatchObject({ state: 'done', blocksLoaded: RANKS, badBlocks: 0 });
    expect(stored.size).toBe(RANKS);
    expect(most).toBe(1);
  });

  it('checks a CRC-32 segment in one pass and hands the cache each block with its CRC', async () => {
    const stored = new Map<number, { data: Buffer; crc?: number }>();
    const prefetcher = stream(
      {
        has: (block) => stored.has(block),
        storeMany: async (entries) => {
          for (const { block, data, crc } of entries) stored.set(block, { data: Buffer.from(data), crc });
        },
      },
      { crcTable: true, damagedRank: 300 },
    );
    await prefetcher.start();
    expect(prefetcher.progress()).toMatchObject({ state: 'done', blocksLoaded: RANKS - 1, badBlocks: 1 });
    expect(stored.has(blockOf(300))).toBe(false);
    expect(stored.size).toBe(RANKS - 1);
    for (const { data, crc } of stored.values()) expect(crc).toBe(crc32(data));
  });

  it('fails the stream when a store fails, and stores nothing after it in that chunk', async () => {
    const calls: number[] = [];
    const prefetcher = stream({
      has: () => false,
      storeMany: async (entries) => {
        calls.push(entries[0]!.block);
        if (calls.length === 2) throw new Error('injected cache write failure');
      },
    });
    await prefetcher.start();
    expect(prefetcher.progress()).toMatchObject({ state: 'failed', error: 'injected cache write failure' });
    // The other chunks in flight stopped before the stream ended: nothing is stored afterwards.
    const storesAtEnd = calls.length;
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(calls.length).toBe(storesAtEnd);
    // The failing slice is its chunk's second; that chunk's third and fourth slices were never handed over.
    const chunkOf = (block: number): number => Math.floor(block / 2 / 256);
    const failedChunk = chunkOf(calls[1]!);
    expect(calls.slice(2).filter((block) => chunkOf(block) === failedChunk)).toEqual([]);
  });

  it('streams nothing from a segment republished since its map was read (another version on storage)', async () => {
    const stored = new Set<number>();
    const sink: PrefetchSink = {
      has: (block) => stored.has(block),
      storeMany: async (entries) => {
        for (const { block } of entries) stored.add(block);
      },
    };
    const stale = stream(sink, { checkedVersion: 'v1' });
    await stale.start();
    expect(stale.progress()).toMatchObject({ state: 'failed', error: 'disk.bcseg: segment was republished since its map was read; not streaming it' });
    expect(stored.size).toBe(0);
    expect(await stale.rankRead(blockOf(5), 1)).toBeUndefined();
    const current = stream(sink, { checkedVersion: 'v2' });
    await current.start();
    expect(current.progress()).toMatchObject({ state: 'done', blocksLoaded: RANKS });
  });
});
