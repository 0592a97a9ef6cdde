/**
 * The cache manager of one image: the read path behind every NBD connection
 * to that image (cache device, prefetch stream, storage system), and the
 * guest reads it hands to the boot recording (BootLifecycle).
 *
 * Read path, per cache block of a request:
 *   1. cached                          -> served from the cache device (hit);
 *   2. being fetched by another request -> waits for that fetch (one storage read);
 *   3. its segment chunk is in flight   -> waits for the chunk (no second read),
 *      or starts it now as a demand chunk when the stream has not reached it;
 *   4. otherwise                        -> read from the image on storage, in one
 *      request per contiguous run of missing blocks (miss), and cached; a
 *      qcow2 run still ahead of the prefetch stream is read from the segment
 *      instead, a rank read (no L2 or compressed reads; see rankRead).
 *
 * One version: the image's sources fail every read once the image (or a
 * backing file) changed on storage (ImageChangedError, see ByteSource.version).
 * The first such failure makes the cache manager stale: from then on every read
 * that needs storage fails at once (EIO for the guest), the prefetch stops,
 * and cached blocks, all read from the version opened, keep being served.
 * No request is ever answered with bytes of the new version.
 *
 * A guest miss is widened to its aligned window (widenMiss), one request for
 * the blocks around it too; a miss that continues a sequential stream also
 * starts the readahead: the blocks after it, read in the background
 * (SequentialReadahead).
 *
 * One block size: the cache's, which is also the map's and the segment's
 * (the agent refuses a segment of another size), so map block i is cache
 * block i.
 *
 * Cache space of a block: the owner identity of the layer that supplies it
 * (ImageSpaces.owner), so overlays on one backing file share its cached blocks;
 * the chain identity when layers mix within the block. Single-layer images
 * use their identity without a lookup.
 *
 * Content-addressed blocks: once the image's version 2 segment is known
 * (setContent), a block with a digest in it is looked up by content first
 * (ContentBlocks: one space shared by every image, each hit checked against
 * the digest of the version opened), then in its own space, then storage. It
 * is cached by content when streamed, or when missed and the bytes read hash
 * to its digest; other blocks are cached in their own space as above.
 */
import { ImageChangedError } from '../errors.js';
import type { DiskImage, Extent } from '../image/types.js';
import type { BlockCache, CacheBlockKind, CacheEntry } from './block-cache.js';
import { BootLifecycle } from './boot-lifecycle.js';
import type { BootPolicy, BootRecorder, BootSummary } from './boot-recorder.js';
import { ImageSpaces } from './cache/spaces.js';
import { CONTENT_SPACE, ContentBlocks, type ContentCounters, type SegmentDigests } from './content-blocks.js';
import { widenMiss } from './miss-window.js';
import { MissWriter } from './miss-writer.js';
import type { Prefetcher } from './prefetcher.js';
import { DEFAULT_READAHEAD, SequentialReadahead } from './readahead.js';

/** Blocks of guest reads by where they came from (status `counters.guestReads`). */
export interface ReadCounters {
  /** From the cache device. */
  cache: number;
  /** From a segment chunk in flight (the prefetch stream, or a demand chunk). */
  prefetch: number;
  /** From the storage system: read for this guest read, or joined to another read's request. */
  storage: number;
}

export interface CacheManagerOptions {
  /** Called after each guest read with where it was served from and how long it took (metrics). */
  onGuestRead?: (source: 'cache' | 'prefetch' | 'storage', seconds: number) => void;
  bootPolicy: BootPolicy;
  /** Cache blocks read on a miss. */
  cacheMisses: boolean;
  counters: ReadCounters;
  /**
   * Blocks being read from storage, keyed by space and block; shared by the
   * cache managers of one cache so overlays missing the same backing block read it once.
   */
  inFlight?: Map<string, Promise<Buffer>>;
  /** Batches the cache writes of missed blocks; shared by the cache managers of one cache (default: one of its own). */
  missWriter?: MissWriter;
  /** Largest sequential readahead window on guest misses, bytes; 0 or absent: off. */
  readaheadBytes?: number;
  /** Aligned window a guest miss is widened to, bytes (miss-window.ts); 0 or absent: off. */
  missWindowBytes?: number;
  /** Called once when a boot ends (idle, window, mark-booted, closed). */
  onBootEnd: (manager: CacheManager, boot: BootRecorder) => void;
  /** Called once, when a storage read finds the image changed (the cache manager is stale from then on). */
  onStale?: (manager: CacheManager, err: ImageChangedError) => void;
  now?: () => number;
}

/** Owner spaces remembered per layered image (block -> space), at most. */
const OWNER_MEMO_MAX = 1 << 18;

export class CacheManager {
  /** The chain identity: the space of single-layer images and of mixed blocks. */
  readonly space: string;
  /** Every space this image's blocks may live in (see ImageSpaces.all). */
  readonly spaces: string[];
  /** Which space each block of the image belongs to. */
  private readonly imageSpaces: ImageSpaces;
  private readonly blockSize: number;
  private readonly inFlight: Map<string, Promise<Buffer>>;
  private readonly missWriter: MissWriter;
  private readonly readaheadWindows: SequentialReadahead | undefined;
  /** Miss window in blocks (0: off); single-layer images only, see readUnrecorded. */
  private readonly missWindowBlocks: number;
  /** More than one layer: blocks may belong to a backing file's space. */
  private readonly layered: boolean;
  private readonly ownerMemo = new Map<number, string>();
  /** Spaces this image's blocks were found in (marked booted when a boot ends). */
  private readonly usedSpaces = new Set<string>();
  private prefetcher: Prefetcher | undefined;
  /** The content side of the read path, once the digests of the image's segment are known. */
  private content: ContentBlocks | undefined;
  private readonly boots: BootLifecycle;
  connections = 0;
  private readonly now: () => number;
  /** Why the cache manager is stale, and since when (epoch ms); see markStale. */
  private staleSince: { error: ImageChangedError; at: number } | undefined;

  constructor(
    readonly name: string,
    readonly image: DiskImage,
    private readonly cache: BlockCache,
    private readonly options: CacheManagerOptions,
  ) {
    this.space = image.identity;
    this.imageSpaces = new ImageSpaces(image);
    this.spaces = this.imageSpaces.all();
    this.layered = this.imageSpaces.layered;
    this.inFlight = options.inFlight ?? new Map();
    this.missWriter = options.missWriter ?? new MissWriter(cache);
    const ra = options.readaheadBytes ?? 0;
    this.readaheadWindows = ra > 0
      ? new SequentialReadahead({ initialBytes: Math.min(DEFAULT_READAHEAD.initialBytes, ra), maxBytes: ra })
      : undefined;
    this.blockSize = cache.blockSize;
    // A layered image would need an owner lookup (a qcow2 L2 read) per widened block.
    this.missWindowBlocks = this.layered ? 0 : Math.floor((options.missWindowBytes ?? 0) / this.blockSize);
    this.now = options.now ?? (() => performance.now());
    this.boots = new BootLifecycle(image, this.blockSize, options.bootPolicy, this.now, (boot) => this.onBootEnd(boot));
  }

  get virtualSize(): number {
    return this.image.virtualSize;
  }

  get prefetch(): Prefetcher | undefined {
    return this.prefetcher;
  }

  setPrefetcher(prefetcher: Prefetcher | undefined): void {
    this.prefetcher = prefetcher;
  }

  /**
   * The digests of the image's segment (checked against this version's
   * identity and map when loaded): from now on, blocks with a digest live in
   * the content space. Undefined: back to image spaces only.
   */
  setContent(digests: SegmentDigests | undefined, counters: ContentCounters): void {
    this.content = digests ? new ContentBlocks(this.cache, digests, counters) : undefined;
  }

  /** Content keys of the segment's blocks, by rank (status: logical bytes), if known. */
  get contentKeys(): Float64Array | undefined {
    return this.content?.keys;
  }

  /** Set once the image changed under the cache manager: its error and when it was seen. */
  get stale(): { error: ImageChangedError; at: number } | undefined {
    return this.staleSince;
  }

  /** The image changed on storage: no more storage reads, no more prefetch; told once. */
  private markStale(error: ImageChangedError): void {
    if (this.staleSince) return;
    this.staleSince = { error, at: Date.now() };
    this.prefetcher?.stop();
    this.options.onStale?.(this, error);
  }

  /**
   * A storage read of the version opened; a changed image makes the cache manager
   * stale. Data reads (`refuseStale`) are refused once stale; metadata
   * lookups go on, answered from the image's cached tables where it can
   * (its sources refuse the rest themselves).
   */
  private fromStorage<T>(read: () => Promise<T>, refuseStale = true): Promise<T> {
    if (refuseStale && this.staleSince) return Promise.reject(this.staleSince.error);
    return read().catch((err: unknown) => {
      if (err instanceof ImageChangedError) this.markStale(err);
      throw err;
    });
  }

  /** A connection opened the export: the first one starts a boot recording. */
  open(): void {
    this.connections++;
    this.boots.start();
  }

  /** A connection closed: the last one ends a boot still recording. */
  close(): void {
    this.connections = Math.max(0, this.connections - 1);
    if (this.connections === 0) this.boots.end('closed');
  }

  markBooted(): BootSummary | undefined {
    return this.boots.markBooted();
  }

  bootSummary(): BootSummary | undefined {
    return this.boots.summary();
  }

  private onBootEnd(boot: BootRecorder): void {
    // Only spaces in use: marking creates a space in the cache index. A discarded recording was no boot.
    if (boot.discardReason === undefined) {
      this.cache.markBooted(this.space);
      for (const space of this.usedSpaces) if (space !== this.space) this.cache.markBooted(space);
    }
    this.options.onBootEnd(this, boot);
  }

  /** Stops timers; the recording in progress, if any, is dropped. */
  dispose(): void {
    this.boots.dispose();
    this.prefetcher?.stop();
  }

  /** Allocation extents; qcow2 metadata not cached yet is read from storage. */
  async extents(offset: number, length: number): Promise<Extent[]> {
    return this.fromStorage(() => this.image.extents(offset, length), false);
  }

  /** Guest bytes [offset, offset+length), recorded as part of the boot. */
  async read(offset: number, length: number): Promise<Buffer> {
    const recorded = this.boots.record(offset, length);
    return this.readUnrecorded(offset, length, recorded ? 'boot' : 'other', true);
  }

  /**
   * The same read path without recording (segment rebuilds, CACHE hints).
   * `guest`: a VM's read, which drives the sequential readahead.
   */
  async readUnrecorded(offset: number, length: number, kind: CacheBlockKind = 'other', guest = false): Promise<Buffer> {
    if (length === 0) return Buffer.alloc(0);
    const started = guest && this.options.onGuestRead ? performance.now() : 0;
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    // Every block lands in `out`: cache hits are read straight into it.
    const out = Buffer.allocUnsafe((last - first + 1) * bs);
    const slice = (block: number, count = 1): Buffer => out.subarray((block - first) * bs, (block - first + count) * bs);
    const waits: Array<Promise<void>> = [];
    const missing: number[] = [];
    let storageWaits = 0;
    let prefetchWaits = 0;
    let cacheBlocks = 0;
    const content = this.content;
    // Blocks cached by content need no owner space (a qcow2 overlay's would cost an L2 lookup),
    // unless their entry fails its digest (readContent looks it up then).
    const byContent = (block: number): boolean => content?.has(block) === true;
    const spaces = this.layered ? await this.ownerSpaces(first, last, byContent) : undefined;
    const spaceOf = (block: number): string => spaces?.[block - first] ?? this.space;
    // Runs of cached blocks of one space: one cache read each.
    let hitStart = -1;
    const flushHits = (end: number): void => {
      if (hitStart < 0) return;
      waits.push(this.readCached(hitStart, end - hitStart, spaceOf(hitStart), slice(hitStart, end - hitStart)));
      hitStart = -1;
    };
    for (let block = first; block <= last; block++) {
      if (content && byContent(block)) {
        cacheBlocks++;
        flushHits(block);
        waits.push(this.readContent(content, block, slice(block)));
        continue;
      }
      const space = spaceOf(block);
      if (this.cache.has(space, block)) {
        cacheBlocks++;
        if (hitStart >= 0 && spaceOf(hitStart) !== space) flushHits(block);
        if (hitStart < 0) hitStart = block;
        continue;
      }
      flushHits(block);
      // Waiting on another request's storage read counts as storage; on a segment chunk, as prefetch.
      const fromStorage = this.inFlight.has(flightKey(space, block));
      const pending = this.pendingBlock(block, space);
      if (pending) {
        if (fromStorage) storageWaits++;
        else prefetchWaits++;
        waits.push(pending.then((data) => void data.copy(slice(block))));
      } else missing.push(block);
    }
    flushHits(last + 1);
    // Contiguous runs of missing blocks: one storage read each, widened to the miss window for guests.
    const windowBlocks = guest ? this.missWindowBlocks : 0;
    const blocks = Math.ceil(this.image.virtualSize / bs);
    let i = 0;
    while (i < missing.length) {
      let j = i + 1;
      while (j < missing.length && missing[j] === missing[j - 1]! + 1) j++;
      const own = { start: missing[i]!, end: missing[j - 1]! };
      const run = windowBlocks > 1
        ? widenMiss(own.start, own.end, first, last, windowBlocks, blocks, (b) => this.fetchable(b, this.space))
        : own;
      const fetched = this.fetchRun(run.start, run.end - run.start + 1, kind, spaces?.slice(run.start - first, run.end - first + 1), own);
      fetched.forEach((p, k) => {
        const block = run.start + k;
        if (block >= first && block <= last) waits.push(p.then((data) => void data.copy(slice(block))));
      });
      i = j;
    }
    if (guest && this.readaheadWindows) {
      const readaheadEnd = Math.min(this.image.virtualSize, this.readaheadWindows.onRead(offset, offset + length, missing.length > 0));
      if (readaheadEnd > (last + 1) * bs) void this.readahead(last + 1, Math.ceil(readaheadEnd / bs) - 1).catch(() => undefined);
    }
    if (guest) {
      const c = this.options.counters;
      c.cache += cacheBlocks;
      c.prefetch += prefetchWaits;
      c.storage += missing.length + storageWaits;
    }
    await Promise.all(waits);
    if (started > 0) {
      const source = missing.length > 0 || storageWaits > 0 ? 'storage' : prefetchWaits > 0 ? 'prefetch' : 'cache';
      this.options.onGuestRead!(source, (performance.now() - started) / 1000);
    }
    const start = offset - first * bs;
    return out.subarray(start, start + length);
  }

  /**
   * A block by content into `into`; an entry that fails its digest (or was
   * evicted meanwhile) is read from the block's own space or storage instead.
   */
  private async readContent(content: ContentBlocks, block: number, into: Buffer): Promise<void> {
    this.usedSpaces.add(CONTENT_SPACE);
    if (await content.read(block, into)) return;
    const space = this.layered ? await this.ownerSpace(block) : this.space;
    if (this.cache.has(space, block)) return this.readCached(block, 1, space, into);
    (await this.refetch(block, space)).copy(into);
  }

  /** Cached blocks [start, start + count) of `space` into `into`; a block evicted meanwhile is fetched again. */
  private readCached(start: number, count: number, space: string, into: Buffer): Promise<void> {
    const bs = this.blockSize;
    const again = (k: number): Promise<void> => this.refetch(start + k, space).then((data) => void data.copy(into, k * bs));
    if (count === 1) return this.cache.get(space, start, into).then((data) => (data ? undefined : again(0)));
    return this.cache.getRun(space, start, count, into).then(async (served) => {
      const missed: Array<Promise<void>> = [];
      served.forEach((ok, k) => {
        if (!ok) missed.push(again(k));
      });
      if (missed.length > 0) await Promise.all(missed);
    });
  }

  /** The cache space of blocks [first, last] (layered images only). */
  /** The cache space of blocks [first, last] (layered images only); `skip`ped blocks get the chain's, unlooked-up. */
  private async ownerSpaces(first: number, last: number, skip?: (block: number) => boolean): Promise<string[]> {
    const out: Array<string | Promise<string>> = [];
    for (let block = first; block <= last; block++) out.push(skip?.(block) ? this.space : this.ownerSpace(block));
    return Promise.all(out);
  }

  private ownerSpace(block: number): string | Promise<string> {
    const known = this.ownerMemo.get(block);
    if (known !== undefined) return known;
    const offset = block * this.blockSize;
    const length = Math.min(this.image.virtualSize, offset + this.blockSize) - offset;
    return this.fromStorage(() => this.imageSpaces.owner(offset, length), false).then((owner) => {
      // The image is immutable while this cache manager lives: remember the answer.
      if (this.ownerMemo.size >= OWNER_MEMO_MAX) this.ownerMemo.clear();
      const space = owner ?? this.space;
      this.ownerMemo.set(block, space);
      this.usedSpaces.add(space);
      return space;
    });
  }

  /** The data of an uncached block on its way: another request's fetch, or its prefetch chunk (in flight, or a demand chunk started now). */
  private pendingBlock(block: number, space: string): Promise<Buffer> | undefined {
    const pending = this.inFlight.get(flightKey(space, block));
    if (pending) return pending;
    // In a chunk being read, or in one the stream has not reached (a demand chunk, started now).
    const streamed = this.prefetcher?.pending(block) ?? this.prefetcher?.demandChunk(block);
    if (!streamed) return undefined;
    // Its segment chunk is being read: take the block from the chunk, no second read.
    return streamed.then((data) => data ?? this.refetch(block, space));
  }

  /**
   * The readahead: reads blocks [first, last] that are not cached, not
   * being read and not coming with the prefetch stream, in the background
   * (one storage request per contiguous run), into the cache as 'other'.
   */
  private async readahead(first: number, last: number): Promise<void> {
    const spaces = this.layered ? await this.ownerSpaces(first, last) : undefined;
    let runStart = -1;
    const flush = (end: number): void => {
      if (runStart < 0) return;
      this.fetchRun(runStart, end - runStart, 'other', spaces?.slice(runStart - first, end - first));
      runStart = -1;
    };
    for (let block = first; block <= last; block++) {
      if (!this.fetchable(block, spaces?.[block - first] ?? this.space)) flush(block);
      else if (runStart < 0) runStart = block;
    }
    flush(last + 1);
  }

  /** Whether a readahead or a miss window may read `block`: nothing else brings it (cache, another read, the segment stream). */
  private fetchable(block: number, space: string): boolean {
    return !(this.content?.has(block) === true || this.cache.has(space, block) || this.inFlight.has(flightKey(space, block)) ||
      this.prefetcher?.unstreamed(block) === true || this.prefetcher?.pending(block) !== undefined);
  }

  /** A block that vanished from the cache between has() and get() (evicted). */
  private refetch(block: number, space: string): Promise<Buffer> {
    return this.inFlight.get(flightKey(space, block)) ?? this.fetchRun(block, 1, 'other', [space])[0]!;
  }


  /**
   * Reads blocks [start, start+count) from storage in one request; one promise
   * per block. `spaces`: each block's cache space (default: the chain's).
   * `own`: the blocks cached as `kind` (default all); the others, a miss
   * window's widening, are cached as 'other'.
   */
  private fetchRun(start: number, count: number, kind: CacheBlockKind, spaces?: string[], own?: { start: number; end: number }): Array<Promise<Buffer>> {
    const bs = this.blockSize;
    const stale = this.staleSince?.error;
    if (stale) {
      // Not registered in flight: another image sharing these spaces must not wait on this refusal.
      return Array.from({ length: count }, () => {
        const refused = Promise.reject(stale);
        refused.catch(() => undefined); // a readahead drops its promises
        return refused;
      });
    }
    const offset = start * bs;
    const end = Math.min(this.image.virtualSize, (start + count) * bs);
    const read = (): Promise<Buffer> => this.rankRead(offset, end) ?? this.image.read(offset, end - offset);
    const whole = this.fromStorage(read).then((data) => {
      // The last block of an image whose size is not a block multiple is zero-padded.
      if (data.length === count * bs) return data;
      const padded = Buffer.alloc(count * bs);
      data.copy(padded);
      return padded;
    });
    const promises: Array<Promise<Buffer>> = [];
    for (let k = 0; k < count; k++) {
      const block = start + k;
      const space = spaces?.[k] ?? this.space;
      const key = flightKey(space, block);
      const p = whole.then((data) => data.subarray(k * bs, (k + 1) * bs));
      this.inFlight.set(key, p);
      p.then(
        async (data) => {
          if (!this.options.cacheMisses) return;
          // By content only when the bytes are the ones the segment describes.
          const key = this.content?.keyFor(block, data);
          const blockKind = !own || (block >= own.start && block <= own.end) ? kind : 'other';
          if (key === undefined) await this.missWriter.queue(space, block, data, blockKind);
          else {
            this.usedSpaces.add(CONTENT_SPACE);
            await this.missWriter.queue(CONTENT_SPACE, key, data, blockKind);
          }
        },
        () => undefined,
      ).finally(() => {
        if (this.inFlight.get(key) === p) this.inFlight.delete(key);
      });
      promises.push(p);
    }
    return promises;
  }

  /**
   * A rank read: guest bytes [offset, end) of a qcow2 image read from its
   * segment at their ranks when the stream has not reached any of their
   * blocks: one ranged read, checksums verified, no L2 table or compressed
   * cluster read (bench/results/far-ahead.md; raw images gain nothing).
   * Falls back to the image when the segment read fails or a checksum differs.
   */
  private rankRead(offset: number, end: number): Promise<Buffer> | undefined {
    const prefetcher = this.prefetcher;
    if (!prefetcher || this.image.format === 'raw') return undefined;
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    const last = Math.floor((end - 1) / bs);
    for (let block = first; block <= last; block++) if (!prefetcher.unstreamed(block)) return undefined;
    return prefetcher
      .rankRead(first, last - first + 1)
      .then((data) => (data ? data.subarray(offset - first * bs, end - first * bs) : this.image.read(offset, end - offset)));
  }

  /**
   * Stores blocks loaded by the prefetcher as one cache batch per space:
   * by content when the segment gives their digest (the prefetch checked
   * their CRC; hits are checked against the digest when read).
   */
  async storeStreamed(entries: readonly CacheEntry[]): Promise<void> {
    const puts = new Map<string, CacheEntry[]>();
    const content = this.content;
    for (const entry of entries) {
      const key = content?.keyOf(entry.block);
      const space = key !== undefined ? CONTENT_SPACE : this.layered ? await this.ownerSpace(entry.block) : this.space;
      const block = key ?? entry.block;
      if (this.cache.has(space, block)) continue;
      let list = puts.get(space);
      if (!list) puts.set(space, (list = []));
      list.push(key === undefined ? entry : { ...entry, block });
    }
    if (puts.has(CONTENT_SPACE)) this.usedSpaces.add(CONTENT_SPACE);
    // Settled, not fail-fast: the caller reuses the data's buffer once this returns, so no write may still read it.
    const results = await Promise.allSettled([...puts].map(([space, list]) => this.cache.putMany(space, list, 'boot')));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  /**
   * Whether `block` is cached, by content or in its own space (layered: a
   * block whose owner is not known yet counts as missing; it is stored after a lookup).
   */
  hasBlock(block: number): boolean {
    if (this.content?.has(block)) return true;
    const space = this.layered ? this.ownerMemo.get(block) : this.space;
    return space !== undefined && this.cache.has(space, block);
  }
}

function flightKey(space: string, block: number): string {
  return `${space}/${block}`;
}
