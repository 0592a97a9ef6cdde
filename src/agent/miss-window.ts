/**
 * The miss window: a guest miss is widened to the aligned window of the
 * image around it, so one storage request brings the blocks near it too.
 *
 * Why: a boot with no segment (an image's first boot, or blocks its map
 * missed) reads small pieces scattered over the image, but clustered: the
 * 4,060 reads of the reference trace touch 1,674 windows of 64 KiB, and only
 * 189 of 1 MiB. Reading the whole window on the first miss in it turns about
 * 3,800 misses of runs into about 190 requests, for twice the bytes (the
 * widening QEMU's copy-on-read and nbdkit's cache filter do at cluster size;
 * docs/benchmarks-fleet.md). The sequential readahead (readahead.ts) covers
 * streams; this covers the jumps between them.
 *
 * A run is widened only over blocks nothing else brings (`fetchable`: not
 * cached, not being read, not coming with the segment stream), and only
 * contiguously, so the widened run stays one ranged read.
 */

/**
 * Widens the missing run [start, end] of a read of blocks [first, last]
 * to its window of `windowBlocks` blocks: backwards from `first` when the
 * run starts there, forwards from `last` when it ends there (a run inside
 * the read is bounded by blocks the read already has). `blocks`: the image's
 * block count.
 */
export function widenMiss(
  start: number,
  end: number,
  first: number,
  last: number,
  windowBlocks: number,
  blocks: number,
  fetchable: (block: number) => boolean,
): { start: number; end: number } {
  if (windowBlocks <= 1) return { start, end };
  const windowStart = Math.floor(start / windowBlocks) * windowBlocks;
  const windowEnd = Math.min(blocks - 1, (Math.floor(end / windowBlocks) + 1) * windowBlocks - 1);
  let s = start;
  let e = end;
  if (s === first) while (s > windowStart && fetchable(s - 1)) s--;
  if (e === last) while (e < windowEnd && fetchable(e + 1)) e++;
  return { start: s, end: e };
}
