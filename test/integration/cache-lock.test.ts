/**
 * The cache directory lock (src/agent/cache/dir-lock.ts) across real
 * processes: it dies with its holder (kill -9), a pid in the file means
 * nothing, and of processes racing for one directory exactly one wins.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CacheDevice } from '../../src/agent/cache/cache-device.js';
import { AgentError } from '../../src/errors.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const BIN = join(ROOT, 'bin', 'run.js');
const VITE_NODE = join(ROOT, 'node_modules', 'vite-node', 'vite-node.mjs');
let dir: string;
const children: ChildProcess[] = [];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bc-cache-lock-'));
  await mkdir(join(dir, 'storage'));
  await writeFile(join(dir, 'storage', 'disk.raw'), randomBytes(1024 * 1024));
});

afterEach(() => {
  for (const c of children.splice(0)) c.kill('SIGKILL');
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const quiet = { warn: (): void => undefined };

interface Started {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  exited: Promise<number>;
}

function spawnWatched(args: string[]): Started {
  const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number>((resolve) => child.on('exit', (code, signal) => resolve(code ?? (signal ? -1 : -2))));
  return { child, stdout: () => out, stderr: () => err, exited };
}

function startAgent(name: string, cache: string): Started {
  return spawnWatched([
    BIN, 'agent', '--no-warmup',
    '--storage', join(dir, 'storage'),
    '--cache', cache,
    '--cache-size', '16M',
    '--socket', join(dir, `${name}.sock`),
    '--control', join(dir, `${name}.ctl`),
  ]);
}

/** Resolves once the agent logged its start; rejects if it exits first. */
async function started(s: Started): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const check = (): void => {
      if (/agent started/.test(s.stdout())) resolve();
    };
    s.child.stdout!.on('data', check);
    check();
    void s.exited.then((code) => reject(new Error(`agent exited (${code}) before it started: ${s.stderr()}`)));
  });
}

describe('cache directory lock', () => {
  it('a lock file naming a live, unrelated process (pid 1, the test runner) does not block an open', async () => {
    for (const pid of [1, process.ppid, process.pid]) {
      const cacheDir = join(dir, `live-pid-${pid}`);
      await mkdir(cacheDir);
      await writeFile(join(cacheDir, 'cache.lock'), `${pid} 0123456789ab\n`);
      const cache = await CacheDevice.open(cacheDir, { capacityBytes: 64 * 4096, logger: quiet });
      // The file names the holder, for humans.
      expect(await readFile(join(cacheDir, 'cache.lock'), 'latin1')).toBe(`${process.pid}\n`);
      await cache.close();
      expect(await readdir(cacheDir)).not.toContain('cache.lock');
    }
  });

  it('agents: a stale pid does not block the start, a second agent is refused with exit 7, and after kill -9 a new one starts at once', async () => {
    const cache = join(dir, 'agent-cache');
    await mkdir(cache);
    await writeFile(join(cache, 'cache.lock'), '1\n'); // pid 1 is alive: a pid check would refuse this
    const first = startAgent('first', cache);
    await started(first);
    const holder = first.child.pid!;
    expect(await readFile(join(cache, 'cache.lock'), 'latin1')).toBe(`${holder}\n`);

    const second = startAgent('second', cache);
    expect(await second.exited).toBe(7);
    expect(second.stderr().trim().split('\n')).toEqual([
      `bootcache agent: error: cache directory ${cache} is in use by process ${holder} [BC_AGENT]`,
    ]);
    // The refused start touched nothing of the holder's.
    expect(await readFile(join(cache, 'cache.lock'), 'latin1')).toBe(`${holder}\n`);

    // An open in this process is refused the same way while the agent lives.
    await expect(CacheDevice.open(cache, { capacityBytes: 16 * 1024 * 1024, logger: quiet })).rejects.toThrow(
      new AgentError(`cache directory ${cache} is in use by process ${holder}`),
    );

    first.child.kill('SIGKILL');
    expect(await first.exited).toBe(-1);
    // The file still names the dead agent: the kernel lock went with it, so that is no obstacle.
    expect(await readFile(join(cache, 'cache.lock'), 'latin1')).toBe(`${holder}\n`);
    const third = startAgent('third', cache);
    await started(third);
    expect(await readFile(join(cache, 'cache.lock'), 'latin1')).toBe(`${third.child.pid}\n`);
    third.child.kill('SIGTERM');
    expect(await third.exited).toBe(0);
    expect(await readdir(cache)).not.toContain('cache.lock');
  });

  it('of processes racing to open one directory exactly one wins, the others are told who holds it', async () => {
    const cache = join(dir, 'race');
    const script = join(dir, 'racer.ts');
    await writeFile(
      script,
      `import { CacheDevice } from ${JSON.stringify(join(ROOT, 'src/agent/cache/cache-device.ts'))};
const go = Number(process.argv[3]);
while (Date.now() < go) await new Promise((r) => setTimeout(r, 1));
try {
  const cache = await CacheDevice.open(process.argv[2], { capacityBytes: 64 * 4096, logger: { warn: () => undefined } });
  process.stdout.write('won\\n');
  await new Promise((r) => setTimeout(r, 60_000));
  await cache.close();
} catch (err) {
  process.stdout.write('lost: ' + err.code + ': ' + err.message + '\\n');
  process.exit(0);
}
`,
    );
    // vite-node takes a second or two to start: all racers wait for the same moment.
    const go = Date.now() + 6000;
    const racers = Array.from({ length: 4 }, () => spawnWatched([VITE_NODE, script, cache, String(go)]));
    const answers = await Promise.all(
      racers.map(async (r) => {
        while (!r.stdout().includes('\n')) {
          const code = await Promise.race([r.exited, new Promise<undefined>((res) => setTimeout(() => res(undefined), 50))]);
          if (code !== undefined && !r.stdout().includes('\n')) throw new Error(`racer exited ${code}: ${r.stderr()}`);
        }
        return r.stdout().split('\n')[0]!;
      }),
    );
    const winners = racers.filter((_, i) => answers[i] === 'won');
    expect(winners).toHaveLength(1);
    const winner = winners[0]!.child.pid!;
    for (const a of answers.filter((a) => a !== 'won')) {
      // A loser may read the file before the winner wrote its pid into it.
      expect(a).toMatch(new RegExp(`^lost: BC_AGENT: cache directory ${cache} is in use by (process ${winner}|another process)$`));
    }
    expect(await readFile(join(cache, 'cache.lock'), 'latin1')).toBe(`${winner}\n`);
  }, 60_000);
});
