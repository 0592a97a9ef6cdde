/**
 * What every part of the cache device shares: the directory, the open
 * files, the in-memory index, the counters, and whether the device still
 * works. The parts (hit-reader, block-writer, reclaim, group-commit) hold
 * one of these; the facade (cache-device.ts) states the rules for using it.
 */
import { join } from 'node:path';
import { fromSystemError, type BootcacheError } from '../../errors.js';
import { FILES, type Files } from './cache-files.js';
import { SlotState, type SlotIndex } from './slot-index.js';

/** Where the cache reports what it recovered from (pino's logger fits). */
export interface CacheLogger {
  warn(message: string): void;
  info?(message: string): void;
}

/** What the device counts (part of CacheStats). */
export interface CacheCounters {
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
}

export class CacheState {
  /** Set by the first failure that makes the index files untrustworthy: every operation then misses or throws it. */
  failed: BootcacheError | undefined;
  closed = false;
  readonly counters: CacheCounters = { hits: 0, misses: 0, evictions: 0, checksumFailures: 0, droppedPuts: 0, noSpaceWrites: 0, slowSyncReads: 0 };
  /** Slots in use: the slot count, fewer once a full disk shrank the cache; the data file is this long. */
  usableSlots: number;
  private active = 0;
  private idleWaiters: (() => void)[] = [];

  constructor(
    readonly dir: string,
    readonly blockSize: number,
    readonly index: SlotIndex,
    readonly files: Files,
    readonly log: CacheLogger,
    slotCount: number,
  ) {
    this.usableSlots = slotCount;
  }

  get dataPath(): string {
    return join(this.dir, FILES.data);
  }

  /** Disables the device (once) and returns the error every later operation reports. */
  fail(err: unknown, doing: string): BootcacheError {
    if (!this.failed) {
      this.failed = fromSystemError(err, this.dir, doing);
      this.log.warn(`${this.failed.message}; the cache is disabled until the agent restarts`);
    }
    return this.failed;
  }

  /** A slot that no record maps becomes free: writable below usableSlots, out of use past a shrink. */
  freeSlot(slot: number): void {
    if (slot < this.usableSlots) this.index.pushFree(slot);
    else this.index.state[slot] = SlotState.FREE;
  }

  /** Counts a get or put in flight, so that close waits for it. */
  opBegin(): void {
    this.active++;
  }

  opEnd(): void {
    if (--this.active === 0 && this.idleWaiters.length > 0) {
      for (const wake of this.idleWaiters.splice(0)) wake();
    }
  }

  /** Resolves once no get or put is in flight. */
  async idle(): Promise<void> {
    if (this.active > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
  }
}
