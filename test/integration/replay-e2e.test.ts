import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import Replay from '../../src/commands/replay.js';
import { NbdUnknownExportError } from '../../src/nbd/errors.js';
import { formatReplayReport } from '../../src/replay/format.js';
import { replayTraceFile, TraceBeyondExportError, type ReplayResult } from '../../src/replay/replay.js';

const TIMED = 'test/data/debian12-minbase-boot-timed.csv';
const UNTIMED = 'test/data/debian12-minbase-boot.csv';
const dir = mkdtempSync(path.join(tmpdir(), 'bc-replay-e2e-'));
const children: ChildProcess[] = [];
let bootUri: string;
let smallUri: string;

async function qemuNbd(file: string, name: string): Promise<string> {
  const socket = path.join(dir, `${name}.sock`);
  const child = spawn('qemu-nbd', ['-r', '-f', 'raw', '-t', '--socket', socket, '-x', name, file], { stdio: 'ignore' });
  children.push(child);
  // The socket file appears at bind(), a moment before listen(): probe until it accepts.
  for (let i = 0; i < 200; i++) {
    if (existsSync(socket) && (await accepts(socket))) return `nbd+unix:///${name}?socket=${socket}`;
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  throw new Error(`qemu-nbd did not start for ${file}`);
}

function accepts(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.createConnection({ path: socket });
    probe.once('connect', () => { probe.destroy(); resolve(true); });
    probe.once('error', () => resolve(false));
  });
}

/** The first `seconds` of a trace (header kept). */
function truncatedTrace(source: string, seconds: number): { file: string; reads: number } {
  const [header, ...rows] = readFileSync(source, 'utf8').trim().split('\n');
  const kept = rows.filter((row) => Number(row.split(',')[0]) < seconds * 1e6);
  const file = path.join(dir, `${path.basename(source, '.csv')}-${seconds}s.csv`);
  writeFileSync(file, [header, ...kept].join('\n'));
  return { file, reads: kept.length };
}

function checkStructure(result: ReplayResult, reads: number): void {
  expect(result.replay.reads).toBe(reads);
  expect(result.phases.reduce((s, p) => s + p.reads, 0)).toBe(reads);
  expect(result.phases.reduce((s, p) => s + p.bytes, 0)).toBe(result.replay.bytes);
  expect(result.phases.reduce((s, p) => s + p.replayS, 0)).toBeCloseTo(result.replay.durationS, 6);
  expect(result.replay.ioBusyS + result.replay.idleS).toBeCloseTo(result.replay.durationS, 6);
  const { p50, p90, p99, max } = result.replay.latencyMs;
  expect(p50).toBeGreaterThan(0);
  expect(p50).toBeLessThanOrEqual(p90);
  expect(p90).toBeLessThanOrEqual(p99);
  expect(p99).toBeLessThanOrEqual(max);
  // Lag only ever delays reads, so the lag-free model time is never longer than the replay.
  expect(result.replay.lagFreeDurationS).toBeLessThanOrEqual(result.replay.durationS + 1e-6);
  expect(result.replay.ratio).toBeCloseTo(result.replay.durationS / result.replay.recordedDurationS, 9);
}

beforeAll(async () => {
  const boot = path.join(dir, 'boot.img');
  const small = path.join(dir, 'small.img');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', boot, '2G']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', small, '1G']);
  bootUri = await qemuNbd(boot, 'boot');
  smallUri = await qemuNbd(small, 'small');
});

afterAll(() => {
  for (const child of children) child.kill('SIGTERM');
  rmSync(dir, { recursive: true, force: true });
});

describe('replay against qemu-nbd serving a sparse 2 GiB raw image', () => {
  it('replays the first 2.5 s of the boot with recorded dependencies and think time', async () => {
    const { file, reads } = truncatedTrace(TIMED, 2.5);
    const result = await replayTraceFile(file, { uri: bootUri, phases: 5 });
    checkStructure(result, reads);
    expect(result.model).toEqual({ kind: 'recorded-dependencies', thinkTime: true, assumedServiceUs: null });
    expect(result.target).toMatchObject({ exportName: 'boot', exportSize: 2 ** 31, connections: 1, negotiation: 'NBD_OPT_GO' });
    expect(result.replay.recordedMaxInFlight).toBe(1); // the overlapping reads come later in the boot
    // Think time is kept, so the replay cannot be much faster than the recording (lower bound only).
    expect(result.replay.durationS).toBeGreaterThan(0.9 * result.replay.recordedDurationS);
    expect(formatReplayReport(result)).toMatch(/completion time\s+\d+\.\d\d s/);
  });

  it('replays the whole boot storage-bound with --no-think-time', async () => {
    const result = await replayTraceFile(TIMED, { uri: bootUri, thinkTime: false });
    checkStructure(result, 4060);
    expect(result.trace.bytes).toBe(result.replay.bytes);
    expect(result.replay.bytes / 2 ** 20).toBeCloseTo(96.96, 1);
    expect(result.trace.maxEndOffset).toBe(2 ** 31);
    expect(result.model.thinkTime).toBe(false);
    expect(result.replay.recordedMaxInFlight).toBe(3);
    // 25 s of guest think time removed: local reads alone take a fraction of it (generous bound).
    expect(result.replay.ratio!).toBeLessThan(1);
  });

  it('replays a trace without done_us with the serial fallback', async () => {
    const { file, reads } = truncatedTrace(UNTIMED, 1);
    const result = await replayTraceFile(file, { uri: bootUri, thinkTime: false });
    checkStructure(result, reads);
    expect(result.model).toEqual({ kind: 'serial-fallback', thinkTime: false, assumedServiceUs: 10 });
    expect(result.replay.maxInFlight).toBe(1);
    expect(result.replay.recordedMaxInFlight).toBeNull();
  });

  it('refuses a trace that reads past the end of the export unless clamped', async () => {
    const err = await replayTraceFile(TIMED, { uri: smallUri }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TraceBeyondExportError);
    expect((err as TraceBeyondExportError).exitCode).toBe(3);
    expect((err as Error).message).toMatch(/line \d+: the trace reads up to byte 2147483648 but export "small" .* is only 1073741824 bytes \(--clamp trims such reads\)/);

    const result = await replayTraceFile(TIMED, { uri: smallUri, clamp: true, thinkTime: false });
    expect(result.clamp.enabled).toBe(true);
    expect(result.clamp.trimmedReads + result.clamp.skippedReads).toBeGreaterThan(0);
    expect(result.replay.reads).toBe(4060);
    expect(result.replay.bytes).toBeLessThan(result.trace.bytes + 1);
  });

  it('reports an unknown export', async () => {
    const uri = bootUri.replace('/boot?', '/nope?');
    await expect(replayTraceFile(TIMED, { uri })).rejects.toBeInstanceOf(NbdUnknownExportError);
  });
});

describe('bootcache replay command', () => {
  async function runCommand(argv: string[]): Promise<{ stdout: string; exitCode: number | undefined }> {
    let stdout = '';
    // oclif writes through console.log.
    const write = vi.spyOn(console, 'log').mockImplementation((...parts: unknown[]) => {
      stdout += `${parts.map(String).join(' ')}\n`;
    });
    const saved = process.exitCode;
    process.exitCode = undefined;
    try {
      await Replay.run(argv, process.cwd()).catch((err: unknown) => {
        if ((err as { oclif?: { exit?: number } }).oclif?.exit === undefined) throw err;
      });
      return { stdout, exitCode: process.exitCode as number | undefined };
    } finally {
      write.mockRestore();
      process.exitCode = saved;
    }
  }

  it('prints the typed result under --json', async () => {
    const { file, reads } = truncatedTrace(TIMED, 0.5);
    const { stdout, exitCode } = await runCommand([file, '--uri', bootUri, '--json', '--phases', '3']);
    expect(exitCode ?? 0).toBe(0);
    const result = JSON.parse(stdout) as ReplayResult;
    expect(result.replay.reads).toBe(reads);
    expect(result.phases).toHaveLength(3);
    // The command warms up by default (the library does not); --no-warmup times a fresh process.
    expect(result.warmup).toEqual({ reads, ms: expect.any(Number) });
    const cold = JSON.parse((await runCommand([file, '--uri', bootUri, '--json', '--no-warmup'])).stdout) as ReplayResult;
    expect(cold.warmup).toBeNull();
    expect(cold.replay.reads).toBe(reads);
  });

  it('writes one CSV row per read with --reads-csv, consistent with the trace and the JSON', async () => {
    const { file, reads } = truncatedTrace(TIMED, 0.5);
    const csv = path.join(dir, 'reads.csv');
    const { stdout, exitCode } = await runCommand([file, '--uri', bootUri, '--json', '--reads-csv', csv]);
    expect(exitCode ?? 0).toBe(0);
    const result = JSON.parse(stdout) as ReplayResult;
    const [header, ...rows] = readFileSync(csv, 'utf8').trim().split('\n');
    expect(header).toBe('index,offset,length,recorded_issue_us,recorded_done_us,target_us,issue_us,done_us,latency_us');
    expect(rows).toHaveLength(reads);
    const traced = readFileSync(file, 'utf8').trim().split('\n').slice(1).map((row) => row.split(',').map(Number));
    let last = 0;
    rows.forEach((row, i) => {
      const [index, offset, length, recordedIssue, recordedDone, target, issue, done, latency] = row.split(',').map(Number);
      expect([index, recordedIssue, offset, length, recordedDone]).toEqual([i, ...traced[i]!.filter((_, k) => k !== 1)]);
      expect(issue).toBeGreaterThanOrEqual(target! - 1);
      expect(done).toBeGreaterThanOrEqual(issue!);
      expect(Math.abs(latency! - (done! - issue!))).toBeLessThanOrEqual(1); // each column rounded to 1 µs
      last = Math.max(last, done!);
    });
    expect(last / 1e6).toBeCloseTo(result.replay.durationS, 2);
    const bad = await runCommand([file, '--uri', bootUri, '--json', '--reads-csv', path.join(dir, 'no-such-dir', 'reads.csv')]);
    expect(bad.exitCode).not.toBe(0);
    expect(bad.stdout).toMatch(/no-such-dir/);
  });

  it('prints a human table', async () => {
    const { file } = truncatedTrace(TIMED, 0.5);
    const { stdout } = await runCommand([file, '--uri', bootUri, '--no-think-time']);
    expect(stdout).toMatch(/replay \/ recorded/);
    expect(stdout).toMatch(/phase\s+recorded window \(s\)\s+reads/);
    expect(stdout).toMatch(/think time off/);
  });

  it('maps errors to one JSON line and a stable exit code', async () => {
    const { stdout, exitCode } = await runCommand([TIMED, '--uri', bootUri.replace('/boot?', '/nope?'), '--json']);
    expect(exitCode).toBe(3);
    const { error } = JSON.parse(stdout) as { error: { code: string; exitCode: number; message: string } };
    expect(error.code).toBe('BC_NBD_UNKNOWN_EXPORT');
    expect(error.message).toMatch(/no export named "nope"/);
  });
});
