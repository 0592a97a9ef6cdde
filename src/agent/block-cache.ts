/**
 * What the cache manager needs of the cache device (src/agent/cache/).
 * Kept as an interface so the read path is testable on its own.
 */
export type CacheBlockKind = 'boot' | 'other';

/** One block of a batched put. */
export interface CacheEntry {
  block: number;
  data: Buffer;
  /**
   * CRC-32 (zlib's) of `data`, when the caller computed it already (the
   * prefetch checks segment blocks with it): the cache keeps it instead of
   * computing it again. Trusted: it must be the CRC of these very bytes (a
   * wrong one is mostly caught as damage on read, but a put of other bytes
   * under the CRC of the bytes already cached would be skipped as a repeat).
   */
  crc?: number;
}

export interface BlockCache {
  readonly blockSize: number;
  has(space: string, block: number): boolean;
  /** The bytes put for (space, block), or undefined on a miss; read into `into` (blockSize bytes) when given. */
  get(space: string, block: number, into?: Buffer): Promise<Buffer | undefined>;
  /**
   * Cached blocks [first, first + count) read into `into` (count × blockSize
   * bytes); resolves to which blocks were served (the rest are misses).
   */
  getRun(space: string, first: number, count: number, into: Buffer): Promise<boolean[]>;
  put(space: string, block: number, data: Buffer, kind: CacheBlockKind): Promise<void>;
  /** put() for many blocks of one space, written and committed together. */
  putMany(space: string, entries: readonly CacheEntry[], kind: CacheBlockKind): Promise<void>;
  /** The image whose blocks live in `space` booted now: keep its boot blocks longest. */
  markBooted(space: string): void;
}
