/**
 * The cache manager of one image: the read path behind every NBD connection
 * to that image (cache, prefetch stream, storage), the boot recorder, and the
 * hand-off to the segment rebuild when a boot ends.
 *
 * Read path, per cache block of a request:
 *   1. cached                          -> served from the cache device (hit);
 *   2. being fetched by another request -> waits for that fetch (one storage read);
 *   3. its segment chunk is in flight   -> waits for the chunk (no second read);
 *   4. otherwise                        -> read from the image on storage, in one
 *      request per contiguous run of missing blocks (miss), and cached; a
 *      qcow2 run still ahead of the prefetch stream is read from the segment
 *      instead (no L2 or compressed reads; see readAhead).
 *
 * One version: the image's sources fail every read once the image (or a
 * backing file) changed on storage (ImageChangedError, see ByteSource.version).
 * The first such failure makes the service stale: from then on every read
 * that needs storage fails at once (EIO for the guest), the prefetch stops,
 * and cached blocks, all read from the version opened, keep being served.
 * No request is ever answered with bytes of the new version.
 *
 * Cache space of a block: the owner identity of the layer that supplies it
 * (DiskImage.owner), so overlays on one backing file share its cached blocks;
 * the chain identity when layers mix within the block. Single-layer images
 * use their identity without a lookup.
 */
import { ImageChangedError } from '../errors.js';
import { imageDataBytes } from '../image/data-bytes.js';
import { chainSpaces } from '../image/identity.js';
import type { DiskImage, Extent } from '../image/types.js';
import type { BlockCache, CacheBlockKind, CacheEntry } from './block-cache.js';
import { BootRecorder, type BootPolicy, type BootSummary } from './boot-recorder.js';
import { MissWriter } from './miss-writer.js';
import type { Prefetcher } from './prefetcher.js';
import { DEFAULT_READAHEAD, SequentialReadahead } from './readahead.js';

export interface ReadCounters {
  hits: number;
  misses: number;
}

export interface ImageServiceOptions {
  bootPolicy: BootPolicy;
  /** Map block size for recorded boots. */
  mapBlockSize: number;
  /** Cache blocks read on a miss. */
  cacheMisses: boolean;
  counters: ReadCounters;
  /**
   * Blocks being read from storage, keyed by space and block; shared by the
   * services of one cache so overlays missing the same backing block read it once.
   */
  inFlight?: Map<string, Promise<Buffer>>;
  /** Batches the cache writes of missed blocks; shared by the services of one cache (default: one of its own). */
  missWriter?: MissWriter;
  /** Largest sequential readahead window on guest misses, bytes; 0 or absent: off. */
  readaheadBytes?: number;
  /** Called once when a boot ends (idle, window, mark-booted, closed). */
  onBootEnd: (service: ImageService, boot: BootRecorder) => void;
  /** Called once, when a storage read finds the image changed (the service is stale from then on). */
  onStale?: (service: ImageService, err: ImageChangedError) => void;
  now?: () => number;
}

/** Owner spaces remembered per layered image (block -> space), at most. */
const OWNER_MEMO_MAX = 1 << 18;

export class ImageService {
  /** The chain identity: the space of single-layer images and of mixed blocks. */
  readonly space: string;
  /** Every space this image's blocks may live in (see chainSpaces). */
  readonly spaces: string[];
  private readonly blockSize: number;
  private readonly inFlight: Map<string, Promise<Buffer>>;
  private readonly missWriter: MissWriter;
  private readonly readahead: SequentialReadahead | undefined;
  /** More than one layer: blocks may belong to a backing file's space. */
  private readonly layered: boolean;
  private readonly ownerMemo = new Map<number, string>();
  /** Spaces this image's blocks were found in (marked booted when a boot ends). */
  private readonly usedSpaces = new Set<string>();
  private prefetcher: Prefetcher | undefined;
  private boot: BootRecorder | undefined;
  private lastBoot: BootRecorder | undefined;
  private bootTimer: NodeJS.Timeout | undefined;
  /** Bytes of data in the image (allocated extents), learnt once a recording may need them (BootPolicy.maxShare). */
  private dataBytes: number | undefined;
  private dataBytesPending: Promise<number> | undefined;
  connections = 0;
  private readonly now: () => number;
  /** Why the service is stale, and since when (epoch ms); see markStale. */
  private staleSince: { error: ImageChangedError; at: number } | undefined;

  constructor(
    readonly name: string,
    readonly image: DiskImage,
    private readonly cache: BlockCache,
    private readonly options: ImageServiceOptions,
  ) {
    this.space = image.identity;
    this.spaces = chainSpaces(image);
    this.layered = image.layers().length > 1;
    this.inFlight = options.inFlight ?? new Map();
    this.missWriter = options.missWriter ?? new MissWriter(cache);
    const ra = options.readaheadBytes ?? 0;
    this.readahead = ra > 0
      ? new SequentialReadahead({ initialBytes: Math.min(DEFAULT_READAHEAD.initialBytes, ra), maxBytes: ra })
      : undefined;
    this.blockSize = cache.blockSize;
    this.now = options.now ?? (() => performance.now());
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

  /** Set once the image changed under the service: its error and when it was seen. */
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
   * A storage read of the version opened; a changed image makes the service
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
    if (!this.boot) {
      this.boot = new BootRecorder(this.image.virtualSize, this.options.mapBlockSize, this.options.bootPolicy, this.now());
      if (this.dataBytes !== undefined) this.boot.setDataBytes(this.dataBytes, this.now());
      this.armBootTimer();
    }
  }

  /** A connection closed: the last one ends a boot still recording. */
  close(): void {
    this.connections = Math.max(0, this.connections - 1);
    if (this.connections === 0 && this.boot) this.endBoot('closed');
  }

  markBooted(): BootSummary | undefined {
    const boot = this.boot;
    if (!boot) return this.lastBoot?.summary(this.now());
    this.endBoot('mark-booted');
    return boot.summary(this.now());
  }

  bootSummary(): BootSummary | undefined {
    return (this.boot ?? this.lastBoot)?.summary(this.now());
  }

  private armBootTimer(): void {
    if (this.bootTimer) clearTimeout(this.bootTimer);
    const boot = this.boot;
    if (!boot) return;
    const delay = Math.max(10, boot.nextDeadline() - this.now());
    this.bootTimer = setTimeout(() => {
      this.bootTimer = undefined;
      if (this.boot !== boot) return;
      if (boot.checkEnd(this.now())) this.finishBoot(boot);
      else this.armBootTimer();
    }, delay);
    this.bootTimer.unref();
  }

  private endBoot(reason: 'mark-booted' | 'closed'): void {
    const boot = this.boot;
    if (!boot) return;
    boot.end(reason, this.now());
    this.finishBoot(boot);
  }

  private finishBoot(boot: BootRecorder): void {
    if (this.bootTimer) clearTimeout(this.bootTimer);
    this.bootTimer = undefined;
    this.boot = undefined;
    this.lastBoot = boot;
    // Only spaces in use: marking creates a space in the cache index. A discarded recording was no boot.
    if (boot.discardReason === undefined) {
      this.cache.markBooted(this.space);
      for (const space of this.usedSpaces) if (space !== this.space) this.cache.markBooted(space);
    }
    this.options.onBootEnd(this, boot);
  }

  /**
   * Learns the image's data bytes for the maxShare limit, and ends the boot
   * recording if it is already over it. Asked only once a recording is half
   * way to the floor, so a boot's reads never compete with a qcow2 image's
   * L2 table reads for it. (A recording that ends before the answer keeps
   * the looser limit taken of the virtual size.)
   */
  private learnDataBytes(): void {
    if (this.dataBytesPending) return;
    this.dataBytesPending = imageDataBytes(this.image).catch(() => this.image.virtualSize);
    void this.dataBytesPending.then((bytes) => {
      this.dataBytes = bytes;
      const current = this.boot;
      if (!current) return;
      current.setDataBytes(bytes, this.now());
      if (!current.recording) this.finishBoot(current);
    });
  }

  /** Stops timers; the recording in progress, if any, is dropped. */
  dispose(): void {
    if (this.bootTimer) clearTimeout(this.bootTimer);
    this.prefetcher?.stop();
  }

  /** Allocation extents; qcow2 metadata not cached yet is read from storage. */
  async extents(offset: number, length: number): Promise<Extent[]> {
    return this.fromStorage(() => this.image.extents(offset, length), false);
  }

  /** Guest bytes [offset, offset+length), recorded as part of the boot. */
  async read(offset: number, length: number): Promise<Buffer> {
    const boot = this.boot;
    if (boot) {
      boot.recordRead(offset, length, this.now());
      if (!boot.recording) this.finishBoot(boot);
      else if (boot.wantsDataBytes) this.learnDataBytes();
    }
    return this.readUnrecorded(offset, length, boot ? 'boot' : 'other', true);
  }

  /**
   * The same read path without recording (segment rebuilds, CACHE hints).
   * `guest`: a VM's read, which drives the sequential readahead.
   */
  async readUnrecorded(offset: number, length: number, kind: CacheBlockKind = 'other', guest = false): Promise<Buffer> {
    if (length === 0) return Buffer.alloc(0);
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    // Every block lands in `out`: cache hits are read straight into it.
    const out = Buffer.allocUnsafe((last - first + 1) * bs);
    const slice = (block: number, count = 1): Buffer => out.subarray((block - first) * bs, (block - first + count) * bs);
    const waits: Array<Promise<void>> = [];
    const missing: number[] = [];
    const spaces = this.layered ? await this.ownerSpaces(first, last) : undefined;
    const spaceOf = (block: number): string => spaces?.[block - first] ?? this.space;
    // Runs of cached blocks of one space: one cache read each.
    let hitStart = -1;
    const flushHits = (end: number): void => {
      if (hitStart < 0) return;
      waits.push(this.readCached(hitStart, end - hitStart, spaceOf(hitStart), slice(hitStart, end - hitStart)));
      hitStart = -1;
    };
    for (let block = first; block <= last; block++) {
      const space = spaceOf(block);
      if (this.cache.has(space, block)) {
        this.options.counters.hits++;
        if (hitStart >= 0 && spaceOf(hitStart) !== space) flushHits(block);
        if (hitStart < 0) hitStart = block;
        continue;
      }
      flushHits(block);
      const pending = this.pendingBlock(block, space);
      if (pending) waits.push(pending.then((data) => void data.copy(slice(block))));
      else missing.push(block);
    }
    flushHits(last + 1);
    // Contiguous runs of missing blocks: one storage read each.
    let i = 0;
    while (i < missing.length) {
      let j = i + 1;
      while (j < missing.length && missing[j] === missing[j - 1]! + 1) j++;
      const runStart = missing[i]!;
      const run = this.fetchRun(runStart, j - i, kind, spaces?.slice(runStart - first, missing[j - 1]! - first + 1));
      run.forEach((p, k) => waits.push(p.then((data) => void data.copy(slice(runStart + k)))));
      i = j;
    }
    if (guest && this.readahead) {
      const aheadEnd = Math.min(this.image.virtualSize, this.readahead.onRead(offset, offset + length, missing.length > 0));
      if (aheadEnd > (last + 1) * bs) void this.fetchAhead(last + 1, Math.ceil(aheadEnd / bs) - 1).catch(() => undefined);
    }
    await Promise.all(waits);
    const start = offset - first * bs;
    return out.subarray(start, start + length);
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
  private async ownerSpaces(first: number, last: number): Promise<string[]> {
    const out: Array<string | Promise<string>> = [];
    for (let block = first; block <= last; block++) out.push(this.ownerSpace(block));
    return Promise.all(out);
  }

  private ownerSpace(block: number): string | Promise<string> {
    const known = this.ownerMemo.get(block);
    if (known !== undefined) return known;
    const offset = block * this.blockSize;
    const length = Math.min(this.image.virtualSize, offset + this.blockSize) - offset;
    return this.fromStorage(() => this.image.owner(offset, length), false).then((owner) => {
      // The image is immutable while this service lives: remember the answer.
      if (this.ownerMemo.size >= OWNER_MEMO_MAX) this.ownerMemo.clear();
      const space = owner ?? this.space;
      this.ownerMemo.set(block, space);
      this.usedSpaces.add(space);
      return space;
    });
  }

  /** The data of an uncached block on its way: another request's fetch, or its prefetch chunk (in flight or demanded now). */
  private pendingBlock(block: number, space: string): Promise<Buffer> | undefined {
    const pending = this.inFlight.get(flightKey(space, block));
    if (pending) {
      this.options.counters.hits++;
      return pending;
    }
    const mapBlock = this.toMapBlock(block);
    // In a chunk being read, or in one the stream has not reached (started now, out of order).
    const streamed = this.prefetcher?.pending(mapBlock) ?? this.prefetcher?.demand(mapBlock);
    if (!streamed) return undefined;
    // Its segment chunk is being read: take the block from the chunk, no second read.
    this.options.counters.hits++;
    const at = block * this.blockSize - mapBlock * this.options.mapBlockSize;
    return streamed.then((data) => (data ? data.subarray(at, at + this.blockSize) : this.refetch(block, space)));
  }

  /**
   * Sequential readahead: reads blocks [first, last] that are not cached, not
   * being read and not coming with the prefetch stream, in the background
   * (one storage request per contiguous run), into the cache as 'other'.
   */
  private async fetchAhead(first: number, last: number): Promise<void> {
    const spaces = this.layered ? await this.ownerSpaces(first, last) : undefined;
    let runStart = -1;
    const flush = (end: number): void => {
      if (runStart < 0) return;
      this.fetchRun(runStart, end - runStart, 'other', spaces?.slice(runStart - first, end - first), false);
      runStart = -1;
    };
    for (let block = first; block <= last; block++) {
      const space = spaces?.[block - first] ?? this.space;
      const mapBlock = this.toMapBlock(block);
      const skip = this.cache.has(space, block) || this.inFlight.has(flightKey(space, block)) ||
        this.prefetcher?.ahead(mapBlock) === true || this.prefetcher?.pending(mapBlock) !== undefined;
      if (skip) flush(block);
      else if (runStart < 0) runStart = block;
    }
    flush(last + 1);
  }

  /** A block that vanished from the cache between has() and get() (evicted). */
  private refetch(block: number, space: string): Promise<Buffer> {
    return this.inFlight.get(flightKey(space, block)) ?? this.fetchRun(block, 1, 'other', [space])[0]!;
  }

  private toMapBlock(cacheBlock: number): number {
    return Math.floor((cacheBlock * this.blockSize) / this.options.mapBlockSize);
  }

  /**
   * Reads blocks [start, start+count) from storage in one request; one promise
   * per block. `spaces`: each block's cache space (default: the chain's).
   */
  private fetchRun(start: number, count: number, kind: CacheBlockKind, spaces?: string[], countMisses = true): Array<Promise<Buffer>> {
    const bs = this.blockSize;
    if (countMisses) this.options.counters.misses += count;
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
    const read = (): Promise<Buffer> => this.readAhead(offset, end) ?? this.image.read(offset, end - offset);
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
          if (this.options.cacheMisses) await this.missWriter.queue(space, block, data, kind);
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
   * Guest bytes [offset, end) of a qcow2 image from its segment when every
   * map block there is still ahead of the prefetch stream: one ranged read,
   * checksums verified, no L2 table or compressed cluster read (see
   * bench/results/2026-11-26-far-ahead.md; raw images gain nothing). Falls
   * back to the image when the segment read fails or a checksum differs.
   */
  private readAhead(offset: number, end: number): Promise<Buffer> | undefined {
    const prefetcher = this.prefetcher;
    if (!prefetcher || this.image.format === 'raw') return undefined;
    const mbs = this.options.mapBlockSize;
    const first = Math.floor(offset / mbs);
    const last = Math.floor((end - 1) / mbs);
    for (let block = first; block <= last; block++) if (!prefetcher.ahead(block)) return undefined;
    return prefetcher
      .readAhead(first, last - first + 1)
      .then((data) => (data ? data.subarray(offset - first * mbs, end - first * mbs) : this.image.read(offset, end - offset)));
  }

  /** Stores map blocks loaded by the prefetcher (split into cache blocks) as one cache batch per space. */
  async storeMapBlocks(entries: readonly CacheEntry[]): Promise<void> {
    const per = this.options.mapBlockSize / this.blockSize;
    const puts = new Map<string, CacheEntry[]>();
    for (const { block: mapBlock, data, crc } of entries) {
      for (let k = 0; k < per; k++) {
        const block = mapBlock * per + k;
        if (block * this.blockSize >= this.image.virtualSize) break;
        const space = this.layered ? await this.ownerSpace(block) : this.space;
        if (!this.cache.has(space, block)) {
          let list = puts.get(space);
          if (!list) puts.set(space, (list = []));
          const part = data.subarray(k * this.blockSize, (k + 1) * this.blockSize);
          // A map block's CRC is its cache block's only when they are the same bytes.
          list.push(crc !== undefined && part.length === data.length ? { block, data: part, crc } : { block, data: part });
        }
      }
    }
    // Settled, not fail-fast: the caller reuses the data's buffer once this returns, so no write may still read it.
    const results = await Promise.allSettled([...puts].map(([space, list]) => this.cache.putMany(space, list, 'boot')));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  hasMapBlock(mapBlock: number): boolean {
    const per = this.options.mapBlockSize / this.blockSize;
    for (let k = 0; k < per; k++) {
      const block = mapBlock * per + k;
      if (block * this.blockSize >= this.image.virtualSize) break;
      // Layered: a block whose owner is not known yet counts as missing (stored after a lookup).
      const space = this.layered ? this.ownerMemo.get(block) : this.space;
      if (space === undefined || !this.cache.has(space, block)) return false;
    }
    return true;
  }
}

function flightKey(space: string, block: number): string {
  return `${space}/${block}`;
}
