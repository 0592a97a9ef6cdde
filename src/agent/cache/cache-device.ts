/**
 * The agent's local cache device: blocks of images (read from storage, or
 * streamed in by the prefetcher from a boot segment) kept on local disk so
 * that later reads are local. This module is the facade (the public API,
 * open and close); the parts share one CacheState (cache-state.ts):
 *   recovery.ts      the directory, and the index rebuilt on open;
 *   hit-reader.ts    cached blocks served, CRC-checked;
 *   block-writer.ts  the write path (put is putMany of one);
 *   reclaim.ts       free slots, eviction, the shrink when the disk fills;
 *   group-commit.ts  journal appends in group commits, and compaction.
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
 *
 * Concurrency, the one rule for every part: the index and the pending
 * records change only in synchronous code, never across an await, so no
 * change is seen half done and no lock guards them. Code that awaits checks
 * again afterwards what may have changed meanwhile: a read its slot's
 * generation (reused: read again), a write its space's epoch (invalidated:
 * dropped) and usableSlots (shrunk past: dropped), and both `failed`. Two
 * things are serialized: puts of one key (Space.writers, taken in ascending
 * block order), and commits with compactions (GroupCommit's lane).
 */
import { unlink, rmdir } from 'node:fs/promises';
import { join } from 'node:path';
import { AgentError, fromSystemError } from '../../errors.js';
import type { BlockCache, CacheBlockKind, CacheEntry } from '../block-cache.js';
import { BlockWriter } from './block-writer.js';
import { FILES, SPACE_FILES, checkBlockSize, removeStaleTempFiles, type Files } from './cache-files.js';
import { CacheState, type CacheCounters, type CacheLogger } from './cache-state.js';
import { acquireLock, holdsLock, releaseLock } from './dir-lock.js';
import { measureRoom, roomWarning } from './disk-space.js';
import { GroupCommit } from './group-commit.js';
import { HitReader } from './hit-reader.js';
import { Reclaimer, type CacheDiskStats } from './reclaim.js';
import { prepareDir, recover, type Recovered } from './recovery.js';

export type { CacheBlockKind, CacheEntry } from '../block-cache.js';
export type { CacheCounters, CacheLogger } from './cache-state.js';
export type { CacheDiskStats } from './reclaim.js';
export { DEFAULT_BLOCK_SIZE, MAX_SLOTS, MIN_SLOTS } from './cache-files.js';

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
   * true): a page-cache pread costs far less than a thread-pool round trip
   * (docs/benchmarks-agent.md). When they turn slow (disk reads) hits go to
   * the thread pool for a second, so a cold or slow cache disk never stalls
   * the event loop for long.
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

export interface CacheStats extends CacheCounters {
  blockSize: number;
  /** The data file size: slots × blockSize (the configured capacity, less after a full disk shrank the cache). */
  capacityBytes: number;
  usedBytes: number;
  blocks: number;
  bootBlocks: number;
  journalBytes: number;
  spaces: CacheSpaceStats[];
  disk: CacheDiskStats;
}

const processWarnings: CacheLogger = {
  warn: (message) => process.emitWarning(message, { code: 'BC_CACHE' }),
};

export class CacheDevice implements BlockCache {
  private readonly state: CacheState;
  private readonly files: Files;
  private readonly commit: GroupCommit;
  private readonly reclaim: Reclaimer;
  private readonly reader: HitReader;
  private readonly writer: BlockWriter;
  /** This open created the cache directory (see closeAndRemoveIfCreated). */
  private createdDir = false;

  private constructor(
    readonly dir: string,
    readonly blockSize: number,
    found: Recovered,
    verifyReads: boolean,
    syncReads: boolean,
    log: CacheLogger,
  ) {
    this.files = found.files;
    this.state = new CacheState(dir, blockSize, found.index, found.files, log, found.slotCount);
    this.commit = new GroupCommit(this.state, found.position, (err) => this.reclaim.journalFull(err));
    this.reclaim = new Reclaimer(this.state, this.commit);
    this.reader = new HitReader(this.state, this.commit, verifyReads, syncReads);
    this.writer = new BlockWriter(this.state, this.commit, this.reclaim);
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
    let found: Recovered;
    try {
      found = await recover(dir, requested, cap, log);
    } catch (err) {
      await releaseLock(lockPath);
      throw fromSystemError(err, dir, 'opening the cache');
    }
    const device = new CacheDevice(dir, found.blockSize, found, options.verifyReads ?? true, options.syncReads ?? true, log);
    device.createdDir = created;
    const disk = device.reclaim.disk;
    const room = await measureRoom(dir, SPACE_FILES);
    if (room) {
      disk.filesystem = room;
      const warning = roomWarning(dir, room, disk.configuredCapacityBytes);
      if (warning) {
        disk.warning = warning;
        log.warn(warning);
      }
    }
    return device;
  }

  /** True when (space, block) is cached (a get may still miss if it is evicted meanwhile). */
  has(space: string, block: number): boolean {
    if (this.state.closed || this.state.failed) return false;
    return this.state.index.lookup(space, block) >= 0;
  }

  /**
   * The bytes put for (space, block), or undefined on a miss. With `into`
   * (exactly blockSize bytes) the block is read there and `into` returned;
   * on a miss its contents are unspecified.
   */
  get(space: string, block: number, into?: Buffer): Promise<Buffer | undefined> {
    if (this.state.closed) return Promise.reject(this.closedError());
    if (into !== undefined && into.length !== this.blockSize) {
      return Promise.reject(new AgentError(`cache get: target buffer is ${into.length} bytes, not the block size ${this.blockSize}`));
    }
    return this.reader.get(space, block, into);
  }

  /**
   * Cached blocks [first, first + count) of `space` read into `into`
   * (count × blockSize bytes), block k at k × blockSize. Resolves to which
   * blocks were served (read and checked); the others' bytes in `into` are
   * unspecified. Blocks in consecutive slots are read with one pread per run.
   */
  getRun(space: string, first: number, count: number, into: Buffer): Promise<boolean[]> {
    if (this.state.closed) return Promise.reject(this.closedError());
    if (into.length !== count * this.blockSize) {
      return Promise.reject(new AgentError(`cache getRun: target buffer is ${into.length} bytes, not ${count} blocks of ${this.blockSize}`));
    }
    return this.reader.getRun(space, first, count, into);
  }

  /**
   * Stores `data` (exactly blockSize bytes, not modified until the promise
   * settles) as (space, block). Resolves once the bytes are in the data
   * file and the index; durable after the next group commit (or flush()).
   * A later put of the same key replaces it; a 'boot' put marks the block
   * as a boot block of its space.
   */
  put(space: string, block: number, data: Buffer, kind: CacheBlockKind): Promise<void> {
    return this.putMany(space, [{ block, data }], kind);
  }

  /**
   * put() for many blocks of one space at once (the prefetcher's chunks):
   * slots are allocated together, each run of consecutive slots is written
   * with one writev, and the records join one group commit. Same ordering
   * rules and resolution as put(); a block listed twice keeps its last data.
   */
  async putMany(space: string, entries: readonly CacheEntry[], kind: CacheBlockKind): Promise<void> {
    this.checkWorking();
    await this.writer.putMany(space, entries, kind);
  }

  /** An image whose blocks live in `space` booted now: its boot blocks are evicted last. */
  markBooted(space: string): void {
    this.checkOpen();
    if (this.state.failed) return;
    const sp = this.writer.intern(space);
    const now = Date.now();
    this.state.index.markBooted(sp, now);
    this.commit.records.booted(sp.id, now);
    this.commit.kick(false);
  }

  /** Drops every block of `space`; resolves when that is durable. Puts in flight for it are discarded. */
  async invalidateSpace(space: string): Promise<void> {
    this.checkWorking();
    const sp = this.state.index.spaces.get(space);
    if (!sp) return;
    sp.epoch++;
    for (const slot of [...sp.blocks.values()]) this.commit.retire(slot);
    this.commit.records.dropSpace(sp.id);
    await this.commit.durable();
  }

  stats(): CacheStats {
    const { index } = this.state;
    const spaces: CacheSpaceStats[] = [];
    for (const sp of index.spacesById) {
      if (!sp || (sp.blocks.size === 0 && sp.lastBootedAt === undefined)) continue;
      const entry: CacheSpaceStats = { space: sp.hex, blocks: sp.blocks.size, bootBlocks: sp.boot.size };
      if (sp.lastBootedAt !== undefined) entry.lastBootedAt = sp.lastBootedAt;
      spaces.push(entry);
    }
    return {
      blockSize: this.blockSize,
      capacityBytes: this.state.usableSlots * this.blockSize,
      usedBytes: index.mapped * this.blockSize,
      blocks: index.mapped,
      bootBlocks: index.bootMapped,
      ...this.state.counters,
      journalBytes: this.commit.journalBytes,
      spaces,
      disk: { ...this.reclaim.disk },
    };
  }

  /** Makes every put that has resolved (and every markBooted) durable. */
  async flush(): Promise<void> {
    this.checkWorking();
    await this.commit.durable();
  }

  /**
   * Maintenance: rewrites the index as a snapshot (temp file, fsync, rename)
   * and starts an empty journal. Also runs by itself when the journal grows.
   */
  async compact(): Promise<void> {
    this.checkWorking();
    await this.commit.compact();
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
    const { state } = this;
    if (state.closed) return;
    state.closed = true;
    await state.idle();
    let error: unknown;
    if (!state.failed) await this.commit.durable().catch((err: unknown) => (error = err));
    await this.commit.stop();
    await this.files.data.close().catch((err: unknown) => (error ??= err));
    await this.files.journal.close().catch((err: unknown) => (error ??= err));
    // Only while the lock is still ours: never the files of a cache another process has taken over.
    if (remove && !(await holdsLock(join(this.dir, FILES.lock)))) remove = false;
    if (remove) {
      await removeStaleTempFiles(this.dir);
      for (const name of SPACE_FILES) await unlink(join(this.dir, name)).catch(() => undefined);
    }
    await releaseLock(join(this.dir, FILES.lock));
    if (remove) await rmdir(this.dir).catch(() => undefined);
    if (error !== undefined && !remove) throw fromSystemError(error, this.dir, 'closing the cache');
  }

  private checkOpen(): void {
    if (this.state.closed) throw this.closedError();
  }

  /** Open and not disabled by a failure. */
  private checkWorking(): void {
    this.checkOpen();
    if (this.state.failed) throw this.state.failed;
  }

  private closedError(): AgentError {
    return new AgentError(`cache ${this.dir} is closed`);
  }
}
