/**
 * Cache hits: a lookup and one positional read of the data file per block
 * (per run of consecutive slots for getRun), each block checked against its
 * CRC-32 before it is served. Written with callbacks: one promise per get.
 */
import { read, readSync } from 'node:fs';
import { crc32 } from 'node:zlib';
import { StorageIOError, fromSystemError } from '../../errors.js';
import type { CacheState } from './cache-state.js';
import type { GroupCommit } from './group-commit.js';
import { SlotFlag, SlotState, type Space } from './slot-index.js';

type ReadDone = (err: NodeJS.ErrnoException | null, bytesRead: number) => void;
/** Reads a whole slot into buf; `done` may run before it returns. */
type SlotRead = (buf: Buffer, slot: number, done: ReadDone) => void;

const MISS: Promise<undefined> = Promise.resolve(undefined);
/**
 * Synchronous hit reads are judged by their time beyond what a page-cache
 * copy takes (generous for a copy from memory). A moving average of that
 * excess, each sample capped and weighted 1/8, above SLOW_SYNC_READ_MS means
 * the reads come from the disk (three slow reads in a row): hits then go
 * through the thread pool for ASYNC_AFTER_SLOW_READ_MS. One or two outliers
 * (a preempted vCPU) do not count. The figures behind these constants are
 * in docs/benchmarks-agent.md.
 */
const PAGE_CACHE_READ_MS = (bytes: number): number => 0.05 + bytes / 1048576;
const SLOW_SYNC_READ_MS = 0.5;
const SLOW_SYNC_READ_WEIGHT = 1 / 8;
const SLOW_SYNC_READ_SAMPLE_CAP_MS = 2;
const ASYNC_AFTER_SLOW_READ_MS = 1000;
/** A get whose slot was reused while it read this many times in a row gives up (a miss). */
const MAX_READ_ATTEMPTS = 3;

export class HitReader {
  /** Until then (performance.now()), hits are read through the thread pool. */
  private asyncReadsUntil = 0;
  /** Moving average of synchronous hit reads' time beyond a page-cache copy, ms. */
  private syncReadExcessMs = 0;

  /** One whole-slot read for get(); replaceable, so that a test can hold a read while the slot is reused. */
  readSlot: SlotRead = (buf, slot, done) => this.readData(buf, 0, buf.length, slot * this.state.blockSize, done);

  constructor(
    private readonly state: CacheState,
    private readonly commit: GroupCommit,
    private readonly verifyReads: boolean,
    private readonly syncReads: boolean,
  ) {}

  /** The block into `buf` (blockSize bytes, allocated when absent), or undefined on a miss. */
  get(space: string, block: number, buf?: Buffer): Promise<Buffer | undefined> {
    const sp = this.state.index.spaces.get(space);
    if (this.state.failed || sp === undefined) {
      this.state.counters.misses++;
      return MISS;
    }
    const into = buf ?? Buffer.allocUnsafe(this.state.blockSize);
    this.state.opBegin();
    return new Promise((resolve) => this.readAttempt(sp, block, into, 0, resolve));
  }

  /**
   * Blocks [first, first + count) into `into`, block k at k × blockSize;
   * resolves to which were served. A run of blocks in consecutive slots (the
   * prefetcher and miss batches allocate them in block order) is one pread.
   */
  getRun(space: string, first: number, count: number, into: Buffer): Promise<boolean[]> {
    const { state } = this;
    const bs = state.blockSize;
    const served = new Array<boolean>(count).fill(false);
    const sp = state.index.spaces.get(space);
    if (state.failed || sp === undefined) {
      state.counters.misses += count;
      return Promise.resolve(served);
    }
    const index = state.index;
    state.opBegin();
    return new Promise((resolve) => {
      let outstanding = 1;
      const settle = (): void => {
        if (--outstanding > 0) return;
        state.opEnd();
        resolve(served);
      };
      // A block whose run read went wrong takes the single-block path (retries, logging, corrupt-drop).
      const single = (k: number): void => {
        outstanding++;
        state.opBegin();
        this.readAttempt(sp, first + k, into.subarray(k * bs, (k + 1) * bs), 0, (result) => {
          served[k] = result !== undefined;
          settle();
        });
      };
      for (let k = 0; k < count; ) {
        const slot = sp.blocks.get(first + k);
        if (slot === undefined) {
          state.counters.misses++;
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
            // Reused while being read, or a failed or short read: that block goes the single way.
            if (err || bytesRead < (i + 1) * bs || state.failed || index.generation[s] !== generations[i]) {
              single(start + i);
              continue;
            }
            if (!this.verified(s, sp, first + start + i, into.subarray((start + i) * bs, (start + i + 1) * bs))) {
              state.counters.misses++;
              continue;
            }
            state.counters.hits++;
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
    const index = this.state.index;
    const slot = attempt < MAX_READ_ATTEMPTS ? sp.blocks.get(block) : undefined;
    if (slot === undefined) return this.endGet(undefined, done);
    const generation = index.generation[slot];
    index.touch(slot);
    this.readSlot(buf, slot, (err, bytesRead) => {
      if (err || bytesRead !== buf.length) {
        // A failing local disk must not fail the guest's read: it is served from storage instead.
        const why = err ?? new StorageIOError(`short read (${bytesRead} bytes) of slot ${slot}`);
        this.state.log.warn(fromSystemError(why, this.state.dataPath, 'reading a cached block').message);
        return this.endGet(undefined, done);
      }
      if (this.state.failed) return this.endGet(undefined, done);
      if (index.generation[slot] !== generation) return this.readAttempt(sp, block, buf, attempt + 1, done);
      this.endGet(this.verified(slot, sp, block, buf) ? buf : undefined, done);
    });
  }

  private endGet(result: Buffer | undefined, done: (result: Buffer | undefined) => void): void {
    if (result) this.state.counters.hits++;
    else this.state.counters.misses++;
    this.state.opEnd();
    done(result);
  }

  /**
   * True when the bytes read from `slot` may be served: checked against the
   * block's CRC-32 when reads are verified or the slot is suspect (then no
   * longer suspect); a block that fails is dropped.
   */
  private verified(slot: number, sp: Space, block: number, data: Buffer): boolean {
    const index = this.state.index;
    if (!this.verifyReads && !(index.flags[slot]! & SlotFlag.UNVERIFIED)) return true;
    if (crc32(data) !== index.crcOf[slot]) {
      this.dropCorrupt(slot, sp, block);
      return false;
    }
    index.flags[slot]! &= ~SlotFlag.UNVERIFIED;
    return true;
  }

  private dropCorrupt(slot: number, sp: Space, block: number): void {
    const { state } = this;
    if (state.index.state[slot] !== SlotState.LIVE || sp.blocks.get(block) !== slot) return;
    state.counters.checksumFailures++;
    state.log.warn(`${state.dataPath}: cached block ${block} of space ${sp.hex} (slot ${slot}) fails its checksum; dropped`);
    this.commit.invalidate(slot);
    this.commit.kick(false);
  }

  /**
   * One pread of the data file: synchronous while reads come from the page
   * cache, else on the thread pool. `done` may run before this returns.
   */
  private readData(buf: Buffer, offset: number, length: number, position: number, done: ReadDone): void {
    const fd = this.state.files.data.fd;
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
      this.state.counters.slowSyncReads++;
      this.syncReadExcessMs = 0;
      this.asyncReadsUntil = finished + ASYNC_AFTER_SLOW_READ_MS;
    }
    done(null, bytesRead);
  }
}
