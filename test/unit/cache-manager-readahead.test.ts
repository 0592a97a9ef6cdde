/**
 * The miss path of the cache manager: sequential readahead on guest misses
 * (fewer storage requests for a boot loader's serial reads), the miss window
 * (one request for the blocks around a scattered miss) and batched cache
 * writes of missed blocks (MissWriter).
 */
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import type { BlockCache } from '../../src/agent/block-cache.js';
import { memoryCache } from '../helpers/memory-cache.js';
import { CacheManager } from '../../src/agent/cache-manager.js';
import { MissWriter } from '../../src/agent/miss-writer.js';
import type { DiskImage } from '../../src/image/types.js';

const BS = 4096;
const BLOCKS = 1024; // 4 MiB image

function setup(readaheadBytes: number, missWindowBytes = 0) {
  const bytes = randomBytes(BLOCKS * BS);
  const imageReads: Array<[number, number]> = [];
  const image: DiskImage = {
    format: 'raw',
    name: 'disk',
    virtualSize: bytes.length,
    identity: 'ab'.repeat(32),
    read: async (offset, length) => {
      imageReads.push([offset, length]);
      await sleep(1);
      return Buffer.from(bytes.subarray(offset, offset + length));
    },
    extents: async () => [],
    layers: () => [
      { name: 'disk', format: 'raw', virtualSize: bytes.length, fileSize: bytes.length, allocatedBytes: bytes.length, stamp: '1:1', metadata: 'cd'.repeat(32) },
    ],
    close: async () => undefined,
  };
  const { cache, cached, batches } = memoryCache(BS);
  const counters = { cache: 0, prefetch: 0, storage: 0 };
  const service = new CacheManager('disk', image, cache, {
    bootPolicy: { idleMs: 60_000, windowMs: 600_000, minReads: 1, maxShare: 0, maxShareFloor: 0 },
    cacheMisses: true,
    counters,
    readaheadBytes,
    missWindowBytes,
    onBootEnd: () => undefined,
  });
  return { bytes, service, imageReads, cached, batches, counters };
}

/** A boot loader's pattern: 16 KiB serial reads through 2 MiB. */
async function serialReads(service: CacheManager, bytes: Buffer, start: number, total: number): Promise<void> {
  for (let off = start; off < start + total; off += 16 * 1024) {
    const got = await service.read(off, 16 * 1024);
    expect(got.equals(bytes.subarray(off, off + 16 * 1024))).toBe(true);
  }
}

describe('sequential readahead on misses', () => {
  it('turns serial reads into a few large storage reads, with the same bytes', async () => {
    const off = setup(0);
    off.service.open();
    await serialReads(off.service, off.bytes, 0, 2 * 1024 * 1024);
    expect(off.imageReads.length).toBe(128);

    const on = setup(1024 * 1024);
    on.service.open();
    await serialReads(on.service, on.bytes, 0, 2 * 1024 * 1024);
    expect(on.imageReads.length).toBeLessThan(20);
    // Readahead blocks are not counted as guest misses.
    expect(on.counters.storage).toBeLessThan(off.counters.storage);
  });

  it('does not read ahead for random reads', async () => {
    const t = setup(1024 * 1024);
    t.service.open();
    const blocks = [5, 700, 33, 512, 90, 1000, 250];
    for (const b of blocks) await t.service.read(b * BS, BS);
    expect(t.imageReads.length).toBe(blocks.length);
    expect(t.imageReads.every(([, len]) => len === BS)).toBe(true);
  });

  it('never reads past the end of the image', async () => {
    const t = setup(2 * 1024 * 1024);
    t.service.open();
    await serialReads(t.service, t.bytes, BLOCKS * BS - 256 * 1024, 256 * 1024);
    await sleep(20);
    for (const [o, len] of t.imageReads) expect(o + len).toBeLessThanOrEqual(BLOCKS * BS);
  });

  it('reads ahead only for guest reads, not for unrecorded ones (rebuilds)', async () => {
    const t = setup(1024 * 1024);
    for (let off = 0; off < 512 * 1024; off += 16 * 1024) await t.service.readUnrecorded(off, 16 * 1024);
    expect(t.imageReads.length).toBe(32);
  });
});

describe('miss window', () => {
  const WINDOW = 64 * 1024; // 16 blocks

  it('reads the aligned window around a miss in one request, serves the reads after it from the cache, same bytes', async () => {
    const t = setup(0, WINDOW);
    t.service.open();
    // Scattered small reads within two windows: [16, 32) and [512, 528).
    for (const b of [20, 17, 30, 16, 31, 515, 512, 527]) {
      const got = await t.service.read(b * BS + 100, 500);
      expect(got.equals(t.bytes.subarray(b * BS + 100, b * BS + 600))).toBe(true);
      await sleep(10); // the window's blocks are written to the cache (MissWriter)
    }
    await sleep(20);
    expect(t.imageReads).toEqual([[16 * BS, WINDOW], [512 * BS, WINDOW]]);
    // Only the blocks guests read count as their misses; the widening is cached as 'other'.
    expect(t.counters.storage).toBe(2);
    expect(t.counters.cache).toBe(6);
  });

  it('widens only over blocks nothing else brings: a cached neighbour ends the window', async () => {
    const t = setup(0, WINDOW);
    t.service.open();
    await t.service.readUnrecorded(40 * BS, BS); // unrecorded: no widening, block 40 cached
    await sleep(20);
    await t.service.read(36 * BS, BS);
    await sleep(20);
    // Window [32, 48) from block 36, stopped before the cached block 40.
    expect(t.imageReads).toEqual([[40 * BS, BS], [32 * BS, 8 * BS]]);
    for (let b = 32; b < 48; b++) {
      const got = await t.service.read(b * BS, BS);
      expect(got.equals(t.bytes.subarray(b * BS, (b + 1) * BS))).toBe(true);
    }
    await sleep(20);
    expect(t.imageReads.length).toBe(3); // blocks 41..47: one more request
  });

  it('never reads past the end of the image, and is off at 0', async () => {
    const t = setup(0, 1024 * 1024);
    t.service.open();
    await t.service.read((BLOCKS - 3) * BS, BS);
    await sleep(20);
    expect(t.imageReads).toEqual([[(BLOCKS - 256) * BS, 256 * BS]]);
    const off = setup(0, 0);
    off.service.open();
    await off.service.read(5 * BS, BS);
    expect(off.imageReads).toEqual([[5 * BS, BS]]);
  });
});

describe('MissWriter', () => {
  it('writes queued blocks of one space as one batch after the delay', async () => {
    const { cache, batches, cached } = memoryCache(BS);
    const writer = new MissWriter(cache, { delayMs: 5, maxBlocks: 100 });
    const done = [1, 2, 3].map((b) => writer.queue('s1', b, Buffer.alloc(BS, b), 'other'));
    void writer.queue('s2', 9, Buffer.alloc(BS, 9), 'boot');
    expect(batches).toEqual([]);
    await Promise.all(done);
    expect(batches).toContainEqual({ space: 's1', blocks: [1, 2, 3] });
    expect(cached.get('s1/2')?.[0]).toBe(2);
    await writer.flush();
    expect(batches).toContainEqual({ space: 's2', blocks: [9] });
  });

  it('writes a batch at once when it is full (bounded memory)', async () => {
    const { cache, batches } = memoryCache(BS);
    const writer = new MissWriter(cache, { delayMs: 60_000, maxBlocks: 4 });
    const done = [0, 1, 2, 3].map((b) => writer.queue('s', b, Buffer.alloc(BS), 'other'));
    await Promise.all(done);
    expect(batches).toEqual([{ space: 's', blocks: [0, 1, 2, 3] }]);
    void writer.queue('s', 4, Buffer.alloc(BS), 'other');
    await writer.flush();
    expect(batches.length).toBe(2);
  });

  it('settles even when the cache fails', async () => {
    const { cache } = memoryCache(BS);
    const failing: BlockCache = { ...cache, putMany: async () => { throw new Error('disk full'); } };
    const writer = new MissWriter(failing, { delayMs: 1, maxBlocks: 10 });
    await expect(writer.queue('s', 1, Buffer.alloc(BS), 'other')).resolves.toBeUndefined();
  });
});
