import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NbdServer } from '../nbd/server/server.js';
import type { ExportProvider, NbdExport } from '../nbd/server/export.js';
import { PORTABLE_MAX_BLOCK } from '../nbd/protocol.js';
import { removeDeadProcessDirs } from '../agent/cache/file-io.js';
import type { NbdTarget } from '../nbd/client/uri.js';
import { NbdPool } from '../nbd/client/pool.js';
import type { ReplayPlan } from './plan.js';
import { largestRead, replayPlan } from './scheduler.js';

/**
 * The replay measures a boot with its own code: the NBD client, the
 * scheduler and the clock's naps. In a fresh process that code starts
 * interpreted and is optimised while the first few hundred reads go by, which
 * makes the first replay of a process slower than the next ones against the
 * same server (docs/replay.md, "Warm-up"). The warm-up runs the
 * same plan once, before it even connects to the server it measures, against
 * an NBD server inside this process that answers every read with zeros: the
 * timed run then starts with optimised code, and the measured server sees
 * nothing of the warm-up, nor gets a head start from it (an agent starts its
 * prefetch when an export is opened).
 */

/** Think times are capped at this in the warm-up (µs), so the naps run but the warm-up stays short. */
const WARMUP_MAX_THINK_US = 200;
/** Reads replayed at most: a boot's worth; a longer trace gains nothing from more. */
const WARMUP_MAX_READS = 4096;
const EXPORT_NAME = 'warmup';
const SECTOR = 512;
/** Scratch directories are `<prefix><pid>-…`, so a later replay can remove those of a killed one. */
const DIR_PREFIX = 'bootcache-replay-warmup-';
/** sun_path holds 108 bytes with its NUL; longer socket paths fall back to TCP on 127.0.0.1. */
const MAX_SOCKET_PATH = 107;

export interface ReplayWarmupReport {
  /** Wall time of the warm-up, ms (server start to close). */
  ms: number;
  /** Reads the in-process server served (0 when the warm-up failed). */
  reads: number;
  /** Why the warm-up was skipped; the timed run goes ahead without it. */
  error?: string;
}

/** One zero-filled export of `size` bytes; reads return views of one shared zero buffer. */
function zeroExportProvider(size: number, largest: number): ExportProvider {
  // The server never asks for more than its maximum request size (the client splits larger reads).
  const zeros = Buffer.alloc(Math.max(1, Math.min(largest, PORTABLE_MAX_BLOCK)));
  const opened: NbdExport = {
    name: EXPORT_NAME,
    size,
    read: async (_offset, length) => {
      return length <= zeros.length ? zeros.subarray(0, length) : Buffer.alloc(length);
    },
    extents: async (offset, length) => [{ offset, length, kind: 'zero' }],
    close: async () => undefined,
  };
  return {
    list: async () => [EXPORT_NAME],
    open: async () => opened,
    describe: async () => ({ name: EXPORT_NAME, size }),
  };
}

/**
 * Replays the first 4,096 reads of `plan` (think times capped) against an
 * in-process zero export of at least `minSize` bytes, over the same transport
 * as the measured server (a unix socket in a private directory under $TMPDIR,
 * or TCP on 127.0.0.1), then removes it all. A failure is reported, not
 * thrown: the timed run does not depend on it.
 */
export async function warmUpReplay(
  plan: ReplayPlan,
  minSize: number,
  like: NbdTarget['transport'],
  connections: number,
): Promise<ReplayWarmupReport> {
  const started = performance.now();
  const elapsed = (): number => Math.round(performance.now() - started);
  try {
    const reads = await replayAgainstZeros(warmupPlan(plan), Math.max(SECTOR, Math.ceil(minSize / SECTOR) * SECTOR), like, connections);
    return { ms: elapsed(), reads };
  } catch (err) {
    return { ms: elapsed(), reads: 0, error: err instanceof Error ? err.message : String(err) };
  }
}

/**
 * The plan's first reads with think times capped. A read's dependencies were
 * issued before it, so they are among the kept reads, and the first `depCount`
 * entries of the filtered completion order are still exactly its dependencies.
 */
export function warmupPlan(plan: ReplayPlan, maxReads = WARMUP_MAX_READS): ReplayPlan {
  const reads = plan.reads.slice(0, maxReads).map((read) => ({ ...read, thinkUs: Math.min(read.thinkUs, WARMUP_MAX_THINK_US) }));
  return { ...plan, reads, completionOrder: plan.completionOrder.filter((index) => index < reads.length) };
}

/** Runs the plan against a zero export served in this process; returns the requests it served. */
async function replayAgainstZeros(plan: ReplayPlan, size: number, like: NbdTarget['transport'], connections: number): Promise<number> {
  const server = new NbdServer(zeroExportProvider(size, largestRead(plan)), { closeTimeoutMs: 1000 });
  let dir: string | undefined;
  try {
    let target: NbdTarget | undefined;
    if (like === 'unix') {
      await removeDeadProcessDirs(tmpdir(), DIR_PREFIX);
      dir = await mkdtemp(join(tmpdir(), `${DIR_PREFIX}${process.pid}-`));
      const socket = join(dir, 'nbd.sock');
      if (Buffer.byteLength(socket) <= MAX_SOCKET_PATH) {
        await server.listenUnix(socket);
        target = { transport: 'unix', socket, exportName: EXPORT_NAME };
      }
    }
    if (target === undefined) {
      const { host, port } = await server.listenTcp('127.0.0.1', 0);
      target = { transport: 'tcp', host, port, exportName: EXPORT_NAME };
    }
    const pool = await NbdPool.connect(target, { connections });
    try {
      await replayPlan(pool, plan);
    } finally {
      await pool.close();
    }
    return server.stats.requests;
  } finally {
    await server.close();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  }
}
