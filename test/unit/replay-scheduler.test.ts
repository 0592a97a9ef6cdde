import fc from 'fast-check';
import { setImmediate as tick } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { buildPlan, simulatePlan, type PlannedRead, type ReplayPlan } from '../../src/replay/plan.js';
import { buildStats, percentile } from '../../src/replay/report.js';
import { realClock, runSchedule, type Clock, type ScheduleResult } from '../../src/replay/scheduler.js';
import { readTraceFile, type BootTrace, type TraceRead } from '../../src/replay/trace.js';

/** A trace from [t, done] pairs (offsets are the index × 4 KiB). */
function traceOf(windows: Array<[number, number | undefined]>): BootTrace {
  const reads: TraceRead[] = windows.map(([tUs, doneUs], i) => ({
    tUs, offset: i * 4096, length: 4096, line: i + 2, ...(doneUs === undefined ? {} : { doneUs }),
  }));
  return { source: '<test>', reads, hasCompletionTimes: windows.every(([, d]) => d !== undefined), ignoredRows: 0 };
}

/**
 * Virtual time for the scheduler: sleeps and read completions are events
 * fired in time order, and whenever the scheduler is blocked the next event
 * fires. Makes runSchedule deterministic and exact.
 */
class VirtualTime implements Clock {
  now = 0;
  private events: Array<{ at: number; seq: number; fire: () => void }> = [];
  private seq = 0;
  private sleeping = false;

  nowUs(): number {
    return this.now;
  }

  at(time: number, fire: () => void): void {
    this.events.push({ at: time, seq: this.seq++, fire });
  }

  /** A fake reader whose latency is given per read. */
  reader(latencyUs: (read: PlannedRead) => number): (read: PlannedRead) => Promise<void> {
    return (read) => new Promise((resolve) => this.at(this.now + latencyUs(read), resolve));
  }

  async sleepUntilUs(target: number): Promise<void> {
    this.sleeping = true;
    for (let e = this.next(target); e !== undefined; e = this.next(target)) {
      this.now = e.at;
      e.fire();
      await tick();
    }
    this.now = Math.max(this.now, target);
    this.sleeping = false;
  }

  /** Runs the promise to completion, firing events whenever nothing else can progress. */
  async drive<T>(work: Promise<T>): Promise<T> {
    let settled = false;
    work.then(() => { settled = true; }, () => { settled = true; });
    for (;;) {
      await tick();
      if (settled) return work;
      if (this.sleeping) continue;
      const e = this.next(Infinity);
      if (e === undefined) throw new Error('deadlock: the scheduler waits and no read is in flight');
      this.now = e.at;
      e.fire();
    }
  }

  private next(limit: number): { at: number; fire: () => void } | undefined {
    let best = -1;
    this.events.forEach((e, i) => {
      if (e.at > limit) return;
      const b = this.events[best];
      if (b === undefined || e.at < b.at || (e.at === b.at && e.seq < b.seq)) best = i;
    });
    return best < 0 ? undefined : this.events.splice(best, 1)[0];
  }
}

async function runVirtual(plan: ReplayPlan, latencyUs: (read: PlannedRead) => number): Promise<ScheduleResult> {
  const clock = new VirtualTime();
  return clock.drive(runSchedule(plan, clock.reader(latencyUs), { clock }));
}

/** Checks the model's invariants on a replay: deps done before issue, think time kept, order kept. */
function checkInvariants(plan: ReplayPlan, result: ScheduleResult): void {
  let previousIssue = -Infinity;
  for (const read of plan.reads) {
    const replayed = result.reads[read.index]!;
    let depsDone = 0;
    for (let k = 0; k < read.depCount; k++) depsDone = Math.max(depsDone, result.reads[plan.completionOrder[k]!]!.doneUs);
    expect(replayed.issueUs).toBeGreaterThanOrEqual(depsDone + read.thinkUs - 1e-6);
    expect(replayed.issueUs).toBeGreaterThanOrEqual(previousIssue);
    previousIssue = replayed.issueUs;
  }
}

// A: [0,100]  B: [50,150] overlaps A  C: [200,300] and D: [210,260] after A and B, overlapping
// E: [400,450] after all of them.
const WINDOWS: Array<[number, number]> = [[0, 100], [50, 150], [200, 300], [210, 260], [400, 450]];

describe('replay plan', () => {
  it('derives dependencies and think times from completion times', () => {
    const plan = buildPlan(traceOf(WINDOWS));
    expect(plan.model).toBe('recorded-dependencies');
    expect(plan.reads.map((r) => r.depCount)).toEqual([0, 0, 2, 2, 4]);
    expect(plan.reads.map((r) => r.thinkUs)).toEqual([0, 50, 50, 60, 100]);
    expect(plan.completionOrder).toEqual([0, 1, 3, 2, 4]);
    expect(plan.recordedDurationUs).toBe(450);
  });

  it('orders zero-latency ties so that no read depends on itself or a later read', () => {
    const plan = buildPlan(traceOf([[10, 10], [10, 10], [10, 12], [12, 12]]));
    expect(plan.reads.map((r) => r.depCount)).toEqual([0, 1, 2, 3]);
    for (const read of plan.reads) {
      for (let k = 0; k < read.depCount; k++) expect(plan.completionOrder[k]!).toBeLessThan(read.index);
    }
  });

  it('falls back to a serial chain without completion times', () => {
    const plan = buildPlan(traceOf([[100, undefined], [105, undefined], [300, undefined]]), { assumedServiceUs: 10 });
    expect(plan.model).toBe('serial-fallback');
    expect(plan.reads.map((r) => r.depCount)).toEqual([0, 1, 2]);
    expect(plan.reads.map((r) => r.thinkUs)).toEqual([100, 0, 185]);
    expect(plan.recordedDurationUs).toBe(310);
    expect(buildPlan(traceOf(WINDOWS), { ignoreCompletionTimes: true }).model).toBe('serial-fallback');
  });

  it('drops think times with thinkTime: false', () => {
    const plan = buildPlan(traceOf(WINDOWS), { thinkTime: false });
    expect(plan.reads.every((r) => r.thinkUs === 0)).toBe(true);
    expect(plan.reads.map((r) => r.depCount)).toEqual([0, 0, 2, 2, 4]);
  });

  it('reproduces the recording exactly when reads take their recorded time', async () => {
    const trace = await readTraceFile('test/data/debian12-minbase-boot-timed.csv');
    const plan = buildPlan(trace);
    const sim = simulatePlan(plan, (r) => r.doneUs - r.tUs);
    sim.forEach((s, i) => {
      expect(s.issueUs).toBe(trace.reads[i]!.tUs);
      expect(s.doneUs).toBe(trace.reads[i]!.doneUs);
    });
  });
});

describe('runSchedule with a controlled reader', () => {
  it('keeps recorded overlap and never issues a read before its dependencies complete', async () => {
    const plan = buildPlan(traceOf(WINDOWS), { thinkTime: false });
    const started: number[] = [];
    const finish = new Map<number, () => void>();
    const run = runSchedule(plan, (read) => {
      started.push(read.index);
      return new Promise<void>((resolve) => finish.set(read.index, resolve));
    });
    const settle = async (): Promise<void> => { for (let i = 0; i < 5; i++) await tick(); };
    await settle();
    expect(started).toEqual([0, 1]); // A and B overlap in the recording: both in flight
    finish.get(1)!();
    await settle();
    expect(started).toEqual([0, 1]); // C and D also need A
    finish.get(0)!();
    await settle();
    expect(started).toEqual([0, 1, 2, 3]);
    finish.get(3)!();
    await settle();
    expect(started).toEqual([0, 1, 2, 3]); // E needs C too
    finish.get(2)!();
    await settle();
    expect(started).toEqual([0, 1, 2, 3, 4]);
    finish.get(4)!();
    const result = await run;
    expect(result.maxInFlight).toBe(2);
    checkInvariants(plan, result);
  });

  it('honours think time after the last dependency completes (virtual time)', async () => {
    const plan = buildPlan(traceOf(WINDOWS));
    const result = await runVirtual(plan, () => 1000);
    // A issues at 0, B at 50 (think 50 from start); both done at 1050; C at +50, D at +60, E 100 after D/C.
    expect(result.reads.map((r) => r.issueUs)).toEqual([0, 50, 1100, 1110, 2210]);
    expect(result.durationUs).toBe(3210);
    expect(result.maxInFlight).toBe(2);
  });

  it('keeps the serial fallback to one read in flight', async () => {
    const plan = buildPlan(traceOf([[0, undefined], [5, undefined], [7, undefined], [100, undefined]]), { assumedServiceUs: 2 });
    const result = await runVirtual(plan, () => 50);
    expect(result.maxInFlight).toBe(1);
    // think: 0, 3, 0, 91
    expect(result.reads.map((r) => r.issueUs)).toEqual([0, 53, 103, 244]);
  });

  it('matches the simulated model on the reference boot with 10 ms storage', async () => {
    const plan = buildPlan(await readTraceFile('test/data/debian12-minbase-boot-timed.csv'));
    const result = await runVirtual(plan, () => 10_000);
    const sim = simulatePlan(plan, () => 10_000);
    result.reads.forEach((r, i) => {
      expect(r.issueUs).toBeCloseTo(sim[i]!.issueUs, 6);
      expect(r.doneUs).toBeCloseTo(sim[i]!.doneUs, 6);
    });
    checkInvariants(plan, result);
    // Slower storage stretches the boot: every read waits at least 10 ms more along the chain.
    expect(result.durationUs).toBeGreaterThan(plan.recordedDurationUs);
    expect(result.maxInFlight).toBeGreaterThan(1);
  });

  it('matches the simulated model on random traces', async () => {
    const windowArb = fc.array(fc.tuple(fc.integer({ min: 0, max: 5000 }), fc.integer({ min: 0, max: 3000 })), { minLength: 1, maxLength: 40 });
    await fc.assert(fc.asyncProperty(
      windowArb,
      fc.boolean(),
      fc.boolean(),
      fc.array(fc.integer({ min: 1, max: 4000 }), { minLength: 40, maxLength: 40 }),
      async (raw, thinkTime, timed, latencies) => {
        const windows = raw.map(([t, d]): [number, number | undefined] => [t, timed ? t + d : undefined]).sort((a, b) => a[0] - b[0]);
        const plan = buildPlan(traceOf(windows), { thinkTime });
        const latency = (r: PlannedRead): number => latencies[r.index]!;
        const result = await runVirtual(plan, latency);
        const sim = simulatePlan(plan, latency);
        result.reads.forEach((r, i) => expect(r.issueUs).toBeCloseTo(sim[i]!.issueUs, 6));
        checkInvariants(plan, result);
      },
    ), { numRuns: 60 });
  });

  it('honours think time on the real clock (lower bounds only)', async () => {
    const plan = buildPlan(traceOf([[0, 1000], [21_000, 22_000], [42_500, 43_000], [42_600, 44_000]]));
    const result = await runSchedule(plan, () => new Promise((resolve) => setTimeout(resolve, 2)), { clock: realClock });
    checkInvariants(plan, result);
    for (const r of result.reads) expect(r.issueUs).toBeGreaterThanOrEqual(r.targetUs);
    // Two think times of 20 ms each and 3 serial reads of at least 2 ms.
    expect(result.durationUs).toBeGreaterThanOrEqual(20_000 + 20_000 + 3 * 2000);
  });

  it('real clock: sub-millisecond and longer waits end at or after the target, and I/O keeps being processed meanwhile', async () => {
    for (const waitUs of [80, 700, 5000, 15_000]) {
      const start = realClock.nowUs();
      const target = start + waitUs;
      // A callback ready while the clock waits, as a reply would be: it runs long before the wait ends.
      let ranAt = -1;
      setImmediate(() => (ranAt = realClock.nowUs()));
      await realClock.sleepUntilUs(target);
      const end = realClock.nowUs();
      expect(end).toBeGreaterThanOrEqual(target);
      // (A short wait may be over before its first turn of the event loop.)
      if (waitUs >= 5000) {
        expect(ranAt).toBeGreaterThan(0);
        expect(ranAt - start).toBeLessThan(waitUs / 2);
      }
    }
  });

  it('stops at the first failed read and waits for reads in flight', async () => {
    const plan = buildPlan(traceOf(WINDOWS), { thinkTime: false });
    const started: number[] = [];
    let settledAfterFailure = 0;
    const err = await runSchedule(plan, (read) => {
      started.push(read.index);
      if (read.index === 0) return new Promise((resolve) => setTimeout(() => { settledAfterFailure++; resolve(undefined); }, 20));
      return Promise.reject(new Error(`read ${read.index} failed`));
    }).catch((e: unknown) => e);
    expect((err as Error).message).toBe('read 1 failed');
    expect(started).toEqual([0, 1]);
    expect(settledAfterFailure).toBe(1);
  });
});

describe('replay statistics', () => {
  it('computes nearest-rank percentiles', () => {
    const values = Float64Array.from({ length: 100 }, (_, i) => i + 1);
    expect(percentile(values, 50)).toBe(50);
    expect(percentile(values, 90)).toBe(90);
    expect(percentile(values, 99)).toBe(99);
    expect(percentile(values, 100)).toBe(100);
    expect(percentile([7], 50)).toBe(7);
  });

  it('splits the replay into phases that add up to the totals', async () => {
    const plan = buildPlan(traceOf(WINDOWS));
    const result = await runVirtual(plan, () => 1000);
    const stats = buildStats(plan, result, 3);
    expect(stats.reads).toBe(5);
    expect(stats.bytes).toBe(5 * 4096);
    expect(stats.durationS).toBeCloseTo(3210 / 1e6, 12);
    expect(stats.ratio).toBeCloseTo(3210 / 450, 9);
    // Phases of 150 µs: [A, B] [C, D] [E]
    expect(stats.phases.map((p) => p.reads)).toEqual([2, 2, 1]);
    expect(stats.phases.reduce((s, p) => s + p.replayS, 0)).toBeCloseTo(stats.durationS, 12);
    expect(stats.phases.reduce((s, p) => s + p.recordedS, 0)).toBeCloseTo(stats.recordedDurationS, 12);
    expect(stats.phases.map((p) => p.replayS * 1e6)).toEqual([1100, 1110, 1000].map((v) => expect.closeTo(v, 6)));
    expect(stats.maxInFlight).toBe(2);
    expect(stats.recordedMaxInFlight).toBe(2);
    // Busy: [0,1050] [1100,2110] [2210,3210]
    expect(stats.ioBusyS * 1e6).toBeCloseTo(1050 + 1010 + 1000, 6);
    expect(stats.recordedIoBusyS! * 1e6).toBeCloseTo(150 + 100 + 50, 6);
    expect(stats.latencyMs.p50).toBeCloseTo(1, 9);
    expect(stats.schedulingLagMs.max).toBe(0);
    expect(stats.lagFreeDurationS).toBeCloseTo(stats.durationS, 12);
  });
});
