import { setImmediate as yieldToLoop, setTimeout as sleepMs } from 'node:timers/promises';
import type { PlannedRead, ReplayPlan } from './plan.js';

/** Microsecond clock with a precise sleep. */
export interface Clock {
  nowUs(): number;
  sleepUntilUs(targetUs: number): Promise<void>;
}

/**
 * Below this much waiting, timers are too coarse: yield to the event loop
 * instead. Node's setTimeout fires between 1 ms early (fractional delays are
 * truncated) and 0.8 ms late (p99, measured here), so a 1 ms window never
 * overshoots in practice; 2 ms spun the replay's CPU for nothing. Local
 * qemu-nbd replays, alternating: 2 ms window 26.56-27.39 s and 4.6-4.9 s of
 * client CPU; 1 ms window 26.54-26.60 s and 3.7-3.8 s; lag 0.05-0.08 s in both.
 */
const SPIN_WINDOW_US = 1000;

/**
 * performance.now() clock. Sleeps with a timer until about 1 ms before the
 * target, then yields to the event loop (setImmediate) until it is reached,
 * so sub-millisecond think times are kept and replies are still processed.
 */
export const realClock: Clock = {
  nowUs: () => performance.now() * 1000,
  async sleepUntilUs(targetUs: number): Promise<void> {
    const remaining = targetUs - performance.now() * 1000;
    if (remaining > SPIN_WINDOW_US) await sleepMs((remaining - SPIN_WINDOW_US) / 1000);
    while (performance.now() * 1000 < targetUs) await yieldToLoop();
  },
};

/** What happened to one read in the replay; times are µs from the replay start. */
export interface ReplayedRead {
  /** When the read was sent. */
  issueUs: number;
  /** When the model wanted it sent (dependencies done + think time); issueUs - targetUs is scheduling lag. */
  targetUs: number;
  doneUs: number;
}

export interface ScheduleResult {
  reads: ReplayedRead[];
  /** Replay start to last completion, µs. */
  durationUs: number;
  maxInFlight: number;
}

export interface ScheduleOptions {
  clock?: Clock;
  /** Called after each completion with the number of completed reads. */
  onProgress?: (completed: number, total: number) => void;
}

/**
 * Replays a plan: reads are issued in recorded order; read i is issued once
 * its dependencies (a prefix of completionOrder) have completed in this
 * replay, plus its think time after the latest of those completions, and
 * never before the read issued before it. Reads whose dependencies are met
 * are issued without waiting for each other, so recorded overlap is kept.
 * The first failed read stops the replay and rejects with its error.
 */
export async function runSchedule(
  plan: ReplayPlan,
  read: (planned: PlannedRead) => Promise<unknown>,
  options: ScheduleOptions = {},
): Promise<ScheduleResult> {
  const clock = options.clock ?? realClock;
  const n = plan.reads.length;
  const issued = new Float64Array(n);
  const targets = new Float64Array(n);
  const done = new Float64Array(n);
  const completed = new Uint8Array(n);
  // prefixMax[k]: latest replay completion among completionOrder[0..k); prefixMax[0] = start.
  const prefixMax = new Float64Array(n + 1);
  let prefix = 0;
  let completedCount = 0;
  let inFlight = 0;
  let maxInFlight = 0;
  let failure: { error: unknown } | undefined;
  // The issuing loop sleeps on `wake` while it waits for dependencies, the end, or the drain after a failure.
  let wake: (() => void) | undefined;
  const wakeUp = (): void => {
    const resolve = wake;
    wake = undefined;
    resolve?.();
  };
  const waitForWake = (): Promise<void> => new Promise((resolve) => { wake = resolve; });

  const start = clock.nowUs();

  const onComplete = (index: number): void => {
    done[index] = clock.nowUs() - start;
    completed[index] = 1;
    inFlight--;
    completedCount++;
    while (prefix < n && completed[plan.completionOrder[prefix]!] === 1) {
      prefixMax[prefix + 1] = Math.max(prefixMax[prefix]!, done[plan.completionOrder[prefix]!]!);
      prefix++;
    }
    options.onProgress?.(completedCount, n);
    wakeUp();
  };

  const onError = (err: unknown): void => {
    inFlight--;
    failure ??= { error: err };
    wakeUp();
  };

  let lastIssueUs = 0;
  for (const planned of plan.reads) {
    while (failure === undefined && prefix < planned.depCount) await waitForWake();
    if (failure !== undefined) break;
    const targetUs = Math.max(lastIssueUs, prefixMax[planned.depCount]! + planned.thinkUs);
    lastIssueUs = targetUs;
    await clock.sleepUntilUs(start + targetUs);
    if (failure !== undefined) break;
    issued[planned.index] = clock.nowUs() - start;
    targets[planned.index] = targetUs;
    inFlight++;
    if (inFlight > maxInFlight) maxInFlight = inFlight;
    let pending: Promise<unknown>;
    try {
      pending = read(planned);
    } catch (err) {
      pending = Promise.reject(err);
    }
    pending.then(() => onComplete(planned.index), onError);
  }
  // Wait for every read sent, also after a failure, so nothing outlives the replay.
  while (inFlight > 0) await waitForWake();
  if (failure !== undefined) throw failure.error;
  const reads: ReplayedRead[] = Array.from({ length: n }, (_, i) => ({ issueUs: issued[i]!, targetUs: targets[i]!, doneUs: done[i]! }));
  let durationUs = 0;
  for (const r of reads) durationUs = Math.max(durationUs, r.doneUs);
  return { reads, durationUs, maxInFlight };
}
