/**
 * `bootcache profile` end to end on tiny guests built here: a 512-byte x86
 * boot sector that reads 100 blocks through the BIOS (int 13h) and prints to
 * the serial port. SeaBIOS boots it in about a second under TCG, so these
 * tests exercise the real thing (QEMU, the in-process NBD server, recording
 * of guest reads, console capture, end-of-boot rules, VM stop, the outputs)
 * without a Linux guest. The reference Debian guest: profile-reference.test.ts.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdir, open, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadMap } from '../../src/format/map.js';
import { readTrace, type TraceEvent } from '../../src/format/trace.js';
import { HeadObjectCommand, PutObjectCommand, type S3Client } from '@aws-sdk/client-s3';
import { qemuImg, removeTmpDir, tmpDir } from '../helpers/qemu.js';
import { createTestBucket, deleteTestBucket, ensureRgw } from '../helpers/rgw.js';

const bin = fileURLToPath(new URL('../../bin/run.js', import.meta.url));
const MiB = 1024 * 1024;

/**
 * The boot sector (GNU as, .code16, linked at 0x7c00):
 *   cli; xor ax,ax; mov ds/es/ss,ax; mov sp,0x7c00; sti; mov [drive],dl
 *   print "BOOTSECTOR: start\r\n"
 *   100 times: int 13h AH=42h (extended read) of 8 sectors at LBA 2048*k
 *              (the 4 KiB block at k MiB, k = 1..100) into 0000:8000
 *   print "BOOTSECTOR: read 100 blocks\r\nbootsector login: "
 *   hlt loop. A failed read prints "BOOTSECTOR: disk read failed" instead.
 * print: lodsb; out 0x3f8 (COM1) until NUL. Then 0x55 0xAA at 510.
 */
const READER_CODE =
  'fa31c08ed88ec08ed0bc007cfb8816567cbe6c7ce83300c706577c6400b4428a16567cbe5c7ccd137218668106647c00080000ff0e577c75e4be807ce8' +
  '0b00f4ebfdbeb07ce80200ebf5baf803ac84c07403eeebf8c30000008d740010000800008000000008000000000000424f4f54534543544f523a207374' +
  '6172740d0a00424f4f54534543544f523a20726561642031303020626c6f636b730d0a626f6f74736563746f72206c6f67696e3a2000424f4f5453454354' +
  '4f523a206469736b2072656164206661696c65640d0a';
/** Prints "BOOTSECTOR: resetting the machine\r\n", then pulses the reset line (out 0x64, 0xFE). */
const RESET_CODE =
  'fa31c08ed8be1a7cbaf803ac84c07403eeebf8b0fee664f4ebfd424f4f54534543544f523a20726573657474696e6720746865206d616368696e650d0a';

/**
 * Prints `text` on COM1, then halts: RESET_CODE with the reset (mov al,0xfe;
 * out 0x64,al) replaced by four NOPs, so the string stays at offset 0x1a.
 */
function printAndHalt(text: string): string {
  return `fa31c08ed8be1a7cbaf803ac84c07403eeebf890909090f4ebfd${Buffer.from(`${text}\0`, 'latin1').toString('hex')}`;
}

function bootSector(hex: string): Buffer {
  const sector = Buffer.alloc(512);
  Buffer.from(hex, 'hex').copy(sector);
  sector[510] = 0x55;
  sector[511] = 0xaa;
  return sector;
}

/** Image blocks the reader boot sector reads: block 0 (the MBR, read by QEMU and SeaBIOS) and k MiB, k = 1..100. */
const READER_BLOCKS = [0, ...Array.from({ length: 100 }, (_, k) => ((k + 1) * MiB) / 4096)];

interface Run {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  json: unknown;
}

/** Runs the built CLI without a TTY; `onSpawn` gets the child (to send signals). */
function profile(args: string[], env: Record<string, string> = {}, onSpawn?: (pid: number) => void): Promise<Run> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [bin, 'profile', ...args], {
      env: { ...process.env, DEBUG: '', NO_COLOR: '1', ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    if (onSpawn && child.pid !== undefined) onSpawn(child.pid);
    child.on('close', (status, signal) => {
      let json: unknown;
      try {
        json = JSON.parse(stdout);
      } catch {
        json = undefined;
      }
      resolve({ status, signal, stdout, stderr, json });
    });
  });
}

interface RunJson {
  run: number;
  accel: string;
  bootSeconds: number;
  endReason: string;
  endLine?: string;
  reads: number;
  bytes: number;
  blocks: number;
  trace: string;
  consoleLog: string;
}
interface ProfileJson extends RunJson {
  image: string;
  format: string;
  accelReason: string;
  runs: RunJson[];
  agreement: { runs: number; blocksInAll: number; blocksInAny: number; ratio: number };
  map: { path: string; blockSize: number; blocks: number; bytes: number; boots: number };
  segment: { path: string; blocks: number; verified: boolean } | null;
  paths: { map: string; segment: string | null; traces: string[]; consoleLogs: string[] };
  notices: string[];
}

async function traceOf(path: string): Promise<TraceEvent[]> {
  const events: TraceEvent[] = [];
  for await (const e of readTrace(path)) events.push(e);
  return events;
}

async function fingerprint(path: string): Promise<string> {
  const s = await stat(path);
  return `${createHash('sha256').update(await readFile(path)).digest('hex')} ${s.mtimeMs}`;
}

/** QEMU processes whose command line mentions `needle` (our test dir). */
function qemuProcessesMentioning(needle: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      if (cmdline.includes('qemu-system') && cmdline.includes(needle)) pids.push(Number(entry));
    } catch {
      // gone
    }
  }
  return pids;
}

let dir: string;
let raw: string;
let qcow2: string;
let zero: string;
let reset: string;
let panic: string;
let rescue: string;
/** TMPDIR for the CLI, to check that it leaves nothing behind. */
let cliTmp: string;

beforeAll(async () => {
  dir = await tmpDir('bc-profile-');
  cliTmp = join(dir, 'tmp');
  await mkdir(cliTmp);
  raw = join(dir, 'reader.raw');
  const fh = await open(raw, 'w');
  await fh.truncate(128 * MiB);
  await fh.write(bootSector(READER_CODE), 0, 512, 0);
  // Random data where the guest reads, so the segment check compares real bytes.
  for (let k = 1; k <= 100; k++) await fh.write(randomBytes(4096), 0, 4096, k * MiB);
  await fh.close();
  qcow2 = join(dir, 'reader.qcow2');
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
  zero = join(dir, 'zero.raw');
  const zh = await open(zero, 'w');
  await zh.truncate(64 * MiB);
  await zh.close();
  reset = join(dir, 'reset.raw');
  await writeFile(reset, Buffer.concat([bootSector(RESET_CODE), Buffer.alloc(16 * MiB - 512)]));
  panic = join(dir, 'panic.raw');
  await writeFile(panic, Buffer.concat([bootSector(printAndHalt('Kernel panic - not syncing: VFS: Unable to mount root fs\r\n')), Buffer.alloc(16 * MiB - 512)]));
  rescue = join(dir, 'rescue.raw');
  await writeFile(rescue, Buffer.concat([bootSector(printAndHalt('error: unknown filesystem.\r\nEntering rescue mode...\r\ngrub rescue> ')), Buffer.alloc(16 * MiB - 512)]));
});

afterAll(async () => {
  await removeTmpDir(dir);
});

describe('bootcache profile on a boot-sector guest', () => {
  it('profiles a raw image: the default --until matches the login prompt; map, trace, segment and console log are written', async () => {
    const before = await fingerprint(raw);
    const r = await profile([raw, '--accel', 'tcg', '--timeout', '120', '--json'], { TMPDIR: cliTmp });
    expect(r.status, r.stderr).toBe(0);
    const j = r.json as ProfileJson;
    expect(j).toMatchObject({
      format: 'raw',
      accel: 'tcg',
      accelReason: '--accel tcg',
      endReason: 'until',
      endLine: 'bootsector login:',
      map: { path: `${raw}.bcmap`, blockSize: 4096, boots: 1 },
      segment: { path: `${raw}.bcseg`, verified: true },
      paths: { traces: [`${raw}.trace.csv`], consoleLogs: [join(dir, 'reader.raw.console.log')] },
      consoleLog: join(dir, 'reader.raw.console.log'),
      agreement: { runs: 1, ratio: 1 },
      notices: [],
    });
    expect(j.bootSeconds).toBeGreaterThan(0);
    expect(j.bootSeconds).toBeLessThan(120);
    // 100 block reads by the boot sector, plus the MBR (QEMU's geometry guess and SeaBIOS).
    expect(j.reads).toBeGreaterThanOrEqual(101);
    expect(j.blocks).toBe(101);
    expect(j.bytes).toBeGreaterThanOrEqual(100 * 4096 + 512);

    const map = await loadMap(`${raw}.bcmap`);
    expect(map.blocksSet).toBe(101);
    for (const b of READER_BLOCKS) expect(map.bitmap.get(b), `block ${b}`).toBe(true);
    expect(j.map.blocks).toBe(101);
    expect(j.segment!.blocks).toBe(101);

    const trace = await traceOf(`${raw}.trace.csv`);
    expect(trace).toHaveLength(j.reads);
    const blockReads = trace.filter((e) => e.offset > 0);
    expect(blockReads.map((e) => [e.offset, e.length])).toEqual(READER_BLOCKS.slice(1).map((b) => [b * 4096, 4096]));
    for (let i = 1; i < trace.length; i++) expect(trace[i]!.tUs).toBeGreaterThanOrEqual(trace[i - 1]!.tUs);
    for (const e of trace) {
      expect(e.op).toBe('read');
      expect(e.doneUs).toBeGreaterThanOrEqual(e.tUs);
      expect(e.tUs).toBeLessThanOrEqual(j.bootSeconds * 1e6 + 1000); // bootSeconds is rounded to ms
    }

    const consoleText = await readFile(j.consoleLog, 'utf8');
    expect(consoleText).toContain('BOOTSECTOR: read 100 blocks');
    expect(await fingerprint(raw)).toBe(before); // never written

    // The outputs are what the other commands expect.
    const verify = await runCli(['verify', raw, '--json']);
    expect(verify.status, verify.stderr).toBe(0);
    expect(qemuProcessesMentioning(dir)).toEqual([]);
    expect(readdirSync(cliTmp)).toEqual([]);
  });

  it('qcow2, the idle rule, --no-segment, another block size, explicit outputs', async () => {
    const out = join(dir, 'idle');
    await mkdir(out);
    const r = await profile(
      [
        qcow2, '--accel', 'tcg', '--until', 'never printed', '--idle', '2', '--no-segment', '--block-size', '65536',
        '--out-map', join(out, 'm.bcmap'), '--out-trace', join(out, 't.csv'), '--console-log', join(out, 'c.log'), '--json',
      ],
      { TMPDIR: cliTmp },
    );
    expect(r.status, r.stderr).toBe(0);
    const j = r.json as ProfileJson;
    expect(j).toMatchObject({ format: 'qcow2', endReason: 'idle', segment: null, map: { path: join(out, 'm.bcmap'), blockSize: 65536 } });
    expect(j.endLine).toBeUndefined();
    // Ended at the last new block: the last trace row.
    const trace = await traceOf(join(out, 't.csv'));
    expect(j.bootSeconds * 1e6).toBeGreaterThanOrEqual(trace[trace.length - 1]!.tUs - 1000);
    expect((await loadMap(join(out, 'm.bcmap'))).blocksSet).toBe(101); // 1 MiB apart: one 64 KiB block each
    expect(existsSync(`${qcow2}.bcseg`)).toBe(false);
    expect(await readFile(join(out, 'c.log'), 'utf8')).toContain('bootsector login: ');
    // Human output names every file.
    const human = await profile([qcow2, '--accel', 'tcg', '--idle', '2', '--no-segment', '--out-map', join(out, 'h.bcmap'), '--out-trace', join(out, 'h.csv'), '--console-log', join(out, 'h.log')]);
    expect(human.status, human.stderr).toBe(0);
    expect(human.stdout).toMatch(/booted in [\d.]+ s under tcg \(console matched "bootsector login:"\): \d+ reads/);
    expect(human.stdout).toContain(`map: ${join(out, 'h.bcmap')}`);
    expect(human.stdout).toContain(`trace: ${join(out, 'h.csv')}`);
    expect(human.stdout).toContain(`console log: ${join(out, 'h.log')}`);
  });

  it('--runs 2 merges the maps with the agent policy and reports agreement', async () => {
    const out = join(dir, 'runs');
    await mkdir(out);
    const r = await profile(
      [raw, '--accel', 'tcg', '--runs', '2', '--out-map', join(out, 'm.bcmap'), '--out-segment', join(out, 's.bcseg'), '--out-trace', join(out, 't.csv'), '--console-log', join(out, 'c.log'), '--json'],
      { TMPDIR: cliTmp },
    );
    expect(r.status, r.stderr).toBe(0);
    const j = r.json as ProfileJson;
    expect(j.runs.map((x) => x.run)).toEqual([1, 2]);
    expect(j.paths.traces).toEqual([join(out, 't.run1.csv'), join(out, 't.run2.csv')]);
    expect(j.paths.consoleLogs).toEqual([join(out, 'c.run1.log'), join(out, 'c.run2.log')]);
    for (const p of [...j.paths.traces, ...j.paths.consoleLogs]) expect(existsSync(p), p).toBe(true);
    expect(j.agreement).toEqual({ runs: 2, blocksInAll: 101, blocksInAny: 101, ratio: 1 });
    const map = await loadMap(join(out, 'm.bcmap'));
    expect(map.boots).toBe(2);
    expect(map.history).toMatchObject({ window: 4, minSeen: 2, recorded: 2 });
    expect(map.blocksSet).toBe(101);
    expect(j.segment).toMatchObject({ blocks: 101, verified: true });
  });

  it('--accel auto falls back to TCG when the guest makes no progress under "KVM" (test hooks: a frozen probe guest)', async () => {
    const out = join(dir, 'auto');
    await mkdir(out);
    const r = await profile(
      [raw, '--accel', 'auto', '--no-segment', '--out-map', join(out, 'm.bcmap'), '--out-trace', join(out, 't.csv'), '--console-log', join(out, 'c.log'), '--json'],
      {
        TMPDIR: cliTmp,
        BOOTCACHE_ACCEL: '',
        // Pretend KVM is usable, probe with TCG, and freeze the probe guest (-S).
        BOOTCACHE_PROFILE_KVM_DEVICE: '/dev/null',
        BOOTCACHE_PROFILE_PROBE_ACCEL: 'tcg',
        BOOTCACHE_PROFILE_PROBE_EXTRA: '-S',
        BOOTCACHE_PROFILE_STALL_MS: '3000',
      },
    );
    expect(r.status, r.stderr).toBe(0);
    const j = r.json as ProfileJson;
    expect(j.accel).toBe('tcg');
    expect(j.accelReason).toMatch(/^fell back to TCG: the guest made no progress under KVM within 3 s/);
    expect(j.notices).toHaveLength(1);
    expect(r.stderr).toMatch(/^bootcache profile: the guest made no progress under KVM within 3 s .*; restarting the boot under TCG\n$/);
    expect(j.endReason).toBe('until');
    // The restarted boot is recorded from scratch.
    expect(j.blocks).toBe(101);

    // The same guest running (not frozen) passes probation and stays on "KVM".
    const ok = await profile(
      [raw, '--accel', 'auto', '--no-segment', '--out-map', join(out, 'k.bcmap'), '--out-trace', join(out, 'k.csv'), '--console-log', join(out, 'k.log'), '--json'],
      { TMPDIR: cliTmp, BOOTCACHE_ACCEL: '', BOOTCACHE_PROFILE_KVM_DEVICE: '/dev/null', BOOTCACHE_PROFILE_PROBE_ACCEL: 'tcg' },
    );
    expect(ok.status, ok.stderr).toBe(0);
    expect(ok.json).toMatchObject({ accel: 'kvm', notices: [], endReason: 'until' });
    expect((ok.json as ProfileJson).accelReason).toMatch(/the guest made progress under KVM/);

    // Without a usable device: TCG, and the JSON says why.
    const none = await profile(
      [raw, '--accel', 'auto', '--no-segment', '--out-map', join(out, 'n.bcmap'), '--out-trace', join(out, 'n.csv'), '--console-log', join(out, 'n.log'), '--json'],
      { TMPDIR: cliTmp, BOOTCACHE_ACCEL: '', BOOTCACHE_PROFILE_KVM_DEVICE: join(dir, 'no-such-kvm') },
    );
    expect(none.status, none.stderr).toBe(0);
    expect(none.json).toMatchObject({ accel: 'tcg', accelReason: `${join(dir, 'no-such-kvm')} does not exist` });
  });
});

const ovmf = ['/usr/share/OVMF/OVMF_CODE_4M.fd', '/usr/share/OVMF/OVMF_CODE.fd', '/usr/share/qemu/OVMF.fd'].some((f) => existsSync(f));

describe('bootcache profile with --firmware uefi', () => {
  it.skipIf(!ovmf)('boots OVMF, which reads the disk and finds nothing to boot (needs the ovmf package)', async () => {
    const out = join(dir, 'uefi');
    await mkdir(out);
    const r = await profile(
      [
        raw, '--firmware', 'uefi', '--accel', 'tcg', '--timeout', '120', '--until', 'BdsDxe: failed to load', '--no-segment',
        '--out-map', join(out, 'm.bcmap'), '--out-trace', join(out, 't.csv'), '--console-log', join(out, 'c.log'), '--json',
      ],
      { TMPDIR: cliTmp },
    );
    expect(r.status, r.stderr).toBe(0);
    const j = r.json as ProfileJson;
    expect(j.endReason).toBe('until');
    expect(j.endLine).toMatch(/^BdsDxe: failed to load Boot\d+/);
    // OVMF reads the partition table (and the GPT header) of the disk.
    expect(j.reads).toBeGreaterThan(1);
    expect(await readFile(join(out, 'c.log'), 'latin1')).toContain('BdsDxe');
    expect(readdirSync(cliTmp)).toEqual([]);
  });
});

describe('bootcache profile failures: one line, the right exit code, the console log path', () => {
  it('QEMU missing: exit 6 naming it', async () => {
    const r = await profile([raw, '--qemu', '/nonexistent/qemu-system-x86_64', '--accel', 'tcg']);
    expect(r.status).toBe(6);
    expect(r.stderr).toBe('bootcache profile: error: QEMU not found: /nonexistent/qemu-system-x86_64 does not exist (--qemu) [BC_BOOT_FAILED]\n');
    const json = await profile([raw, '--qemu', 'no-such-qemu-binary', '--json']);
    expect(json.status).toBe(6);
    expect(json.json).toEqual({
      error: { code: 'BC_BOOT_FAILED', exitCode: 6, message: 'QEMU not found: no no-such-qemu-binary in PATH (install qemu-system-x86, or give --qemu PATH)' },
    });
    const notExec = await profile([raw, '--qemu', raw]);
    expect(notExec.status).toBe(6);
    expect(notExec.stderr).toContain('is not executable');
  });

  it('a disk that does not boot: exit 6 at the firmware\'s fatal line, not at --timeout; the failed log is kept apart', async () => {
    // A good boot first, logging where the failed one will.
    const logs = join(dir, 'logs');
    await mkdir(logs);
    const good = await profile([raw, '--accel', 'tcg', '--no-segment', '--out-map', join(logs, 'm.bcmap'), '--out-trace', join(logs, 't.csv'), '--console-log', join(logs, 'c.log')]);
    expect(good.status, good.stderr).toBe(0);
    const goodLog = await readFile(join(logs, 'c.log'), 'utf8');
    expect(goodLog).toContain('BOOTSECTOR: read 100 blocks');

    // The default --timeout (300 s) would fail the test's own timeout: the fatal line must end it.
    const r = await profile([zero, '--accel', 'tcg', '--console-log', join(logs, 'c.log')], { TMPDIR: cliTmp });
    expect(r.status).toBe(6);
    const lines = r.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(
      /^bootcache profile: error: .*zero\.raw: the boot failed after [\d.]+ s under tcg: the firmware printed "(Boot failed: not a bootable disk|No bootable device\.)": \d+ reads \(0\.0 MiB, 1 blocks\).*; console log: .*c\.failed\.log \[BC_BOOT_FAILED\]$/,
    );
    expect(existsSync(join(logs, 'c.failed.log'))).toBe(true);
    expect(await readFile(join(logs, 'c.log'), 'utf8')).toBe(goodLog); // the good boot's log is still there
    expect(existsSync(join(logs, 'c.log.partial'))).toBe(false);
    expect(existsSync(`${zero}.bcmap`)).toBe(false); // no outputs from a failed boot
    expect(qemuProcessesMentioning(dir)).toEqual([]);
    expect(readdirSync(cliTmp)).toEqual([]);
  });

  it('a kernel panic or GRUB\'s rescue prompt on the console: exit 6 quoting the line; --until may still claim it', async () => {
    const p = await profile([panic, '--accel', 'tcg', '--json']);
    expect(p.status).toBe(6);
    const message = (p.json as { error: { message: string } }).error.message;
    expect(message).toContain('the console printed "Kernel panic - not syncing: VFS: Unable to mount root fs"');
    expect(message).toContain(`console log: ${join(dir, 'panic.raw.console.failed.log')}`);

    const g = await profile([rescue, '--accel', 'tcg']);
    expect(g.status).toBe(6);
    expect(g.stderr).toContain('the console printed "grub rescue>"');

    // A line matching --until ends the boot well, fatal or not.
    const until = await profile([panic, '--accel', 'tcg', '--until', 'Kernel panic', '--json']);
    expect(until.status, until.stderr).toBe(0);
    expect(until.json).toMatchObject({ endReason: 'until', endLine: 'Kernel panic - not syncing: VFS: Unable to mount root fs' });
  });

  it('a boot that never ends: --timeout is exit 5 and says how far the boot got', async () => {
    const started = Date.now();
    const r = await profile([raw, '--accel', 'tcg', '--until', 'never printed', '--idle', '0', '--timeout', '8', '--no-segment',
      '--out-map', join(dir, 'to.bcmap'), '--out-trace', join(dir, 'to.csv'), '--console-log', join(dir, 'to.log')], { TMPDIR: cliTmp });
    expect(r.status).toBe(5);
    expect(Date.now() - started).toBeLessThan(60_000);
    const lines = r.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^bootcache profile: error: .*reader\.raw: the boot did not finish within 8 s \(--timeout\) under tcg: \d+ reads \([\d.]+ MiB, 101 blocks\), last read at [\d.]+ s; last console line: "bootsector login:".*; console log: .*to\.failed\.log \[BC_BOOT_TIMEOUT\]$/);
    expect(existsSync(join(dir, 'to.bcmap'))).toBe(false);
    expect(qemuProcessesMentioning(dir)).toEqual([]);
  });

  it('a guest that resets (QEMU exits early): exit 6 with the last console line and the console log', async () => {
    const r = await profile([reset, '--accel', 'tcg', '--json']);
    expect(r.status).toBe(6);
    const message = (r.json as { error: { message: string; code: string } }).error.message;
    expect(message).toMatch(/reset\.raw: QEMU exited with status 0 after [\d.]+ s, before the end of boot \(the guest reset or powered off; QEMU runs with -no-reboot\)/);
    expect(message).toContain('last console line: "BOOTSECTOR: resetting the machine"');
    expect(message).toContain(`console log: ${join(dir, 'reset.raw.console.failed.log')}`);
  });

  it('QEMU refusing its arguments: exit 6 with QEMU\'s last stderr line', async () => {
    const r = await profile([raw, '--accel', 'tcg', '--qemu-arg', '-kernel', '--qemu-arg', join(dir, 'no-such-kernel'), '--console-log', join(dir, 'k.log')]);
    expect(r.status).toBe(6);
    expect(r.stderr).toMatch(/QEMU exited with status 1 after [\d.]+ s, before the end of boot; QEMU said: ".*could not (open|load) kernel.*no-such-kernel.*"/);
    expect(r.stderr).toContain(`console log: ${join(dir, 'k.failed.log')}`);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
  });

  it('usage and output errors before anything starts', async () => {
    const badUntil = await profile([raw, '--until', '(']);
    expect(badUntil.status).toBe(2);
    expect(badUntil.stderr).toContain('--until "(" is not a valid regular expression');
    const badBlock = await profile([raw, '--block-size', '1000']);
    expect(badBlock.status).toBe(2);
    const noDir = await profile([raw, '--out-map', join(dir, 'missing', 'm.bcmap')]);
    expect(noDir.status).toBe(4); // an output that cannot be written
    expect(noDir.stderr).toContain(join(dir, 'missing'));
    const noImage = await profile([join(dir, 'nope.raw')]);
    expect(noImage.status).toBe(3);
    const consoleIsDir = await profile([raw, '--accel', 'tcg', '--console-log', dir]);
    expect(consoleIsDir.status).toBe(4);
    expect(consoleIsDir.stderr).toBe(`bootcache profile: error: ${dir}: cannot write: is a directory (while checking where to write the console log) [BC_IO]\n`);
    const self = await profile([raw, '--out-trace', raw]);
    expect(self.status).toBe(2);
    expect(self.stderr).toContain('is the image itself');
  });

  it('SIGTERM during a boot stops the VM and cleans up', async () => {
    let pid = 0;
    const running = profile([zero, '--accel', 'tcg', '--timeout', '120', '--console-log', join(dir, 'sig.log')], { TMPDIR: cliTmp }, (p) => {
      pid = p;
    });
    // Wait until QEMU runs (the console log exists), then interrupt.
    for (let i = 0; i < 200 && qemuProcessesMentioning(dir).length === 0; i++) await new Promise((r) => setTimeout(r, 50));
    expect(qemuProcessesMentioning(dir).length).toBe(1);
    process.kill(pid, 'SIGTERM');
    const r = await running;
    expect(r.signal).toBe('SIGTERM');
    expect(r.stderr).toMatch(/interrupted after [\d.]+ s; console log: .*sig\.failed\.log; the VM was stopped/);
    expect(qemuProcessesMentioning(dir)).toEqual([]);
    expect(readdirSync(cliTmp)).toEqual([]);
  });
});

/** Any bootcache command (for verify). */
function runCli(args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [bin, ...args], { env: { ...process.env, DEBUG: '' }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('close', (status, signal) => resolve({ status, signal, stdout, stderr, json: undefined }));
  });
}

const rgw = await ensureRgw();

describe.skipIf(rgw === undefined)('bootcache profile of an image on s3:// (Ceph RGW)', () => {
  let bucket: string;
  let admin: S3Client;

  beforeAll(async () => {
    ({ bucket, client: admin } = await createTestBucket(rgw!, 'bc-profile'));
    const body = await readFile(raw);
    await admin.send(new PutObjectCommand({ Bucket: bucket, Key: 'img/reader.raw', Body: body, ContentLength: body.length }));
  }, 120_000);

  afterAll(async () => {
    if (rgw !== undefined) await deleteTestBucket(admin, bucket);
  });

  it('boots the object through ranged reads; map and segment go next to it, the trace and console log stay local', async () => {
    const image = `s3://${bucket}/img/reader.raw`;
    const work = join(dir, 's3-work');
    await mkdir(work);
    const r = await profile(
      [image, '--accel', 'tcg', '--timeout', '120', '--s3-endpoint', rgw!.endpoint, '--s3-path-style',
        '--out-trace', join(work, 'reader.trace.csv'), '--console-log', join(work, 'reader.console.log'), '--json'],
      { TMPDIR: cliTmp },
    );
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ map: { path: `${image}.bcmap`, blocks: 101 }, segment: { path: `${image}.bcseg`, verified: true } });
    for (const key of ['img/reader.raw.bcmap', 'img/reader.raw.bcseg']) await admin.send(new HeadObjectCommand({ Bucket: bucket, Key: key }));
    expect(existsSync(join(work, 'reader.trace.csv'))).toBe(true);
    expect(await readFile(join(work, 'reader.console.log'), 'utf8')).toContain('BOOTSECTOR: read 100 blocks');
    // What it put verifies against the object, and nothing is left in TMPDIR.
    const verify = await runCli(['verify', image, '--s3-endpoint', rgw!.endpoint, '--s3-path-style', '--json']);
    expect(verify.status, verify.stderr).toBe(0);
    expect(readdirSync(cliTmp)).toEqual([]);
    const refused = await profile([image, '--accel', 'tcg', '--s3-endpoint', rgw!.endpoint, '--s3-path-style', '--out-trace', `s3://${bucket}/t.csv`]);
    expect(refused.status).toBe(2);
    expect(refused.stderr).toMatch(/--out-trace must be a local path/);
  }, 180_000);
});
