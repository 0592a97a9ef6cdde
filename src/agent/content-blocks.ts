/**
 * Content-addressed blocks (docs/cache-device.md, "Content-addressed blocks"):
 * blocks whose SHA-256 a version 2 segment gives are cached once, by content,
 * in one reserved cache space shared by every image, so two images (or two
 * versions of one) whose boots read the same bytes store and fetch them once.
 *
 * Key of a block in the content space: the first 52 bits of its SHA-256 (a
 * safe integer, as the cache device's block numbers must be). The key is
 * truncated, so every hit is checked against the full digest of the version
 * opened: a key collision or a damaged block the CRC missed is a miss, never
 * bytes of another block.
 */
import { createHash, hash } from 'node:crypto';
import type { BlockCache } from './block-cache.js';

/** The reserved cache space of content-addressed blocks (64 hex digits, like an image identity). */
export const CONTENT_SPACE = createHash('sha256').update('bootcache content v1').digest('hex');

/** Bytes of one digest (SHA-256), as in the segment's digest table. */
const DIGEST_LENGTH = 32;

/** The content-space key of a block whose SHA-256 is `digest`: its first 52 bits, big-endian. */
export function contentKey(digest: Uint8Array, at = 0): number {
  // 48 bits, then the high nibble of byte 6: 2^52 - 1 at most, below Number.MAX_SAFE_INTEGER.
  const high48 = ((digest[at]! << 16) | (digest[at + 1]! << 8) | digest[at + 2]!) * 2 ** 24 + ((digest[at + 3]! << 16) | (digest[at + 4]! << 8) | digest[at + 5]!);
  return high48 * 16 + (digest[at + 6]! >> 4);
}

/** The digests of an image's segment, found by image block: the map's rank, then the table. */
export interface SegmentDigests {
  isSet(block: number): boolean;
  rank(block: number): number;
  /** The digest table: DIGEST_LENGTH bytes per rank. */
  table: Buffer;
}

/** Content-space counters of one agent (status `cache.content`). */
export interface ContentCounters {
  /** Content entries served (each checked against its digest). */
  hits: number;
  /** Content entries whose bytes did not hash to the digest wanted: read elsewhere instead. */
  mismatches: number;
  /** Missed blocks that did not hash to their segment digest: cached in the image's space. */
  unmatchedMisses: number;
}

export function emptyContentCounters(): ContentCounters {
  return { hits: 0, mismatches: 0, unmatchedMisses: 0 };
}

/** The content side of one image version's read path. */
export class ContentBlocks {
  /** Content key per rank, computed once. */
  readonly keys: Float64Array;

  constructor(
    private readonly cache: BlockCache,
    private readonly digests: SegmentDigests,
    private readonly counters: ContentCounters,
  ) {
    const ranks = Math.floor(digests.table.length / DIGEST_LENGTH);
    this.keys = new Float64Array(ranks);
    for (let r = 0; r < ranks; r++) this.keys[r] = contentKey(digests.table, r * DIGEST_LENGTH);
  }

  /** The rank of `block` in the segment, or -1 when the segment does not hold it. */
  private rankOf(block: number): number {
    if (!this.digests.isSet(block)) return -1;
    const rank = this.digests.rank(block);
    return rank < this.keys.length ? rank : -1;
  }

  /** The content key of `block`, or undefined when its digest is not known. */
  keyOf(block: number): number | undefined {
    const rank = this.rankOf(block);
    return rank < 0 ? undefined : this.keys[rank];
  }

  /** True when an entry is cached under the content key of `block` (its bytes are checked on read). */
  has(block: number): boolean {
    const key = this.keyOf(block);
    return key !== undefined && this.cache.has(CONTENT_SPACE, key);
  }

  /**
   * Reads the content entry of `block` into `into` (blockSize bytes); true
   * only when it is cached and hashes to the block's digest.
   */
  async read(block: number, into: Buffer): Promise<boolean> {
    const rank = this.rankOf(block);
    if (rank < 0) return false;
    const data = await this.cache.get(CONTENT_SPACE, this.keys[rank]!, into);
    if (!data) return false;
    if (!this.matchesRank(rank, data)) {
      this.counters.mismatches++;
      return false;
    }
    this.counters.hits++;
    return true;
  }

  /**
   * The content key to cache `data` (the bytes of `block` read from storage)
   * under: only when they hash to the block's digest, else undefined (the
   * segment does not describe these bytes; they stay in the image's space).
   */
  keyFor(block: number, data: Buffer): number | undefined {
    const rank = this.rankOf(block);
    if (rank < 0) return undefined;
    if (this.matchesRank(rank, data)) return this.keys[rank];
    this.counters.unmatchedMisses++;
    return undefined;
  }

  private matchesRank(rank: number, data: Buffer): boolean {
    const at = rank * DIGEST_LENGTH;
    return hash('sha256', data, 'buffer').equals(this.digests.table.subarray(at, at + DIGEST_LENGTH));
  }
}
