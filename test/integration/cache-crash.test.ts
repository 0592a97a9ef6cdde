/**
 * Crash safety for real: a child process hammers a small cache (puts and
 * putMany batches that overwrite and evict, gets, boots, flushes,
 * compactions, invalidations)
 * and is killed with SIGKILL at random moments. After every kill the cache
 * must reopen, return only bytes that were put for the key asked for, and
 * keep working. The child runs the TypeScript sources through vite-node
 * (installed with vitest); it logs every version before putting it.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { CacheDevice } from '../../src/agent/cache/cache-device.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const VITE_NODE = join(ROOT, 'node_modules', 'vite-node', 'vite-node.mjs');
const BS = 4096;
const SLOTS = 48;
const SPACES = ['a0', 'b1', 'c2'];
const BLOCKS = 40;
const dirs: string[] = [];

afterAll(async () => {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});

/** Block contents: a pure function of (space, block, version). Kept in sync with the child's copy. */
function content(space: string, block: number, version: number): Buffer {
  const buf = Buffer.alloc(BS);
  const tag = `${space}:${block}:${version}:`;
  let at = 0;
  for (let i = 0; at < BS; i++) at += buf.write(`${tag}${(i * 2654435761) % 1000003};`, at, 'latin1');
  return buf;
}

const CHILD = `
import { appendFileSync } from 'node:fs';
import { CacheDevice } from ${JSON.stringify(join(ROOT, 'src/agent/cache/cache-device.js'))};

const [dir, logPath, runArg, mode] = process.argv.slice(2);
const run = Number(runArg);
const BS = ${BS};
const SPACES = ${JSON.stringify(SPACES)};
const BLOCKS = ${BLOCKS};
${content.toString()}

let seed = run * 7919 + 17;
const rand = (n) => {
  // mulberry32
  seed = (seed + 0x6d2b79f5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) % n;
};
const cache = await CacheDevice.open(dir, { capacityBytes: ${SLOTS} * BS, verifyReads: false, logger: { warn: () => {} } });
if (mode === 'durability') {
  for (let b = 0; b < 30; b++) {
    appendFileSync(logPath, 'a0 ' + b + ' ' + (run * 1000000 + b) + '\\n');
    await cache.put('a0', b, content('a0', b, run * 1000000 + b), 'other');
  }
  await cache.flush();
  process.stdout.write('flushed\\n');
  await new Promise(() => {});
}
process.stdout.write('ready\\n');
let counter = 0;
async function worker() {
  for (;;) {
    const space = SPACES[rand(SPACES.length)];
    const block = rand(BLOCKS);
    const r = rand(1000);
    if (r < 150) {
      // A batch of consecutive blocks, as the prefetcher stores a chunk.
      const batch = [];
      for (let b = block; b < Math.min(BLOCKS, block + 1 + rand(8)); b++) {
        const version = run * 1000000 + ++counter;
        appendFileSync(logPath, space + ' ' + b + ' ' + version + '\\n');
        batch.push({ block: b, data: content(space, b, version) });
      }
      await cache.putMany(space, batch, r < 75 ? 'boot' : 'other');
    } else if (r < 600) {
      const version = run * 1000000 + ++counter;
      appendFileSync(logPath, space + ' ' + block + ' ' + version + '\\n');
      await cache.put(space, block, content(space, block, version), r < 200 ? 'boot' : 'other');
    } else if (r < 950) {
      const got = await cache.get(space, block);
      if (got) {
        const m = /^([a-z0-9]+):(\\d+):(\\d+):/.exec(got.toString('latin1', 0, 40));
        if (!m || m[1] !== space || Number(m[2]) !== block || !content(space, block, Number(m[3])).equals(got)) {
          process.stderr.write('BAD BLOCK ' + space + ' ' + block + '\\n');
          process.exit(3);
        }
      }
    } else if (r < 975) {
      cache.markBooted(space);
    } else if (r < 990) {
      await cache.flush();
    } else if (r < 997) {
      await cache.compact();
    } else {
      await cache.invalidateSpace(space);
    }
  }
}
await Promise.all(Array.from({ length: 12 }, worker));
`;

interface ChildRun {
  /** What the child printed first ('ready' or 'flushed'), once it did. */
  started: Promise<string>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>;
  kill(): void;
}

function startChild(script: string, dir: string, log: string, run: number, mode = 'churn'): ChildRun {
  const child = spawn(process.execPath, [VITE_NODE, script, dir, log, String(run), mode], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((res) =>
    child.on('exit', (code, signal) => res({ code, signal, stderr })),
  );
  const started = new Promise<string>((res, rej) => {
    let out = '';
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('\n')) res(out.split('\n')[0]!);
    });
    void exited.then((e) => rej(new Error(`child exited before starting (code ${e.code}): ${e.stderr}`)));
  });
  return { started, exited, kill: () => child.kill('SIGKILL') };
}

/** key -> versions the child logged (it logs before it puts). */
async function loggedVersions(log: string): Promise<Map<string, Set<number>>> {
  const versions = new Map<string, Set<number>>();
  const text = await readFile(log, 'latin1').catch(() => '');
  for (const line of text.split('\n')) {
    const [space, block, version] = line.split(' ');
    if (version === undefined) continue; // a line torn by the kill
    const key = `${space}/${block}`;
    versions.set(key, (versions.get(key) ?? new Set()).add(Number(version)));
  }
  return versions;
}

/** Every block the cache returns is a logged version of the key asked for; returns the hit count. */
async function checkCache(cache: CacheDevice, versions: Map<string, Set<number>>): Promise<number> {
  let hits = 0;
  for (const space of SPACES) {
    for (let block = 0; block < BLOCKS; block++) {
      const got = await cache.get(space, block);
      if (!got) continue;
      hits++;
      const m = /^([a-z0-9]+):(\d+):(\d+):/.exec(got.toString('latin1', 0, 40));
      expect(m, `${space}/${block}: bytes of no block at all`).not.toBeNull();
      expect(`${m![1]}/${m![2]}`, 'bytes of another key').toBe(`${space}/${block}`);
      const version = Number(m![3]);
      expect(versions.get(`${space}/${block}`)?.has(version), `${space}/${block} v${version} was never put`).toBe(true);
      expect(got.equals(content(space, block, version)), `${space}/${block} v${version}: torn or mixed bytes`).toBe(true);
    }
  }
  return hits;
}

/** A temp directory with the child script, the cache directory and the version log. */
async function workspace(): Promise<{ script: string; dir: string; log: string }> {
  const work = await mkdtemp(join(tmpdir(), 'bc-cache-crash-'));
  dirs.push(work);
  const script = join(work, 'child.ts');
  await writeFile(script, CHILD);
  return { script, dir: join(work, 'cache'), log: join(work, 'versions.log') };
}

/** Deterministic delays in [5, 300) ms. */
function delays(count: number, seed: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    seed = (seed * 48271) % 2147483647;
    out.push(5 + (seed % 295));
  }
  return out;
}

describe('CacheDevice crash safety', () => {
  it('survives 20 SIGKILLs at random moments without ever serving wrong bytes', { timeout: 600_000 }, async () => {
    const { script, dir, log } = await workspace();
    let totalHits = 0;
    let killedWhileRunning = 0;
    for (const [run, delay] of delays(20, 20240607).entries()) {
      const child = startChild(script, dir, log, run + 1);
      expect(await child.started).toBe('ready');
      await new Promise((r) => setTimeout(r, delay));
      child.kill();
      const exit = await child.exited;
      expect(exit.stderr).not.toMatch(/BAD BLOCK/);
      if (exit.signal === 'SIGKILL') killedWhileRunning++;

      // The crashed cache reopens (taking over the dead process's lock) and serves only legitimate bytes.
      const warnings: string[] = [];
      const cache = await CacheDevice.open(dir, {
        capacityBytes: SLOTS * BS,
        verifyReads: false,
        logger: { warn: (m) => warnings.push(m) },
      });
      expect(warnings).toEqual([]); // a crash leaves nothing a restart has to warn about
      const versions = await loggedVersions(log);
      totalHits += await checkCache(cache, versions);
      const s = cache.stats();
      expect(s.usedBytes).toBeLessThanOrEqual(SLOTS * BS);
      expect(s.checksumFailures).toBe(0);
      expect((await stat(join(dir, 'cache.data'))).size).toBe(SLOTS * BS);

      // And it keeps working.
      cache.markBooted('ff');
      for (let b = 0; b < 5; b++) await cache.put('ff', b, content('ff', b, run), 'boot');
      for (let b = 0; b < 5; b++) expect((await cache.get('ff', b))?.equals(content('ff', b, run))).toBe(true);
      await cache.invalidateSpace('ff');
      await cache.close();
    }
    expect(killedWhileRunning).toBe(20);
    expect(totalHits).toBeGreaterThan(0);
  });

  it('keeps every flushed block across a SIGKILL', { timeout: 120_000 }, async () => {
    const { script, dir, log } = await workspace();
    const child = startChild(script, dir, log, 7, 'durability');
    expect(await child.started).toBe('flushed');
    child.kill();
    await child.exited;
    const cache = await CacheDevice.open(dir, { capacityBytes: SLOTS * BS, verifyReads: false });
    for (let b = 0; b < 30; b++) expect((await cache.get('a0', b))?.equals(content('a0', b, 7_000_000 + b))).toBe(true);
    await cache.close();
  });
});
