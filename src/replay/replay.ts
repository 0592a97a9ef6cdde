import { BootcacheError, ExitCode, InvalidTraceError, UsageError } from '../errors.js';
import { NbdClient, type NbdClientOptions, type NbdExportInfo } from '../nbd/client/client.js';
import { NbdPool } from '../nbd/client/pool.js';
import { parseNbdUri } from '../nbd/client/uri.js';
import { buildPlan, type PlanOptions, type ReplayModelKind, type ReplayPlan } from './plan.js';
import { buildStats, type PhaseReport, type ReplayStats } from './report.js';
import { replayPlan, type Clock, type ReplayedRead } from './scheduler.js';
import { readTraceFile, type BootTrace } from './trace.js';
import { warmUpReplay, type ReplayWarmupReport } from './warmup.js';

/** The trace reads past the end of the export (and --clamp was not given). */
export class TraceBeyondExportError extends BootcacheError {
  readonly code = 'BC_TRACE_BEYOND_EXPORT';
  readonly exitCode = ExitCode.BAD_INPUT;
}

export interface ReplayOptions extends PlanOptions {
  /** nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH */
  uri: string;
  /** Trim reads that extend past the export instead of refusing the trace. */
  clamp?: boolean;
  /** NBD connections (multi-conn), default 1. */
  connections?: number;
  /** Number of equal phases of recorded time in the timeline, default 10. */
  phases?: number;
  client?: NbdClientOptions;
  clock?: Clock;
  /**
   * open() replays the plan once against an in-process zero export before it
   * connects, so the timed run starts with optimised code
   * (src/replay/warmup.ts). Default false here; the CLI turns it on.
   */
  warmup?: boolean;
}

export interface ReplayResult {
  trace: {
    path: string;
    reads: number;
    bytes: number;
    /** Rows with ops other than "read", ignored. */
    ignoredRows: number;
    hasCompletionTimes: boolean;
    recordedDurationS: number;
    /** End of the furthest read, bytes. */
    maxEndOffset: number;
  };
  target: {
    uri: string;
    exportName: string;
    exportSize: number;
    connections: number;
    canMultiConn: boolean;
    negotiation: NbdExportInfo['negotiation'];
  };
  model: {
    kind: ReplayModelKind;
    thinkTime: boolean;
    /** Fallback model only: assumed local service time, µs. */
    assumedServiceUs: number | null;
  };
  clamp: { enabled: boolean; trimmedReads: number; skippedReads: number };
  /** The untimed warm-up before the run, or null when it was off. */
  warmup: ReplayWarmupReport | null;
  replay: Omit<ReplayStats, 'phases'>;
  phases: PhaseReport[];
}

const DEFAULT_PHASES = 10;

/** A trace checked against a connected export, ready to replay. */
export class ReplaySession {
  /** Per-read times of the last run (issue order), for readsCsv(). */
  private lastReads: ReplayedRead[] | undefined;

  private constructor(
    readonly trace: BootTrace,
    readonly plan: ReplayPlan,
    private readonly pool: NbdPool,
    private readonly options: ReplayOptions,
    private readonly clampCounts: { trimmedReads: number; skippedReads: number },
    private readonly maxEndOffset: number,
    private readonly warmup: ReplayWarmupReport | null,
  ) {}

  /** Connects and checks the trace fits the export; the caller must close() the session. */
  static async open(trace: BootTrace, options: ReplayOptions): Promise<ReplaySession> {
    const phases = options.phases ?? DEFAULT_PHASES;
    if (!Number.isInteger(phases) || phases < 1 || phases > 1000) {
      throw new UsageError(`phases must be an integer from 1 to 1000, got ${phases}`);
    }
    if (options.assumedServiceUs !== undefined && !(options.assumedServiceUs >= 0 && Number.isFinite(options.assumedServiceUs))) {
      throw new UsageError(`assumed service time must be a non-negative number of µs, got ${options.assumedServiceUs}`);
    }
    if (trace.reads.length === 0) {
      throw new InvalidTraceError(`no reads in the trace (${trace.ignoredRows} other rows)`, { file: trace.source });
    }
    let maxEnd = 0;
    let furthest = trace.reads[0]!;
    for (const read of trace.reads) {
      if (read.offset + read.length > maxEnd) {
        maxEnd = read.offset + read.length;
        furthest = read;
      }
    }

    const target = parseNbdUri(options.uri);
    const checkFits = (info: NbdExportInfo): void => {
      if (maxEnd > info.size && options.clamp !== true) {
        throw new TraceBeyondExportError(
          `line ${furthest.line}: the trace reads up to byte ${maxEnd} but export "${info.exportName}" ` +
            `at ${info.uri} is only ${info.size} bytes (--clamp trims such reads)`,
          { file: trace.source },
        );
      }
    };
    let warmup: ReplayWarmupReport | null = null;
    if (options.warmup === true) {
      // What only the server can tell (no such export, too small) comes before the warm-up:
      // NBD_OPT_INFO does not open the export. Servers without it are checked at connect.
      const probed = await NbdClient.probe(target, options.client);
      if (probed !== undefined) checkFits(probed);
      // Before connecting: opening an export can start work on the server (the
      // agent's prefetch, its boot recording) that the warm-up must not get ahead of.
      warmup = await warmUpReplay(buildPlan(trace, options), maxEnd, target.transport, options.connections ?? 1);
    }
    const pool = await NbdPool.connect(target, { ...options.client, connections: options.connections ?? 1 });
    try {
      const size = pool.size;
      const counts = { trimmedReads: 0, skippedReads: 0 };
      let fitted = trace;
      checkFits(pool.info);
      if (maxEnd > size) {
        // Clamped reads keep their place in the plan (length 0 = completes at once) so dependencies are unchanged.
        fitted = {
          ...trace,
          reads: trace.reads.map((read) => {
            if (read.offset + read.length <= size) return read;
            if (read.offset >= size) counts.skippedReads++;
            else counts.trimmedReads++;
            return { ...read, length: Math.max(0, size - read.offset) };
          }),
        };
      }
      const plan = buildPlan(fitted, options);
      return new ReplaySession(fitted, plan, pool, { ...options, phases }, counts, maxEnd, warmup);
    } catch (err) {
      await pool.close();
      throw err;
    }
  }

  /** Replays the trace; onProgress gets (completed, total) after each read. */
  async run(onProgress?: (completed: number, total: number) => void): Promise<ReplayResult> {
    const pool = this.pool;
    const schedule = await replayPlan(
      pool,
      this.plan,
      { ...(this.options.clock !== undefined ? { clock: this.options.clock } : {}), ...(onProgress !== undefined ? { onProgress } : {}) },
    );
    this.lastReads = schedule.reads;
    const { phases, ...replay } = buildStats(this.plan, schedule, this.options.phases ?? DEFAULT_PHASES);
    const info = pool.info;
    return {
      trace: {
        path: this.trace.source,
        reads: this.trace.reads.length,
        bytes: replay.bytes,
        ignoredRows: this.trace.ignoredRows,
        hasCompletionTimes: this.trace.hasCompletionTimes,
        recordedDurationS: replay.recordedDurationS,
        maxEndOffset: this.maxEndOffset,
      },
      target: {
        uri: info.uri,
        exportName: info.exportName,
        exportSize: info.size,
        connections: pool.connections,
        canMultiConn: info.canMultiConn,
        negotiation: info.negotiation,
      },
      model: { kind: this.plan.model, thinkTime: this.plan.thinkTime, assumedServiceUs: this.plan.assumedServiceUs },
      clamp: { enabled: this.options.clamp === true, ...this.clampCounts },
      warmup: this.warmup,
      replay,
      phases,
    };
  }

  /**
   * The last run read by read, as CSV: the recorded issue and completion
   * times beside the replay's target (dependencies + think time), issue and
   * completion times, all µs from the start. Undefined before a run.
   */
  readsCsv(): string | undefined {
    const replayed = this.lastReads;
    if (replayed === undefined) return undefined;
    const rows = ['index,offset,length,recorded_issue_us,recorded_done_us,target_us,issue_us,done_us,latency_us'];
    const us = (v: number): string => v.toFixed(0);
    for (const planned of this.plan.reads) {
      const r = replayed[planned.index]!;
      rows.push([planned.index, planned.offset, planned.length, planned.tUs, planned.doneUs, us(r.targetUs), us(r.issueUs), us(r.doneUs), us(r.doneUs - r.issueUs)].join(','));
    }
    return rows.join('\n') + '\n';
  }

  async close(): Promise<void> {
    await this.pool.close();
  }
}

/** Reads a trace file and replays it against an NBD export. */
export async function replayTraceFile(
  tracePath: string,
  options: ReplayOptions,
  onProgress?: (completed: number, total: number) => void,
): Promise<ReplayResult> {
  const trace = await readTraceFile(tracePath);
  const session = await ReplaySession.open(trace, options);
  try {
    return await session.run(onProgress);
  } finally {
    await session.close();
  }
}
