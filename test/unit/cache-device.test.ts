import { mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { CacheDevice, type CacheLogger } from '../../src/agent/cache/cache-device.js';
import { AgentError, BootcacheError } from '../../src/errors.js';

const BS = 4096;
const dirs: string[] = [];

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'bc-cache-'));
  dirs.push(dir);
  return dir;
}

afterAll(async () => {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});

function collectingLogger(): CacheLogger & { lines: string[] } {
  const lines: string[] = [];
  return { lines, warn: (m) => lines.push(`warn: ${m}`), info: (m) => lines.push(`info: ${m}`) };
}

/** A block whose bytes name its key and version. */
function block(space: string, index: number, version = 0, size = BS): Buffer {
  const buf = Buffer.alloc(size);
  const tag = `${space}/${index}/v${version};`;
  for (let at = 0; at < size; at += tag.length) buf.write(tag, at, 'latin1');
  return buf;
}

async function openCache(dir: string, blocks: number, extra: { blockSize?: number; logger?: CacheLogger } = {}): Promise<CacheDevice> {
  const bs = extra.blockSize ?? BS;
  return CacheDevice.open(dir, { capacityBytes: blocks * bs, logger: extra.logger ?? collectingLogger(), ...extra });
}

/** Which of the given blocks of a space are cached. */
function present(cache: CacheDevice, space: string, blocks: number[]): number[] {
  return blocks.filter((b) => cache.has(space, b));
}

const range = (from: number, to: number): number[] => Array.from({ length: to - from }, (_, i) => from + i);

describe('CacheDevice basics', () => {
  it('reads runs of blocks with getRun, in consecutive slots or not, and reports which were served', async () => {
    const cache = await openCache(await tempDir(), 64);
    await cache.putMany('aa', range(10, 19).map((b) => ({ block: b, data: block('aa', b) })), 'boot'); // slots in block order
    await cache.put('aa', 20, block('aa', 20), 'other');
    await cache.put('aa', 19, block('aa', 19), 'other'); // 19 and 20 in reversed slots
    const into = Buffer.alloc(14 * BS);
    const served = await cache.getRun('aa', 8, 14, into); // blocks 8..21
    expect(served).toEqual([false, false, true, true, true, true, true, true, true, true, true, true, true, false]);
    for (let b = 10; b <= 20; b++) expect(into.subarray((b - 8) * BS, (b - 7) * BS).equals(block('aa', b))).toBe(true);
    expect(await cache.getRun('zz', 0, 2, Buffer.alloc(2 * BS))).toEqual([false, false]);
    await expect(cache.getRun('aa', 0, 2, Buffer.alloc(BS))).rejects.toThrow(/target buffer is 4096 bytes, not 2 blocks/);
    const before = cache.stats();
    await cache.getRun('aa', 10, 4, Buffer.alloc(4 * BS));
    expect(cache.stats().hits - before.hits).toBe(4);
    await cache.close();
  });

  it('returns exactly the bytes put, and misses what was never put', async () => {
    const cache = await openCache(await tempDir(), 64);
    await cache.put('aa', 0, block('aa', 0), 'other');
    await cache.put('aa', 7, block('aa', 7), 'boot');
    await cache.put('bb', 0, block('bb', 0), 'other');
    expect(cache.has('aa', 7)).toBe(true);
    expect(cache.has('aa', 1)).toBe(false);
    expect((await cache.get('aa', 0))?.equals(block('aa', 0))).toBe(true);
    expect((await cache.get('aa', 7))?.equals(block('aa', 7))).toBe(true);
    expect((await cache.get('bb', 0))?.equals(block('bb', 0))).toBe(true);
    expect(await cache.get('aa', 1)).toBeUndefined();
    expect(await cache.get('cc', 0)).toBeUndefined();
    const into = Buffer.alloc(BS);
    expect(await cache.get('aa', 7, into)).toBe(into);
    expect(into.equals(block('aa', 7))).toBe(true);
    const s = cache.stats();
    expect(s).toMatchObject({ blocks: 3, bootBlocks: 1, hits: 4, misses: 2, usedBytes: 3 * BS, capacityBytes: 64 * BS });
    await cache.close();
  });

  it('replaces a block put again with other bytes, and keeps one copy of the same bytes', async () => {
    const cache = await openCache(await tempDir(), 32);
    await cache.put('aa', 1, block('aa', 1, 0), 'other');
    await cache.put('aa', 1, block('aa', 1, 0), 'boot'); // same bytes: now a boot block, no second slot
    expect(cache.stats()).toMatchObject({ blocks: 1, bootBlocks: 1 });
    await cache.put('aa', 1, block('aa', 1, 1), 'other');
    expect((await cache.get('aa', 1))?.equals(block('aa', 1, 1))).toBe(true);
    expect(cache.stats()).toMatchObject({ blocks: 1, bootBlocks: 1 }); // stays a boot block
    await cache.close();
  });

  it('concurrent puts of one key use one slot and leave one of the versions', async () => {
    const dir = await tempDir();
    const cache = await openCache(dir, 32);
    const versions = range(0, 40).map((v) => block('aa', 5, v));
    await Promise.all(versions.map((data) => cache.put('aa', 5, data, 'other')));
    expect(cache.stats().blocks).toBe(1);
    const got = await cache.get('aa', 5);
    expect(versions.some((v) => v.equals(got!))).toBe(true);
    // Every other slot is still usable: fill the cache completely.
    for (let b = 0; b < 31; b++) await cache.put('bb', b, block('bb', b), 'other');
    expect(cache.stats()).toMatchObject({ blocks: 32, evictions: 0 });
    await cache.close();
    const again = await openCache(dir, 32);
    expect((await again.get('aa', 5))?.equals(got!)).toBe(true);
    await again.close();
  });

  it('persists blocks, boot marks and recency across close and open', async () => {
    const dir = await tempDir();
    let cache = await openCache(dir, 64);
    for (let b = 0; b < 10; b++) await cache.put('aa', b, block('aa', b), b < 5 ? 'boot' : 'other');
    cache.markBooted('aa');
    await cache.put('bb', 3, block('bb', 3), 'boot');
    await cache.close();
    cache = await openCache(dir, 64);
    for (let b = 0; b < 10; b++) expect((await cache.get('aa', b))?.equals(block('aa', b))).toBe(true);
    expect((await cache.get('bb', 3))?.equals(block('bb', 3))).toBe(true);
    const s = cache.stats();
    expect(s).toMatchObject({ blocks: 11, bootBlocks: 6 });
    const aa = s.spaces.find((x) => x.space === 'aa');
    expect(aa).toMatchObject({ blocks: 10, bootBlocks: 5 });
    expect(aa?.lastBootedAt).toBeGreaterThan(Date.now() - 60_000);
    await cache.compact();
    await cache.close();
    cache = await openCache(dir, 64);
    expect(cache.stats()).toMatchObject({ blocks: 11, bootBlocks: 6 });
    expect(cache.stats().spaces.find((x) => x.space === 'aa')?.lastBootedAt).toBe(aa?.lastBootedAt);
    for (let b = 0; b < 10; b++) expect((await cache.get('aa', b))?.equals(block('aa', b))).toBe(true);
    await cache.close();
  });

  it('never grows past its capacity', async () => {
    const dir = await tempDir();
    const cache = await CacheDevice.open(dir, { capacityBytes: 20 * BS + 1000, logger: collectingLogger() });
    for (let b = 0; b < 100; b++) await cache.put('aa', b, block('aa', b), b % 4 === 0 ? 'boot' : 'other');
    const s = cache.stats();
    expect(s.capacityBytes).toBe(20 * BS);
    expect(s.usedBytes).toBeLessThanOrEqual(s.capacityBytes);
    expect(s.blocks).toBe(20);
    expect(s.evictions).toBe(80);
    expect((await stat(join(dir, 'cache.data'))).size).toBe(20 * BS);
    let hits = 0;
    for (let b = 0; b < 100; b++) {
      const got = await cache.get('aa', b);
      if (got) {
        hits++;
        expect(got.equals(block('aa', b))).toBe(true);
      }
    }
    expect(hits).toBe(20);
    await cache.close();
    expect((await stat(join(dir, 'cache.data'))).size).toBe(20 * BS);
  });

  it('evicts other blocks first, least recently used first', async () => {
    const cache = await openCache(await tempDir(), 16);
    for (let b = 0; b < 8; b++) await cache.put('aa', b, block('aa', b), 'boot');
    for (let b = 8; b < 16; b++) await cache.put('aa', b, block('aa', b), 'other');
    await cache.get('aa', 8); // 8 becomes the most recently used 'other' block
    for (let b = 16; b < 20; b++) await cache.put('aa', b, block('aa', b), 'other');
    expect(present(cache, 'aa', range(0, 20))).toEqual([...range(0, 9), ...range(13, 20)]);
    await cache.close();
  });

  it('then evicts boot blocks of the least recently booted space first', async () => {
    const cache = await openCache(await tempDir(), 16);
    cache.markBooted('aa');
    for (let b = 0; b < 6; b++) await cache.put('aa', b, block('aa', b), 'boot');
    cache.markBooted('bb');
    for (let b = 0; b < 6; b++) await cache.put('bb', b, block('bb', b), 'boot');
    cache.markBooted('cc');
    for (let b = 0; b < 4; b++) await cache.put('cc', b, block('cc', b), 'boot');
    cache.markBooted('aa'); // aa booted again: bb is now the least recently booted
    await cache.get('bb', 0); // within bb, 0 becomes the most recently used
    for (let b = 0; b < 3; b++) await cache.put('dd', b, block('dd', b), 'boot');
    expect(present(cache, 'bb', range(0, 6))).toEqual([0, 4, 5]);
    expect(present(cache, 'aa', range(0, 6))).toEqual(range(0, 6));
    expect(present(cache, 'cc', range(0, 4))).toEqual(range(0, 4));
    expect(present(cache, 'dd', range(0, 3))).toEqual(range(0, 3));
    // 'other' blocks go before any boot block.
    await cache.put('ee', 0, block('ee', 0), 'other'); // the cache holds boot blocks only: bb 4 goes
    await cache.put('ee', 1, block('ee', 1), 'other'); // ee 0 goes, not a boot block
    expect(present(cache, 'ee', range(0, 2))).toEqual([1]);
    expect(present(cache, 'bb', range(0, 6))).toEqual([0, 5]);
    await cache.close();
  });

  it('keeps the eviction order across a restart', async () => {
    const dir = await tempDir();
    let cache = await openCache(dir, 16);
    cache.markBooted('aa');
    for (let b = 0; b < 8; b++) await cache.put('aa', b, block('aa', b), 'boot');
    cache.markBooted('bb');
    for (let b = 0; b < 8; b++) await cache.put('bb', b, block('bb', b), 'boot');
    await cache.compact();
    cache.markBooted('aa'); // journal only
    await cache.close();
    cache = await openCache(dir, 16);
    for (let b = 0; b < 2; b++) await cache.put('cc', b, block('cc', b), 'boot');
    expect(present(cache, 'bb', range(0, 8))).toEqual(range(2, 8));
    expect(present(cache, 'aa', range(0, 8))).toEqual(range(0, 8));
    await cache.close();
  });

  it('invalidateSpace drops every block of the space, durably', async () => {
    const dir = await tempDir();
    let cache = await openCache(dir, 32);
    for (let b = 0; b < 6; b++) await cache.put('aa', b, block('aa', b), b < 3 ? 'boot' : 'other');
    await cache.put('bb', 0, block('bb', 0), 'boot');
    await cache.invalidateSpace('aa');
    await cache.invalidateSpace('ffff'); // unknown: nothing to do
    expect(present(cache, 'aa', range(0, 6))).toEqual([]);
    expect(await cache.get('aa', 0)).toBeUndefined();
    expect(cache.stats()).toMatchObject({ blocks: 1, bootBlocks: 1 });
    await cache.put('aa', 9, block('aa', 9, 2), 'other'); // the space is usable again
    await cache.close();
    cache = await openCache(dir, 32);
    expect(present(cache, 'aa', range(0, 10))).toEqual([9]);
    expect((await cache.get('bb', 0))?.equals(block('bb', 0))).toBe(true);
    await cache.close();
  });

  it('reports stats per space', async () => {
    const cache = await openCache(await tempDir(), 32);
    await cache.put('aa', 0, block('aa', 0), 'boot');
    await cache.put('aa', 1, block('aa', 1), 'other');
    cache.markBooted('bb');
    await cache.get('aa', 0);
    await cache.get('aa', 5);
    const s = cache.stats();
    expect(s).toMatchObject({
      blockSize: BS,
      capacityBytes: 32 * BS,
      usedBytes: 2 * BS,
      blocks: 2,
      bootBlocks: 1,
      hits: 1,
      misses: 1,
      evictions: 0,
      checksumFailures: 0,
    });
    expect(s.spaces).toEqual([
      { space: 'aa', blocks: 2, bootBlocks: 1 },
      { space: 'bb', blocks: 0, bootBlocks: 0, lastBootedAt: expect.any(Number) },
    ]);
    await cache.close();
  });

  it('grows and shrinks with the configured capacity', async () => {
    const dir = await tempDir();
    let cache = await openCache(dir, 32);
    for (let b = 0; b < 32; b++) await cache.put('aa', b, block('aa', b), 'other');
    await cache.close();
    cache = await openCache(dir, 64);
    expect(cache.stats()).toMatchObject({ blocks: 32, capacityBytes: 64 * BS });
    for (let b = 32; b < 64; b++) await cache.put('aa', b, block('aa', b), 'other');
    expect(cache.stats().evictions).toBe(0);
    await cache.close();
    expect((await stat(join(dir, 'cache.data'))).size).toBe(64 * BS);
    cache = await openCache(dir, 20);
    const s = cache.stats();
    expect(s.capacityBytes).toBe(20 * BS);
    expect(s.blocks).toBeLessThanOrEqual(20);
    for (let b = 0; b < 64; b++) {
      const got = await cache.get('aa', b);
      if (got) expect(got.equals(block('aa', b))).toBe(true);
    }
    await cache.close();
    expect((await stat(join(dir, 'cache.data'))).size).toBe(20 * BS);
  });

  it('uses the block size of the directory and refuses another one', async () => {
    const dir = await tempDir();
    let cache = await openCache(dir, 32, { blockSize: 8192 });
    await cache.put('aa', 0, block('aa', 0, 0, 8192), 'other');
    await cache.close();
    const err = await openCache(dir, 32, { blockSize: 4096 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AgentError);
    expect((err as Error).message).toMatch(/holds 8192-byte blocks, not 4096/);
    cache = await CacheDevice.open(dir, { capacityBytes: 32 * 8192, logger: collectingLogger() });
    expect(cache.blockSize).toBe(8192);
    expect((await cache.get('aa', 0))?.equals(block('aa', 0, 0, 8192))).toBe(true);
    await cache.close();
  });

  it('rejects bad options and arguments with one-line errors', async () => {
    const dir = await tempDir();
    await expect(CacheDevice.open(dir, { capacityBytes: 7 * BS })).rejects.toThrow(/too small: it must hold at least 8 blocks of 4096 bytes/);
    await expect(CacheDevice.open(dir, { capacityBytes: -5 })).rejects.toThrow(AgentError);
    await expect(CacheDevice.open(dir, { capacityBytes: 1e6, blockSize: 3000 })).rejects.toThrow(/not a power of two/);
    await expect(CacheDevice.open(dir, { capacityBytes: 2 ** 50 })).rejects.toThrow(/too large/);
    const file = join(dir, 'plain-file');
    await writeFile(file, 'x');
    await expect(CacheDevice.open(file, { capacityBytes: 1e6 })).rejects.toThrow(/is not a directory/);
    await expect(CacheDevice.open(join(file, 'sub'), { capacityBytes: 1e6 })).rejects.toThrow(BootcacheError);
    await expect(CacheDevice.open('/proc/bootcache-cache-test', { capacityBytes: 1e6 })).rejects.toThrow(BootcacheError);

    const cache = await openCache(dir, 32);
    await expect(cache.put('aa', 0, Buffer.alloc(100), 'other')).rejects.toThrow(/100 bytes of data, expected the block size 4096/);
    await expect(cache.put('AA', 0, block('x', 0), 'other')).rejects.toThrow(/not a lowercase hex string/);
    await expect(cache.put('', 0, block('x', 0), 'other')).rejects.toThrow(AgentError);
    await expect(cache.put('aa', -1, block('x', 0), 'other')).rejects.toThrow(/not a block index/);
    await expect(cache.put('aa', 1.5, block('x', 0), 'other')).rejects.toThrow(/not a block index/);
    await expect(cache.get('aa', 0, Buffer.alloc(10))).rejects.toThrow(/target buffer/);
    expect(() => cache.markBooted('not hex')).toThrow(AgentError);
    expect(cache.stats().blocks).toBe(0);
    await cache.close();
    await expect(cache.get('aa', 0)).rejects.toThrow(/closed/);
    await expect(cache.put('aa', 0, block('aa', 0), 'other')).rejects.toThrow(/closed/);
    expect(cache.has('aa', 0)).toBe(false);
  });

  it('refuses a directory in use, and a lock file naming a dead process is no obstacle', async () => {
    const dir = await tempDir();
    const cache = await openCache(dir, 32);
    await expect(openCache(dir, 32)).rejects.toThrow(/in use by this process/);
    await cache.close();
    await writeFile(join(dir, 'cache.lock'), '999999999\n'); // no such process
    const again = await openCache(dir, 32);
    await again.close();
    expect(await readdir(dir)).not.toContain('cache.lock');
  });

  it('opens over a lock file with its own pid that it does not hold (pid 1 in a container, killed and restarted), but not one it holds under another path', async () => {
    const dir = await tempDir();
    await writeFile(join(dir, 'cache.lock'), `${process.pid}\n`);
    const cache = await openCache(dir, 32);
    const link = `${dir}-link`;
    dirs.push(link);
    await symlink(dir, link);
    await expect(openCache(link, 32)).rejects.toThrow(/in use by this process \(opened twice\)/);
    await cache.close();
    expect(await readdir(dir)).not.toContain('cache.lock');
  });

  it('reads hits through the thread pool for a while once synchronous reads turn slow, like disk reads', async () => {
    const cache = await openCache(await tempDir(), 64);
    for (let b = 0; b < 8; b++) await cache.put('aa', b, block('aa', b), 'other');
    // Every clock reading is 2.5 ms after the last: each synchronous read looks like a disk read.
    let clock = performance.now();
    const spy = vi.spyOn(performance, 'now').mockImplementation(() => (clock += 2.5));
    try {
      for (let b = 0; b < 2; b++) expect((await cache.get('aa', b))?.equals(block('aa', b))).toBe(true);
      expect(cache.stats().slowSyncReads).toBe(0); // one or two outliers do not count
      expect((await cache.get('aa', 2))?.equals(block('aa', 2))).toBe(true);
      expect(cache.stats().slowSyncReads).toBe(1);
      // Thread-pool reads now: same bytes, and no more verdicts for a second.
      for (let b = 3; b < 8; b++) expect((await cache.get('aa', b))?.equals(block('aa', b))).toBe(true);
      const into = Buffer.alloc(8 * BS);
      expect(await cache.getRun('aa', 0, 8, into)).toEqual(Array(8).fill(true));
      expect(cache.stats().slowSyncReads).toBe(1);
      clock += 2000; // a second later, synchronous reads are tried again
      for (let b = 0; b < 3; b++) await cache.get('aa', b);
      expect(cache.stats().slowSyncReads).toBe(2);
    } finally {
      spy.mockRestore();
    }
    await cache.close();
  });

  it('serves the same bytes with synchronous hit reads off', async () => {
    const cache = await CacheDevice.open(await tempDir(), { capacityBytes: 64 * BS, syncReads: false, logger: collectingLogger() });
    await cache.putMany('aa', range(0, 6).map((b) => ({ block: b, data: block('aa', b) })), 'other');
    const into = Buffer.alloc(6 * BS);
    expect(await cache.getRun('aa', 0, 6, into)).toEqual(Array(6).fill(true));
    for (let b = 0; b < 6; b++) expect(into.subarray(b * BS, (b + 1) * BS).equals(block('aa', b))).toBe(true);
    expect((await cache.get('aa', 5))?.equals(block('aa', 5))).toBe(true);
    await cache.close();
  });

  it('a get racing the reuse of its slot never returns the new occupant', async () => {
    const cache = await CacheDevice.open(await tempDir(), { capacityBytes: 16 * BS, verifyReads: false, logger: collectingLogger() });
    await cache.put('aa', 0, block('aa', 0), 'other');
    // Hold the next read of the data file until the slot has been reused.
    type ReadDone = (err: NodeJS.ErrnoException | null, bytesRead: number) => void;
    const seam = (cache as unknown as { reader: { readSlot(buf: Buffer, slot: number, done: ReadDone): void } }).reader;
    const realRead = seam.readSlot.bind(seam);
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    let reads = 0;
    seam.readSlot = (buf, slot, done) => {
      if (reads++ === 0) void gate.then(() => realRead(buf, slot, done));
      else realRead(buf, slot, done);
    };
    const racing = cache.get('aa', 0);
    await cache.invalidateSpace('aa'); // slot 0 is free once this is durable...
    await cache.put('bb', 0, block('bb', 0), 'other'); // ...and reused at once
    expect(cache.stats().blocks).toBe(1);
    release();
    expect(await racing).toBeUndefined();
    expect((await cache.get('bb', 0))?.equals(block('bb', 0))).toBe(true);
    await cache.close();
  });

  it('serves many concurrent gets and puts', async () => {
    const cache = await openCache(await tempDir(), 24);
    const written = new Map<string, Buffer[]>();
    const ops: Promise<void>[] = [];
    for (let i = 0; i < 400; i++) {
      const key = i % 40;
      if (i % 3 === 0) {
        const data = block('aa', key, i);
        written.set(String(key), [...(written.get(String(key)) ?? []), data]);
        ops.push(cache.put('aa', key, data, i % 2 ? 'boot' : 'other'));
      } else {
        ops.push(
          cache.get('aa', key).then((got) => {
            if (got) expect((written.get(String(key)) ?? []).some((d) => d.equals(got))).toBe(true);
          }),
        );
      }
    }
    await Promise.all(ops);
    expect(cache.stats().usedBytes).toBeLessThanOrEqual(24 * BS);
    await cache.close();
  });
});

describe('CacheDevice closeAndRemoveIfCreated (a start that failed)', () => {
  it('removes a cache directory this open created, and nothing else', async () => {
    const root = await tempDir();
    const fresh = join(root, 'new', 'cache');
    const created = await openCache(fresh, 32);
    await created.put('aa', 1, block('aa', 1), 'other');
    await created.closeAndRemoveIfCreated();
    await expect(stat(fresh)).rejects.toThrow(/ENOENT/);
    // The parent it had to create stays: only the cache directory itself is removed.
    expect(await readdir(join(root, 'new'))).toEqual([]);
  });

  it('leaves a directory that existed before, also when named through a missing one and ".."', async () => {
    const root = await tempDir();
    const existing = join(root, 'existing');
    await mkdir(existing);
    await writeFile(join(existing, 'precious'), 'x');
    // A template string: join() would fold "missing/.." away.
    for (const path of [existing, `${root}/missing/../existing`]) {
      const cache = await openCache(path, 32);
      await cache.closeAndRemoveIfCreated();
      expect((await readdir(existing)).sort()).toEqual(['cache.data', 'cache.journal', 'cache.snap', 'precious']);
    }
    // A reopen finds its cache intact.
    const again = await openCache(existing, 32);
    await again.close();
  });

  it('removes nothing once its lock file was replaced, and never removes a lock file that is not its own', async () => {
    const root = await tempDir();
    const fresh = join(root, 'replaced');
    const cache = await openCache(fresh, 32);
    // Someone removed the lock file and made another: the directory is no longer known to be ours alone.
    await rm(join(fresh, 'cache.lock'));
    await writeFile(join(fresh, 'cache.lock'), '1\n');
    await cache.closeAndRemoveIfCreated();
    expect((await readdir(fresh)).sort()).toEqual(['cache.data', 'cache.journal', 'cache.lock', 'cache.snap']);
    expect(await readFile(join(fresh, 'cache.lock'), 'latin1')).toBe('1\n');
  });

  it('never removes a cache another process holds: an open that fails on the lock has nothing to remove', async () => {
    const root = await tempDir();
    const shared = join(root, 'shared');
    const holder = await openCache(shared, 32);
    await holder.put('aa', 2, block('aa', 2), 'other');
    await expect(openCache(shared, 32)).rejects.toThrow(/in use/);
    expect((await holder.get('aa', 2))?.equals(block('aa', 2))).toBe(true);
    await holder.close();
    expect(await readdir(shared)).toContain('cache.data');
  });
});

describe('CacheDevice putMany', () => {
  const entries = (space: string, blocks: number[], version = 0): { block: number; data: Buffer }[] =>
    blocks.map((b) => ({ block: b, data: block(space, b, version) }));

  it('round-trips a batch, durably', async () => {
    const dir = await tempDir();
    let cache = await openCache(dir, 256);
    await cache.putMany('aa', entries('aa', range(0, 100)), 'boot');
    expect(cache.stats()).toMatchObject({ blocks: 100, bootBlocks: 100 });
    for (const b of range(0, 100)) expect((await cache.get('aa', b))?.equals(block('aa', b))).toBe(true);
    await cache.close();
    cache = await openCache(dir, 256);
    expect(cache.stats()).toMatchObject({ blocks: 100, bootBlocks: 100 });
    for (const b of range(0, 100)) expect((await cache.get('aa', b))?.equals(block('aa', b))).toBe(true);
    await cache.close();
  });

  it('keeps a CRC-32 the caller computed, and a wrong one is caught as damage on read', async () => {
    const dir = await tempDir();
    const cache = await openCache(dir, 64);
    await cache.putMany('aa', range(0, 4).map((b) => ({ block: b, data: block('aa', b), crc: crc32(block('aa', b)) })), 'boot');
    // Block 4 comes with the CRC of other bytes: the cache trusts it, so its reads must catch it.
    await cache.putMany('aa', [{ block: 4, data: block('aa', 4), crc: crc32(block('aa', 5)) }], 'boot');
    for (const b of range(0, 4)) expect((await cache.get('aa', b))?.equals(block('aa', b))).toBe(true);
    expect(await cache.get('aa', 4)).toBeUndefined();
    expect(cache.stats()).toMatchObject({ blocks: 4, checksumFailures: 1 });
    // A CRC that is no u32 is refused before anything is locked, written or journaled.
    for (const crc of [-1, 2 ** 32 + 5, 1.5, Number.NaN]) {
      await expect(cache.putMany('aa', [{ block: 8, data: block('aa', 8) }, { block: 9, data: block('aa', 9), crc }], 'boot')).rejects.toThrow(
        /cache put: CRC-32 .* of block 9 is not a 32-bit unsigned integer/,
      );
    }
    expect(present(cache, 'aa', range(0, 10))).toEqual(range(0, 4));
    await cache.close();
    // The given CRCs went to the journal as the slots' checksums: a reopened cache serves the good blocks.
    const again = await openCache(dir, 64);
    for (const b of range(0, 4)) expect((await again.get('aa', b))?.equals(block('aa', b))).toBe(true);
    expect(await again.get('aa', 4)).toBeUndefined();
    await again.close();
  });

  it('handles blocks already cached: same bytes are kept, other bytes replaced, a duplicate keeps its last data', async () => {
    const cache = await openCache(await tempDir(), 64);
    for (const b of range(0, 10)) await cache.put('aa', b, block('aa', b), 'other');
    const batch = [...entries('aa', range(0, 5)), ...entries('aa', range(5, 15), 1), { block: 20, data: block('aa', 20, 1) }, { block: 20, data: block('aa', 20, 2) }];
    await cache.putMany('aa', batch, 'boot');
    for (const b of range(0, 5)) expect((await cache.get('aa', b))?.equals(block('aa', b))).toBe(true);
    for (const b of range(5, 15)) expect((await cache.get('aa', b))?.equals(block('aa', b, 1))).toBe(true);
    expect((await cache.get('aa', 20))?.equals(block('aa', 20, 2))).toBe(true);
    // Every block of the batch is a boot block now, and no slot leaked.
    expect(cache.stats()).toMatchObject({ blocks: 16, bootBlocks: 16 });
    await cache.flush();
    await cache.close();
  });

  it('evicts while batching and never exceeds capacity; a batch larger than the cache drops the rest', async () => {
    const dir = await tempDir();
    const cache = await openCache(dir, 16);
    for (const b of range(0, 16)) await cache.put('bb', b, block('bb', b), 'other');
    await cache.putMany('aa', entries('aa', range(0, 12)), 'boot');
    expect(cache.stats().blocks).toBe(16);
    expect(present(cache, 'aa', range(0, 12))).toEqual(range(0, 12));
    expect(present(cache, 'bb', range(0, 16))).toHaveLength(4);
    for (const b of range(0, 12)) expect((await cache.get('aa', b))?.equals(block('aa', b))).toBe(true);
    await cache.putMany('cc', entries('cc', range(0, 40)), 'other');
    const s = cache.stats();
    expect(s.blocks).toBeLessThanOrEqual(16);
    expect(s.droppedPuts).toBeGreaterThan(0);
    for (const b of range(0, 40)) {
      const got = await cache.get('cc', b);
      if (got) expect(got.equals(block('cc', b))).toBe(true);
    }
    await cache.close();
    const again = await openCache(dir, 16);
    for (const sp of ['aa', 'bb', 'cc']) {
      for (const b of range(0, 40)) {
        const got = await again.get(sp, b);
        if (got) expect(got.equals(block(sp, b))).toBe(true);
      }
    }
    await again.close();
  });

  it('overlapping batches and single puts of the same keys never deadlock nor mix bytes', async () => {
    const cache = await openCache(await tempDir(), 64);
    const ops: Promise<void>[] = [];
    for (let v = 0; v < 6; v++) {
      ops.push(cache.putMany('aa', entries('aa', v % 2 ? range(0, 20).reverse() : range(10, 30), v), 'other'));
      ops.push(cache.put('aa', 15, block('aa', 15, 100 + v), 'boot'));
    }
    await Promise.all(ops);
    for (const b of range(0, 30)) {
      const got = await cache.get('aa', b);
      expect(got).toBeDefined();
      expect(got!.toString('latin1', 0, 3 + String(b).length)).toBe(`aa/${b}`);
    }
    expect(cache.stats().blocks).toBe(30);
    await cache.close();
  });

  it('drops a batch that raced an invalidation of its space, and rejects bad entries', async () => {
    const cache = await openCache(await tempDir(), 64);
    const racing = cache.putMany('aa', entries('aa', range(0, 8)), 'other');
    await cache.invalidateSpace('aa');
    await racing;
    expect(present(cache, 'aa', range(0, 8))).toEqual([]);
    await expect(cache.putMany('aa', [{ block: -1, data: block('aa', 0) }], 'other')).rejects.toThrow(AgentError);
    await expect(cache.putMany('aa', [{ block: 0, data: Buffer.alloc(10) }], 'other')).rejects.toThrow(/block size/);
    await cache.putMany('aa', [], 'other');
    await cache.close();
  });
});
