/**
 * Two versions of one image for the content tests: B is A rebuilt. A's boot
 * reads `runs` runs of `run` blocks; in B the first `changed` runs hold new
 * bytes, the next `moved` runs hold A's bytes at other offsets (their old
 * place holds other bytes B's boot no longer reads), the rest are unchanged.
 */
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';

export interface RebuiltPlan {
  size: number;
  blockSize: number;
  runs: number;
  run: number;
  changed: number;
  moved: number;
  /** First block of A's run i. */
  runStart(i: number): number;
  /** Where B keeps moved run i (changed <= i < changed + moved). */
  movedStart(i: number): number;
}

/** Writes A and B; returns the first block of each boot run of A and of B, in boot order. */
export async function writeRebuiltPair(aPath: string, bPath: string, plan: RebuiltPlan): Promise<{ aRuns: number[]; bRuns: number[] }> {
  const bs = plan.blockSize;
  const a = randomBytes(plan.size);
  const b = Buffer.from(a);
  const aRuns: number[] = [];
  const bRuns: number[] = [];
  for (let i = 0; i < plan.runs; i++) {
    const at = plan.runStart(i);
    aRuns.push(at);
    if (i < plan.changed) {
      randomBytes(plan.run * bs).copy(b, at * bs);
      bRuns.push(at);
    } else if (i < plan.changed + plan.moved) {
      a.copy(b, plan.movedStart(i) * bs, at * bs, (at + plan.run) * bs);
      randomBytes(plan.run * bs).copy(b, at * bs);
      bRuns.push(plan.movedStart(i));
    } else bRuns.push(at);
  }
  await writeFile(aPath, a);
  await writeFile(bPath, b);
  return { aRuns, bRuns };
}
