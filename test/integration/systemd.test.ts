/**
 * The systemd units in contrib/systemd/, tested as far as this machine
 * allows (no systemd as PID 1): `systemd-analyze verify` on the units, and
 * socket activation through `systemd-socket-activate`, which passes the
 * NBD and control sockets as systemd does (LISTEN_FDS, LISTEN_FDNAMES):
 * `qemu-img compare` and `agent status` over the passed sockets, with and
 * without an address-space limit (under which the CLI runs itself again and
 * hands the sockets on).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { copyFile, mkdir, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { passedSockets } from '../../src/agent/socket-activation.js';
import { cli } from '../helpers/cli.js';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';

const run = promisify(execFile);
const repo = fileURLToPath(new URL('../..', import.meta.url));
const units = join(repo, 'contrib/systemd');
let dir: string;

beforeAll(async () => {
  dir = await tmpDir('bc-systemd-');
  await mkdir(join(dir, 'storage'));
  await writeFile(join(dir, 'storage', 'disk.raw'), randomBytes(4 * 1024 * 1024));
});
afterAll(async () => {
  await removeTmpDir(dir);
});

describe('systemd units', () => {
  it('pass systemd-analyze verify (Documentation= resolves to our man page)', async () => {
    const man = join(dir, 'man', 'man1');
    await mkdir(man, { recursive: true });
    await copyFile(join(repo, 'man', 'bootcache-agent.1'), join(man, 'bootcache-agent.1'));
    const files = (await readdir(units)).filter((f) => /\.(service|socket)$/.test(f)).map((f) => join(units, f));
    expect(files.length).toBe(3);
    const { stdout, stderr } = await run('systemd-analyze', ['verify', ...files], { env: { ...process.env, MANPATH: join(dir, 'man') } });
    expect(`${stdout}${stderr}`).toBe('');
  });
});

/** Runs the agent under systemd-socket-activate; `limitKiB`: under `ulimit -v`. */
function activate(name: string, limitKiB?: number): { child: ChildProcess; nbd: string; control: string } {
  const nbd = join(dir, `${name}.nbd.sock`);
  const control = join(dir, `${name}.control.sock`);
  const command = [
    'systemd-socket-activate', '-l', nbd, '-l', control, '--fdname=nbd:control',
    process.execPath, join(repo, 'bin/run.js'), 'agent', '--storage', join(dir, 'storage'), '--cache', join(dir, `${name}-cache`),
    '--cache-size', '64M', '--no-warmup', '--log-level', 'warn',
  ];
  const script = `${limitKiB === undefined ? '' : `ulimit -v ${limitKiB} && `}exec ${command.map((a) => `'${a}'`).join(' ')}`;
  const child = spawn('bash', ['-c', script], { stdio: ['ignore', 'ignore', 'pipe'] });
  return { child, nbd, control };
}

async function waitForSocket(path: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    try {
      await run('test', ['-S', path]);
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  throw new Error(`${path} did not appear`);
}

describe('socket activation (systemd-socket-activate)', () => {
  for (const [label, limit] of [['', undefined], [' under ulimit -v 2 GiB', 2 * 1024 * 1024]] as const) {
    it(`serves QEMU and answers status over the passed sockets${label}`, async () => {
      const { child, nbd, control } = activate(limit === undefined ? 'plain' : 'limited', limit);
      let stderr = '';
      child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
      try {
        await waitForSocket(nbd);
        await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', `nbd+unix:///disk.raw?socket=${nbd}`, join(dir, 'storage', 'disk.raw')]);
        const status = await cli('agent', 'status', '--control', control, '--json');
        expect(status.status).toBe(0);
        expect(status.json).toMatchObject({ socket: 'passed by systemd: nbd (fd 3)', exports: [{ name: 'disk.raw' }] });
      } finally {
        child.kill('SIGTERM');
        await new Promise((resolve) => child.once('exit', resolve));
      }
      // The agent execs in place of systemd-socket-activate: SIGTERM reached it, and it stopped cleanly.
      expect(child.exitCode === 0 || child.signalCode === 'SIGTERM').toBe(true);
      expect(stderr).not.toMatch(/"level":(50|60)/);
    });
  }

  it('takes sockets only when LISTEN_PID names this process, and clears the variables', () => {
    const env: NodeJS.ProcessEnv = { LISTEN_PID: '1234', LISTEN_FDS: '2', LISTEN_FDNAMES: 'nbd:control' };
    expect(passedSockets(env, 1234, 1)).toEqual([{ fd: 3, name: 'nbd' }, { fd: 4, name: 'control' }]);
    expect(env.LISTEN_PID).toBeUndefined();
    expect(passedSockets({ LISTEN_PID: '999', LISTEN_FDS: '1' }, 1234, 1)).toEqual([]);
    // Run again by bin/run.js under a limit: the parent was named.
    expect(passedSockets({ LISTEN_PID: '77', LISTEN_FDS: '1', BOOTCACHE_REEXEC: '1' }, 1234, 77)).toEqual([{ fd: 3, name: 'unknown' }]);
    expect(() => passedSockets({ LISTEN_PID: '1234', LISTEN_FDS: 'x' }, 1234, 1)).toThrow(/LISTEN_FDS/);
  });
});
