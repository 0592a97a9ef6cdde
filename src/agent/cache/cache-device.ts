/**
 * The agent's local cache device: blocks of images (read from storage, or
 * streamed in by the prefetcher from a boot segment) kept on local disk so
 * that later reads are local.
 *
 * A fixed-size data file of blockSize slots holds the bytes; an in-memory
 * index maps (space, block) to a slot and is persisted as a snapshot plus an
 * append-only journal. The ordering rules that make it crash-safe (see
 * docs/cache-device.md, "Crash safety"):
 *   1. data is written only into a slot that no durable record maps;
 *   2. the data file is fdatasync'd before the journal records that map its
 *      slots are appended (group commit: one fdatasync pair per batch);
 *   3. a slot leaves the index (eviction, overwrite, invalidation) at once,
 *      but is reused only after the record saying so is durable.
 */
import { constants, read, readSync } from 'node:fs';
import { mkdir, open, readdir, rmdir, stat, unlink, type FileHandle } from 'node:fs/promises';
import { randomInt } from 'node:crypto';
import { dirname, join } from 'node:path';
import { crc32 } from 'node:zlib';
import { AgentError, BootcacheError, StorageIOError, fromSystemError } from '../../errors.js';
import type { BlockCache, CacheBlockKind, CacheEntry } from '../block-cache.js';
import { isTempName, writeFileAtomic } from '../../format/atomic-write.js';
import { acquireLock, holdsLock, releaseLock } from './dir-lock.js';
import { isNoSpace, measureRoom, mib, roomWarning, shrunkSlots, type FilesystemRoom } from './disk-space.js';
import { pwriteAll, readHead, readIfExists, writevAll } from './file-io.js';
import {
  JOURNAL_HEADER_SIZE,
  PUT_FLAG_BOOT,
  RecordBuffer,
  RecordType,
  decodeJournalHeader,
  encodeJournalHeader,
  scanJournal,
  type JournalHeader,
  type JournalRecord,
} from './journal.js';
import { SlotFlag, SlotIndex, SlotState, type Space } from './slot-index.js';
import { SNAPSHOT_HEADER_SIZE, decodeSnapshotHeader, encodeSnapshot, isSpaceHex, loadSnapshot } from './snapshot.js';

export type { CacheBlockKind, CacheEntry } from '../block-cache.js';

/** Where the cache reports what it recovered from (pino's logger fits). */
export interface CacheLogger {
  warn(message: string): void;
  info?(message: string): void;
}

export interface CacheDeviceOptions {
  /** Upper bound of the data file; it holds floor(capacityBytes / blockSize) blocks. */
  capacityBytes: number;
  /** Bytes per block, a power of two from 512 to 2 MiB; fixed per directory (default: the directory's, else 4096). */
  blockSize?: number;
  /** Recovery warnings; default: process warnings. */
  logger?: CacheLogger;
  /** Check each block's CRC-32 on every get (default true; see docs/cache-device.md). */
  verifyReads?: boolean;
  /**
   * Read hits synchronously while the data file answers from memory (default
   * true): a page-cache pread takes 4-10 µs, a thread-pool round trip about
   * 47 µs on the 2-vCPU reference host. When they turn slow (disk reads, see
   * SLOW_SYNC_READ_MS) hits go to the thread pool for a second, so a cold or
   * slow cache disk never stalls the event loop for long.
   */
  syncReads?: boolean;
}

export interface CacheSpaceStats {
  space: string;
  blocks: number;
  bootBlocks: number;
  /** When an image of this space last booted (ms since the Unix epoch). */
  lastBootedAt?: number;
}

/** The cache directory's filesystem, and what a lack of room there did (docs/cache-device.md, "A full disk"). */
export interface CacheDiskStats {
  /** The configured capacity in whole blocks: capacityBytes until the disk fills. */
  configuredCapacityBytes: number;
  /** statfs of the directory at open and after each shrink; absent where statfs fails. */
  filesystem?: FilesystemRoom;
  /** Set at open when the filesystem cannot hold the configured capacity. */
  warning?: string;
  /** Set once writes found the disk full: the capacity the cache shrank to, why, when (ISO 8601), and how many shrinks so far. */
  shrunk?: { capacityBytes: number; reason: string; at: string; times: number };
}

export interface CacheStats {
  blockSize: number;
  /** The data file size: slots × blockSize (the configured capacity, less after a full disk shrank the cache). */
  capacityBytes: number;
  usedBytes: number;
  blocks: number;
  bootBlocks: number;
  hits: number;
  misses: number;
  evictions: number;
  /** Blocks dropped because their bytes no longer matched their checksum. */
  checksumFailures: number;
  /** Puts skipped because every slot was being written at once, or because the cache shrank past their slot. */
  droppedPuts: number;
  /** Block writes that failed for lack of disk space; their blocks were dropped and the cache shrank. */
  noSpaceWrites: number;
  /** Times synchronous hit reads were found slow, like disk reads (each sends hits to the thread pool for a second). */
  slowSyncReads: number;
  journalBytes: number;
  spaces: CacheSpaceStats[];
  disk: CacheDiskStats;
}

export const DEFAULT_BLOCK_SIZE = 4096;
/** The smallest cache accepted, in blocks. */
export const MIN_SLOTS = 8;
/** The in-memory index costs about 40 bytes a slot: 2^27 slots is 512 GiB of 4 KiB blocks. */
export const MAX_SLOTS = 2 ** 27;
const MIN_BLOCK_SIZE = 512;
const MAX_BLOCK_SIZE = 2 * 1024 * 1024;
/** Group commit: records wait at most this long for companions... */
const COMMIT_DELAY_MS = 4;
/** ...or until this many are queued. */
const COMMIT_MAX_RECORDS = 4096;
/** Compact when the journal outgrows this plus twice the snapshot's size. */
const COMPACT_MIN_JOURNAL = 8 * 1024 * 1024;
const SNAPSHOT_BYTES_PER_ENTRY = 24;

type ReadDone = (err: NodeJS.ErrnoException | null, bytesRead: number) => void;

const MISS: Promise<undefined> = Promise.resolve(undefined);
/**
 * Synchronous hit reads are judged by their time beyond what a page-cache
 * copy takes (50 µs plus 1 ms per MiB, generous for a copy from memory). A
 * moving average of that excess, each sample capped at 2 ms and weighted
 * 1/8, above SLOW_SYNC_READ_MS means the reads come from the disk (three
 * 5 ms reads in a row): hits then go through the thread pool for
 * ASYNC_AFTER_SLOW_READ_MS. One or two outliers (a preempted vCPU) do not
 * count. The figures behind these constants are in docs/benchmarks-agent.md.
 */
const PAGE_CACHE_READ_MS = (bytes: number): number => 0.05 + bytes / 1048576;
const SLOW_SYNC_READ_MS = 0.5;
const SLOW_SYNC_READ_WEIGHT = 1 / 8;
const SLOW_SYNC_READ_SAMPLE_CAP_MS = 2;
const ASYNC_AFTER_SLOW_READ_MS = 1000;

const FILES = {
  data: 'cache.data',
  snapshot: 'cache.snap',
  journal: 'cache.journal',
  lock: 'cache.lock',
} as const;

/** Records queued for one journal append, and the slots that become free once it is durable. */
class Batch {
  readonly records: RecordBuffer;
  readonly freed: number[] = [];
  readonly done: Promise<void>;
  resolve!: () => void;
  reject!: (err: Error) => void;

  constructor(salt: number) {
    this.records = new RecordBuffer(salt);
    this.done = new Promise<void>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    this.done.catch(() => undefined); // failures surface through put/flush, never as unhandled
  }

  get empty(): boolean {
    return this.records.count === 0;
  }
}

interface Files {
  data: FileHandle;
  journal: FileHandle;
}

interface Persisted {
  index: SlotIndex;
  epoch: number;
  salt: number;
  journalSize: number;
}

export class CacheDevice implements BlockCache {
  private pending: Batch;
  /** The batch being committed (or covered by a compaction in progress). */
  private inflight: Batch | undefined;
  private timer: NodeJS.Timeout | undefined;
  private commitQueued = false;
  /** Serializes commits and compactions. */
  private writerTail: Promise<void> = Promise.resolve();
  /** Set when a data write finished since the last fdatasync of the data file. */
  private dataDirty = false;
  private failed: BootcacheError | undefined;
  private closed = false;
  /** This open created the cache directory (see closeAndRemoveIfCreated). */
  private createdDir = false;
  private active = 0;
  private idleWaiters: (() => void)[] = [];
  private counters = { hits: 0, misses: 0, evictions: 0, checksumFailures: 0, droppedPuts: 0, noSpaceWrites: 0, slowSyncReads: 0 };
  /** Until then (performance.now()), hits are read through the thread pool (see CacheDeviceOptions.syncReads). */
  private asyncReadsUntil = 0;
  /** Moving average of synchronous hit reads' time beyond a page-cache copy, ms. */
  private syncReadExcessMs = 0;
  /** Free slots the device keeps ready ahead of demand (0 for small caches: evict on demand). */
  private reserve: number;
  /** Slots in use: slotCount, fewer once a full disk shrank the cache; the data file is this long. */
  private usableSlots: number;
  private readonly disk: CacheDiskStats;
  /** The shrink in progress after a write found the disk full. */
  private shrinking: Promise<void> | undefined;
  /** Shrinks finished: a write that started before the last one needs no other. */
  private shrinks = 0;
  private loggedAtMinimum = false;
  /** Slots past usableSlots still being written (a shrink waits for them before it cuts the data file). */
  private writingAbove = 0;
  private drained: (() => void) | undefined;

  private constructor(
    readonly dir: string,
    readonly blockSize: number,
    private readonly index: SlotIndex,
    slotCount: number,
    private files: Files,
    private epoch: number,
    private salt: number,
    private journalSize: number,
    private readonly verifyReads: boolean,
    private readonly syncReads: boolean,
    private readonly log: CacheLogger,
  ) {
    this.pending = new Batch(salt);
    this.usableSlots = slotCount;
    this.reserve = reserveFor(slotCount);
    this.disk = { configuredCapacityBytes: slotCount * blockSize };
  }

  /**
   * Opens (creating it if needed) the cache in `dir`. A damaged index is
   * recovered (see docs/cache-device.md) with a warning; unusable options,
   * a directory that is a file, no permission or a directory in use by
   * another process are one-line errors.
   */
  static async open(dir: string, options: CacheDeviceOptions): Promise<CacheDevice> {
    const requested = options.blockSize;
    if (requested !== undefined) checkBlockSize(requested);
    const cap = options.capacityBytes;
    if (!Number.isSafeInteger(cap) || cap <= 0) {
      throw new AgentError(`cache size ${String(cap)} is not a positive number of bytes`);
    }
    const log = options.logger ?? processWarnings;
    const created = await prepareDir(dir);
    const lockPath = join(dir, FILES.lock);
    await acquireLock(lockPath, dir);
    let loaded: Loaded;
    try {
      await removeStaleTempFiles(dir);
      loaded = await loadPersisted(dir, requested, cap, log); // closes what it opened if it fails
    } catch (err) {
      await releaseLock(lockPath);
      throw fromSystemError(err, dir, 'opening the cache');
    }
    const { blockSize, slotCount, files, persisted: p } = loaded;
    p.index.rebuildFreeList(slotCount);
    const device = new CacheDevice(dir, blockSize, p.index, slotCount, files, p.epoch, p.salt, p.journalSize, options.verifyReads ?? true, options.syncReads ?? true, log);
    device.createdDir = created;
    const room = await measureRoom(dir, [FILES.data, FILES.journal, FILES.snapshot]);
    if (room) {
      device.disk.filesystem = room;
      const warning = roomWarning(dir, room, slotCount * blockSize);
      if (warning) {
        device.disk.warning = warning;
        log.warn(warning);
      }
    }
    return device;
  }

  // --- the block interface ---

  /** True when (space, block) is cached (a get may still miss if it is evicted meanwhile). */
  has(space: string, block: number): boolean {
    if (this.closed || this.failed) return false;
    return this.index.lookup(space, block) >= 0;
  }

  /**
   * The bytes put for (space, block), or undefined on a miss. With `into`
   * (exactly blockSize bytes) the block is read there and `into` returned;
   * on a miss its contents are unspecified. The hit path is one positional
   * read plus map lookups, written with callbacks (one promise per get).
   */
  get(space: string, block: number, into?: Buffer): Promise<Buffer | undefined> {
    if (this.closed) return Promise.reject(this.closedError());
    if (into !== undefined && into.length !== this.blockSize) {
      return Promise.reject(new AgentError(`cache get: target buffer is ${into.length} bytes, not the block size ${this.blockSize}`));
    }
    const sp = this.index.spaces.get(space);
    if (this.failed || sp === undefined) {
      this.counters.misses++;
      return MISS;
    }
    const buf = into ?? Buffer.allocUnsafe(this.blockSize);
    this.active++;
    return new Promise((resolve) => this.readAttempt(sp, block, buf, 0, resolve));
  }

  /**
   * Cached blocks [first, first + count) of `space` read into `into`
   * (count × blockSize bytes), block k at k × blockSize. Resolves to which
   * blocks were served (read and checked); the others' bytes in `into` are
   * unspecified. Blocks in consecutive slots (the prefetcher and miss batches
   * allocate them in block order) are read with one pread per run, so a
   * 128 KiB guest read of prefetched blocks costs one system call, not 32.
   */
  getRun(space: string, first: number, count: number, into: Buffer): Promise<boolean[]> {
    if (this.closed) return Promise.reject(this.closedError());
    const bs = this.blockSize;
    if (into.length !== count * bs) {
      return Promise.reject(new AgentError(`cache getRun: target buffer is ${into.length} bytes, not ${count} blocks of ${bs}`));
    }
    const served = new Array<boolean>(count).fill(false);
    const sp = this.index.spaces.get(space);
    if (this.failed || sp === undefined) {
      this.counters.misses += count;
      return Promise.resolve(served);
    }
    const index = this.index;
    this.active++;
    return new Promise((resolve) => {
      let outstanding = 1;
      const settle = (): void => {
        if (--outstanding > 0) return;
        this.opDone();
        resolve(served);
      };
      // A block whose run read went wrong takes the single-block path (retries, logging, corrupt-drop).
      const single = (k: number): void => {
        outstanding++;
        this.active++;
        this.readAttempt(sp, first + k, into.subarray(k * bs, (k + 1) * bs), 0, (result) => {
          served[k] = result !== undefined;
          settle();
        });
      };
      for (let k = 0; k < count; ) {
        const slot = sp.blocks.get(first + k);
        if (slot === undefined) {
          this.counters.misses++;
          k++;
          continue;
        }
        let n = 1;
        while (k + n < count && sp.blocks.get(first + k + n) === slot + n) n++;
        if (n === 1) {
          single(k);
          k++;
          continue;
        }
        const start = k;
        const generations = new Array<number>(n);
        for (let i = 0; i < n; i++) {
          generations[i] = index.generation[slot + i]!;
          index.touch(slot + i);
        }
        outstanding++;
        this.readData(into, start * bs, n * bs, slot * bs, (err, bytesRead) => {
          for (let i = 0; i < n; i++) {
            const s = slot + i;
            const data = into.subarray((start + i) * bs, (start + i + 1) * bs);
            // Reused while being read, or a failed or short read: that block goes the single way.
            if (err || bytesRead < (i + 1) * bs || this.failed || index.generation[s] !== generations[i]) {
              single(start + i);
              continue;
            }
            if (this.verifyReads || index.flags[s]! & SlotFlag.UNVERIFIED) {
              if (crc32(data) !== index.crcOf[s]) {
                this.dropCorrupt(s, sp, first + start + i);
                this.counters.misses++;
                continue;
              }
              index.flags[s]! &= ~SlotFlag.UNVERIFIED;
            }
            this.counters.hits++;
            served[start + i] = true;
          }
          settle();
        });
        k += n;
      }
      settle();
    });
  }

  /**
   * One lookup and read for get(). Retried when the slot was reused while
   * being read (it then held someone else's bytes).
   */
  private readAttempt(sp: Space, block: number, buf: Buffer, attempt: number, done: (result: Buffer | undefined) => void): void {
    const index = this.index;
    const slot = attempt < 3 ? sp.blocks.get(block) : undefined;
    if (slot === undefined) return this.endGet(undefined, done);
    const generation = index.generation[slot];
    index.touch(slot);
    this.readSlot(buf, slot, (err, bytesRead) => {
      if (err || bytesRead !== buf.length) {
        // A failing local disk must not fail the guest's read: it is served from storage instead.
        const why = err ?? new StorageIOError(`short read (${bytesRead} bytes) of slot ${slot}`);
        this.log.warn(fromSystemError(why, join(this.dir, FILES.data), 'reading a cached block').message);
        return this.endGet(undefined, done);
      }
      if (this.failed) return this.endGet(undefined, done);
      if (index.generation[slot] !== generation) return this.readAttempt(sp, block, buf, attempt + 1, done);
      if (this.verifyReads || index.flags[slot] & SlotFlag.UNVERIFIED) {
        if (crc32(buf) !== index.crcOf[slot]) {
          this.dropCorrupt(slot, sp, block);
          return this.endGet(undefined, done);
        }
        index.flags[slot] &= ~SlotFlag.UNVERIFIED;
      }
      this.endGet(buf, done);
    });
  }

  private endGet(result: Buffer | undefined, done: (result: Buffer | undefined) => void): void {
    if (result) this.counters.hits++;
    else this.counters.misses++;
    this.opDone();
    done(result);
  }

  /**
   * Stores `data` (exactly blockSize bytes, not modified until the promise
   * settles) as (space, block). Resolves once the bytes are in the data
   * file and the index; durable after the next group commit (or flush()).
   * A later put of the same key replaces it; a 'boot' put marks the block
   * as a boot block of its space.
   */
  async put(space: string, block: number, data: Buffer, kind: CacheBlockKind): Promise<void> {
    this.checkOpen();
    if (this.failed) throw this.failed;
    if (!Number.isSafeInteger(block) || block < 0) throw new AgentError(`cache put: block ${block} is not a block index`);
    if (data.length !== this.blockSize) {
      throw new AgentError(`cache put: ${data.length} bytes of data, expected the block size ${this.blockSize}`);
    }
    if (kind !== 'boot' && kind !== 'other') throw new AgentError(`cache put: unknown block kind ${JSON.stringify(kind)}`);
    const sp = this.intern(space);
    const crc = crc32(data);
    this.active++;
    try {
      // One put per key at a time: two puts of a key never both allocate a slot.
      for (let prior = sp.writers.get(block); prior; prior = sp.writers.get(block)) await prior;
      let release!: () => void;
      sp.writers.set(block, new Promise<void>((resolve) => (release = resolve)));
      try {
        await this.putLocked(sp, block, data, crc, kind === 'boot');
      } finally {
        sp.writers.delete(block);
        release();
      }
    } finally {
      this.opDone();
    }
  }

  /**
   * put() for many blocks of one space at once (the prefetcher's chunks):
   * slots are allocated together, each run of consecutive slots is written
   * with one writev, and the records join one group commit. Same ordering
   * rules and resolution as put(); a block listed twice keeps its last data.
   */
  async putMany(space: string, entries: readonly CacheEntry[], kind: CacheBlockKind): Promise<void> {
    this.checkOpen();
    if (this.failed) throw this.failed;
    if (kind !== 'boot' && kind !== 'other') throw new AgentError(`cache put: unknown block kind ${JSON.stringify(kind)}`);
    const byBlock = new Map<number, CacheEntry>();
    for (const entry of entries) {
      const { block, data } = entry;
      if (!Number.isSafeInteger(block) || block < 0) throw new AgentError(`cache put: block ${block} is not a block index`);
      if (data.length !== this.blockSize) {
        throw new AgentError(`cache put: ${data.length} bytes of data, expected the block size ${this.blockSize}`);
      }
      if (entry.crc !== undefined && !(Number.isInteger(entry.crc) && entry.crc >= 0 && entry.crc <= 0xffffffff)) {
        throw new AgentError(`cache put: CRC-32 ${entry.crc} of block ${block} is not a 32-bit unsigned integer`);
      }
      byBlock.set(block, entry);
    }
    if (byBlock.size === 0) return;
    const sp = this.intern(space);
    // Keys are locked in ascending order, so two overlapping batches never wait on each other.
    const blocks = [...byBlock.keys()].sort((a, b) => a - b);
    // One promise stands for the whole batch in every key it locks (not one
    // per block: a cold boot's prefetch puts 24,000 blocks while it reads).
    let release!: () => void;
    const batch = new Promise<void>((resolve) => (release = resolve));
    let locked = 0;
    this.active++;
    try {
      for (const block of blocks) {
        for (let prior = sp.writers.get(block); prior; prior = sp.writers.get(block)) await prior;
        sp.writers.set(block, batch);
        locked++;
      }
      await this.putManyLocked(sp, blocks, byBlock, kind === 'boot');
    } finally {
      for (let i = 0; i < locked; i++) sp.writers.delete(blocks[i]!);
      release();
      this.opDone();
    }
  }

  /** An image whose blocks live in `space` booted now: its boot blocks are evicted last. */
  markBooted(space: string): void {
    this.checkOpen();
    if (this.failed) return;
    const sp = this.intern(space);
    const now = Date.now();
    this.index.markBooted(sp, now);
    this.pending.records.booted(sp.id, now);
    this.kick(false);
  }

  /** Drops every block of `space`; resolves when that is durable. Puts in flight for it are discarded. */
  async invalidateSpace(space: string): Promise<void> {
    this.checkOpen();
    if (this.failed) throw this.failed;
    const sp = this.index.spaces.get(space);
    if (!sp) return;
    sp.epoch++;
    for (const slot of [...sp.blocks.values()]) this.retire(slot);
    this.pending.records.dropSpace(sp.id);
    await this.commitQueuedRecords();
  }

  stats(): CacheStats {
    const spaces: CacheSpaceStats[] = [];
    for (const sp of this.index.spacesById) {
      if (!sp || (sp.blocks.size === 0 && sp.lastBootedAt === undefined)) continue;
      const entry: CacheSpaceStats = { space: sp.hex, blocks: sp.blocks.size, bootBlocks: sp.boot.size };
      if (sp.lastBootedAt !== undefined) entry.lastBootedAt = sp.lastBootedAt;
      spaces.push(entry);
    }
    return {
      blockSize: this.blockSize,
      capacityBytes: this.usableSlots * this.blockSize,
      usedBytes: this.index.mapped * this.blockSize,
      blocks: this.index.mapped,
      bootBlocks: this.index.bootMapped,
      ...this.counters,
      journalBytes: this.journalSize,
      spaces,
      disk: { ...this.disk },
    };
  }

  /** Makes every put that has resolved (and every markBooted) durable. */
  async flush(): Promise<void> {
    this.checkOpen();
    if (this.failed) throw this.failed;
    await this.commitQueuedRecords();
  }

  /**
   * Maintenance: rewrites the index as a snapshot (temp file, fsync, rename)
   * and starts an empty journal. Also runs by itself when the journal grows.
   */
  async compact(): Promise<void> {
    this.checkOpen();
    if (this.failed) throw this.failed;
    await this.exclusive(() => this.compactLocked());
  }

  /** Waits for operations in flight, makes everything durable and closes the files. */
  close(): Promise<void> {
    return this.closeFiles(false);
  }

  /**
   * For a start that failed: closes the cache and, when this open created its
   * directory, removes the cache again. The files go while the lock is still
   * held, then the directory only if it is empty, so a cache another process
   * opened meanwhile (or a directory that existed before) is never touched.
   */
  closeAndRemoveIfCreated(): Promise<void> {
    return this.closeFiles(this.createdDir);
  }

  private async closeFiles(remove: boolean): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.active > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    let error: unknown;
    if (!this.failed) await this.commitQueuedRecords().catch((err: unknown) => (error = err));
    await this.writerTail;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    await this.files.data.close().catch((err: unknown) => (error ??= err));
    await this.files.journal.close().catch((err: unknown) => (error ??= err));
    // Only while the lock is still ours: never the files of a cache another process has taken over.
    if (remove && !(await holdsLock(join(this.dir, FILES.lock)))) remove = false;
    if (remove) {
      await removeStaleTempFiles(this.dir);
      for (const name of [FILES.data, FILES.snapshot, FILES.journal]) await unlink(join(this.dir, name)).catch(() => undefined);
    }
    await releaseLock(join(this.dir, FILES.lock));
    if (remove) await rmdir(this.dir).catch(() => undefined);
    if (error !== undefined && !remove) throw fromSystemError(error, this.dir, 'closing the cache');
  }

  // --- puts and slots ---

  /** Reads a whole slot into buf (one pread; the file is sized, so short reads do not happen). */
  private readSlot(buf: Buffer, slot: number, done: ReadDone): void {
    this.readData(buf, 0, buf.length, slot * this.blockSize, done);
  }

  /**
   * One pread of the data file for hits: synchronous while reads come from
   * the page cache, else on the thread pool (see CacheDeviceOptions.syncReads).
   * `done` may run before this returns.
   */
  private readData(buf: Buffer, offset: number, length: number, position: number, done: ReadDone): void {
    const fd = this.files.data.fd;
    if (!this.syncReads || performance.now() < this.asyncReadsUntil) {
      read(fd, buf, offset, length, position, done);
      return;
    }
    const started = performance.now();
    let bytesRead: number;
    try {
      bytesRead = readSync(fd, buf, offset, length, position);
    } catch (err) {
      done(err as NodeJS.ErrnoException, 0);
      return;
    }
    const finished = performance.now();
    const excess = Math.min(SLOW_SYNC_READ_SAMPLE_CAP_MS, Math.max(0, finished - started - PAGE_CACHE_READ_MS(length)));
    this.syncReadExcessMs += (excess - this.syncReadExcessMs) * SLOW_SYNC_READ_WEIGHT;
    if (this.syncReadExcessMs > SLOW_SYNC_READ_MS) {
      this.counters.slowSyncReads++;
      this.syncReadExcessMs = 0;
      this.asyncReadsUntil = finished + ASYNC_AFTER_SLOW_READ_MS;
    }
    done(null, bytesRead);
  }

  private async putLocked(sp: Space, block: number, data: Buffer, crc: number, boot: boolean): Promise<void> {
    const index = this.index;
    const existing = sp.blocks.get(block);
    if (existing !== undefined && index.crcOf[existing] === crc && !(index.flags[existing] & SlotFlag.UNVERIFIED)) {
      // The same bytes again: no write; a boot put still marks it as a boot block.
      if (boot && !(index.flags[existing] & SlotFlag.BOOT)) {
        index.promoteToBoot(existing);
        this.pending.records.put(sp.id, block, existing, true, crc);
        this.kick(false);
      }
      index.touch(existing);
      return;
    }
    const epoch = sp.epoch;
    const slot = await this.allocateSlot();
    if (slot < 0) {
      this.counters.droppedPuts++;
      return;
    }
    const shrinks = this.shrinks;
    try {
      await pwriteAll(this.files.data.fd, data, slot * this.blockSize);
    } catch (err) {
      this.freeWritten(slot); // no record maps it: still free
      if (isNoSpace(err)) return this.noSpace(err, `writing cache slot ${slot}`, shrinks);
      throw fromSystemError(err, join(this.dir, FILES.data), `writing cache slot ${slot}`);
    }
    this.dataDirty = true;
    if (this.failed || sp.epoch !== epoch || slot >= this.usableSlots) {
      if (slot >= this.usableSlots) this.counters.droppedPuts++;
      this.freeWritten(slot);
      if (this.failed) throw this.failed;
      return;
    }
    const old = sp.blocks.get(block);
    if (old !== undefined) {
      boot ||= (index.flags[old] & SlotFlag.BOOT) !== 0;
      this.retire(old); // superseded by the put record below, free once it is durable
    }
    index.attach(slot, sp, block, boot, crc);
    this.pending.records.put(sp.id, block, slot, boot, crc);
    this.kick(false);
  }

  private async putManyLocked(sp: Space, blocks: number[], byBlock: Map<number, CacheEntry>, boot: boolean): Promise<void> {
    const index = this.index;
    const writes: { block: number; data: Buffer; crc: number; slot: number }[] = [];
    let touched = false;
    for (const block of blocks) {
      const { data, crc: given } = byBlock.get(block)!;
      const crc = given ?? crc32(data);
      const existing = sp.blocks.get(block);
      if (existing !== undefined && index.crcOf[existing] === crc && !(index.flags[existing] & SlotFlag.UNVERIFIED)) {
        // The same bytes again: as in putLocked, no write.
        if (boot && !(index.flags[existing] & SlotFlag.BOOT)) {
          index.promoteToBoot(existing);
          this.pending.records.put(sp.id, block, existing, true, crc);
          touched = true;
        }
        index.touch(existing);
        continue;
      }
      writes.push({ block, data, crc, slot: -1 });
    }
    if (touched) this.kick(false);
    if (writes.length === 0) return;
    const epoch = sp.epoch;
    const taken: typeof writes = [];
    try {
      for (const w of writes) {
        // Free slots are taken without yielding, so concurrent batches do not
        // interleave their slots and each batch stays readable with few preads (getRun).
        w.slot = this.takeFreeSlot();
        if (w.slot < 0) w.slot = await this.allocateSlot();
        if (w.slot < 0) this.counters.droppedPuts++;
        else taken.push(w);
      }
    } catch (err) {
      for (const w of taken) this.freeWritten(w.slot);
      throw err;
    }
    if (taken.length === 0) return;
    // One writev per run of consecutive slots (fresh slots come off the free stack in order).
    taken.sort((a, b) => a.slot - b.slot);
    const shrinks = this.shrinks;
    const runs: Promise<void>[] = [];
    for (let i = 0; i < taken.length; ) {
      let j = i + 1;
      while (j < taken.length && taken[j]!.slot === taken[j - 1]!.slot + 1) j++;
      const run = taken.slice(i, j).map((w) => w.data);
      runs.push(run.length === 1 ? pwriteAll(this.files.data.fd, run[0]!, taken[i]!.slot * this.blockSize) : writevAll(this.files.data, run, taken[i]!.slot * this.blockSize));
      i = j;
    }
    const results = await Promise.allSettled(runs);
    const failure = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failure) {
      for (const w of taken) this.freeWritten(w.slot); // no record maps them: still free
      if (isNoSpace(failure.reason)) return this.noSpace(failure.reason, `writing ${taken.length} cache slots`, shrinks);
      throw fromSystemError(failure.reason, join(this.dir, FILES.data), `writing ${taken.length} cache slots`);
    }
    this.dataDirty = true;
    if (this.failed || sp.epoch !== epoch) {
      for (const w of taken) this.freeWritten(w.slot);
      if (this.failed) throw this.failed;
      return;
    }
    // All records in one synchronous step: they join the same group commit, after the data fdatasync.
    for (const w of taken) {
      if (w.slot >= this.usableSlots) {
        // The cache shrank past it while it was written.
        this.freeWritten(w.slot);
        this.counters.droppedPuts++;
        continue;
      }
      let blockBoot = boot;
      const old = sp.blocks.get(w.block);
      if (old !== undefined) {
        blockBoot ||= (index.flags[old] & SlotFlag.BOOT) !== 0;
        this.retire(old);
      }
      index.attach(w.slot, sp, w.block, blockBoot, w.crc);
      this.pending.records.put(sp.id, w.block, w.slot, blockBoot, w.crc);
    }
    this.kick(false);
  }

  /**
   * A free slot (state WRITING), evicting when none is free; -1 when nothing
   * can be evicted because every slot is being written.
   */
  private async allocateSlot(): Promise<number> {
    for (let attempt = 0; attempt < 1000; attempt++) {
      if (this.failed) throw this.failed;
      const slot = this.takeFreeSlot();
      if (slot >= 0) return slot;
      // Evicted slots are reusable once their invalidation is durable.
      if (this.index.retired === 0 && !this.evictOne()) return -1;
      await this.commitQueuedRecords();
    }
    return -1;
  }

  /** A free slot (state WRITING) without waiting, topping up the reserve; -1 when none is free now. */
  private takeFreeSlot(): number {
    const slot = this.index.popFree();
    if (slot >= 0) this.evictAhead();
    return slot;
  }

  /** Keeps `reserve` slots free or freeing, so that puts rarely wait for a commit. */
  private evictAhead(): void {
    if (this.reserve === 0) return;
    const short = this.reserve - (this.index.freeCount + this.index.retired);
    if (short <= 0) return;
    for (let i = 0; i < short + this.reserve && this.evictOne(); i++);
    this.kick(false);
  }

  private evictOne(): boolean {
    const slot = this.index.victim();
    if (slot < 0) return false;
    this.retire(slot);
    this.pending.records.invalidate(slot);
    this.counters.evictions++;
    return true;
  }

  /** Takes a mapped slot out of the index; it is reused once the pending batch is durable. */
  private retire(slot: number): void {
    this.index.detach(slot);
    this.index.state[slot] = SlotState.RETIRED;
    this.index.retired++;
    this.pending.freed.push(slot);
  }

  private dropCorrupt(slot: number, sp: Space, block: number): void {
    if (this.index.state[slot] !== SlotState.LIVE || sp.blocks.get(block) !== slot) return;
    this.counters.checksumFailures++;
    this.log.warn(
      `${join(this.dir, FILES.data)}: cached block ${block} of space ${sp.hex} (slot ${slot}) fails its checksum; dropped`,
    );
    this.retire(slot);
    this.pending.records.invalidate(slot);
    this.kick(false);
  }

  private intern(hex: string): Space {
    const known = this.index.spaces.get(hex);
    if (known) return known;
    if (!isSpaceHex(hex)) {
      throw new AgentError(`cache: space ${JSON.stringify(hex.slice(0, 140))} is not a lowercase hex string of 1 to 128 digits`);
    }
    const sp = this.index.space(hex);
    this.pending.records.space(sp.id, hex);
    return sp;
  }

  // --- a full disk ---

  /** A slot a put took (WRITING) that no record maps goes back: to the free list, or out of use past a shrink. */
  private freeWritten(slot: number): void {
    if (slot < this.usableSlots) return this.index.pushFree(slot);
    this.index.state[slot] = SlotState.FREE;
    if (--this.writingAbove === 0) this.drained?.();
  }

  /**
   * A block write failed for lack of space: its blocks are dropped (the put
   * resolves; a later miss reads storage again) and the cache shrinks, once
   * for all the writes that failed before the shrink was done.
   */
  private async noSpace(err: unknown, doing: string, shrinksBefore: number, file: string = FILES.data): Promise<void> {
    this.counters.noSpaceWrites++;
    if (!this.shrinking && this.shrinks === shrinksBefore) {
      const reason = fromSystemError(err, join(this.dir, file), doing).message;
      this.shrinking = this.shrinkForSpace(reason).finally(() => {
        this.shrinking = undefined;
        this.shrinks++;
      });
    }
    await this.shrinking;
  }

  /**
   * Shrinks the cache to what the disk held minus a margin (shrunkSlots):
   * blocks in slots past the new end leave the index, and once no write to
   * those slots is in flight the data file is cut there, which frees their
   * disk blocks. Safe at any crash point: a durable record that still maps a
   * slot past the cut is dropped at load (the data file is too short for
   * it), and nothing writes past the cut any more. A compaction then writes
   * the new slot count into the index files. Never rejects.
   */
  private async shrinkForSpace(reason: string): Promise<void> {
    if (this.closed || this.failed) return;
    const from = this.usableSlots;
    const allocated = await this.files.data.stat().then((st) => st.blocks * 512, () => from * this.blockSize);
    const target = shrunkSlots(allocated, this.blockSize, from, MIN_SLOTS);
    if (target >= from) {
      if (!this.loggedAtMinimum) {
        this.loggedAtMinimum = true;
        this.log.warn(`cache ${this.dir}: the disk is full (${reason}) and the cache is at its smallest (${mib(from * this.blockSize)}); blocks that do not fit are not cached`);
      }
      return;
    }
    this.usableSlots = target;
    this.reserve = reserveFor(target);
    this.index.dropFreeFrom(target);
    let dropped = 0;
    for (let slot = target; slot < from; slot++) {
      const state = this.index.state[slot];
      if (state === SlotState.LIVE) {
        this.retire(slot);
        this.pending.records.invalidate(slot);
        dropped++;
      } else if (state === SlotState.WRITING) {
        this.writingAbove++;
      }
    }
    if (this.writingAbove > 0) await new Promise<void>((resolve) => (this.drained = resolve));
    this.drained = undefined;
    try {
      await this.files.data.truncate(target * this.blockSize);
    } catch (err) {
      this.fail(err, 'shrinking the cache data file');
      return;
    }
    this.kick(true);
    const room = await measureRoom(this.dir, [FILES.data, FILES.journal, FILES.snapshot]);
    if (room) this.disk.filesystem = room;
    this.disk.shrunk = { capacityBytes: target * this.blockSize, reason, at: new Date().toISOString(), times: (this.disk.shrunk?.times ?? 0) + 1 };
    this.log.warn(
      `cache ${this.dir}: the disk is full (${reason}); the cache now holds at most ${mib(target * this.blockSize)} ` +
        `(was ${mib(from * this.blockSize)}, configured ${mib(this.disk.configuredCapacityBytes)}), ${dropped} cached blocks past that dropped`,
    );
    if (!this.closed && !this.failed) {
      // Not awaited: a journal commit waiting for this shrink holds the lane the compaction needs.
      void this.exclusive(() => this.compactLocked()).catch((err: unknown) => this.log.warn(`cache compaction failed: ${(err as Error).message}`));
    }
  }

  // --- group commit ---

  /** Schedules a commit of the pending batch: soon (`now`), or after a short delay to gather companions. */
  private kick(now: boolean): void {
    if (this.pending.empty || this.commitQueued) return;
    if (now || this.pending.records.count >= COMMIT_MAX_RECORDS) {
      if (this.timer) clearTimeout(this.timer);
      this.timer = undefined;
      this.commitQueued = true;
      this.exclusive(() => this.commitPending()).catch(() => undefined); // failures reach waiters via the batch
    } else if (!this.timer) {
      this.timer = setTimeout(() => {
        this.timer = undefined;
        this.kick(true);
      }, COMMIT_DELAY_MS);
      this.timer.unref();
    }
  }

  /** Resolves when every record queued so far is durable. */
  private async commitQueuedRecords(): Promise<void> {
    const target = this.pending.empty ? this.inflight : this.pending;
    if (!target) return;
    if (target === this.pending) this.kick(true);
    await target.done;
  }

  private exclusive(task: () => Promise<void>): Promise<void> {
    const run = this.writerTail.then(task);
    this.writerTail = run.catch(() => undefined);
    return run;
  }

  private async commitPending(): Promise<void> {
    this.commitQueued = false;
    const batch = this.pending;
    if (batch.empty) return;
    this.pending = new Batch(this.salt);
    await this.commitBatch(batch);
    if (this.journalSize > COMPACT_MIN_JOURNAL + 2 * SNAPSHOT_BYTES_PER_ENTRY * this.index.mapped) {
      await this.compactLocked().catch((err: unknown) => this.log.warn(`cache compaction failed: ${(err as Error).message}`));
    }
  }

  /** One group commit: data fdatasync, journal append, journal fdatasync, then freed slots become reusable. */
  private async commitBatch(batch: Batch): Promise<void> {
    this.inflight = batch;
    try {
      if (this.failed) throw this.failed;
      if (this.dataDirty) {
        this.dataDirty = false;
        await this.files.data.datasync();
      }
      const bytes = batch.records.bytes;
      const records = batch.records.take();
      for (let attempt = 1; ; attempt++) {
        try {
          // Rewritten from the same offset on a retry: a partial append is overwritten.
          await writevAll(this.files.journal, records, this.journalSize);
          await this.files.journal.datasync();
          break;
        } catch (err) {
          // The blocks filled the disk before the journal could grow: shrinking the data file
          // frees room, then the append goes again, once.
          if (!isNoSpace(err) || attempt > 1) throw err;
          await this.noSpace(err, 'appending to the cache journal', this.shrinks, FILES.journal);
          if (this.failed) throw this.failed;
        }
      }
      this.journalSize += bytes;
    } catch (err) {
      const error = this.fail(err, 'committing the cache journal');
      batch.reject(error);
      this.pending.reject(error);
      return;
    } finally {
      this.inflight = undefined;
    }
    this.release(batch);
  }

  /** The batch is durable: its freed slots may be written again (those below usableSlots). */
  private release(batch: Batch): void {
    for (const slot of batch.freed) {
      this.index.retired--;
      if (slot < this.usableSlots) this.index.pushFree(slot);
      else this.index.state[slot] = SlotState.FREE;
    }
    batch.resolve();
  }

  /**
   * Writes the index as a new snapshot and starts a new journal (the epoch
   * goes up by one). Records queued before the capture are covered by the
   * snapshot and never appended; their batch completes with it. Runs inside
   * exclusive(). Serializing the index is synchronous (a few hundred ms per
   * million blocks: it is the consistent capture).
   */
  private async compactLocked(): Promise<void> {
    if (this.failed) throw this.failed;
    const epoch = (this.epoch + 1) >>> 0;
    const salt = randomSalt();
    // Capture the index and the records it covers in one synchronous step.
    const snapshot = encodeSnapshot(this.index, { blockSize: this.blockSize, slotCount: this.usableSlots, epoch });
    const covered = this.pending;
    this.pending = new Batch(salt);
    this.inflight = covered;
    let journal: FileHandle;
    try {
      // Every slot the snapshot maps was written before the capture: make those bytes durable first.
      this.dataDirty = false;
      await this.files.data.datasync();
      journal = await writeIndexFiles(this.dir, snapshot, { blockSize: this.blockSize, slotCount: this.usableSlots, epoch, salt });
    } catch (err) {
      const error = fromSystemError(err, this.dir, 'compacting the cache index');
      this.inflight = undefined;
      if ((await snapshotEpochOnDisk(this.dir)) !== this.epoch) {
        // The old journal no longer counts on disk: nothing can be committed safely any more.
        this.fail(error, 'compacting the cache index');
        covered.reject(error);
        this.pending.reject(error);
        throw error;
      }
      // The old snapshot and journal still rule: append the covered records there after all,
      // and what was queued since after them.
      this.pending.records.resalt(this.salt);
      await this.commitBatch(covered);
      this.kick(false);
      throw error;
    }
    const old = this.files.journal;
    this.files.journal = journal;
    this.journalSize = JOURNAL_HEADER_SIZE;
    this.epoch = epoch;
    this.salt = salt;
    this.inflight = undefined;
    await old.close().catch(() => undefined);
    this.release(covered);
    this.kick(false);
  }

  private fail(err: unknown, doing: string): BootcacheError {
    if (!this.failed) {
      this.failed = fromSystemError(err, this.dir, doing);
      this.log.warn(`${this.failed.message}; the cache is disabled until the agent restarts`);
    }
    return this.failed;
  }

  private checkOpen(): void {
    if (this.closed) throw this.closedError();
  }

  private closedError(): AgentError {
    return new AgentError(`cache ${this.dir} is closed`);
  }

  private opDone(): void {
    if (--this.active === 0 && this.idleWaiters.length > 0) {
      for (const wake of this.idleWaiters.splice(0)) wake();
    }
  }
}

// --- opening ---

const processWarnings: CacheLogger = {
  warn: (message) => process.emitWarning(message, { code: 'BC_CACHE' }),
};

/** Free slots kept ahead of demand for a cache of `slots` (see CacheDevice.reserve). */
function reserveFor(slots: number): number {
  return slots >= 1024 ? Math.min(1024, Math.floor(slots / 64)) : 0;
}

function checkBlockSize(bs: number): void {
  if (!Number.isInteger(bs) || bs < MIN_BLOCK_SIZE || bs > MAX_BLOCK_SIZE || (bs & (bs - 1)) !== 0) {
    throw new AgentError(`cache block size ${bs} is not a power of two from ${MIN_BLOCK_SIZE} to ${MAX_BLOCK_SIZE}`);
  }
}

function slotsFor(capacityBytes: number, blockSize: number): number {
  const slots = Math.floor(capacityBytes / blockSize);
  if (slots < MIN_SLOTS) {
    throw new AgentError(
      `cache size ${capacityBytes} bytes is too small: it must hold at least ${MIN_SLOTS} blocks of ${blockSize} bytes (${MIN_SLOTS * blockSize} bytes)`,
    );
  }
  if (slots > MAX_SLOTS) {
    throw new AgentError(
      `cache size ${capacityBytes} bytes is too large for ${blockSize}-byte blocks (at most ${MAX_SLOTS} blocks); use a larger block size`,
    );
  }
  return slots;
}

/** Checks or creates the cache directory; true when this call created it (its own mkdir succeeded). */
async function prepareDir(dir: string): Promise<boolean> {
  try {
    const st = await stat(dir).catch((err: unknown) => {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    });
    if (st && !st.isDirectory()) throw new AgentError(`cache directory ${dir} exists and is not a directory`);
    return st ? false : await makeDir(dir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTDIR' || code === 'ENOENT') {
      throw new AgentError(`cache directory ${dir} cannot be created (${code}: a parent is missing or not a directory)`, { cause: err });
    }
    throw fromSystemError(err, dir, 'creating the cache directory');
  }
}

/**
 * mkdir -p. Not fs.mkdir's recursive mode: that loops forever where mkdir
 * fails with ENOENT under an existing parent (e.g. in /proc).
 */
async function makeDir(dir: string): Promise<boolean> {
  try {
    await mkdir(dir);
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') return false;
    const parent = dirname(dir);
    if (code !== 'ENOENT' || parent === dir) throw err;
    await makeDir(parent);
    // "a/missing/../b" names a directory that may exist once "a/missing" does: created only if this mkdir succeeds.
    return mkdir(dir).then(() => true, (again: unknown) => {
      if ((again as NodeJS.ErrnoException).code !== 'EEXIST') throw again;
      return false;
    });
  }
}

function randomSalt(): number {
  return randomInt(0, 0xffffffff);
}

interface Loaded {
  blockSize: number;
  slotCount: number;
  files: Files;
  persisted: Persisted;
}

/**
 * Reads snapshot, journal and data file; anything damaged beyond what a
 * crash leaves behind is recovered by starting empty (or, when the journal
 * alone is damaged, by checking blocks before serving them) with a warning.
 */
async function loadPersisted(dir: string, requested: number | undefined, capacity: number, log: CacheLogger): Promise<Loaded> {
  const snapPath = join(dir, FILES.snapshot);
  const journalPath = join(dir, FILES.journal);
  const dataPath = join(dir, FILES.data);
  const startEmpty = async (blockSize: number, why?: string): Promise<Loaded> => {
    if (why) log.warn(`${why}; starting with an empty cache`);
    const slotCount = slotsFor(capacity, blockSize);
    return { blockSize, slotCount, ...(await initialize(dir, blockSize, slotCount)) };
  };

  const snapBuf = await readIfExists(snapPath, 'reading the cache snapshot');
  if (!snapBuf) {
    const leftovers = (await readIfExists(journalPath, 'reading the cache journal')) !== undefined;
    return startEmpty(requested ?? DEFAULT_BLOCK_SIZE, leftovers ? `${snapPath}: missing` : undefined);
  }
  const header = decodeSnapshotHeader(snapBuf);
  if (typeof header === 'string') return startEmpty(requested ?? DEFAULT_BLOCK_SIZE, `${snapPath}: ${header}`);
  const blockSize = header.blockSize;
  if (requested !== undefined && requested !== blockSize) {
    throw new AgentError(
      `cache directory ${dir} holds ${blockSize}-byte blocks, not ${requested}: use block size ${blockSize} or another (or emptied) cache directory`,
    );
  }
  try {
    checkBlockSize(blockSize);
  } catch {
    return startEmpty(DEFAULT_BLOCK_SIZE, `${snapPath}: block size ${blockSize} is invalid`);
  }
  if (header.slotCount < MIN_SLOTS || header.slotCount > MAX_SLOTS) {
    return startEmpty(blockSize, `${snapPath}: slot count ${header.slotCount} is invalid`);
  }
  const slotCount = slotsFor(capacity, blockSize);
  const dataSize = await stat(dataPath).then(
    (st) => (st.isFile() ? st.size : -1),
    (err: unknown) => {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return -1;
      throw fromSystemError(err, dataPath, 'checking the cache data file');
    },
  );
  if (dataSize < 0) return startEmpty(blockSize, `${dataPath}: missing`);
  // Shorter than the index's slots: cut when a full disk shrank the cache, and the crash came before the
  // compaction that records it. Blocks in slots past its end are gone; the others are intact.
  const dataSlots = Math.floor(dataSize / blockSize);
  if (dataSlots < header.slotCount) {
    log.warn(`${dataPath}: ${dataSize} bytes, shorter than the ${header.slotCount * blockSize} the index needs; the blocks past its end are dropped`);
  }

  const index = new SlotIndex(Math.max(header.slotCount, slotCount));
  const usable = Math.min(header.slotCount, slotCount, dataSlots);
  const snapError = loadSnapshot(snapBuf, header, index, usable);
  if (snapError) return startEmpty(blockSize, `${snapPath}: ${snapError}`);

  let rewrite = slotCount !== header.slotCount || dataSlots < header.slotCount;
  let suspect = false;
  let journalSize = JOURNAL_HEADER_SIZE;
  let salt = 0;
  const journalBuf = await readIfExists(journalPath, 'reading the cache journal');
  const jh = journalBuf ? decodeJournalHeader(journalBuf) : 'missing';
  if (!journalBuf || typeof jh === 'string') {
    if (journalBuf) return startEmpty(blockSize, `${journalPath}: ${jh}`);
    if (index.mapped > 0) {
      log.warn(`${journalPath}: missing; cached blocks will be checked against their checksums before use`);
      suspect = true;
    }
    rewrite = true;
  } else if (jh.blockSize !== blockSize || jh.slotCount !== header.slotCount) {
    return startEmpty(blockSize, `${journalPath}: block size or slot count differ from the snapshot's`);
  } else if (jh.epoch === ((header.epoch - 1) >>> 0)) {
    // Left by a compaction interrupted after the new snapshot was in place: the snapshot covers it.
    rewrite = true;
  } else if (jh.epoch !== header.epoch) {
    log.warn(
      `${journalPath}: epoch ${jh.epoch} does not follow snapshot epoch ${header.epoch}; ignored, and cached blocks will be checked before use`,
    );
    suspect = rewrite = true;
  } else {
    salt = jh.salt;
    const scan = scanJournal(journalBuf, salt, (rec) => replay(index, rec, header.slotCount, usable));
    journalSize = scan.validEnd;
    if (scan.damagedInMiddle || scan.rejected > 0) {
      log.warn(
        `${journalPath}: ${scan.damagedBytes} damaged bytes and ${scan.rejected} inconsistent records; ` +
          'cached blocks will be checked against their checksums before use',
      );
      suspect = rewrite = true;
    } else if (scan.damagedBytes > 0) {
      log.info?.(`${journalPath}: dropped a torn tail of ${scan.damagedBytes} bytes (an interrupted write)`);
    }
  }
  if (suspect) for (let slot = 0; slot < usable; slot++) index.flags[slot] |= SlotFlag.UNVERIFIED;

  const data = await open(dataPath, constants.O_RDWR);
  let journal: FileHandle | undefined;
  try {
    let epoch = header.epoch;
    if (rewrite) {
      // A new snapshot of what was loaded, with the new size, and an empty journal; the data file
      // grows only after it, so no durable record maps a slot the growth fills with zeros.
      epoch = (epoch + 1) >>> 0;
      salt = randomSalt();
      journalSize = JOURNAL_HEADER_SIZE;
      const snapshot = encodeSnapshot(index, { blockSize, slotCount, epoch });
      journal = await writeIndexFiles(dir, snapshot, { blockSize, slotCount, epoch, salt });
    } else {
      journal = await open(journalPath, constants.O_RDWR);
      if (journalSize < (journalBuf?.length ?? 0)) {
        await journal.truncate(journalSize);
        await journal.sync();
      }
    }
    // A data file longer than the index's slots (an interrupted resize) is cut back; a shorter one grows (sparse).
    if ((await data.stat()).size !== slotCount * blockSize) {
      await data.truncate(slotCount * blockSize);
      await data.sync();
    }
    return {
      blockSize,
      slotCount,
      files: { data, journal },
      persisted: { index, epoch, salt, journalSize },
    };
  } catch (err) {
    await journal?.close().catch(() => undefined);
    await data.close().catch(() => undefined);
    throw err;
  }
}

/**
 * Writes a snapshot of the index for `epoch`, then an empty journal of the
 * same epoch (each atomically: temp file, fsync, rename, directory fsync),
 * and returns the journal opened for appending. A crash between the two
 * leaves the journal of the previous epoch, which loading recognises as
 * covered by the snapshot.
 */
async function writeIndexFiles(dir: string, snapshot: Buffer[], journalHeader: JournalHeader): Promise<FileHandle> {
  await writeFileAtomic(join(dir, FILES.snapshot), snapshot);
  const journalPath = join(dir, FILES.journal);
  await writeFileAtomic(journalPath, [encodeJournalHeader(journalHeader)]);
  return open(journalPath, constants.O_RDWR);
}

/** The epoch of the snapshot on disk; undefined when it cannot be read (treated as changed). */
async function snapshotEpochOnDisk(dir: string): Promise<number | undefined> {
  const head = await readHead(join(dir, FILES.snapshot), SNAPSHOT_HEADER_SIZE + 4).catch(() => undefined);
  const header = head ? decodeSnapshotHeader(head) : undefined;
  return typeof header === 'object' ? header.epoch : undefined;
}

/** Removes temp files a crash left behind while replacing the snapshot or the journal. */
async function removeStaleTempFiles(dir: string): Promise<void> {
  const names = await readdir(dir).catch(() => [] as string[]);
  const ours = names.filter((n) => isTempName(n) && (n.startsWith(`.${FILES.snapshot}.`) || n.startsWith(`.${FILES.journal}.`)));
  await Promise.all(ours.map((n) => unlink(join(dir, n)).catch(() => undefined)));
}

/** Applies one journal record to the index; false when it does not fit (it is then ignored). */
function replay(index: SlotIndex, rec: JournalRecord, slotCount: number, usable: number): boolean {
  switch (rec.type) {
    case RecordType.SPACE: {
      const byId = index.spacesById[rec.spaceId];
      if (byId) return byId.hex === rec.hex;
      if (!isSpaceHex(rec.hex) || index.spaces.has(rec.hex) || rec.spaceId > 0xffffff) return false;
      index.space(rec.hex, rec.spaceId);
      return true;
    }
    case RecordType.PUT: {
      const sp = index.spacesById[rec.spaceId];
      if (!sp || rec.slot >= slotCount || !Number.isSafeInteger(rec.block)) return false;
      const current = sp.blocks.get(rec.block);
      if (current !== undefined) unmap(index, current);
      if (rec.slot >= usable) return true; // the cache shrank: the block is gone
      if (index.state[rec.slot] === SlotState.LIVE) unmap(index, rec.slot);
      index.attach(rec.slot, sp, rec.block, (rec.flags & PUT_FLAG_BOOT) !== 0, rec.crc);
      return true;
    }
    case RecordType.INVALIDATE:
      if (rec.slot >= slotCount) return false;
      if (rec.slot < usable && index.state[rec.slot] === SlotState.LIVE) unmap(index, rec.slot);
      return true;
    case RecordType.BOOTED: {
      const sp = index.spacesById[rec.spaceId];
      if (!sp || !Number.isFinite(rec.time)) return false;
      index.markBooted(sp, rec.time);
      return true;
    }
    case RecordType.DROP_SPACE: {
      const sp = index.spacesById[rec.spaceId];
      if (!sp) return false;
      for (const slot of [...sp.blocks.values()]) unmap(index, slot);
      return true;
    }
    default:
      return false;
  }
}

function unmap(index: SlotIndex, slot: number): void {
  index.detach(slot);
  index.state[slot] = SlotState.FREE;
}

/**
 * Creates an empty cache, replacing whatever is there. Order matters: an
 * empty snapshot first (from then on nothing old is trusted; its epoch
 * differs from any journal left behind, so that journal never replays), then
 * the data file is emptied, then the new journal is written. A crash at any
 * point leaves an empty cache or a damaged one that starts empty again.
 */
async function initialize(dir: string, blockSize: number, slotCount: number): Promise<{ files: Files; persisted: Persisted }> {
  const dataPath = join(dir, FILES.data);
  const journalPath = join(dir, FILES.journal);
  const st = await stat(dataPath).catch(() => undefined);
  if (st && !st.isFile()) throw new StorageIOError('cache data file is not a regular file', { file: dataPath });
  const old = await readHead(journalPath, JOURNAL_HEADER_SIZE);
  const oldHeader = old ? decodeJournalHeader(old) : undefined;
  const epoch = typeof oldHeader === 'object' && oldHeader.epoch === 1 ? 2 : 1;
  const salt = randomSalt();
  const index = new SlotIndex(slotCount);
  let data: FileHandle | undefined;
  try {
    await writeFileAtomic(join(dir, FILES.snapshot), encodeSnapshot(index, { blockSize, slotCount, epoch }));
    data = await open(dataPath, constants.O_RDWR | constants.O_CREAT, 0o644);
    await data.truncate(0); // frees the old blocks
    await data.truncate(slotCount * blockSize); // sparse: takes no space until written
    await data.sync();
    await writeFileAtomic(journalPath, [encodeJournalHeader({ blockSize, slotCount, epoch, salt })]);
    const journal = await open(journalPath, constants.O_RDWR);
    return { files: { data, journal }, persisted: { index, epoch, salt, journalSize: JOURNAL_HEADER_SIZE } };
  } catch (err) {
    await data?.close().catch(() => undefined);
    throw fromSystemError(err, dir, 'creating the cache');
  }
}
