import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CONFIG_DEFAULTS, type AgentConfig } from '../../src/agent/config.js';
import { removeStaleWarmupDirs, warmUp, warmupReads } from '../../src/agent/warmup.js';

let root: string;
let savedTmp: string | undefined;

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'bc-warmup-'));
  savedTmp = process.env.TMPDIR;
});

afterAll(async () => {
  if (savedTmp === undefined) delete process.env.TMPDIR;
  else process.env.TMPDIR = savedTmp;
  await rm(root, { recursive: true, force: true });
});

const config: AgentConfig = { ...CONFIG_DEFAULTS, storage: '/nonexistent', cache: '/nonexistent' };

/** A pino logger whose records land in `lines`. */
function capture(lines: Array<Record<string, unknown>>): ReturnType<typeof pino> {
  return pino({ level: 'debug' }, { write: (line: string) => void lines.push(JSON.parse(line) as Record<string, unknown>) });
}

describe('warm-up', () => {
  it('reads a fixed, boot-like pattern: aligned, inside the image, mixed sizes, the same on every start', () => {
    const reads = warmupReads(2500, 32 * 1024 * 1024);
    expect(reads).toHaveLength(2500);
    expect(warmupReads(2500, 32 * 1024 * 1024)).toEqual(reads);
    for (const { offset, length } of reads) {
      expect(offset % 512).toBe(0);
      expect(length).toBeGreaterThan(0);
      expect(offset + length).toBeLessThanOrEqual(32 * 1024 * 1024);
    }
    expect(new Set(reads.map((r) => r.length)).size).toBeGreaterThanOrEqual(5);
    // Runs of sequential reads, as a boot's: a read often starts where the previous ended.
    const sequential = reads.filter((r, i) => i > 0 && r.offset === reads[i - 1]!.offset + reads[i - 1]!.length).length;
    expect(sequential).toBeGreaterThan(reads.length / 2);
  });

  it('gives the private agent its own scratch storage, cache and sockets, never the real ones', async () => {
    const tmp = join(root, 'tmp-config');
    await mkdir(tmp);
    process.env.TMPDIR = tmp;
    const seen: AgentConfig[] = [];
    const lines: Array<Record<string, unknown>> = [];
    const report = await warmUp({
      config: {
        ...config, listen: { host: '127.0.0.1', port: 10809 }, socketGroup: 'disk', storageDelayMs: 10, storageErrorRate: 0.5,
        // Operator settings that would keep the warm-up from recording, publishing or caching.
        cacheMisses: false, boot: { ...config.boot, maxShareFloor: 0, minReads: 100_000 },
      },
      log: capture(lines),
      createAgent: (c) => {
        seen.push(c);
        throw new Error('no agent in this test');
      },
      stopped: () => false,
    });
    expect(report).toBeUndefined();
    expect(seen).toHaveLength(1);
    const c = seen[0]!;
    for (const path of [c.storage, c.cache, c.socket, c.control]) expect(path.startsWith(join(tmp, 'bootcache-warmup-'))).toBe(true);
    expect(c).toMatchObject({ warmup: false, storageDelayMs: 0, storageErrorRate: 0, maintenance: 'off', cacheMisses: true });
    expect(c.boot).toMatchObject({ minReads: 1, maxShare: 0 });
    for (const path of [c.socket, c.control]) expect(path.startsWith(join(tmp, `bootcache-warmup-${process.pid}-`))).toBe(true);
    expect(c.listen).toBeUndefined();
    expect(c.socketGroup).toBeUndefined();
    // A failed warm-up is one warning naming why, and leaves nothing behind.
    expect(lines.filter((l) => l.level === 40).map((l) => l.msg)).toEqual(['warm-up skipped: no agent in this test']);
    expect(await readdir(tmp)).toEqual([]);
  });

  it('does nothing once the real agent is being stopped', async () => {
    const tmp = join(root, 'tmp-stopped');
    await mkdir(tmp);
    process.env.TMPDIR = tmp;
    let created = 0;
    const report = await warmUp({
      config,
      log: pino({ level: 'silent' }),
      createAgent: () => {
        created++;
        return { start: async () => undefined, stop: async () => undefined, status: () => ({ exports: [] }) };
      },
      stopped: () => true,
    });
    expect(report).toBeUndefined();
    expect(created).toBe(0);
    expect(await readdir(tmp)).toEqual([]);
  });

  it('removes the scratch directories of warm-ups whose process died, and only those', async () => {
    const parent = join(root, 'tmp-stale');
    // Above the kernel's largest pid_max (2^22): no process has it.
    const dead = 4_194_304 + 4242;
    const names = [`bootcache-warmup-${dead}-a1b2c3`, `bootcache-warmup-${process.pid}-d4e5f6`, `bootcache-warmup-1-g7h8i9`, 'bootcache-warmup-x', 'other'];
    for (const name of names) await mkdir(join(parent, name, 'storage'), { recursive: true });
    await removeStaleWarmupDirs(parent);
    // Its own, a live process's (pid 1), and names that are not a warm-up's stay.
    expect((await readdir(parent)).sort()).toEqual(names.slice(1).sort());
    await removeStaleWarmupDirs(join(root, 'no-such-dir'));
  });
});
