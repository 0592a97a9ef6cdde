/**
 * What the cache manager needs of the cache device (src/agent/cache/).
 * Kept as an interface so the read path is testable on its own.
 */
export type CacheBlockKind = 'boot' | 'other';

export interface BlockCache {
  readonly blockSize: number;
  has(space: string, block: number): boolean;
  /** The bytes put for (space, block), or undefined on a miss. */
  get(space: string, block: number): Promise<Buffer | undefined>;
  put(space: string, block: number, data: Buffer, kind: CacheBlockKind): Promise<void>;
  /** The image whose blocks live in `space` booted now: keep its boot blocks longest. */
  markBooted(space: string): void;
}
