import { simulatePlan, type ReplayPlan } from './plan.js';
import type { ScheduleResult } from './scheduler.js';

/** Read latency percentiles, milliseconds (nearest-rank). */
export interface LatencySummary {
  p50: number;
  p90: number;
  p99: number;
  max: number;
  mean: number;
}

/**
 * One slice of the boot. Phases are equal windows of recorded time; a
 * phase's recorded and replay durations run from its first read's issue to
 * the next phase's first read's issue, so they add up to the totals.
 */
export interface PhaseReport {
  phase: number;
  /** The phase's window of recorded time, seconds. */
  windowStartS: number;
  windowEndS: number;
  reads: number;
  bytes: number;
  recordedS: number;
  replayS: number;
  /** replayS / recordedS; null when the phase took no recorded time. */
  ratio: number | null;
  /** Replay time in this phase with at least one read in flight, seconds. */
  ioBusyS: number;
  latencyMs: { mean: number; max: number } | null;
}

export interface ReplayStats {
  durationS: number;
  recordedDurationS: number;
  /** durationS / recordedDurationS; null if the recording took no time. */
  ratio: number | null;
  reads: number;
  bytes: number;
  throughputMiBs: number;
  latencyMs: LatencySummary;
  /**
   * How late reads were sent compared with the model (dependencies done +
   * think time), ms. Large values mean the replaying host could not keep up
   * (e.g. an overloaded CPU), and the completion time is overstated.
   */
  schedulingLagMs: LatencySummary;
  /**
   * The completion time the model gives with the latencies measured in this
   * replay but no scheduling lag, seconds: what durationS would be on an idle
   * replaying host. Close to durationS when the lag is small.
   */
  lagFreeDurationS: number;
  maxInFlight: number;
  /** Most reads in flight at once in the recording (null without done_us). */
  recordedMaxInFlight: number | null;
  /** Replay time with at least one read in flight, and without (think time and overheads), seconds. */
  ioBusyS: number;
  idleS: number;
  /** The same split in the recording (null without done_us). */
  recordedIoBusyS: number | null;
  phases: PhaseReport[];
}

export function percentile(sorted: ArrayLike<number>, p: number): number {
  if (sorted.length === 0) return 0;
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[Math.min(sorted.length, rank) - 1]!;
}

export function summarizeLatencies(latenciesMs: number[]): LatencySummary {
  const sorted = Float64Array.from(latenciesMs).sort();
  let sum = 0;
  for (const v of sorted) sum += v;
  return {
    p50: percentile(sorted, 50),
    p90: percentile(sorted, 90),
    p99: percentile(sorted, 99),
    max: sorted.length > 0 ? sorted[sorted.length - 1]! : 0,
    mean: sorted.length > 0 ? sum / sorted.length : 0,
  };
}

/** Union length of [start, end) intervals, split over consecutive windows given by their boundaries. */
function busyPerWindow(intervals: Array<[number, number]>, bounds: number[]): number[] {
  const sorted = [...intervals].sort((a, b) => a[0] - b[0]);
  const merged: Array<[number, number]> = [];
  for (const [s, e] of sorted) {
    const last = merged[merged.length - 1];
    if (last !== undefined && s <= last[1]) last[1] = Math.max(last[1], e);
    else merged.push([s, e]);
  }
  const out = new Array<number>(Math.max(0, bounds.length - 1)).fill(0);
  let m = 0;
  for (let w = 0; w < out.length; w++) {
    const lo = bounds[w]!;
    const hi = bounds[w + 1]!;
    while (m < merged.length && merged[m]![1] <= lo) m++;
    for (let k = m; k < merged.length && merged[k]![0] < hi; k++) {
      out[w]! += Math.max(0, Math.min(hi, merged[k]![1]) - Math.max(lo, merged[k]![0]));
    }
  }
  return out;
}

function maxConcurrency(intervals: Array<[number, number]>): number {
  const events: Array<[number, number]> = [];
  for (const [s, e] of intervals) events.push([s, 1], [e, -1]);
  // Ends before starts at equal times: back-to-back reads do not overlap.
  events.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  let current = 0;
  let max = 0;
  for (const [, delta] of events) {
    current += delta;
    if (current > max) max = current;
  }
  return max;
}

/**
 * Phase boundaries: boundary k is when phase k's first read was issued
 * (0 for phase 0; an empty phase takes the next boundary), plus the end.
 */
function phaseBounds(phaseOf: number[], issueTimes: ArrayLike<number>, phases: number, end: number): number[] {
  const first = new Array<number | undefined>(phases).fill(undefined);
  for (let i = phaseOf.length - 1; i >= 0; i--) first[phaseOf[i]!] = issueTimes[i]!;
  const bounds = new Array<number>(phases + 1);
  bounds[phases] = end;
  for (let k = phases - 1; k >= 0; k--) bounds[k] = k === 0 ? 0 : first[k] ?? bounds[k + 1]!;
  return bounds;
}

function lagFreeDurationUs(plan: ReplayPlan, schedule: ScheduleResult): number {
  const simulated = simulatePlan(plan, (read) => schedule.reads[read.index]!.doneUs - schedule.reads[read.index]!.issueUs);
  let end = 0;
  for (const read of simulated) end = Math.max(end, read.doneUs);
  return end;
}

/** Compares a replay with its recording: totals, latencies, and a per-phase timeline. */
export function buildStats(plan: ReplayPlan, schedule: ScheduleResult, phases: number): ReplayStats {
  const n = plan.reads.length;
  const recordedUs = plan.recordedDurationUs;
  const phaseCount = Math.max(1, Math.floor(phases));
  const width = recordedUs / phaseCount;
  const phaseOf = plan.reads.map((r) => (width > 0 ? Math.min(phaseCount - 1, Math.floor(r.tUs / width)) : 0));

  const replayIntervals = schedule.reads.map((r): [number, number] => [r.issueUs, r.doneUs]);
  const recordedIntervals = plan.reads.map((r): [number, number] => [r.tUs, r.doneUs]);
  const replayBounds = phaseBounds(phaseOf, schedule.reads.map((r) => r.issueUs), phaseCount, schedule.durationUs);
  const recordedBounds = phaseBounds(phaseOf, plan.reads.map((r) => r.tUs), phaseCount, recordedUs);
  const busy = busyPerWindow(replayIntervals, replayBounds);

  const phaseReads = Array.from({ length: phaseCount }, () => ({ reads: 0, bytes: 0, latencies: [] as number[] }));
  const latenciesMs: number[] = [];
  let bytes = 0;
  for (let i = 0; i < n; i++) {
    const read = plan.reads[i]!;
    const latencyMs = (schedule.reads[i]!.doneUs - schedule.reads[i]!.issueUs) / 1000;
    latenciesMs.push(latencyMs);
    bytes += read.length;
    const phase = phaseReads[phaseOf[i]!]!;
    phase.reads++;
    phase.bytes += read.length;
    phase.latencies.push(latencyMs);
  }

  const phaseReports: PhaseReport[] = phaseReads.map((p, k) => {
    const recordedS = (recordedBounds[k + 1]! - recordedBounds[k]!) / 1e6;
    const replayS = (replayBounds[k + 1]! - replayBounds[k]!) / 1e6;
    let sum = 0;
    let max = 0;
    for (const v of p.latencies) { sum += v; max = Math.max(max, v); }
    return {
      phase: k + 1,
      windowStartS: (k * width) / 1e6,
      windowEndS: ((k + 1) * width) / 1e6,
      reads: p.reads,
      bytes: p.bytes,
      recordedS,
      replayS,
      ratio: recordedS > 0 ? replayS / recordedS : null,
      ioBusyS: busy[k]! / 1e6,
      latencyMs: p.reads > 0 ? { mean: sum / p.reads, max } : null,
    };
  });

  const ioBusyUs = busy.reduce((a, b) => a + b, 0);
  const hasRecordedWindows = plan.model === 'recorded-dependencies';
  const durationS = schedule.durationUs / 1e6;
  return {
    durationS,
    recordedDurationS: recordedUs / 1e6,
    ratio: recordedUs > 0 ? schedule.durationUs / recordedUs : null,
    reads: n,
    bytes,
    throughputMiBs: durationS > 0 ? bytes / (1024 * 1024) / durationS : 0,
    latencyMs: summarizeLatencies(latenciesMs),
    lagFreeDurationS: lagFreeDurationUs(plan, schedule) / 1e6,
    schedulingLagMs: summarizeLatencies(schedule.reads.map((r) => Math.max(0, r.issueUs - r.targetUs) / 1000)),
    maxInFlight: schedule.maxInFlight,
    recordedMaxInFlight: hasRecordedWindows ? maxConcurrency(recordedIntervals) : null,
    ioBusyS: ioBusyUs / 1e6,
    idleS: Math.max(0, schedule.durationUs - ioBusyUs) / 1e6,
    recordedIoBusyS: hasRecordedWindows ? busyPerWindow(recordedIntervals, [0, Math.max(recordedUs, 1)])[0]! / 1e6 : null,
    phases: phaseReports,
  };
}
