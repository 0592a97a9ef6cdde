/**
 * The cache device against damaged or odd on-disk state: torn and garbage
 * journals, broken snapshots, wrong-size data files, interrupted compaction,
 * corrupted data, unusable directories.
 */
import { randomBytes } from 'node:crypto';
import { chmod, copyFile, cp, mkdir, mkdtemp, open, readdir, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CacheDevice, type CacheLogger } from '../../src/agent/cache/cache-device.js';
import { AgentError, StorageIOError } from '../../src/errors.js';

const BS = 4096;
const dirs: string[] = [];

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'bc-cache-rec-'));
  dirs.push(dir);
  return dir;
}

afterAll(async () => {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});

function logger(): CacheLogger & { warnings: string[]; infos: string[] } {
  const warnings: string[] = [];
  const infos: string[] = [];
  return { warnings, infos, warn: (m) => warnings.push(m), info: (m) => infos.push(m) };
}

function block(space: string, index: number, version = 0): Buffer {
  const buf = Buffer.alloc(BS);
  const tag = `${space}/${index}/v${version};`;
  for (let at = 0; at < BS; at += tag.length) buf.write(tag, at, 'latin1');
  return buf;
}

/** Parses a block made by block(): its key and version, or undefined. */
function identify(buf: Buffer): { space: string; index: number; version: number } | undefined {
  const m = /^([0-9a-f]+)\/(\d+)\/v(\d+);/.exec(buf.toString('latin1', 0, 64));
  if (!m) return undefined;
  const id = { space: m[1]!, index: Number(m[2]), version: Number(m[3]) };
  return block(id.space, id.index, id.version).equals(buf) ? id : undefined;
}

interface Opts {
  slots?: number;
  verifyReads?: boolean;
  log?: CacheLogger;
}

function openCache(dir: string, o: Opts = {}): Promise<CacheDevice> {
  return CacheDevice.open(dir, {
    capacityBytes: (o.slots ?? 32) * BS,
    logger: o.log ?? logger(),
    ...(o.verifyReads !== undefined ? { verifyReads: o.verifyReads } : {}),
  });
}

/** A cache with history: puts, overwrites, evictions, boots; `latest` holds each key's last version. */
async function populate(dir: string, slots = 32): Promise<Map<string, number>> {
  const cache = await openCache(dir, { slots });
  const latest = new Map<string, number>();
  for (let i = 0; i < slots * 2; i++) {
    const space = i % 3 === 0 ? 'aa' : 'bb';
    const index = (i * 7) % (slots + 5);
    const version = i;
    await cache.put(space, index, block(space, index, version), i % 4 === 0 ? 'boot' : 'other');
    latest.set(`${space}/${index}`, version);
    if (i % 10 === 0) cache.markBooted(space);
  }
  await cache.close();
  return latest;
}

/** Every block the cache returns is the latest version put for its key; returns the hit count. */
async function checkAll(cache: CacheDevice, latest: Map<string, number>, allowOlder = false): Promise<number> {
  let hits = 0;
  for (const [key, version] of latest) {
    const [space, index] = key.split('/') as [string, string];
    const got = await cache.get(space, Number(index));
    if (!got) continue;
    hits++;
    const id = identify(got);
    expect(id, `${key} returned bytes of no block at all`).toBeDefined();
    expect(`${id!.space}/${id!.index}`).toBe(key);
    if (allowOlder) expect(id!.version).toBeLessThanOrEqual(version);
    else expect(id!.version).toBe(version);
  }
  return hits;
}

/** Still works: new puts land and read back. */
async function checkUsable(cache: CacheDevice): Promise<void> {
  for (let b = 0; b < 5; b++) await cache.put('cc', b, block('cc', b, 99), 'other');
  for (let b = 0; b < 5; b++) expect((await cache.get('cc', b))?.equals(block('cc', b, 99))).toBe(true);
}

describe('CacheDevice recovery', () => {
  it('drops a torn journal tail and keeps the rest', async () => {
    const dir = await tempDir();
    const cache = await openCache(dir);
    for (let b = 0; b < 10; b++) await cache.put('aa', b, block('aa', b), 'other');
    await cache.close();
    const journal = join(dir, 'cache.journal');
    const size = (await stat(journal)).size;
    await truncate(journal, size - 3);
    const log = logger();
    const again = await openCache(dir, { verifyReads: false, log });
    expect(log.warnings).toEqual([]);
    expect(log.infos.join()).toMatch(/dropped a torn tail of \d+ bytes/);
    for (let b = 0; b < 9; b++) expect((await again.get('aa', b))?.equals(block('aa', b))).toBe(true);
    expect(await again.get('aa', 9)).toBeUndefined(); // its record was the torn one
    expect((await stat(journal)).size).toBe(size - 28); // cut back to the last whole record
    await checkUsable(again);
    await again.close();
    const log2 = logger();
    const third = await openCache(dir, { verifyReads: false, log: log2 });
    expect([...log2.warnings, ...log2.infos]).toEqual([]);
    expect((await third.get('cc', 4))?.equals(block('cc', 4, 99))).toBe(true);
    await third.close();
  });

  it('never serves wrong bytes from any prefix of the journal', async () => {
    const base = await tempDir();
    const latest = await populate(base, 20);
    const size = (await stat(join(base, 'cache.journal'))).size;
    for (let cut = 32; cut <= size; cut += 13) {
      const dir = await tempDir();
      await cp(base, dir, { recursive: true });
      await truncate(join(dir, 'cache.journal'), cut);
      const cache = await openCache(dir, { slots: 20 });
      await checkAll(cache, latest, true);
      await cache.close();
      await rm(dir, { recursive: true });
    }
  });

  it('starts empty, with a warning, when the journal is garbage', async () => {
    const dir = await tempDir();
    await populate(dir);
    await writeFile(join(dir, 'cache.journal'), randomBytes(5000));
    const log = logger();
    const cache = await openCache(dir, { log });
    expect(log.warnings.join()).toMatch(/cache\.journal: journal has a bad magic number; starting with an empty cache/);
    expect(cache.stats().blocks).toBe(0);
    await checkUsable(cache);
    await cache.close();
  });

  it('checks every block when the journal is damaged in its middle', async () => {
    const dir = await tempDir();
    const latest = await populate(dir);
    await damageMiddle(join(dir, 'cache.journal'));
    const log = logger();
    const cache = await openCache(dir, { verifyReads: false, log });
    expect(log.warnings.join()).toMatch(/damaged bytes and \d+ inconsistent records; cached blocks will be checked/);
    expect(await checkAll(cache, latest, true)).toBeGreaterThan(0);
    await checkUsable(cache);
    await cache.close();
    // The index was rewritten at once: the next start is quiet.
    const log2 = logger();
    const again = await openCache(dir, { verifyReads: false, log: log2 });
    expect(log2.warnings).toEqual([]);
    await checkAll(again, latest, true);
    await again.close();
  });

  it('drops unverified blocks whose bytes are damaged, even with verifyReads off', async () => {
    const dir = await tempDir();
    const latest = await populate(dir);
    const damagedSlots = await corruptEveryMappedSlot(dir);
    await damageMiddle(join(dir, 'cache.journal'));
    const cache = await openCache(dir, { verifyReads: false });
    expect(await checkAll(cache, latest, true)).toBe(0);
    expect(cache.stats().checksumFailures).toBeGreaterThan(0);
    expect(cache.stats().checksumFailures).toBeLessThanOrEqual(damagedSlots);
    await checkUsable(cache);
    await cache.close();
  });

  it('ignores records from another journal (salted checksums)', async () => {
    const a = await tempDir();
    const b = await tempDir();
    const cacheA = await openCache(a);
    await cacheA.put('aa', 1, block('aa', 1), 'other');
    await cacheA.close();
    const cacheB = await openCache(b);
    for (let i = 0; i < 5; i++) await cacheB.put('bb', i, block('bb', i), 'other');
    await cacheB.close();
    const recordsOfB = (await readFile(join(b, 'cache.journal'))).subarray(32);
    const journalA = await open(join(a, 'cache.journal'), 'a');
    await journalA.write(recordsOfB);
    await journalA.close();
    const cache = await openCache(a, { verifyReads: false });
    expect(cache.stats().blocks).toBe(1);
    expect(cache.has('bb', 0)).toBe(false);
    expect((await cache.get('aa', 1))?.equals(block('aa', 1))).toBe(true);
    await cache.close();
  });

  it('starts empty, with a warning, when the snapshot is damaged', async () => {
    for (const damage of ['header', 'body', 'short']) {
      const dir = await tempDir();
      await populate(dir);
      const c = await openCache(dir);
      await c.compact();
      await c.close();
      const snap = join(dir, 'cache.snap');
      const buf = await readFile(snap);
      if (damage === 'header') buf[12] ^= 0xff;
      if (damage === 'body') buf[buf.length - 30] ^= 0x01;
      await writeFile(snap, damage === 'short' ? buf.subarray(0, 20) : buf);
      const log = logger();
      const cache = await openCache(dir, { log });
      expect(log.warnings.join()).toMatch(/cache\.snap: .*; starting with an empty cache/);
      expect(cache.stats().blocks).toBe(0);
      await checkUsable(cache);
      await cache.close();
    }
  });

  it('handles a data file of the wrong size', async () => {
    // Shorter (a full disk shrank the cache and a crash came before the compaction): the blocks in
    // the first 10 slots stay, exactly as put; the file grows back to the capacity.
    const dir = await tempDir();
    const latest = await populate(dir);
    await truncate(join(dir, 'cache.data'), 10 * BS);
    const log = logger();
    let cache = await openCache(dir, { log, verifyReads: false });
    expect(log.warnings.join()).toMatch(/cache\.data: 40960 bytes, shorter than the 131072 the index needs; the blocks past its end are dropped/);
    const kept = cache.stats().blocks;
    expect(kept).toBeGreaterThan(0);
    expect(kept).toBeLessThanOrEqual(10);
    expect(await checkAll(cache, latest)).toBe(kept);
    expect((await stat(join(dir, 'cache.data'))).size).toBe(32 * BS);
    await checkUsable(cache);
    await cache.close();

    const dir2 = await tempDir();
    const latest2 = await populate(dir2);
    await truncate(join(dir2, 'cache.data'), 100 * BS); // longer: cut back, nothing lost
    cache = await openCache(dir2, { verifyReads: false });
    expect((await stat(join(dir2, 'cache.data'))).size).toBe(32 * BS);
    expect(await checkAll(cache, latest2)).toBe(32);
    await cache.close();

    const dir3 = await tempDir();
    await populate(dir3);
    await rm(join(dir3, 'cache.data'));
    const log3 = logger();
    cache = await openCache(dir3, { log: log3 });
    expect(log3.warnings.join()).toMatch(/cache\.data: missing; starting with an empty cache/);
    await checkUsable(cache);
    await cache.close();

    const dir4 = await tempDir();
    await mkdir(join(dir4, 'cache.data'));
    await expect(openCache(dir4)).rejects.toThrow(/cache\.data: cache data file is not a regular file/);
  });

  it('recovers from a compaction interrupted between the two renames', async () => {
    const dir = await tempDir();
    const cache = await openCache(dir, { verifyReads: false });
    for (let b = 0; b < 40; b++) await cache.put('aa', b, block('aa', b, b), b % 2 ? 'boot' : 'other');
    await cache.flush();
    await copyFile(join(dir, 'cache.journal'), join(dir, 'old.journal'));
    await cache.compact(); // the snapshot now covers everything in old.journal
    await cache.close();
    await copyFile(join(dir, 'old.journal'), join(dir, 'cache.journal'));
    const log = logger();
    const again = await openCache(dir, { verifyReads: false, log });
    expect(log.warnings).toEqual([]);
    expect(again.stats().blocks).toBe(32);
    let hits = 0;
    for (let b = 0; b < 40; b++) {
      const got = await again.get('aa', b);
      if (got) {
        hits++;
        expect(got.equals(block('aa', b, b))).toBe(true);
      }
    }
    expect(hits).toBe(32);
    await checkUsable(again);
    await again.close();
  });

  it('checks blocks before use when the journal is missing or from another epoch', async () => {
    for (const damage of ['missing', 'epoch']) {
      const dir = await tempDir();
      const latest = await populate(dir);
      const c = await openCache(dir);
      await c.compact();
      await c.put('aa', 1000, block('aa', 1000), 'other');
      await c.close();
      const journal = join(dir, 'cache.journal');
      if (damage === 'missing') await rm(journal);
      else {
        const other = await tempDir();
        const o = await openCache(other);
        for (let i = 0; i < 5; i++) await o.compact(); // a journal of a later epoch
        await o.close();
        await copyFile(join(other, 'cache.journal'), journal);
      }
      await corruptEveryMappedSlot(dir, 2);
      const log = logger();
      const cache = await openCache(dir, { verifyReads: false, log });
      expect(log.warnings.join()).toMatch(damage === 'missing' ? /cache\.journal: missing; cached blocks will be checked/ : /epoch \d+ does not follow snapshot epoch/);
      expect(await checkAll(cache, latest, true)).toBeGreaterThan(0);
      expect(cache.stats().checksumFailures).toBeGreaterThan(0);
      await checkUsable(cache);
      await cache.close();
    }
  });

  it('verifies reads by default: a block damaged on disk becomes a miss, not wrong bytes', async () => {
    const dir = await tempDir();
    const log = logger();
    const cache = await openCache(dir, { log });
    for (let b = 0; b < 4; b++) await cache.put('aa', b, block('aa', b), 'other');
    await cache.flush();
    const data = await open(join(dir, 'cache.data'), 'r+');
    await data.write(Buffer.from('garbage'), 0, 7, 100); // slot 0 holds block 0
    await data.close();
    expect(await cache.get('aa', 0)).toBeUndefined();
    expect(cache.has('aa', 0)).toBe(false);
    expect(cache.stats().checksumFailures).toBe(1);
    expect(log.warnings.join()).toMatch(/cached block 0 of space aa \(slot 0\) fails its checksum; dropped/);
    expect((await cache.get('aa', 1))?.equals(block('aa', 1))).toBe(true);
    await cache.put('aa', 0, block('aa', 0), 'other');
    expect((await cache.get('aa', 0))?.equals(block('aa', 0))).toBe(true);
    await cache.close();
  });

  it('verifies run reads too: getRun serves the sound blocks of a run and drops the damaged one', async () => {
    const dir = await tempDir();
    const log = logger();
    const cache = await openCache(dir, { log });
    await cache.putMany('aa', [0, 1, 2, 3].map((b) => ({ block: b, data: block('aa', b) })), 'boot');
    await cache.flush();
    const data = await open(join(dir, 'cache.data'), 'r+');
    await data.write(Buffer.from('garbage'), 0, 7, 2 * BS + 100); // slot 2 holds block 2
    await data.close();
    const into = Buffer.alloc(4 * BS);
    expect(await cache.getRun('aa', 0, 4, into)).toEqual([true, true, false, true]);
    for (const b of [0, 1, 3]) expect(into.subarray(b * BS, (b + 1) * BS).equals(block('aa', b))).toBe(true);
    expect(cache.has('aa', 2)).toBe(false);
    expect(cache.stats().checksumFailures).toBe(1);
    expect(log.warnings.join()).toMatch(/cached block 2 of space aa \(slot 2\) fails its checksum; dropped/);
    await cache.close();
  });

  it('disables itself after a failed commit, and restarts consistent', async () => {
    const dir = await tempDir();
    const log = logger();
    const cache = await openCache(dir, { verifyReads: false, log });
    for (let b = 0; b < 5; b++) await cache.put('aa', b, block('aa', b), 'other');
    await cache.flush();
    // Pull the journal out from under the device: the next commit fails (EBADF).
    await (cache as unknown as { files: { journal: { close(): Promise<void> } } }).files.journal.close();
    await cache.put('aa', 5, block('aa', 5), 'other');
    await expect(cache.flush()).rejects.toThrow(StorageIOError);
    expect(log.warnings.join()).toMatch(/the cache is disabled until the agent restarts/);
    await expect(cache.put('aa', 6, block('aa', 6), 'other')).rejects.toThrow(StorageIOError);
    expect(await cache.get('aa', 0)).toBeUndefined(); // misses, never possibly stale bytes
    expect(cache.has('aa', 0)).toBe(false);
    await cache.close().catch(() => undefined);
    const again = await openCache(dir, { verifyReads: false });
    for (let b = 0; b < 5; b++) expect((await again.get('aa', b))?.equals(block('aa', b))).toBe(true);
    await checkUsable(again);
    await again.close();
  });

  it('removes temp files a crash left behind, and leaves other files alone', async () => {
    const dir = await tempDir();
    await populate(dir);
    await writeFile(join(dir, '.cache.snap.tmp-123-0123456789ab'), 'partial snapshot');
    await writeFile(join(dir, '.cache.journal.tmp-123-0123456789ab'), 'partial journal');
    await mkdir(join(dir, 'tmp'));
    await writeFile(join(dir, 'tmp', 'sidecar'), 'not ours');
    const cache = await openCache(dir);
    await cache.compact();
    await cache.close();
    expect((await readdir(dir)).sort()).toEqual(['cache.data', 'cache.journal', 'cache.snap', 'tmp']);
    expect(await readdir(join(dir, 'tmp'))).toEqual(['sidecar']);
  });

  it('gives one-line errors for unusable directories', async () => {
    await expect(openCache('/sys/bootcache-cache-test')).rejects.toThrow(StorageIOError);
    await expect(openCache('/sys/bootcache-cache-test')).rejects.toThrow(/permission denied \(while creating the cache directory\)/);
    await expect(openCache('/sys/kernel')).rejects.toThrow(/cache\.lock: permission denied \(while locking the cache directory\)/);
    await expect(openCache('/proc/no-such-dir/cache')).rejects.toThrow(AgentError);
  });

  it.skipIf(process.getuid?.() === 0)('reports a directory without write permission', async () => {
    const dir = await tempDir();
    await chmod(dir, 0o500);
    await expect(openCache(dir)).rejects.toThrow(/permission denied/);
    await chmod(dir, 0o700);
  });
});

/** Overwrites, in the data file, every `every`-th slot holding a block, with garbage; returns how many. */
async function corruptEveryMappedSlot(dir: string, every = 1): Promise<number> {
  const data = await open(join(dir, 'cache.data'), 'r+');
  const size = (await data.stat()).size;
  const buf = Buffer.alloc(BS);
  const slots: number[] = [];
  for (let slot = 0; slot * BS < size; slot++) {
    await data.read(buf, 0, BS, slot * BS);
    if (identify(buf)) slots.push(slot);
  }
  let damaged = 0;
  for (let i = 0; i < slots.length; i += every, damaged++) {
    await data.write(randomBytes(64), 0, 64, slots[i]! * BS + 200);
  }
  await data.close();
  return damaged;
}

/** Overwrites 40 bytes in the middle of a file with garbage. */
async function damageMiddle(path: string): Promise<void> {
  const buf = await readFile(path);
  randomBytes(40).copy(buf, Math.floor(buf.length / 2));
  await writeFile(path, buf);
}
