/**
 * The prefetch manager: streams an image's boot segment from storage in large
 * sequential reads through a bounded buffer, and loads each block into the
 * cache at the image block computed from the map (select over the bitmap).
 *
 * One Prefetcher per image, whatever the number of VMs booting from it.
 * Foreground reads never queue behind it: a block whose chunk is in flight
 * waits for that chunk; any other block is read directly (see CacheManager).
 * A paced stream (rateBytesPerS) keeps one read on the link; see pacedWorker().
 *
 * Its reads skip what the cache holds: the stream plans, when it starts, one
 * ranged read per run of ranks the sink does not have (ReadPlan, at most a
 * chunk each, short held runs read through), so a host holding most of the
 * segment's content (another image, an earlier version) reads only the rest.
 * "Chunk" below is one such planned read.
 */
import { crc32 } from 'node:zlib';
import { readSourceInto } from '../image/file-source.js';
import type { ByteSource } from '../image/types.js';
import type { ObjectStat, Storage } from '../storage/types.js';
import { BufferPool } from './buffer-pool.js';
import { ReadPlan } from './prefetch-plan.js';
import { ImageChangedError } from '../errors.js';

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
  /**
   * The storage version of the segment whose header was checked against the
   * map (ObjectStat.version); the stream reads only that version, so a
   * segment republished meanwhile (by another host) is never streamed for
   * this map. Undefined: any version (tests).
   */
  readonly version?: string;
  /** That version's stat, when known: the stream's source opens without a request (OpenOptions.known). */
  readonly stat?: ObjectStat;
  /** True when `data` (one segment block) matches the checksum stored for `rank`. */
  checkBlock(rank: number, data: Buffer): boolean;
  /**
   * The CRC-32 stored for `rank`, when the segment's block checksums are
   * CRC-32s (else undefined): the prefetch then checks the block itself and
   * hands the cache the checksum it keeps per slot, computed once.
   */
  storedCrc32?(rank: number): number | undefined;
}

export interface PrefetchSink {
  /**
   * Stores segment blocks (segment.blockSize bytes each), each for its image
   * block, as one batch; `crc`, when given, is the CRC-32 of `data`.
   */
  storeMany(entries: { block: number; data: Buffer; crc?: number }[]): Promise<void>;
  /** True when the block is already cached (skip it). */
  has(block: number): boolean;
}

export interface PrefetchOptions {
  chunkBytes: number;
  depth: number;
  /** Chunks in flight on demand at most (see demandChunk()); default `depth`, 0 turns demand off. */
  demandDepth?: number;
  onWarning?: (message: string) => void;
  /** Chunk buffers shared with other streams (see BufferPool); default: the stream's own. */
  buffers?: BufferPool;
  /**
   * Paces the stream's chunk reads to this many bytes per second (a token
   * bucket holding one chunk, full at the start); undefined or 0: unpaced.
   * Demand chunks and rank reads (a guest waiting) never wait for it; a
   * demand chunk's bytes are taken from the bucket all the same, so the
   * stream waits longer afterwards and its segment reads keep to the rate.
   */
  rateBytesPerS?: number;
}

/**
 * A token bucket over bytes: `rate` bytes per second, holding at most `burst`
 * bytes, full at the start. Spending may overdraw it (a demand chunk, which
 * does not wait): the debt is paid back before waitMs() says 0 again. So over
 * the time from the start to the end of any wait, what was spent is at most
 * burst + rate x t.
 */
export class TokenBucket {
  private tokens: number;
  private last: number;

  constructor(
    readonly rate: number,
    readonly burst: number,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.tokens = burst;
    this.last = now();
  }

  /** Milliseconds until the bucket holds `bytes` (capped at the burst); 0: now. */
  waitMs(bytes: number): number {
    this.refill();
    const missing = Math.min(bytes, this.burst) - this.tokens;
    return missing <= 0 ? 0 : (missing / this.rate) * 1000;
  }

  /** Takes `bytes` out of the bucket, into debt if it holds fewer. */
  spend(bytes: number): void {
    this.refill();
    this.tokens -= bytes;
  }

  private refill(): void {
    const t = this.now();
    this.tokens = Math.min(this.burst, this.tokens + ((t - this.last) / 1000) * this.rate);
    this.last = t;
  }
}

/**
 * Blocks verified and handed to the cache per slice. Chunks are processed one
 * at a time through a single lane, one slice per event-loop turn: a guest
 * read arriving meanwhile waits behind at most one slice of block checks and
 * cache bookkeeping, not behind every chunk in flight. A slice's cache writes
 * run while the next slice is checked, and finish before that one is handed
 * over, so the stream keeps at most one slice's writes in the thread pool (a
 * write per run of consecutive slots): the pool's threads stay free for the
 * boot's own I/O (docs/benchmarks-agent.md has the figures).
 */
const VERIFY_SLICE = 64;

export type PrefetchState = 'idle' | 'streaming' | 'done' | 'failed' | 'stopped';

export interface PrefetchProgress {
  state: PrefetchState;
  segment: string;
  blocks: number;
  bytesTotal: number;
  bytesRead: number;
  blocksLoaded: number;
  /** Blocks not read from storage because they were cached already (the stream reads only the rest). */
  blocksCached: number;
  badBlocks: number;
  chunksInFlight: number;
  /** Chunks started out of order because a guest read wanted one of their blocks first. */
  chunksDemanded: number;
  /** The pace, bytes per second (a paced stream only). */
  rateBytesPerS?: number;
  /** Time the paced stream waited for its bucket, ms (a paced stream only). */
  pacedMs?: number;
  startedAt?: number;
  durationMs?: number;
  error?: string;
}

export class Prefetcher {
  private state: PrefetchState = 'idle';
  private readonly blocksPerChunk: number;
  /** Held runs this short (ranks) are read through rather than split into two reads (see ReadPlan). */
  private readonly gapRanks: number;
  /** The stream's reads, planned when it starts (before that: none, nothing is pending). */
  private plan: ReadPlan | undefined;
  private chunkCount = 0;
  /** Chunk index -> its load (read + store), while in flight. */
  private readonly inFlight = new Map<number, Promise<void>>();
  /**
   * Chunk index -> its data, resolved as soon as the storage read returns
   * (before the blocks are written to the cache), so a waiting foreground read
   * is served from memory without waiting for the cache writes.
   */
  private readonly chunkData = new Map<number, Promise<Buffer>>();
  /** Lowest chunk the sequential stream has not started; chunks below it are started or done. */
  private nextChunk = 0;
  /** 1 for every chunk started, by the stream or on demand. */
  private started = new Uint8Array(0);
  /** Chunks started on demand (see demandChunk()), in flight now. */
  private readonly demanded = new Set<Promise<void>>();
  /** Storage reads of demand chunks in progress (a paced stream starts no read meanwhile). */
  private readonly demandReads = new Set<Promise<unknown>>();
  private chunksDemanded = 0;
  /** The paced stream's bucket (options.rateBytesPerS > 0), else undefined. */
  private readonly pace: TokenBucket | undefined;
  private pacedMs = 0;
  /** Ends the paced stream's wait for its bucket early (stop(), a failed chunk). */
  private wake: (() => void) | undefined;
  /** The first failure of a chunk started on demand: it fails the stream when the workers are done. */
  private demandFailure: Error | undefined;
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
  /** The segment, opened once for the whole stream (one version of it, one open). */
  private source: Promise<ByteSource> | undefined;
  /**
   * Chunk buffers, reused: a fresh buffer per chunk costs page faults and
   * garbage collections while the boot reads. The agent's pool outlives the
   * stream; without one, the stream has its own.
   */
  private readonly buffers: BufferPool;
  /** Tail of the single lane in which chunks are verified and stored (see VERIFY_SLICE). */
  private lane: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly storage: Storage,
    private readonly map: PrefetchMap,
    private readonly segment: PrefetchSegment,
    private readonly sink: PrefetchSink,
    private readonly options: PrefetchOptions,
  ) {
    this.blocksPerChunk = Math.max(1, Math.floor(options.chunkBytes / segment.blockSize));
    // A read more costs a round trip; reading a sixteenth of a chunk through costs less.
    this.gapRanks = Math.floor(this.blocksPerChunk / 16);
    this.buffers = options.buffers ?? new BufferPool(this.blocksPerChunk * segment.blockSize, options.depth + (options.demandDepth ?? options.depth));
    const rate = options.rateBytesPerS ?? 0;
    this.pace = rate > 0 ? new TokenBucket(rate, this.blocksPerChunk * segment.blockSize) : undefined;
  }

  /** Starts streaming; the returned promise settles when the stream ends (never rejects). */
  start(): Promise<void> {
    if (!this.finished) {
      this.state = 'streaming';
      this.startedAt = performance.now();
      // Planned at once: from now on a guest read can join (or demand) the read of its block.
      const plan = ReadPlan.make(this.segment.blockCount, this.blocksPerChunk, this.gapRanks, (rank) => this.sink.has(this.map.select(rank)));
      this.blocksCached += plan.skippedRanks;
      this.started = new Uint8Array(plan.length);
      this.chunkCount = plan.length;
      this.plan = plan;
      const expected = this.segment.version;
      const known = this.segment.stat;
      this.source = this.storage.openSource(this.segment.key, known ? { known } : undefined).then(async (source) => {
        if (expected !== undefined && source.version !== expected) {
          await source.close();
          throw new ImageChangedError('segment was republished since its map was read; not streaming it', { file: this.segment.key });
        }
        return source;
      });
      this.source.catch(() => undefined); // its failure fails the stream in run()
      this.finished = this.run();
    }
    return this.finished;
  }

  stop(): void {
    this.stopped = true;
    this.wake?.();
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
    if (this.state !== 'streaming' || !this.plan || !this.map.isSet(block)) return undefined;
    const rank = this.map.rank(block);
    const chunk = this.plan.readOf(rank);
    const data = chunk < 0 ? undefined : this.chunkData.get(chunk);
    if (!data) return undefined;
    const bs = this.segment.blockSize;
    const at = (rank - this.plan.read(chunk).first) * bs;
    return data.then(
      (buf) => {
        const blockData = buf.subarray(at, at + bs);
        return this.segment.checkBlock(rank, blockData) ? blockData : undefined;
      },
      () => undefined,
    );
  }

  /** Whether `block` is unstreamed: in the segment, in a chunk the stream has not started. */
  unstreamed(block: number): boolean {
    return this.unstreamedChunk(block) >= 0;
  }

  /** The chunk of `block` when it is unstreamed, else -1. */
  private unstreamedChunk(block: number): number {
    if (this.state !== 'streaming' || !this.plan || !this.map.isSet(block)) return -1;
    const chunk = this.plan.readOf(this.map.rank(block));
    return chunk >= 0 && this.started[chunk] === 0 ? chunk : -1;
  }

  /**
   * A demand chunk: a guest read wants `block`, a segment block whose chunk
   * the stream has not started: start that chunk now, out of order, and return the
   * block's data as pending() would. The boot's order is not the segment's
   * (the kernel sits 1 GiB into the image, so its blocks come late in the
   * stream): without this, each such read was a storage read of its own, and
   * its misses set off readahead of blocks the boot never reads. At most
   * `demandDepth` chunks are in flight on demand (the buffer stays bounded);
   * past that, undefined (the caller reads the block elsewhere).
   */
  demandChunk(block: number): Promise<Buffer | undefined> | undefined {
    const chunk = this.unstreamedChunk(block);
    if (this.stopped || chunk < 0 || this.demanded.size >= (this.options.demandDepth ?? this.options.depth)) return undefined;
    this.chunksDemanded++;
    const load = this.startChunk(chunk);
    const read = this.chunkData.get(chunk);
    if (read) {
      // Read now, unpaced; its bytes count against the stream's pace (see rateBytesPerS).
      this.pace?.spend(this.chunkBytesOf(chunk));
      this.demandReads.add(read);
      const done = (): boolean => this.demandReads.delete(read);
      read.then(done, done);
    }
    this.demanded.add(load);
    load.then(
      () => this.demanded.delete(load),
      (err: unknown) => {
        this.demanded.delete(load);
        this.demandFailure ??= err instanceof Error ? err : new Error(String(err));
      },
    );
    return this.pending(block);
  }

  /**
   * A rank read: blocks [block, block + count), all unstreamed and at
   * consecutive ranks, straight from the segment in one ranged read, each
   * block checked against its checksum. Undefined when the read fails or any
   * block fails its check (the caller reads the image instead).
   */
  async rankRead(block: number, count: number): Promise<Buffer | undefined> {
    const rank = this.map.rank(block);
    if (this.map.rank(block + count - 1) !== rank + count - 1) return undefined;
    const bs = this.segment.blockSize;
    let data: Buffer;
    try {
      // Through the stream's source: the segment version checked against the map.
      const source = await (this.source ?? Promise.reject(new Error('not streaming')));
      data = await source.read(this.segment.dataOffset + rank * bs, count * bs);
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
      chunksDemanded: this.chunksDemanded,
    };
    if (this.pace) {
      p.rateBytesPerS = this.pace.rate;
      p.pacedMs = Math.round(this.pacedMs);
    }
    if (this.startedAt !== undefined) {
      p.startedAt = this.startedAt;
      p.durationMs = (this.finishedAt ?? performance.now()) - this.startedAt;
    }
    if (this.error) p.error = this.error;
    return p;
  }

  private async run(): Promise<void> {
    let workers: Array<Promise<void>> = [];
    try {
      await this.source;
      // A window of `depth` chunks in flight: the bounded buffer (paced: one reader, see pacedWorker()).
      workers = this.pace ? [this.pacedWorker(this.pace)] : Array.from({ length: Math.min(this.options.depth, this.chunkCount) }, () => this.worker());
      await Promise.all(workers);
      // Chunks started on demand finish too (their failure fails the stream, as a worker's would).
      while (this.demanded.size > 0) await Promise.allSettled([...this.demanded]);
      if (this.demandFailure) throw this.demandFailure;
      this.state = this.stopped ? 'stopped' : 'done';
    } catch (err) {
      // The other workers and demanded chunks stop at their next slice and end before the source closes.
      this.stopped = true;
      await Promise.allSettled([...workers, ...this.demanded]);
      this.state = 'failed';
      this.error = (err as Error).message;
      this.options.onWarning?.(`prefetch of ${this.segment.key} stopped: ${this.error}`);
    } finally {
      if (this.options.buffers === undefined) this.buffers.clear(); // the stream's own pool
      await this.source?.then((source) => source.close()).catch(() => undefined);
      this.finishedAt = performance.now();
    }
  }

  private async worker(): Promise<void> {
    for (;;) {
      const chunk = this.nextUnstarted();
      if (this.stopped || chunk === undefined) return;
      await this.startChunk(chunk);
    }
  }

  /** The lowest chunk neither the stream nor a demand has started, if any. */
  private nextUnstarted(): number | undefined {
    while (this.nextChunk < this.chunkCount && this.started[this.nextChunk] === 1) this.nextChunk++;
    return this.nextChunk < this.chunkCount ? this.nextChunk : undefined;
  }

  /**
   * The paced stream. Guest reads never wait for the pace, and a demand read
   * shares the storage link with at most one stream read:
   * - one stream read at a time (not `depth`): the next starts when the last
   *   one's data is back, and only once the bucket holds its bytes; up to
   *   `depth` chunks may still be verified and stored (the buffer bound);
   * - the chunk waiting for the bucket is not claimed: a guest read of it
   *   starts it at once as an unpaced demand chunk, and the stream moves on;
   * - no stream read starts while a demand chunk's read is on the link.
   * So a demand read finds at most the one stream read that had started before
   * it. A demand chunk's bytes are taken from the bucket (it never waits for
   * it): the stream pays them back by waiting. One read at a time keeps up
   * with the pace while a chunk's read takes less than chunkBytes / rate
   * (320 ms for 8 MiB at 25 MiB/s).
   */
  private async pacedWorker(pace: TokenBucket): Promise<void> {
    const loads = new Set<Promise<void>>();
    let failure: unknown;
    const track = (load: Promise<void>): void => {
      loads.add(load);
      load.then(
        () => loads.delete(load),
        (err: unknown) => {
          loads.delete(load);
          failure ??= err;
          // As run() does for a failed worker: the chunks still being stored stop at their next slice.
          this.stopped = true;
          this.wake?.();
        },
      );
    };
    for (;;) {
      if (loads.size >= this.options.depth) {
        await Promise.race(loads).catch(() => undefined);
        continue;
      }
      const chunk = this.nextUnstarted();
      if (this.stopped || chunk === undefined) break;
      const bytes = this.chunkReadBytes(chunk);
      if (bytes > 0) {
        const waitMs = pace.waitMs(bytes);
        if (waitMs > 0) {
          const napStart = performance.now();
          await this.nap(waitMs);
          this.pacedMs += performance.now() - napStart;
          continue; // the chunk may have been demanded meanwhile
        }
        if (this.demandReads.size > 0) {
          await Promise.allSettled([...this.demandReads]);
          continue;
        }
        pace.spend(bytes);
      }
      const load = this.startChunk(chunk);
      track(load);
      // startChunk() registered the chunk's read synchronously (undefined: every block cached, no read).
      await this.chunkData.get(chunk)?.catch(() => undefined);
    }
    await Promise.allSettled([...loads]);
    if (failure !== undefined) throw failure;
  }

  /** Segment bytes of `chunk`. */
  private chunkBytesOf(chunk: number): number {
    return this.plan!.read(chunk).count * this.segment.blockSize;
  }

  /** Segment bytes loadChunk() will read for `chunk`: 0 when every block of it is cached. */
  private chunkReadBytes(chunk: number): number {
    const { first: firstRank, count: ranks } = this.plan!.read(chunk);
    for (let i = 0; i < ranks; i++) {
      if (!this.sink.has(this.map.select(firstRank + i))) return this.chunkBytesOf(chunk);
    }
    return 0;
  }

  /** Waits `ms`, or less when stop() (or a failed chunk) wakes the stream. */
  private nap(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.wake = undefined;
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.wake = done;
    });
  }

  /** Loads one chunk (read, verify, store), tracked in inFlight/chunkData while it runs. */
  private async startChunk(chunk: number): Promise<void> {
    this.started[chunk] = 1;
    const load = this.loadChunk(chunk);
    this.inFlight.set(chunk, load);
    try {
      await load;
    } finally {
      this.inFlight.delete(chunk);
      this.chunkData.delete(chunk);
    }
  }

  private async loadChunk(chunk: number): Promise<void> {
    const { blockSize, dataOffset } = this.segment;
    const { first: firstRank, count: ranks } = this.plan!.read(chunk);
    const blocks = new Array<number>(ranks);
    let cached = 0;
    for (let i = 0; i < ranks; i++) {
      blocks[i] = this.map.select(firstRank + i);
      if (this.sink.has(blocks[i]!)) cached++;
    }
    // Cached since the plan was made (a guest read, another image): no storage read.
    if (cached === ranks) {
      this.blocksCached += ranks;
      return;
    }
    const length = ranks * blockSize;
    const buffer = this.buffers.take(this.blocksPerChunk * blockSize);
    const read = this.source!
      .then((source) => readSourceInto(source, dataOffset + firstRank * blockSize, length, buffer, 0))
      .then(() => buffer.subarray(0, length));
    this.chunkData.set(chunk, read);
    try {
      const data = await read;
      this.bytesRead += data.length;
      const verified = this.lane.then(() => this.verifyAndStore(firstRank, blocks, data));
      this.lane = verified.catch(() => undefined);
      await verified;
    } finally {
      // Readers of this chunk copied their blocks when the read resolved, and the cache has written its stores.
      this.buffers.give(buffer);
    }
  }

  /** Checks a chunk's blocks slice by slice and stores each slice in the cache before the next (see VERIFY_SLICE). */
  private async verifyAndStore(firstRank: number, blocks: number[], data: Buffer): Promise<void> {
    const { blockSize, key } = this.segment;
    // The previous slice's cache writes, in flight while this slice is checked.
    let storing: Promise<void> | undefined;
    try {
      for (let start = 0; start < blocks.length; start += VERIFY_SLICE) {
        if (start > 0) await new Promise<void>((resolve) => setImmediate(resolve));
        if (this.stopped) break;
        const entries: { block: number; data: Buffer; crc?: number }[] = [];
        for (let i = start; i < Math.min(blocks.length, start + VERIFY_SLICE); i++) {
          const rank = firstRank + i;
          const block = blocks[i]!;
          const blockData = data.subarray(i * blockSize, (i + 1) * blockSize);
          const crc = this.segment.storedCrc32?.(rank);
          if (crc !== undefined ? crc32(blockData) !== crc : !this.segment.checkBlock(rank, blockData)) {
            this.badBlocks++;
            if (this.badBlocks === 1) this.options.onWarning?.(`segment ${key}: block of rank ${rank} fails its checksum; skipped`);
            continue;
          }
          this.loaded.add(block);
          this.blocksLoaded++;
          if (!this.sink.has(block)) entries.push(crc === undefined ? { block, data: blockData } : { block, data: blockData, crc });
        }
        if (entries.length === 0) continue;
        if (storing) await storing;
        storing = this.sink.storeMany(entries);
        storing.catch(() => undefined); // awaited below; not unhandled while the next slice is checked
      }
      if (storing) await storing;
    } finally {
      // Every write has finished before the caller reuses the chunk's buffer, failed or not.
      if (storing) await storing.catch(() => undefined);
    }
  }
}
