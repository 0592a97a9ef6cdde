/**
 * Logical and physical bytes of the cache (status `cache.content`, metrics):
 * what the images' cached blocks would take if each image kept its own copy,
 * against what the cache device holds. Definition (docs/cache-device.md,
 * "Content-addressed blocks"):
 *
 *   physical = every cached block × blockSize (the device's usedBytes)
 *   logical  = (blocks of every space but the content space
 *               + per image version known, its segment ranks whose content
 *                 key is cached
 *               + content entries no such version refers to) × blockSize
 *
 * "Known": the image versions whose version 2 segment this agent loaded since
 * it started, the MAX_VERSIONS most recent. A content entry counts once per
 * rank that refers to it, so logical ≥ physical.
 */
import type { CacheStats } from './cache/cache-device.js';
import { CONTENT_SPACE } from './content-blocks.js';

/** Image versions remembered (each holds 8 bytes per segment block). */
export const MAX_VERSIONS = 64;

export interface ContentBytes {
  logicalBytes: number;
  physicalBytes: number;
  /** logical / physical (1 when the cache is empty). */
  ratio: number;
}

export class ContentLedger {
  /** Image identity -> content key per rank of its segment; most recently recorded last. */
  private readonly versions = new Map<string, Float64Array>();
  private generation = 0;
  /** The referred count of the last computation, and what it was computed from. */
  private memo: { fingerprint: string; referred: number; referredKeys: number } | undefined;

  constructor(private readonly has: (space: string, block: number) => boolean) {}

  /** The version `identity` of an image has a version 2 segment with these content keys. */
  record(identity: string, keys: Float64Array): void {
    if (this.versions.get(identity) === keys) return;
    this.versions.delete(identity);
    this.versions.set(identity, keys);
    while (this.versions.size > MAX_VERSIONS) this.versions.delete(this.versions.keys().next().value!);
    this.generation++;
  }

  bytes(stats: Pick<CacheStats, 'blockSize' | 'blocks' | 'usedBytes' | 'spaces' | 'evictions' | 'checksumFailures'>): ContentBytes {
    const contentBlocks = stats.spaces.find((s) => s.space === CONTENT_SPACE)?.blocks ?? 0;
    const { referred, referredKeys } = this.referred(contentBlocks, stats);
    const logicalBlocks = stats.blocks - contentBlocks + referred + Math.max(0, contentBlocks - referredKeys);
    const logicalBytes = logicalBlocks * stats.blockSize;
    return { logicalBytes, physicalBytes: stats.usedBytes, ratio: stats.usedBytes === 0 ? 1 : logicalBytes / stats.usedBytes };
  }

  /**
   * Ranks of the known versions whose content is cached, and how many
   * distinct keys they are. Computed again only when the content space may
   * have changed which keys it holds (an entry added, evicted or dropped as
   * damaged) or a version was recorded: status is polled often.
   */
  private referred(contentBlocks: number, stats: Pick<CacheStats, 'evictions' | 'checksumFailures'>): { referred: number; referredKeys: number } {
    const fingerprint = `${this.generation}/${contentBlocks}/${stats.evictions}/${stats.checksumFailures}`;
    if (this.memo?.fingerprint === fingerprint) return this.memo;
    let referred = 0;
    const keys = new Set<number>();
    for (const ranks of this.versions.values()) {
      for (const key of ranks) {
        if (!this.has(CONTENT_SPACE, key)) continue;
        referred++;
        keys.add(key);
      }
    }
    this.memo = { fingerprint, referred, referredKeys: keys.size };
    return this.memo;
  }
}
