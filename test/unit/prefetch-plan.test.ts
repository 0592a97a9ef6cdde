import { describe, expect, it } from 'vitest';
import { ReadPlan } from '../../src/agent/prefetch-plan.js';

const reads = (plan: ReadPlan): Array<[number, number]> => Array.from({ length: plan.length }, (_, i) => [plan.read(i).first, plan.read(i).count]);

describe('ReadPlan', () => {
  it('reads a cold segment as its chunks, back to back', () => {
    const plan = ReadPlan.make(10, 4, 1, () => false);
    expect(reads(plan)).toEqual([[0, 4], [4, 4], [8, 2]]);
    expect(plan.skippedRanks).toBe(0);
  });

  it('skips held runs, reads through held runs of at most gapRanks, and never reads more than a chunk at once', () => {
    // Missing: 0, 2 (gap 1: read through), 6 (gap 3: split), 7..12 (a chunk is 4 ranks).
    const missing = new Set([0, 2, 6, 7, 8, 9, 10, 11, 12]);
    const plan = ReadPlan.make(16, 4, 1, (rank) => !missing.has(rank));
    expect(reads(plan)).toEqual([[0, 3], [6, 4], [10, 3]]);
    expect(plan.skippedRanks).toBe(16 - 10);
    expect([0, 1, 2, 3, 5, 6, 9, 10, 12, 13, 15].map((r) => plan.readOf(r))).toEqual([0, 0, 0, -1, -1, 1, 1, 2, 2, -1, -1]);
  });

  it('plans nothing when every rank is held', () => {
    const plan = ReadPlan.make(40_000, 256, 16, () => true);
    expect([plan.length, plan.skippedRanks, plan.readOf(0)]).toEqual([0, 40_000, -1]);
  });
});
