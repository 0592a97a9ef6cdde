import type { BootTrace } from './trace.js';

/**
 * Which dependency model a plan uses:
 * - "recorded-dependencies": the trace has done_us; a read depends on every
 *   read that had completed when it was issued in the recording.
 * - "serial-fallback": no done_us; each read depends on the previous one.
 */
export type ReplayModelKind = 'recorded-dependencies' | 'serial-fallback';

export interface PlannedRead {
  /** Position in issue order. */
  index: number;
  offset: number;
  length: number;
  /** Recorded issue time, µs. */
  tUs: number;
  /** Recorded (or, in the fallback, assumed) completion time, µs. */
  doneUs: number;
  /**
   * The read waits for the first `depCount` entries of `completionOrder`
   * (the dependency set is always such a prefix).
   */
  depCount: number;
  /** Guest think time: µs between its last dependency completing and its issue. */
  thinkUs: number;
}

export interface ReplayPlan {
  model: ReplayModelKind;
  reads: PlannedRead[];
  /** Read indices in recorded completion order (ties: issue order). */
  completionOrder: number[];
  /** End of the recording: last completion (or last assumed completion), µs from 0. */
  recordedDurationUs: number;
  /** Service time assumed for a local read in the fallback model, µs; null with done_us. */
  assumedServiceUs: number | null;
  thinkTime: boolean;
}

export interface PlanOptions {
  /** false: every think time is 0 (pure dependency-driven, storage-bound replay). */
  thinkTime?: boolean;
  /** Use the fallback model even when the trace has done_us (for comparisons). */
  ignoreCompletionTimes?: boolean;
  /** Fallback model: assumed service time of a local read, µs (default 10). */
  assumedServiceUs?: number;
}

/**
 * Recorded median and mean read latency of the reference boot
 * (debian12-minbase-boot-timed.csv: 5 µs and 12 µs); the fallback subtracts
 * this from the gap between two reads to estimate the guest's think time.
 */
export const DEFAULT_ASSUMED_SERVICE_US = 10;

/** Builds the dependency and think-time plan for a trace. */
export function buildPlan(trace: BootTrace, options: PlanOptions = {}): ReplayPlan {
  const thinkTime = options.thinkTime ?? true;
  const useRecorded = trace.hasCompletionTimes && options.ignoreCompletionTimes !== true;
  return useRecorded
    ? recordedDependencyPlan(trace, thinkTime)
    : serialFallbackPlan(trace, thinkTime, options.assumedServiceUs ?? DEFAULT_ASSUMED_SERVICE_US);
}

/**
 * Read i depends on every read j with done_j <= t_i (ties at done_j == t_i
 * only for j issued before i, so there are no cycles). As reads are in issue
 * order, these sets grow with i and are prefixes of the reads sorted by
 * (done, index): depCount is found with one pointer sweep, O(n log n) total.
 * think_i = t_i - max(done_j over the deps), or t_i when there are none.
 */
function recordedDependencyPlan(trace: BootTrace, thinkTime: boolean): ReplayPlan {
  const source = trace.reads;
  const n = source.length;
  const done = source.map((read) => read.doneUs!);
  const completionOrder = Array.from({ length: n }, (_, i) => i).sort((a, b) => done[a]! - done[b]! || a - b);
  const reads: PlannedRead[] = [];
  let prefix = 0;
  let recordedEnd = 0;
  for (let i = 0; i < n; i++) {
    const { tUs, offset, length } = source[i]!;
    while (prefix < n) {
      const j = completionOrder[prefix]!;
      if (done[j]! < tUs || (done[j] === tUs && j < i)) prefix++;
      else break;
    }
    const lastDepDone = prefix > 0 ? done[completionOrder[prefix - 1]!]! : 0;
    reads.push({
      index: i, offset, length, tUs, doneUs: done[i]!,
      depCount: prefix,
      thinkUs: thinkTime ? tUs - lastDepDone : 0,
    });
    recordedEnd = Math.max(recordedEnd, done[i]!);
  }
  return { model: 'recorded-dependencies', reads, completionOrder, recordedDurationUs: recordedEnd, assumedServiceUs: null, thinkTime };
}

/**
 * Without completion times the overlap between reads is unknown. The
 * fallback is closed-loop and serial: each read waits for the previous one,
 * and the think time is the gap between their recorded starts minus an
 * assumed local service time S, floored at 0. A boot is a chain of mostly
 * dependent reads (the reference boot never has more than 3 in flight), so
 * this keeps the causal slowdown slow storage causes, while an open-loop
 * replay at the recorded start times would hide it.
 */
function serialFallbackPlan(trace: BootTrace, thinkTime: boolean, assumedServiceUs: number): ReplayPlan {
  const reads: PlannedRead[] = trace.reads.map(({ tUs, offset, length }, i) => {
    const previousStart = i > 0 ? trace.reads[i - 1]!.tUs : undefined;
    const think = previousStart === undefined ? tUs : Math.max(0, tUs - previousStart - assumedServiceUs);
    return { index: i, offset, length, tUs, doneUs: tUs + assumedServiceUs, depCount: i, thinkUs: thinkTime ? think : 0 };
  });
  const last = trace.reads[trace.reads.length - 1];
  return {
    model: 'serial-fallback',
    reads,
    completionOrder: reads.map((read) => read.index),
    recordedDurationUs: last === undefined ? 0 : last.tUs + assumedServiceUs,
    assumedServiceUs,
    thinkTime,
  };
}

export interface SimulatedRead {
  issueUs: number;
  doneUs: number;
}

/**
 * The replay schedule in virtual time for given read latencies: what
 * runSchedule does, without a clock or a server. Used to predict a replay
 * against storage of a known latency, and as a test oracle.
 */
export function simulatePlan(plan: ReplayPlan, latencyUs: (read: PlannedRead) => number): SimulatedRead[] {
  const out: SimulatedRead[] = [];
  const prefixMax = [0];
  let lastIssue = 0;
  for (const read of plan.reads) {
    // Every dependency precedes the read in issue order, so its completion is known.
    while (prefixMax.length <= read.depCount) {
      const dep = plan.completionOrder[prefixMax.length - 1]!;
      prefixMax.push(Math.max(prefixMax[prefixMax.length - 1]!, out[dep]!.doneUs));
    }
    const issueUs = Math.max(lastIssue, prefixMax[read.depCount]! + read.thinkUs);
    lastIssue = issueUs;
    out.push({ issueUs, doneUs: issueUs + latencyUs(read) });
  }
  return out;
}
