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
 *      request per contiguous run of missing blocks (miss), and cached.
 */
import type { DiskImage, Extent } from '../image/types.js';
import type { BlockCache, CacheBlockKind, CacheEntry } from './block-cache.js';
import { BootRecorder, type BootPolicy, type BootSummary } from './boot-recorder.js';
import type { Prefetcher } from './prefetcher.js';

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
  /** Called once when a boot ends (idle, window, mark-booted, closed). */
  onBootEnd: (service: ImageService, boot: BootRecorder) => void;
  now?: () => number;
}

export class ImageService {
  readonly space: string;
  private readonly blockSize: number;
  private readonly inFlight = new Map<number, Promise<Buffer>>();
  private prefetcher: Prefetcher | undefined;
  private boot: BootRecorder | undefined;
  private lastBoot: BootRecorder | undefined;
  private bootTimer: NodeJS.Timeout | undefined;
  connections = 0;
  private readonly now: () => number;

  constructor(
    readonly name: string,
    readonly image: DiskImage,
    private readonly cache: BlockCache,
    private readonly options: ImageServiceOptions,
  ) {
    this.space = image.identity;
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

  /** A connection opened the export: the first one starts a boot recording. */
  open(): void {
    this.connections++;
    if (!this.boot) {
      this.boot = new BootRecorder(this.image.virtualSize, this.options.mapBlockSize, this.options.bootPolicy, this.now());
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
    this.cache.markBooted(this.space);
    this.options.onBootEnd(this, boot);
  }

  /** Stops timers; the recording in progress, if any, is dropped. */
  dispose(): void {
    if (this.bootTimer) clearTimeout(this.bootTimer);
    this.prefetcher?.stop();
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    return this.image.extents(offset, length);
  }

  /** Guest bytes [offset, offset+length), recorded as part of the boot. */
  async read(offset: number, length: number): Promise<Buffer> {
    const boot = this.boot;
    if (boot) {
      boot.recordRead(offset, length, this.now());
      if (!boot.recording) this.finishBoot(boot);
    }
    return this.readUnrecorded(offset, length, boot ? 'boot' : 'other');
  }

  /** The same read path without recording (segment rebuilds, CACHE hints). */
  async readUnrecorded(offset: number, length: number, kind: CacheBlockKind = 'other'): Promise<Buffer> {
    if (length === 0) return Buffer.alloc(0);
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    const count = last - first + 1;
    // Multi-block requests: cache hits are read straight into the reply buffer (no concat).
    const out = count === 1 ? undefined : Buffer.allocUnsafe(count * bs);
    const parts: Array<Promise<Buffer>> = new Array(count);
    const missing: number[] = [];
    for (let block = first; block <= last; block++) {
      const at = (block - first) * bs;
      parts[block - first] = this.lookup(block, missing, out?.subarray(at, at + bs));
    }
    // Contiguous runs of missing blocks: one storage read each.
    let i = 0;
    while (i < missing.length) {
      let j = i + 1;
      while (j < missing.length && missing[j] === missing[j - 1]! + 1) j++;
      const run = this.fetchRun(missing[i]!, j - i, kind);
      for (let k = i; k < j; k++) parts[missing[k]! - first] = run[k - i]!;
      i = j;
    }
    const blocks = await Promise.all(parts);
    let whole = blocks[0]!;
    if (out) {
      for (let k = 0; k < count; k++) {
        const b = blocks[k]!;
        if (b.buffer !== out.buffer || b.byteOffset !== out.byteOffset + k * bs) b.copy(out, k * bs);
      }
      whole = out;
    }
    const start = offset - first * bs;
    return whole.subarray(start, start + length);
  }

  /** A pending buffer for `block`, or a placeholder after pushing it to `missing`; hits are read into `into` if given. */
  private lookup(block: number, missing: number[], into?: Buffer): Promise<Buffer> {
    if (this.cache.has(this.space, block)) {
      this.options.counters.hits++;
      return this.cache.get(this.space, block, into).then((data) => data ?? this.refetch(block));
    }
    const pending = this.inFlight.get(block);
    if (pending) {
      this.options.counters.hits++;
      return pending;
    }
    const mapBlock = this.toMapBlock(block);
    const streamed = this.prefetcher?.pending(mapBlock);
    if (streamed) {
      // Its segment chunk is being read: take the block from the chunk, no second read.
      this.options.counters.hits++;
      const at = block * this.blockSize - mapBlock * this.options.mapBlockSize;
      return streamed.then((data) => (data ? data.subarray(at, at + this.blockSize) : this.refetch(block)));
    }
    missing.push(block);
    return Promise.resolve(Buffer.alloc(0)); // replaced by the run's promise
  }

  /** A block that vanished from the cache between has() and get() (evicted). */
  private refetch(block: number): Promise<Buffer> {
    return this.inFlight.get(block) ?? this.fetchRun(block, 1, 'other')[0]!;
  }

  private toMapBlock(cacheBlock: number): number {
    return Math.floor((cacheBlock * this.blockSize) / this.options.mapBlockSize);
  }

  /** Reads blocks [start, start+count) from storage in one request; one promise per block. */
  private fetchRun(start: number, count: number, kind: CacheBlockKind): Array<Promise<Buffer>> {
    const bs = this.blockSize;
    this.options.counters.misses += count;
    const offset = start * bs;
    const end = Math.min(this.image.virtualSize, (start + count) * bs);
    const whole = this.image.read(offset, end - offset).then((data) => {
      // The last block of an image whose size is not a block multiple is zero-padded.
      if (data.length === count * bs) return data;
      const padded = Buffer.alloc(count * bs);
      data.copy(padded);
      return padded;
    });
    const promises: Array<Promise<Buffer>> = [];
    for (let k = 0; k < count; k++) {
      const block = start + k;
      const p = whole.then((data) => data.subarray(k * bs, (k + 1) * bs));
      this.inFlight.set(block, p);
      p.then(
        async (data) => {
          if (this.options.cacheMisses) await this.cache.put(this.space, block, data, kind).catch(() => undefined);
        },
        () => undefined,
      ).finally(() => {
        if (this.inFlight.get(block) === p) this.inFlight.delete(block);
      });
      promises.push(p);
    }
    return promises;
  }

  /** Stores map blocks loaded by the prefetcher (split into cache blocks) as one cache batch. */
  async storeMapBlocks(entries: readonly CacheEntry[]): Promise<void> {
    const per = this.options.mapBlockSize / this.blockSize;
    const puts: CacheEntry[] = [];
    for (const { block: mapBlock, data } of entries) {
      for (let k = 0; k < per; k++) {
        const block = mapBlock * per + k;
        if (block * this.blockSize >= this.image.virtualSize) break;
        if (!this.cache.has(this.space, block)) {
          puts.push({ block, data: data.subarray(k * this.blockSize, (k + 1) * this.blockSize) });
        }
      }
    }
    if (puts.length > 0) await this.cache.putMany(this.space, puts, 'boot');
  }

  hasMapBlock(mapBlock: number): boolean {
    const per = this.options.mapBlockSize / this.blockSize;
    for (let k = 0; k < per; k++) {
      const block = mapBlock * per + k;
      if (block * this.blockSize >= this.image.virtualSize) break;
      if (!this.cache.has(this.space, block)) return false;
    }
    return true;
  }
}
