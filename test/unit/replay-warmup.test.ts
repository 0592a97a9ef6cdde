import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ExportNotFoundError, NbdUnknownExportError } from '../../src/nbd/errors.js';
import type { ExportProvider, NbdExport } from '../../src/nbd/server/export.js';
import { NbdServer } from '../../src/nbd/server/server.js';
import { formatReplayReport } from '../../src/replay/format.js';
import { buildPlan } from '../../src/replay/plan.js';
import { replayTraceFile, TraceBeyondExportError } from '../../src/replay/replay.js';
import { readTraceFile } from '../../src/replay/trace.js';
import { warmupPlan } from '../../src/replay/warmup.js';

const TIMED = 'test/data/debian12-minbase-boot-timed.csv';
const dir = mkdtempSync(path.join(tmpdir(), 'bc-replay-warmup-'));
const privateTmp = path.join(dir, 'tmp');
const savedTmp = process.env.TMPDIR;

/** An export of zeros (2 GiB unless told) that counts what reaches it; unknown names are refused. */
function countingProvider(size = 2 ** 31) {
  const seen = { reads: 0, bytes: 0, opens: 0, describes: 0, tmpAtOpen: [] as string[], describedAt: 0, openedAt: 0 };
  const opened: NbdExport = {
    name: 'boot',
    size,
    read: async (_offset, length) => {
      seen.reads++;
      seen.bytes += length;
      return Buffer.alloc(length);
    },
    extents: async (offset, length) => [{ offset, length, kind: 'data' }],
    close: async () => undefined,
  };
  const known = (name: string): void => {
    if (name !== 'boot') throw new ExportNotFoundError(`no export named ${JSON.stringify(name)}`);
  };
  const provider: ExportProvider = {
    list: async () => ['boot'],
    open: async (name) => {
      known(name);
      seen.opens++;
      seen.openedAt = performance.now();
      seen.tmpAtOpen = readdirSync(privateTmp);
      return opened;
    },
    // NBD_OPT_INFO: what the replay asks before its warm-up.
    describe: async (name) => {
      known(name);
      seen.describes++;
      seen.describedAt = performance.now();
      return { name, size };
    },
  };
  return { seen, provider };
}

/** The first `seconds` of the reference trace. */
function firstSeconds(seconds: number): { file: string; reads: number } {
  const [header, ...rows] = readFileSync(TIMED, 'utf8').trim().split('\n');
  const kept = rows.filter((row) => Number(row.split(',')[0]) < seconds * 1e6);
  const file = path.join(dir, `first-${seconds}s.csv`);
  writeFileSync(file, [header, ...kept].join('\n'));
  return { file, reads: kept.length };
}

let server: NbdServer | undefined;

/** The measured server: a counting export on a unix socket. */
async function measuredServer(name: string, size?: number): Promise<{ uri: string; seen: ReturnType<typeof countingProvider>['seen']; measured: NbdServer }> {
  const { provider, seen } = countingProvider(size);
  const measured = new NbdServer(provider);
  server = measured;
  const socket = path.join(dir, `${name}.sock`);
  await measured.listenUnix(socket);
  return { uri: `nbd+unix:///boot?socket=${socket}`, seen, measured };
}

beforeAll(() => {
  mkdirSync(privateTmp);
  // os.tmpdir() reads TMPDIR on every call: the warm-up's socket directory goes here.
  process.env.TMPDIR = privateTmp;
});

afterEach(async () => {
  await server?.close();
  server = undefined;
});

afterAll(() => {
  if (savedTmp === undefined) delete process.env.TMPDIR;
  else process.env.TMPDIR = savedTmp;
  rmSync(dir, { recursive: true, force: true });
});

describe('replay warm-up', () => {
  it('replays the plan against its own zero export before it connects: the measured server sees only the timed run', async () => {
    // A scratch directory of a killed replay (its pid above the kernel's largest pid_max, 2^22) is swept.
    const stale = `bootcache-replay-warmup-${4_194_304 + 4242}-x1y2z3`;
    mkdirSync(path.join(privateTmp, stale));
    const { uri, seen, measured } = await measuredServer('measured');
    const { file, reads } = firstSeconds(1);
    const result = await replayTraceFile(file, { uri, thinkTime: false, warmup: true });
    expect(result.warmup).toEqual({ reads, ms: expect.any(Number) });
    expect(result.warmup!.ms).toBeGreaterThan(0);
    expect(result.replay.reads).toBe(reads);
    // Every read the measured server served belongs to the timed run.
    expect(seen.reads).toBe(reads);
    expect(seen.bytes).toBe(result.replay.bytes);
    expect(seen.opens).toBe(1);
    // One NBD_OPT_INFO probe before the warm-up, which ran between it and the open.
    expect(seen.describes).toBe(1);
    expect(seen.openedAt - seen.describedAt).toBeGreaterThanOrEqual(result.warmup!.ms - 1);
    expect(measured.stats.totalConnections).toBe(2);
    expect(measured.stats.handshakes).toBe(1);
    expect(measured.stats.protocolErrors).toBe(0);
    // The warm-up (its unix socket directory) was over before the measured export was opened.
    expect(seen.tmpAtOpen).toEqual([]);
    expect(readdirSync(privateTmp)).toEqual([]);
    expect(formatReplayReport(result)).toMatch(new RegExp(`warm-up: ${reads} reads against an in-process zero export in \\d+\\.\\d\\d s`));
  });

  it('warms up over TCP for a TCP target', async () => {
    const { provider, seen } = countingProvider();
    const measured = new NbdServer(provider);
    server = measured;
    const { port } = await measured.listenTcp('127.0.0.1', 0);
    const { file, reads } = firstSeconds(0.5);
    const result = await replayTraceFile(file, { uri: `nbd://127.0.0.1:${port}/boot`, warmup: true });
    expect(result.warmup?.reads).toBe(reads);
    expect(result.warmup?.error).toBeUndefined();
    expect(seen.reads).toBe(reads);
    expect(seen.opens).toBe(1);
  });

  it('reports an unknown export or a too small one before its warm-up, without opening the export', async () => {
    const { uri, seen } = await measuredServer('small', 2 ** 20);
    const { file } = firstSeconds(0.5);
    const missing = await replayTraceFile(file, { uri: uri.replace('/boot?', '/nope?'), warmup: true }).catch((e: unknown) => e);
    expect(missing).toBeInstanceOf(NbdUnknownExportError);
    const small = await replayTraceFile(file, { uri, warmup: true }).catch((e: unknown) => e);
    expect(small).toBeInstanceOf(TraceBeyondExportError);
    expect((small as Error).message).toMatch(/export "boot" .* is only 1048576 bytes/);
    expect(seen.describes).toBe(1);
    expect(seen.opens).toBe(0);
    expect(readdirSync(privateTmp)).toEqual([]);
  });

  it('falls back to TCP when its unix socket path would be too long for sun_path', async () => {
    const { uri, seen } = await measuredServer('longtmp');
    const longTmp = path.join(privateTmp, 'l'.repeat(100));
    mkdirSync(longTmp);
    const { file, reads } = firstSeconds(0.5);
    process.env.TMPDIR = longTmp;
    try {
      const result = await replayTraceFile(file, { uri, thinkTime: false, warmup: true });
      expect(result.warmup).toEqual({ reads, ms: expect.any(Number) });
      expect(seen.reads).toBe(reads);
      expect(readdirSync(longTmp)).toEqual([]);
    } finally {
      process.env.TMPDIR = privateTmp;
      rmSync(longTmp, { recursive: true });
    }
  });

  it('replays at most the first 4,096 reads, with the same dependencies', async () => {
    const plan = buildPlan(await readTraceFile(TIMED));
    const short = warmupPlan(plan, 1000);
    expect(short.reads).toHaveLength(1000);
    expect(short.completionOrder).toHaveLength(1000);
    for (const read of short.reads) {
      // Each read waits for the same reads as in the full plan, and thinks at most 0.2 ms.
      expect(short.completionOrder.slice(0, read.depCount)).toEqual(plan.completionOrder.slice(0, read.depCount));
      expect(read.thinkUs).toBe(Math.min(plan.reads[read.index]!.thinkUs, 200));
    }
    expect(warmupPlan(plan).reads).toHaveLength(4060);
    const capped = warmupPlan({ ...plan, reads: [...plan.reads, ...plan.reads.map((r) => ({ ...r, index: r.index + 4060 }))] });
    expect(capped.reads).toHaveLength(4096);
  });

  it('is skipped, with the reason in the result, when its socket directory cannot be made', async () => {
    const { uri, seen } = await measuredServer('notmp');
    const { file, reads } = firstSeconds(0.5);
    process.env.TMPDIR = path.join(dir, 'no-such-tmp');
    try {
      const result = await replayTraceFile(file, { uri, thinkTime: false, warmup: true });
      expect(result.warmup).toEqual({ reads: 0, ms: expect.any(Number), error: expect.stringMatching(/no-such-tmp/) });
      expect(result.replay.reads).toBe(reads);
      expect(seen.reads).toBe(reads);
      expect(formatReplayReport(result)).toMatch(/warm-up skipped: .*no-such-tmp/);
    } finally {
      process.env.TMPDIR = privateTmp;
    }
  });

  it('is off unless asked for in the library', async () => {
    const { uri, seen } = await measuredServer('off');
    const { file, reads } = firstSeconds(0.5);
    const result = await replayTraceFile(file, { uri, thinkTime: false });
    expect(result.warmup).toBeNull();
    expect(seen.reads).toBe(reads);
    expect(formatReplayReport(result)).not.toMatch(/warm-up/);
  });
});
