/**
 * The prefetch stream's writes into the cache: one slice's store at a time
 * (the thread pool keeps room for the boot's own I/O), every good block
 * stored, and a failed store fails the stream, which stops its other chunks.
 * A paced stream (--prefetch-rate): its pace, one read on the link, and
 * demand chunks that do not wait for it.
 */
import { randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { Prefetcher, TokenBucket, type PrefetchSegment, type PrefetchSink } from '../../src/agent/prefetcher.js';
import { blockChecksum } from '../../src/format/segment.js';
import type { Storage } from '../../src/storage/types.js';

const BS = 512;
/** Segment blocks: 4 chunks of 256 blocks, 4 slices each. */
const RANKS = 1024;
const DATA_OFFSET = 4096;

/** Image block of each rank: every other block of the image. */
const blockOf = (rank: number): number => rank * 2;

interface StreamOptions {
  crcTable?: boolean;
  damagedRank?: number;
  checkedVersion?: string;
  /** The pace (PrefetchOptions.rateBytesPerS). */
  rateBytesPerS?: number;
  /** Each storage read takes this long (default 1 ms). */
  readMs?: number;
  /** Told of every storage read: its segment byte offset, and a promise settled when it returns. */
  onRead?: (segmentOffset: number, done: Promise<unknown>) => void;
  /** The segment's bytes (default random). */
  data?: Buffer;
}

/**
 * A stream over a random segment. `crcTable`: the segment offers its CRC-32s
 * (storedCrc32) and checkBlock must not be needed; `damagedRank`: that
 * block's data is flipped after its checksum was taken.
 */
function stream(sink: PrefetchSink, options: StreamOptions = {}): Prefetcher {
  const segment = options.data ?? randomBytes(RANKS * BS);
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
  const read = (offset: number, length: number): Promise<Buffer> => {
    const done = new Promise<Buffer>((resolve) => setTimeout(resolve, options.readMs ?? 1)).then(() =>
      Buffer.from(segment.subarray(offset - DATA_OFFSET, offset - DATA_OFFSET + length)),
    );
    options.onRead?.(offset - DATA_OFFSET, done);
    return done;
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
    { chunkBytes: CHUNK_BYTES, depth: 4, ...(options.rateBytesPerS === undefined ? {} : { rateBytesPerS: options.rateBytesPerS }) },
  );
}

const CHUNK_BYTES = 256 * BS;

/** A sink that keeps what it is given. */
function memorySink(): PrefetchSink & { stored: Set<number> } {
  const stored = new Set<number>();
  return {
    stored,
    has: (block) => stored.has(block),
    storeMany: async (entries) => {
      for (const { block } of entries) stored.add(block);
    },
  };
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

describe('paced prefetch stream (--prefetch-rate)', () => {
  it('streams at the pace: 512 KiB at 256 KiB/s, with a burst of one 128 KiB chunk, takes at least 1.5 s', async () => {
    const sink = memorySink();
    const prefetcher = stream(sink, { rateBytesPerS: 256 * 1024 });
    const started = performance.now();
    await prefetcher.start();
    const seconds = (performance.now() - started) / 1000;
    // (512 - 128) KiB after the burst, at 256 KiB/s: 1.5 s; unpaced, the stream takes a few ms.
    expect(seconds).toBeGreaterThanOrEqual(1.45);
    expect(prefetcher.progress()).toMatchObject({ state: 'done', blocksLoaded: RANKS, bytesRead: RANKS * BS, rateBytesPerS: 256 * 1024 });
    expect(prefetcher.progress().pacedMs).toBeGreaterThanOrEqual(1400);
    expect(sink.stored.size).toBe(RANKS);
  });

  it('keeps one stream read on the link (not --prefetch-depth), and starts none while a demand read is on it', async () => {
    // A pace far above what the 40 ms reads allow: only the one-read rule holds the stream back.
    const events: string[] = [];
    let streamReads = 0;
    let demandReads = 0;
    let most = 0;
    const demandOffset = 3 * CHUNK_BYTES;
    const prefetcher = stream(memorySink(), {
      rateBytesPerS: 1024 ** 3,
      readMs: 40,
      onRead: (offset, done) => {
        const demand = offset === demandOffset;
        if (demand) demandReads++;
        else {
          if (demandReads > 0) events.push(`stream read of chunk ${offset / CHUNK_BYTES} started during a demand read`);
          streamReads++;
          most = Math.max(most, streamReads);
        }
        void done.then(() => (demand ? demandReads-- : streamReads--));
      },
    });
    const finished = prefetcher.start();
    await new Promise((resolve) => setTimeout(resolve, 10));
    const data = await prefetcher.demandChunk(blockOf(3 * 256 + 5));
    expect(data).toBeDefined();
    await finished;
    expect(prefetcher.progress()).toMatchObject({ state: 'done', blocksLoaded: RANKS, chunksDemanded: 1 });
    expect(most).toBe(1);
    expect(events).toEqual([]);
  });

  it('serves a demand read during a paced stream without waiting for the pace, and stops at once when told', async () => {
    // One 128 KiB chunk per second: the last chunk's turn would come about 3 s after the start.
    const data = randomBytes(RANKS * BS);
    const prefetcher = stream(memorySink(), { rateBytesPerS: CHUNK_BYTES, data });
    const finished = prefetcher.start();
    // The burst's chunk is read at once; the second waits for the bucket.
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(prefetcher.progress()).toMatchObject({ bytesRead: CHUNK_BYTES });
    // A block of that second chunk, the one the stream waits to read: not claimed yet, so a demand chunk now.
    const rank = 256 + 17;
    const asked = performance.now();
    const block = await prefetcher.demandChunk(blockOf(rank));
    const waitedMs = performance.now() - asked;
    expect(block?.equals(data.subarray(rank * BS, (rank + 1) * BS))).toBe(true);
    // Served by its own read (1 ms here), long before the stream's next turn (about 900 ms away).
    expect(waitedMs).toBeLessThan(500);
    expect(prefetcher.progress()).toMatchObject({ chunksDemanded: 1, bytesRead: 2 * CHUNK_BYTES });
    // stop() ends the wait for the bucket: the stream ends without reading the chunks left.
    prefetcher.stop();
    await finished;
    expect(prefetcher.progress()).toMatchObject({ state: 'stopped', bytesRead: 2 * CHUNK_BYTES });
    expect(prefetcher.progress().durationMs!).toBeLessThan(900);
  });

  it('counts a demand chunk against the pace: the stream waits it back, and the whole segment still takes at least 1.5 s', async () => {
    const sink = memorySink();
    const prefetcher = stream(sink, { rateBytesPerS: 256 * 1024 });
    const started = performance.now();
    const finished = prefetcher.start();
    await new Promise((resolve) => setTimeout(resolve, 10));
    const block = await prefetcher.demandChunk(blockOf(RANKS - 1));
    expect(block).toBeDefined();
    // The demand chunk was not paced: served by its own read, long before the stream's next turn.
    expect(performance.now() - started).toBeLessThan(400);
    await finished;
    // Burst chunk, then the demanded 128 KiB and two more chunks at 256 KiB/s: 1.5 s (1 s if the demand were free).
    expect((performance.now() - started) / 1000).toBeGreaterThanOrEqual(1.45);
    expect(prefetcher.progress()).toMatchObject({ state: 'done', blocksLoaded: RANKS, chunksDemanded: 1 });
    expect(sink.stored.size).toBe(RANKS);
  });

  it('fails the paced stream when a store fails, while it waits for the bucket, and stores nothing afterwards', async () => {
    let calls = 0;
    const prefetcher = stream(
      {
        has: () => false,
        storeMany: async () => {
          calls++;
          if (calls === 2) throw new Error('injected cache write failure');
        },
      },
      { rateBytesPerS: CHUNK_BYTES },
    );
    await prefetcher.start();
    // The failure woke the stream from its wait for the second chunk's turn (about 1 s away).
    expect(prefetcher.progress()).toMatchObject({ state: 'failed', error: 'injected cache write failure', bytesRead: CHUNK_BYTES });
    expect(prefetcher.progress().durationMs!).toBeLessThan(900);
    const storesAtEnd = calls;
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(calls).toBe(storesAtEnd);
  });

  it('spends at most burst + rate x t (token bucket on a fake clock)', () => {
    let now = 0;
    const bucket = new TokenBucket(1000, 500, () => now);
    expect(bucket.waitMs(500)).toBe(0);
    bucket.spend(500);
    expect(bucket.waitMs(500)).toBe(500);
    now = 200;
    expect(bucket.waitMs(500)).toBe(300);
    expect(bucket.waitMs(100)).toBe(0);
    // An idle bucket fills up to its burst, no more.
    now = 10_000;
    bucket.spend(500);
    expect(bucket.waitMs(1)).toBe(1);
    // Overdrawn (a demand chunk does not wait): the debt is paid back first.
    bucket.spend(1000);
    expect(bucket.waitMs(500)).toBe(1500);
    now = 11_500;
    expect(bucket.waitMs(500)).toBe(0);
  });
});
