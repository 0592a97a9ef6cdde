/**
 * The prefetch stream's reads: the segment ranks the cache does not hold,
 * coalesced into ranged reads of at most one chunk each. A run of held ranks
 * between two missing ones is read through when it is short (at most
 * `gapRanks`): a request more costs a round trip, a short gap only bytes.
 * On a cold cache the reads are the segment's chunks, back to back.
 */

/** One ranged read of the segment: ranks [first, first + count). */
export interface PlannedRead {
  first: number;
  count: number;
}

export class ReadPlan {
  private constructor(
    /** First rank of each read, ascending. */
    private readonly firsts: Float64Array,
    private readonly counts: Float64Array,
    /** Ranks in no read: held by the cache when planned. */
    readonly skippedRanks: number,
  ) {}

  /**
   * Plans reads over ranks [0, rankCount): `held(rank)` says whether the
   * cache already holds that rank's block.
   */
  static make(rankCount: number, maxRanks: number, gapRanks: number, held: (rank: number) => boolean): ReadPlan {
    const reads: PlannedRead[] = [];
    let current: PlannedRead | undefined;
    let planned = 0;
    for (let rank = 0; rank < rankCount; rank++) {
      if (held(rank)) continue;
      const end = current ? current.first + current.count : 0;
      if (current && rank - end <= gapRanks && rank + 1 - current.first <= maxRanks) {
        current.count = rank + 1 - current.first;
        continue;
      }
      if (current) planned += current.count;
      current = { first: rank, count: 1 };
      reads.push(current);
    }
    if (current) planned += current.count;
    return new ReadPlan(Float64Array.from(reads, (r) => r.first), Float64Array.from(reads, (r) => r.count), rankCount - planned);
  }

  get length(): number {
    return this.firsts.length;
  }

  read(index: number): PlannedRead {
    return { first: this.firsts[index]!, count: this.counts[index]! };
  }

  /** The read that holds `rank`, or -1 (a rank skipped as held). */
  readOf(rank: number): number {
    let lo = 0;
    let hi = this.firsts.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (this.firsts[mid]! > rank) hi = mid - 1;
      else if (this.firsts[mid]! + this.counts[mid]! <= rank) lo = mid + 1;
      else return mid;
    }
    return -1;
  }
}
