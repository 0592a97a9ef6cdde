import { mkdtemp, mkdir, readdir, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { StorageIOError, UsageError } from '../../src/errors.js';
import { CountingStorage, FaultyStorage } from '../../src/storage/filters.js';
import { LocalDirStorage, validateKey } from '../../src/storage/local.js';

/** Temp directories of this file, removed at the end. */
const temps: string[] = [];
afterAll(async () => {
  await Promise.all(temps.map((dir) => rm(dir, { recursive: true, force: true })));
});

async function fixture(): Promise<{ root: string; storage: LocalDirStorage }> {
  const root = await mkdtemp(join(tmpdir(), 'bc-storage-'));
  temps.push(root);
  await mkdir(join(root, 'sub'));
  await writeFile(join(root, 'a.img'), Buffer.from('0123456789'));
  await writeFile(join(root, 'sub', 'b.img'), Buffer.alloc(4096, 7));
  return { root, storage: await LocalDirStorage.open(root) };
}

describe('LocalDirStorage', () => {
  it('stats, reads ranges, gets and lists', async () => {
    const { storage } = await fixture();
    const st = await storage.stat('a.img');
    expect(st?.size).toBe(10);
    expect(st?.stamp).toMatch(/^10:\d+$/);
    expect((await storage.read('a.img', 2, 3)).toString()).toBe('234');
    expect((await storage.get('sub/b.img')).length).toBe(4096);
    expect((await storage.list()).map((o) => o.key)).toEqual(['a.img', 'sub/b.img']);
    expect((await storage.list('sub/')).map((o) => o.key)).toEqual(['sub/b.img']);
    expect(await storage.stat('missing.img')).toBeUndefined();
  });

  it('publishes atomically and changes the stamp', async () => {
    const { root, storage } = await fixture();
    const before = await storage.stat('a.img');
    await new Promise((r) => setTimeout(r, 5));
    const after = await storage.put('a.img', Buffer.from('new content'));
    expect(after.stamp).not.toBe(before?.stamp);
    expect((await storage.get('a.img')).toString()).toBe('new content');
    // Concurrent writers: the result is one of them whole, and no temp files remain.
    const bodies = Array.from({ length: 8 }, (_, i) => Buffer.alloc(65536, i));
    await Promise.all(bodies.map((b) => storage.put('sub/c.bin', b)));
    const got = await storage.get('sub/c.bin');
    expect(bodies.some((b) => b.equals(got))).toBe(true);
    expect((await readdir(join(root, 'sub'))).filter((f) => f.includes('.tmp-'))).toEqual([]);
  });

  it('streams a put from an async iterable', async () => {
    const { storage } = await fixture();
    async function* chunks(): AsyncIterable<Buffer> {
      for (let i = 0; i < 4; i++) yield Buffer.alloc(1000, i);
    }
    const st = await storage.put('new/dir/obj', chunks());
    expect(st.size).toBe(4000);
  });

  it('refuses keys that reach outside the root', async () => {
    const { root, storage } = await fixture();
    const outside = await mkdtemp(join(tmpdir(), 'bc-outside-'));
    temps.push(outside);
    await writeFile(join(outside, 'secret'), 'x');
    await symlink(join(outside, 'secret'), join(root, 'link'));
    await symlink(outside, join(root, 'dirlink'));
    for (const key of ['../x', '/etc/passwd', 'a/../../x', 'a\0b', '', 'sub//b.img', './a.img']) {
      expect(() => validateKey(key), key).toThrow(UsageError);
    }
    await expect(storage.get('link')).rejects.toThrow(/outside the storage root/);
    await expect(storage.get('dirlink/secret')).rejects.toThrow(/outside the storage root/);
    await expect(storage.put('dirlink/evil', Buffer.from('x'))).rejects.toThrow(/outside the storage root/);
  });

  it('reports a missing root clearly', async () => {
    await expect(LocalDirStorage.open('/nonexistent/bootcache-root')).rejects.toThrow(/nonexistent.*no such file/);
  });
});

describe('storage filters', () => {
  it('counts read requests and bytes, through sources too', async () => {
    const { storage } = await fixture();
    const counting = new CountingStorage(storage);
    await counting.read('a.img', 0, 4);
    const source = await counting.openSource('sub/b.img');
    await source.read(0, 512);
    await source.read(512, 512);
    await source.close();
    expect(counting.counters).toEqual({ readRequests: 3, readBytes: 1028 });
  });

  it('reads into the caller\'s buffer through every filter, still counted, delayed and failed', async () => {
    const { storage } = await fixture();
    const counting = new CountingStorage(storage);
    let n = 0;
    const faulty = new FaultyStorage(counting, { delayMs: 1, errorRate: 0.5, random: () => (n++ % 2 === 0 ? 0.9 : 0.1) });
    const source = await faulty.openSource('a.img');
    expect(source.readInto).toBeTypeOf('function');
    const target = Buffer.alloc(8, 0xee);
    await source.readInto!(2, 5, target, 1);
    expect(target.toString('latin1', 1, 6)).toBe('23456');
    expect(target[0]).toBe(0xee);
    await expect(source.readInto!(0, 1, target, 0)).rejects.toThrow(StorageIOError);
    await source.close();
    expect(counting.counters).toEqual({ readRequests: 1, readBytes: 5 });
  });

  it('delays every read, and concurrent reads overlap', async () => {
    const { storage } = await fixture();
    const slow = new FaultyStorage(storage, { delayMs: 50 });
    const start = performance.now();
    await Promise.all(Array.from({ length: 10 }, () => slow.read('a.img', 0, 1)));
    const elapsed = performance.now() - start;
    // Ten overlapping 50 ms requests take far less than ten sequential ones.
    expect(elapsed).toBeGreaterThanOrEqual(45);
    expect(elapsed).toBeLessThan(400);
  });

  it('injects read errors at the given rate', async () => {
    const { storage } = await fixture();
    let n = 0;
    const faulty = new FaultyStorage(storage, { errorRate: 0.5, random: () => (n++ % 2 === 0 ? 0.1 : 0.9) });
    await expect(faulty.read('a.img', 0, 1)).rejects.toThrow(StorageIOError);
    await expect(faulty.read('a.img', 0, 1)).resolves.toHaveLength(1);
  });
});
