/**
 * The prefetch manager: streams an image's boot segment from storage in large
 * sequential reads through a bounded buffer, and loads each block into the
 * cache at the image block computed from the map (select over the bitmap).
 *
 * One Prefetcher per image, whatever the number of VMs booting from it.
 * Foreground reads never queue behind it: a block whose chunk is in flight
 * waits for that chunk; any other block is read directly (see ImageService).
 */
import type { Storage } from '../storage/types.js';

/** What the prefetcher needs of a map: rank/select over its bitmap. */
export interface PrefetchMap {
  readonly blockSize: number;
  readonly blockCount: number;
  /** Number of set bits (= segment blocks). */
  readonly blocksSet: number;
  isSet(block: number): boolean;
  rank(block: number): number;
  select(rank: number): number;
}

/** What the prefetcher needs of a segment: where block data lives and how to check it. */
export interface PrefetchSegment {
  readonly key: string;
  readonly blockSize: number;
  readonly blockCount: number;
  readonly dataOffset: number;
  /** True when `data` (one segment block) matches the checksum stored for `rank`. */
  checkBlock(rank: number, data: Buffer): boolean;
}

export interface PrefetchSink {
  /** Stores segment blocks (segment.blockSize bytes each), each for its image block, as one batch. */
  storeMany(entries: { block: number; data: Buffer }[]): Promise<void>;
  /** True when the block is already cached (skip it). */
  has(block: number): boolean;
}

export interface PrefetchOptions {
  chunkBytes: number;
  depth: number;
  onWarning?: (message: string) => void;
}

/** Blocks checked between two yields to the event loop. */
const VERIFY_SLICE = 128;

export type PrefetchState = 'idle' | 'streaming' | 'done' | 'failed' | 'stopped';

export interface PrefetchProgress {
  state: PrefetchState;
  segment: string;
  blocks: number;
  bytesTotal: number;
  bytesRead: number;
  blocksLoaded: number;
  /** Blocks of chunks skipped without a storage read because every block was cached already. */
  blocksCached: number;
  badBlocks: number;
  chunksInFlight: number;
  startedAt?: number;
  durationMs?: number;
  error?: string;
}

export class Prefetcher {
  private state: PrefetchState = 'idle';
  private readonly blocksPerChunk: number;
  private readonly chunkCount: number;
  /** Chunk index -> its load (read + store), while in flight. */
  private readonly inFlight = new Map<number, Promise<void>>();
  /**
   * Chunk index -> its data, resolved as soon as the storage read returns
   * (before the blocks are written to the cache), so a waiting foreground read
   * is served from memory without waiting for the cache writes.
   */
  private readonly chunkData = new Map<number, Promise<Buffer>>();
  private nextChunk = 0;
  private stopped = false;
  private bytesRead = 0;
  private blocksLoaded = 0;
  private blocksCached = 0;
  private badBlocks = 0;
  private startedAt: number | undefined;
  private finishedAt: number | undefined;
  private error: string | undefined;
  /** Image blocks loaded by the prefetcher (for the "unused prefetch" counter). */
  readonly loaded = new Set<number>();
  private finished: Promise<void> | undefined;

  constructor(
    private readonly storage: Storage,
    private readonly map: PrefetchMap,
    private readonly segment: PrefetchSegment,
    private readonly sink: PrefetchSink,
    private readonly options: PrefetchOptions,
  ) {
    this.blocksPerChunk = Math.max(1, Math.floor(options.chunkBytes / segment.blockSize));
    this.chunkCount = Math.ceil(segment.blockCount / this.blocksPerChunk);
  }

  /** Starts streaming; the returned promise settles when the stream ends (never rejects). */
  start(): Promise<void> {
    if (!this.finished) {
      this.state = 'streaming';
      this.startedAt = performance.now();
      this.finished = this.run();
    }
    return this.finished;
  }

  stop(): void {
    this.stopped = true;
  }

  /** Bytes of prefetched blocks that the boot never read (`read`: the boot's bitmap of `readBlockSize` blocks). */
  unusedBytes(read: { get(block: number): boolean; length: number }, readBlockSize: number): number {
    const mbs = this.map.blockSize;
    let unused = 0;
    for (const block of this.loaded) {
      const first = Math.floor((block * mbs) / readBlockSize);
      const last = Math.min(read.length - 1, Math.floor(((block + 1) * mbs - 1) / readBlockSize));
      let used = false;
      for (let b = first; b <= last && !used; b++) used = read.get(b);
      if (!used) unused += mbs;
    }
    return unused;
  }

  /**
   * If `block` (a map block) is in a chunk being read now, a promise of its
   * data (undefined when it fails its checksum or the read fails).
   */
  pending(block: number): Promise<Buffer | undefined> | undefined {
    if (this.state !== 'streaming' || !this.map.isSet(block)) return undefined;
    const rank = this.map.rank(block);
    const chunk = Math.floor(rank / this.blocksPerChunk);
    const data = this.chunkData.get(chunk);
    if (!data) return undefined;
    const bs = this.segment.blockSize;
    const at = (rank - chunk * this.blocksPerChunk) * bs;
    return data.then(
      (buf) => {
        const blockData = buf.subarray(at, at + bs);
        return this.segment.checkBlock(rank, blockData) ? blockData : undefined;
      },
      () => undefined,
    );
  }

  /** Whether the stream will still reach `block` (it is in the segment and its chunk is not done). */
  ahead(block: number): boolean {
    if (this.state !== 'streaming' || !this.map.isSet(block)) return false;
    return Math.floor(this.map.rank(block) / this.blocksPerChunk) >= this.nextChunk;
  }

  /**
   * Map blocks [block, block + count), all ahead of the stream (so in the
   * segment at consecutive ranks), straight from the segment in one ranged
   * read, each block checked against its checksum. Undefined when the read
   * fails or any block fails its check (the caller reads the image instead).
   */
  async readAhead(block: number, count: number): Promise<Buffer | undefined> {
    const rank = this.map.rank(block);
    if (this.map.rank(block + count - 1) !== rank + count - 1) return undefined;
    const bs = this.segment.blockSize;
    let data: Buffer;
    try {
      data = await this.storage.read(this.segment.key, this.segment.dataOffset + rank * bs, count * bs);
    } catch {
      return undefined;
    }
    for (let i = 0; i < count; i++) {
      if (!this.segment.checkBlock(rank + i, data.subarray(i * bs, (i + 1) * bs))) return undefined;
    }
    return data;
  }

  progress(): PrefetchProgress {
    const p: PrefetchProgress = {
      state: this.state,
      segment: this.segment.key,
      blocks: this.segment.blockCount,
      bytesTotal: this.segment.blockCount * this.segment.blockSize,
      bytesRead: this.bytesRead,
      blocksLoaded: this.blocksLoaded,
      blocksCached: this.blocksCached,
      badBlocks: this.badBlocks,
      chunksInFlight: this.inFlight.size,
    };
    if (this.startedAt !== undefined) {
      p.startedAt = this.startedAt;
      p.durationMs = (this.finishedAt ?? performance.now()) - this.startedAt;
    }
    if (this.error) p.error = this.error;
    return p;
  }

  private async run(): Promise<void> {
    try {
      // A window of `depth` chunks in flight: the bounded buffer.
      const workers = Array.from({ length: Math.min(this.options.depth, this.chunkCount) }, () => this.worker());
      await Promise.all(workers);
      this.state = this.stopped ? 'stopped' : 'done';
    } catch (err) {
      this.state = 'failed';
      this.error = (err as Error).message;
      this.options.onWarning?.(`prefetch of ${this.segment.key} stopped: ${this.error}`);
    } finally {
      this.finishedAt = performance.now();
    }
  }

  private async worker(): Promise<void> {
    while (!this.stopped && this.nextChunk < this.chunkCount) {
      const chunk = this.nextChunk++;
      const load = this.loadChunk(chunk);
      this.inFlight.set(chunk, load);
      try {
        await load;
      } finally {
        this.inFlight.delete(chunk);
        this.chunkData.delete(chunk);
      }
    }
  }

  private async loadChunk(chunk: number): Promise<void> {
    const { blockSize, dataOffset, key } = this.segment;
    const firstRank = chunk * this.blocksPerChunk;
    const ranks = Math.min(this.blocksPerChunk, this.segment.blockCount - firstRank);
    const blocks = new Array<number>(ranks);
    let cached = 0;
    for (let i = 0; i < ranks; i++) {
      blocks[i] = this.map.select(firstRank + i);
      if (this.sink.has(blocks[i]!)) cached++;
    }
    // A warm cache (second open, agent restart): no storage read for a chunk it holds entirely.
    if (cached === ranks) {
      this.blocksCached += ranks;
      return;
    }
    const read = this.storage.read(key, dataOffset + firstRank * blockSize, ranks * blockSize);
    this.chunkData.set(chunk, read);
    const data = await read;
    this.bytesRead += data.length;
    const stores: { block: number; data: Buffer }[] = [];
    for (let i = 0; i < ranks; i++) {
      // SHA-256 of a 4 MiB chunk takes ~15 ms: yield now and then so the boot's reads are not held up.
      if (i > 0 && i % VERIFY_SLICE === 0) await new Promise<void>((resolve) => setImmediate(resolve));
      const rank = firstRank + i;
      const block = blocks[i]!;
      const blockData = data.subarray(i * blockSize, (i + 1) * blockSize);
      if (!this.segment.checkBlock(rank, blockData)) {
        this.badBlocks++;
        if (this.badBlocks === 1) this.options.onWarning?.(`segment ${key}: block of rank ${rank} fails its checksum; skipped`);
        continue;
      }
      this.loaded.add(block);
      this.blocksLoaded++;
      if (!this.sink.has(block)) stores.push({ block, data: blockData });
    }
    if (stores.length > 0) await this.sink.storeMany(stores);
  }
}
