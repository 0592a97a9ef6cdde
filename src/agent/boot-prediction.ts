/**
 * Boot prediction for a new version of an image (docs/agent.md, "A new
 * version of an image"): an image published with an index (IMAGE.bcidx)
 * naming its previous version (`bootcache index --previous`), but no segment
 * of its own yet. Its boot is predicted from the previous version's segment:
 * every digest of that segment found in the new index is a block the new
 * version's boot will likely read, wherever the rebuild moved it. Blocks
 * whose content the cache holds need nothing (the cache manager serves them
 * by content); the rest are read from the new image, in runs, and cached by
 * content. The boot itself is recorded as any other, and its end publishes
 * the new version's own map and segment.
 */
import type { ImageIndex } from '../format/image-index.js';
import type { CacheManager } from './cache-manager.js';
import { contentKey, type SegmentDigests } from './content-blocks.js';

/** Bytes of one digest (SHA-256) in the segment's and the index's tables. */
const DIGEST_LENGTH = 32;

export interface PredictionResult {
  /** Blocks of the new version whose content the previous version's segment holds. */
  predicted: number;
  /** Of those, already cached (by content or in the image's space). */
  cached: number;
  /** Read from the new image now. */
  fetched: number;
  /** Previous segment blocks whose content the new version does not hold (changed). */
  unmatched: number;
}

/**
 * The new version's blocks predicted from `previous` (the previous version's
 * segment digests): ascending, one block per distinct content.
 */
export function predictBlocks(index: ImageIndex, previous: SegmentDigests): { blocks: number[]; unmatched: number } {
  const table = index.digestTable;
  const byKey = new Map<number, number>();
  for (let rank = 0; rank < index.dataBlocks; rank++) {
    const key = contentKey(table, rank * DIGEST_LENGTH);
    // The first block of a content: any block with these bytes serves the boot's reads of all of them.
    if (!byKey.has(key)) byKey.set(key, rank);
  }
  const blocks = new Set<number>();
  let unmatched = 0;
  const ranks = Math.floor(previous.table.length / DIGEST_LENGTH);
  for (let r = 0; r < ranks; r++) {
    const at = r * DIGEST_LENGTH;
    const rank = byKey.get(contentKey(previous.table, at));
    // The key is a prefix: compare the whole digest before trusting the match.
    if (rank === undefined || !index.digestAt(rank).equals(previous.table.subarray(at, at + DIGEST_LENGTH))) {
      unmatched++;
      continue;
    }
    blocks.add(index.blockAt(rank));
  }
  return { blocks: [...blocks].sort((a, b) => a - b), unmatched };
}

/**
 * Loads the predicted blocks the cache lacks through the cache manager's read
 * path (so they are checked against the index and cached by content), in runs
 * of consecutive blocks of at most `runBytes`, `depth` runs at a time.
 */
export async function loadPredicted(
  manager: CacheManager,
  blocks: readonly number[],
  options: { blockSize: number; runBytes: number; depth: number; stopped: () => boolean },
): Promise<Pick<PredictionResult, 'cached' | 'fetched'>> {
  const { blockSize: bs } = options;
  const maxRun = Math.max(1, Math.floor(options.runBytes / bs));
  const runs: Array<[number, number]> = [];
  let cached = 0;
  for (const block of blocks) {
    if (manager.hasBlock(block)) {
      cached++;
      continue;
    }
    const last = runs[runs.length - 1];
    if (last && last[0] + last[1] === block && last[1] < maxRun) last[1]++;
    else runs.push([block, 1]);
  }
  let next = 0;
  let fetched = 0;
  const worker = async (): Promise<void> => {
    while (next < runs.length && !options.stopped()) {
      const [first, count] = runs[next++]!;
      const offset = first * bs;
      const length = Math.min(manager.virtualSize, (first + count) * bs) - offset;
      await manager.readUnrecorded(offset, length, 'boot');
      fetched += count;
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, options.depth) }, worker));
  return { cached, fetched };
}
