/**
 * A cache directory on a filesystem smaller than the cache size: a real
 * tmpfs (mounted here; needs root) under the cache device and under a real
 * agent. The start warns, a full disk shrinks the cache once instead of
 * failing writes and segment rebuilds over and over, and every byte served
 * stays right.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, rmdir, stat, statfs, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CacheDevice, type CacheLogger } from '../../src/agent/cache/cache-device.js';
import { controlRequest } from '../../src/agent/control.js';
import type { AgentStatus } from '../../src/agent/agent.js';

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const BIN = join(ROOT, 'bin', 'run.js');
const BS = 4096;
const MiB = 1024 * 1024;
let work: string;
const mounts: string[] = [];
const children: ChildProcess[] = [];

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'bc-cache-space-'));
});

afterEach(() => {
  for (const c of children.splice(0)) c.kill('SIGKILL');
});

afterAll(async () => {
  for (const c of children.splice(0)) c.kill('SIGKILL');
  for (const m of mounts) {
    await run('umount', [m]).catch(() => run('umount', ['-l', m]));
    await rmdir(m).catch(() => undefined);
  }
  await rm(work, { recursive: true, force: true });
});

/** A fresh tmpfs of `bytes` (the kernel rounds to pages). */
async function smallFilesystem(bytes: number): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'bc-small-fs-'));
  await run('mount', ['-t', 'tmpfs', '-o', `size=${bytes}`, 'tmpfs', dir]);
  mounts.push(dir);
  return dir;
}

function collectingLogger(): CacheLogger & { warnings: string[] } {
  const warnings: string[] = [];
  return { warnings, warn: (m) => warnings.push(m), info: () => undefined };
}

/** A block whose bytes name its key. */
function block(space: string, index: number): Buffer {
  const buf = Buffer.alloc(BS);
  const tag = `${space}/${index};`;
  for (let at = 0; at < BS; at += tag.length) buf.write(tag, at, 'latin1');
  return buf;
}

async function inParallel<T>(width: number, items: T[], task: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: width }, async () => {
    while (next < items.length) await task(items[next++]!);
  }));
}

const range = (from: number, to: number): number[] => Array.from({ length: to - from }, (_, i) => from + i);

describe('cache device on a filesystem smaller than its capacity', () => {
  for (const mode of ['put', 'putMany'] as const) {
    it(`warns at open, shrinks once when writes find the disk full (${mode}), and keeps serving exact bytes`, async () => {
      const fs = await smallFilesystem(2 * MiB);
      const dir = join(fs, 'cache');
      const log = collectingLogger();
      const open = (): Promise<CacheDevice> => CacheDevice.open(dir, { capacityBytes: 8 * MiB, logger: log, verifyReads: false });
      let cache = await open();
      const warning = cache.stats().disk.warning;
      expect(warning).toMatch(/its filesystem can hold 2\.0 MiB of cache \(2\.0 MiB free, 0\.0 MiB in the cache\), less than the cache size 8\.0 MiB/);
      expect(log.warnings).toEqual([warning]);

      // Four times what the filesystem holds, 16 writers at once: nothing rejects.
      const write = async (blocks: number[]): Promise<void> => {
        if (mode === 'put') await inParallel(16, blocks, (b) => cache.put('aa', b, block('aa', b), 'other'));
        else await inParallel(4, range(0, blocks.length / 32).map((i) => blocks.slice(i * 32, i * 32 + 32)), (batch) =>
          cache.putMany('aa', batch.map((b) => ({ block: b, data: block('aa', b) })), 'boot'));
      };
      await write(range(0, 2048));
      await cache.flush();
      const s = cache.stats();
      expect(s.noSpaceWrites).toBeGreaterThan(0);
      expect(s.disk.shrunk).toMatchObject({ capacityBytes: s.capacityBytes, reason: expect.stringMatching(/cache\.(data: no space left on device \(while writing|journal: no space left on device \(while appending)/) });
      expect(s.capacityBytes).toBeLessThan(2 * MiB);
      const shrinks = log.warnings.filter((w) => /the disk is full/.test(w));
      // Once per shrink, not once per failed write.
      expect(shrinks).toHaveLength(s.disk.shrunk!.times);
      expect(shrinks.length).toBeLessThan(s.noSpaceWrites + 1);
      expect(shrinks.length).toBeLessThanOrEqual(3);
      expect(shrinks[0]).toMatch(/the cache now holds at most \d+\.\d MiB \(was 8\.0 MiB, configured 8\.0 MiB\), \d+ cached blocks past that dropped/);
      expect((await stat(join(dir, 'cache.data'))).size).toBe(s.capacityBytes);

      // Within its new capacity it evicts to fit: more writes, no more failures, every hit exact.
      const failed = s.noSpaceWrites;
      await write(range(2048, 4096));
      await cache.flush();
      expect(cache.stats().noSpaceWrites).toBe(failed);
      expect(cache.stats().blocks).toBeGreaterThan(cache.stats().capacityBytes / BS / 2);
      const checkHits = async (): Promise<number> => {
        let hits = 0;
        for (const b of range(0, 4096)) {
          const got = await cache.get('aa', b);
          if (!got) continue;
          hits++;
          expect(got.equals(block('aa', b)), `block ${b}`).toBe(true);
        }
        return hits;
      };
      const hits = await checkHits();
      expect(hits).toBe(cache.stats().blocks);
      await cache.close();

      // A restart tries the configured size again (warning again) with every block intact.
      log.warnings.length = 0;
      cache = await open();
      expect(log.warnings).toHaveLength(1);
      expect(log.warnings[0]).toMatch(/its filesystem can hold .* less than the cache size 8\.0 MiB/);
      expect(cache.stats().capacityBytes).toBe(8 * MiB);
      expect(await checkHits()).toBe(hits);
      await cache.close();
    });
  }
});

describe('a full disk at the journal commit', () => {
  it('shrinks the data file and commits the journal again, instead of failing the cache', async () => {
    const fs = await smallFilesystem(4 * MiB);
    const dir = join(fs, 'cache');
    const log = collectingLogger();
    const cache = await CacheDevice.open(dir, { capacityBytes: 8 * MiB, logger: log, verifyReads: false });
    // Blocks written and committed; then another file takes the rest of the disk, and records
    // alone (boot marks) grow the journal: its append finds no room.
    await inParallel(8, range(0, 256), (b) => cache.put('bb', b, block('bb', b), 'other'));
    await cache.flush();
    const filler = join(fs, 'filler');
    await run('sh', ['-c', `dd if=/dev/zero of=${filler} bs=4k 2>/dev/null || true`]);
    for (let i = 0; i < 2000; i++) {
      cache.markBooted(i.toString(16).padStart(8, "0"));
      if (i % 100 === 99) await cache.flush();
    }
    await cache.flush();
    const s = cache.stats();
    expect(s.disk.shrunk?.reason).toMatch(/cache\.journal: no space left on device \(while appending to the cache journal\)/);
    // Every block still mapped reads back exact; the cache keeps working.
    let hits = 0;
    for (const b of range(0, 256)) {
      const got = await cache.get('bb', b);
      if (!got) continue;
      hits++;
      expect(got.equals(block('bb', b))).toBe(true);
    }
    expect(hits).toBe(cache.stats().blocks);
    await rm(filler);
    await cache.put('bb', 1000, block('bb', 1000), 'other');
    await cache.flush();
    expect((await cache.get('bb', 1000))?.equals(block('bb', 1000))).toBe(true);
    await cache.close();
  });
});

describe('agent with its cache on a filesystem smaller than --cache-size', () => {
  it('warns at start, shrinks the cache once when the disk fills, serves correct bytes, and its segment rebuilds succeed', async () => {
    const storage = join(work, 'storage');
    await mkdir(storage);
    const image = randomBytes(32 * MiB);
    await writeFile(join(storage, 'disk.raw'), image);
    const fs = await smallFilesystem(12 * MiB);
    const socket = join(work, 'agent.sock');
    const control = join(work, 'agent.ctl');
    const child = spawn(process.execPath, [
      BIN, 'agent', '--no-warmup',
      '--storage', storage,
      '--cache', join(fs, 'cache'),
      '--cache-size', '64M',
      // A whole-disk copy is not a boot (no rebuild of 32 MiB); the small boots below are.
      '--boot-max-share-floor', '1M',
      // Each boot's blocks join the map, so each boot builds a new segment (in the cache directory's tmp/).
      '--merge-min-seen', '1',
      '--socket', socket,
      '--control', control,
    ], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(child);
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const exited = new Promise<number>((resolve) => child.on('exit', (code) => resolve(code ?? -1)));
    while (!/agent started/.test(out)) {
      const code = await Promise.race([exited, new Promise<undefined>((r) => setTimeout(() => r(undefined), 50))]);
      if (code !== undefined) throw new Error(`agent exited ${code}: ${err}`);
    }
    const status = (): Promise<AgentStatus> => controlRequest<AgentStatus>(control, 'GET', '/status');
    const logLines = (pattern: RegExp): string[] => out.split('\n').filter((l) => pattern.test(l));

    expect(logLines(/its filesystem can hold .* less than the cache size 64\.0 MiB/)).toHaveLength(1);
    expect((await status()).cache.disk.warning).toMatch(/less than the cache size 64\.0 MiB/);

    const url = `nbd+unix:///disk.raw?socket=${socket}`;
    const copy = async (name: string): Promise<void> => {
      const target = join(work, name);
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', url, target]);
      expect((await readFile(target)).equals(image), `${name} differs from the image`).toBe(true);
      await rm(target);
    };
    /** A boot: 80 scattered 8 KiB reads in one connection, then its close ends the boot. */
    const boot = async (seed: number): Promise<void> => {
      const reads = range(0, 80).flatMap((i) => ['-c', `read ${(((i * 7919 + seed) % 4000) * 8192)} 8k`]);
      await run('qemu-io', ['-f', 'raw', '-r', url, ...reads]);
    };
    /** Waits until `boots` boots have been merged, published or not. */
    const rebuilt = async (boots: number): Promise<AgentStatus> => {
      for (;;) {
        const s = await status();
        const { recorded, skipped, failed } = s.counters.boots;
        if (recorded + skipped + failed >= boots && s.exports.every((e) => e.rebuild?.state !== 'running')) return s;
        await new Promise((r) => setTimeout(r, 50));
      }
    };

    await copy('copy-1.raw'); // the misses fill the small filesystem
    let s = await status();
    for (let i = 0; i < 200 && !s.cache.disk.shrunk; i++) {
      await new Promise((r) => setTimeout(r, 50)); // the last misses are written behind the reads
      s = await status();
    }
    expect(s.cache.disk.shrunk).toMatchObject({ reason: expect.stringMatching(/no space left on device/) });
    expect(s.cache.capacityBytes).toBe(s.cache.disk.shrunk!.capacityBytes);
    expect(s.cache.capacityBytes).toBeLessThan(12 * MiB);

    await boot(1);
    s = await rebuilt(1);
    expect(s.counters.boots).toMatchObject({ recorded: 1, skipped: 0, failed: 0 });
    await boot(2);
    s = await rebuilt(2);
    expect(s.counters.boots).toMatchObject({ recorded: 2, skipped: 0, failed: 0 });
    expect(logLines(/published map and segment/)).toHaveLength(2);
    expect(s.exports.find((e) => e.name === 'disk.raw')?.rebuild).toMatchObject({ state: 'idle' });
    await copy('copy-2.raw'); // hits from the shrunk cache, prefetched boot blocks, misses: all right

    s = await status();
    expect(logLines(/segment rebuild failed/)).toEqual([]);
    const shrinkLines = logLines(/the disk is full/);
    expect(shrinkLines).toHaveLength(s.cache.disk.shrunk!.times);
    expect(shrinkLines.length).toBeLessThanOrEqual(3);
    expect(shrinkLines[0]).toMatch(/"level":40/);

    child.kill('SIGTERM');
    expect(await exited).toBe(0);
  }, 120_000);
});
