/**
 * `bootcache agent` as a real process: start-up errors, status over the
 * control socket, QEMU's own client, JSON logs and a clean SIGTERM.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { cli } from '../helpers/cli.js';

const run = promisify(execFile);
const bin = fileURLToPath(new URL('../../bin/run.js', import.meta.url));
let dir: string;
const children: ChildProcess[] = [];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bc-agent-cli-'));
  await mkdir(join(dir, 'storage'));
  await writeFile(join(dir, 'storage', 'disk.raw'), randomBytes(8 * 1024 * 1024));
});

afterEach(() => {
  for (const c of children.splice(0)) c.kill('SIGKILL');
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

interface Started {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  exited: Promise<number>;
}

/** Starts `bootcache agent`; without the start-up warm-up (a second or two) unless `--warmup` is among the args. */
function startAgent(args: string[], env: NodeJS.ProcessEnv = process.env): Started {
  const full = args.includes('--warmup') ? args : [...args, '--no-warmup'];
  const child = spawn(process.execPath, [bin, 'agent', ...full], { stdio: ['ignore', 'pipe', 'pipe'], env });
  children.push(child);
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number>((resolve) => child.on('exit', (code) => resolve(code ?? -1)));
  return { child, stdout: () => out, stderr: () => err, exited };
}

async function waitForLog(s: Started, pattern: RegExp, timeoutMs = 30_000): Promise<void> {
  const start = Date.now();
  while (!pattern.test(s.stdout())) {
    if (Date.now() - start > timeoutMs) throw new Error(`agent did not log ${pattern}: ${s.stdout()} ${s.stderr()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Sends `signal` as soon as the agent logs a line matching `pattern` (no polling delay). */
function signalOnLog(s: Started, pattern: RegExp, signal: NodeJS.Signals): void {
  const check = (): void => {
    if (!pattern.test(s.stdout())) return;
    s.child.stdout!.off('data', check);
    s.child.kill(signal);
  };
  s.child.stdout!.on('data', check);
}

const paths = (name: string) => ({
  socket: join(dir, `${name}.sock`),
  control: join(dir, `${name}.ctl`),
  cache: join(dir, `cache-${name}`),
});

describe('bootcache agent (process)', () => {
  it('serves QEMU, answers status, logs JSON, and stops cleanly on SIGTERM', async () => {
    const p = paths('ok');
    // As operators run it: with the start-up warm-up, whose scratch files go to TMPDIR and are removed.
    const tmp = join(dir, 'tmp-ok');
    await mkdir(tmp);
    const a = startAgent(['--storage', join(dir, 'storage'), '--cache', p.cache, '--socket', p.socket, '--control', p.control, '--cache-size', '64M', '--warmup'],
      { ...process.env, TMPDIR: tmp });
    await waitForLog(a, /agent started/);
    expect(a.stdout()).toMatch(/"warmupMs":\d+,"msg":"agent started"/);
    expect(await readdir(tmp)).toEqual([]);
    await run('qemu-io', ['-f', 'raw', '-r', `nbd+unix:///disk.raw?socket=${p.socket}`, '-c', 'read 0 64k', '-c', 'read 1M 4k']);
    const status = await cli('agent', 'status', '--control', p.control, '--json');
    expect(status.status, status.stderr).toBe(0);
    expect(status.json).toMatchObject({
      warmup: { boots: 3, reads: expect.any(Number), ms: expect.any(Number), prefetchedBlocks: expect.any(Number) },
      exports: [{ name: 'disk.raw', size: 8 * 1024 * 1024 }],
      counters: { storage: { readRequests: expect.any(Number) }, guestReads: { storage: expect.any(Number) } },
      nbd: { handshakes: 1, rejectedConnections: 0, droppedConnections: 0, protocolErrors: 0 },
    });
    const human = await cli('agent', 'status', '--control', p.control);
    expect(human.stdout).toMatch(/disk\.raw: 8\.0 MiB/);
    expect(human.stdout).toMatch(/nbd: \d+ connections open, 1 accepted, 0 refused and 0 dropped when full/);
    // Group members may connect (write permission on the socket), others may not.
    expect((await stat(p.socket)).mode & 0o777).toBe(0o660);
    // An export that is not open is bad input (3), not an unreachable agent (7).
    const unknown = await cli('agent', 'mark-booted', 'nosuch.raw', '--control', p.control, '--json');
    expect(unknown.status, unknown.stderr).toBe(3);
    expect(unknown.json).toMatchObject({ error: { code: 'BC_EXPORT_NOT_FOUND', message: expect.stringMatching(/not open/) } });
    a.child.kill('SIGTERM');
    expect(await a.exited).toBe(0);
    // Every stdout line is a JSON log record.
    for (const line of a.stdout().trim().split('\n')) expect(() => JSON.parse(line)).not.toThrow();
    expect(a.stdout()).toMatch(/"msg":"agent stopped"/);
  });

  it('stops cleanly on a SIGTERM during its start: exit 0, no sockets left, the cache free for the next agent', async () => {
    const p = paths('early');
    // One 256 MiB prefetch buffer to fault in: the start takes a second or so, and the
    // signal comes at its beginning (the "starting" line, logged once the handlers are in).
    const args = ['--storage', join(dir, 'storage'), '--cache', p.cache, '--socket', p.socket, '--control', p.control,
      '--cache-size', '64M', '--prefetch-chunk', '256M', '--prefetch-depth', '1', '--log-level', 'debug'];
    const a = startAgent(args);
    signalOnLog(a, /"msg":"starting"/, 'SIGTERM');
    expect(await a.exited, a.stdout() + a.stderr()).toBe(0);
    expect(a.stdout()).toMatch(/"msg":"stopping"/);
    // The signal came during the start, not after it.
    expect(a.stdout()).not.toMatch(/agent started/);
    expect(a.stderr()).toBe('');
    await expect(stat(p.socket)).rejects.toThrow(/ENOENT/);
    await expect(stat(p.control)).rejects.toThrow(/ENOENT/);
    const b = startAgent(args);
    await waitForLog(b, /agent started/);
    b.child.kill('SIGTERM');
    expect(await b.exited).toBe(0);
  });

  it('stops cleanly on a SIGTERM during its warm-up: exit 0, the scratch files removed, nothing listening', async () => {
    const p = paths('warming');
    const tmp = join(dir, 'tmp-warming');
    await mkdir(tmp);
    const a = startAgent(['--storage', join(dir, 'storage'), '--cache', p.cache, '--socket', p.socket, '--control', p.control,
      '--cache-size', '64M', '--warmup', '--log-level', 'debug'], { ...process.env, TMPDIR: tmp });
    signalOnLog(a, /"msg":"warm-up started"/, 'SIGTERM');
    expect(await a.exited, a.stdout() + a.stderr()).toBe(0);
    expect(a.stdout()).not.toMatch(/agent started|warm-up done/);
    expect(a.stderr()).toBe('');
    expect(await readdir(tmp)).toEqual([]);
    await expect(stat(p.socket)).rejects.toThrow(/ENOENT/);
    await expect(stat(p.control)).rejects.toThrow(/ENOENT/);
  });

  it('starts without the warm-up when its scratch directory cannot be made: one warning, then serves', async () => {
    const p = paths('nowarm');
    const a = startAgent(['--storage', join(dir, 'storage'), '--cache', p.cache, '--socket', p.socket, '--control', p.control,
      '--cache-size', '64M', '--warmup'], { ...process.env, TMPDIR: join(dir, 'no-such-tmp') });
    await waitForLog(a, /agent started/);
    expect(a.stdout()).toMatch(/"level":40,.*warm-up skipped: .*no-such-tmp/);
    await run('qemu-io', ['-f', 'raw', '-r', `nbd+unix:///disk.raw?socket=${p.socket}`, '-c', 'read 0 64k']);
    a.child.kill('SIGTERM');
    expect(await a.exited).toBe(0);
  });

  it('gives one clear line and exit 7 for a missing storage directory, an unwritable cache, a port in use', async () => {
    const p = paths('bad');
    const missing = startAgent(['--storage', join(dir, 'nope'), '--cache', p.cache, '--socket', p.socket, '--control', p.control]);
    expect(await missing.exited).toBe(7);
    expect(missing.stderr()).toMatch(/storage: .*nope.*no such file/);
    expect(missing.stderr().trim().split('\n')).toHaveLength(1);

    // A control path at a regular file is refused, and the file kept.
    const notSocket = join(dir, 'control-is-a-file');
    await writeFile(notSocket, 'precious');
    const badControl = startAgent(['--storage', join(dir, 'storage'), '--cache', p.cache, '--socket', p.socket, '--control', notSocket]);
    expect(await badControl.exited).toBe(7);
    expect(badControl.stderr()).toMatch(/control-is-a-file: the path exists and is not a socket/);
    expect(await readFile(notSocket, 'utf8')).toBe('precious');
    await expect(stat(p.socket)).rejects.toThrow(/ENOENT/);

    const notDir = join(dir, 'cache-is-a-file');
    await writeFile(notDir, 'x');
    const badCache = startAgent(['--storage', join(dir, 'storage'), '--cache', notDir, '--socket', p.socket, '--control', p.control]);
    expect(await badCache.exited).toBe(7);
    expect(badCache.stderr()).toMatch(/cache-is-a-file/);

    const busy = createServer();
    await new Promise<void>((r) => busy.listen(0, '127.0.0.1', () => r()));
    const port = (busy.address() as { port: number }).port;
    const inUse = startAgent(['--storage', join(dir, 'storage'), '--cache', p.cache, '--socket', p.socket, '--control', p.control, '--listen', `127.0.0.1:${port}`]);
    expect(await inUse.exited).toBe(7);
    expect(inUse.stderr()).toMatch(new RegExp(`${port}.*(in use|EADDRINUSE)`, 'i'));
    // It never started, so it does not log that it stopped.
    expect(inUse.stdout()).not.toMatch(/agent stopped/);
    // The cache directory it created is removed again; an existing one is left as it was.
    await expect(stat(p.cache)).rejects.toThrow(/ENOENT/);
    const kept = join(dir, 'existing-cache');
    await mkdir(kept);
    await writeFile(join(kept, 'marker'), 'x');
    const inUseKept = startAgent(['--storage', join(dir, 'storage'), '--cache', kept, '--socket', p.socket, '--control', p.control, '--listen', `127.0.0.1:${port}`]);
    expect(await inUseKept.exited).toBe(7);
    expect((await readdir(kept)).sort()).toEqual(expect.arrayContaining(['cache.data', 'marker']));
    // Named through a directory that does not exist yet and "..": still the existing one, still kept.
    const throughMissing = startAgent(['--storage', join(dir, 'storage'), '--cache', `${dir}/not-yet/../existing-cache`, '--socket', p.socket, '--control', p.control, '--listen', `127.0.0.1:${port}`]);
    expect(await throughMissing.exited).toBe(7);
    expect((await readdir(kept)).sort()).toEqual(expect.arrayContaining(['cache.data', 'marker']));
    busy.close();
  });

  it('rejects a broken config file with exit 2', async () => {
    const p = paths('cfg');
    const cfg = join(dir, 'agent.json');
    await writeFile(cfg, JSON.stringify({ storage: join(dir, 'storage'), cache: p.cache, cacheSize: 'lots' }));
    const a = startAgent(['--config', cfg, '--socket', p.socket, '--control', p.control]);
    expect(await a.exited).toBe(2);
    expect(a.stderr()).toMatch(/cacheSize.*lots/);
    await writeFile(cfg, '{ not json');
    const b = startAgent(['--config', cfg, '--socket', p.socket, '--control', p.control]);
    expect(await b.exited).toBe(2);
    expect(b.stderr()).toMatch(/agent\.json: config file is not valid JSON/);
  });

  it('rejects a --boot-max-share outside 0..1 and a bad boot.maxShareFloor with exit 2, naming them', async () => {
    const p = paths('share');
    const common = ['--storage', join(dir, 'storage'), '--cache', p.cache, '--socket', p.socket, '--control', p.control];
    const a = startAgent([...common, '--boot-max-share', '2']);
    expect(await a.exited).toBe(2);
    expect(a.stderr().trim()).toMatch(/--boot-max-share must be a number from 0 to 1, got "2" \[BC_USAGE\]$/);
    const cfg = join(dir, 'share.json');
    await writeFile(cfg, JSON.stringify({ boot: { maxShareFloor: 'half' } }));
    const b = startAgent([...common, '--config', cfg]);
    expect(await b.exited).toBe(2);
    expect(b.stderr().trim()).toMatch(/config: boot\.maxShareFloor must be a size such as 4096, 64K, 512M or 8G, got "half" \[BC_USAGE\]$/);
  });

  it('rejects a --prefetch-rate that is not a pace with exit 2, in one line naming it', async () => {
    const p = paths('rate');
    const a = startAgent(['--storage', join(dir, 'storage'), '--cache', p.cache, '--socket', p.socket, '--control', p.control, '--prefetch-rate', '25']);
    expect(await a.exited).toBe(2);
    expect(a.stderr().trim()).toMatch(/^[^\n]*--prefetch-rate must be 0 \(unlimited\) or at least 64K \(bytes per second\), got "25" \[BC_USAGE\]$/);
  });

  it('gives both sockets the --socket-group and the NBD socket the --socket-mode; an unknown group is a usage error', async () => {
    const p = paths('group');
    const a = startAgent(['--storage', join(dir, 'storage'), '--cache', p.cache, '--socket', p.socket, '--control', p.control,
      '--cache-size', '64M', '--socket-group', '1', '--socket-mode', '640']);
    await waitForLog(a, /agent started/);
    const nbd = await stat(p.socket);
    expect({ mode: nbd.mode & 0o777, gid: nbd.gid }).toEqual({ mode: 0o640, gid: 1 });
    const control = await stat(p.control);
    expect({ mode: control.mode & 0o777, gid: control.gid }).toEqual({ mode: 0o660, gid: 1 });
    a.child.kill('SIGTERM');
    expect(await a.exited).toBe(0);

    const q = paths('nogroup');
    const b = startAgent(['--storage', join(dir, 'storage'), '--cache', q.cache, '--socket', q.socket, '--control', q.control,
      '--socket-group', 'no-such-group-here']);
    expect(await b.exited).toBe(2);
    // One line naming the flag (or the config key), not a bare lookup failure.
    expect(b.stderr()).toBe('bootcache agent: error: --socket-group: no group named "no-such-group-here" [BC_USAGE]\n');
    // A configuration error is found before anything is created.
    await expect(stat(q.cache)).rejects.toThrow(/ENOENT/);
    const cfg = join(dir, 'nogroup.json');
    await writeFile(cfg, JSON.stringify({ socketGroup: 'no-such-group-here' }));
    const c = startAgent(['--config', cfg, '--storage', join(dir, 'storage'), '--cache', q.cache, '--socket', q.socket, '--control', q.control]);
    expect(await c.exited).toBe(2);
    expect(c.stderr()).toBe('bootcache agent: error: config: socketGroup: no group named "no-such-group-here" [BC_USAGE]\n');
  });

  it('status without an agent is a clear error', async () => {
    const r = await cli('agent', 'status', '--control', join(dir, 'none.ctl'));
    expect(r.status).toBe(7);
    expect(r.stderr).toMatch(/^bootcache agent status: error: .*none\.ctl: cannot reach the agent's control socket .*is the agent running/);
  });
});
