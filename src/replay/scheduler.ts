import { setImmediate as yieldToLoop, setTimeout as sleepMs } from 'node:timers/promises';
import type { BlockReader } from '../nbd/client/pool.js';
import type { PlannedRead, ReplayPlan } from './plan.js';

/** Microsecond clock with a precise sleep. */
export interface Clock {
  nowUs(): number;
  sleepUntilUs(targetUs: number): Promise<void>;
}

/**
 * Waits longer than this (µs) sleep on a timer until this long before the
 * target; the rest is napped (below). Node's setTimeout fires up to 1 ms early
 * (fractional delays are truncated) and up to about a millisecond late.
 */
const TIMER_WINDOW_US = 10_000;
/** Longest nap, µs: a blocking Atomics.wait, so replies wait at most this long to be read. */
const NAP_US = 50;
/** The last this many µs are spent yielding to the event loop, which is exact. */
const FINAL_YIELD_US = 150;

/** Shared memory that nobody notifies: Atomics.wait on it is a precise, blocking sleep. */
const napCell = new Int32Array(new SharedArrayBuffer(4));

/**
 * performance.now() clock. Sleeps on a timer until 10 ms before the target,
 * naps in 50 us futex waits (Atomics.wait) with a turn of the event loop after
 * each, so replies are still processed, and yields to the event loop for the
 * last 150 us.
 *
 * Why naps and not a spin: a process that spins before sending makes the
 * server's next wake-up cross vCPUs, which costs several times a same-vCPU
 * wake-up (bench/tools/wakeup-pingpong.c measures it; docs/replay.md,
 * "Timing", has the figures).
 */
export const realClock: Clock = {
  nowUs: () => performance.now() * 1000,
  async sleepUntilUs(targetUs: number): Promise<void> {
    const remaining = targetUs - performance.now() * 1000;
    if (remaining > TIMER_WINDOW_US + 1000) await sleepMs((remaining - TIMER_WINDOW_US) / 1000);
    for (;;) {
      const left = targetUs - performance.now() * 1000;
      if (left <= FINAL_YIELD_US) break;
      Atomics.wait(napCell, 0, 0, Math.min(NAP_US, left - FINAL_YIELD_US) / 1000);
      await yieldToLoop();
    }
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

/** The longest read of a plan, bytes. */
export function largestRead(plan: ReplayPlan): number {
  let largest = 0;
  for (const read of plan.reads) largest = Math.max(largest, read.length);
  return largest;
}

/**
 * Runs a plan's reads through `reader`. The data is not kept: every read lands
 * in one scratch buffer, faulted in beforehand, as a guest's reads land in
 * memory it already has. The timed replay and its warm-up both go through here.
 */
export function replayPlan(reader: BlockReader, plan: ReplayPlan, options: ScheduleOptions = {}): Promise<ScheduleResult> {
  const scratch = Buffer.allocUnsafeSlow(Math.max(1, largestRead(plan))).fill(0);
  return runSchedule(
    plan,
    (read) => (read.length === 0 ? Promise.resolve() : reader.read(read.offset, read.length, scratch)),
    options,
  );
}
