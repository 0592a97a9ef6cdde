/**
 * Slots for puts: free ones handed out, least recently used ones evicted to
 * make more (the order is the index's, slot-index.ts), and the capacity cut
 * down when the disk under the cache fills.
 */
import { join } from 'node:path';
import { fromSystemError } from '../../errors.js';
import { FILES, MIN_SLOTS, SPACE_FILES } from './cache-files.js';
import type { CacheState } from './cache-state.js';
import { measureRoom, mib, shrunkSlots, type FilesystemRoom } from './disk-space.js';
import type { GroupCommit } from './group-commit.js';
import { SlotState } from './slot-index.js';

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

export class Reclaimer {
  readonly disk: CacheDiskStats;
  /** Free slots kept ready ahead of demand (0 for small caches: evict on demand). */
  private reserve: number;
  /** The shrink in progress after a write found the disk full. */
  private shrinking: Promise<void> | undefined;
  private shrinks = 0;
  private loggedAtMinimum = false;
  /** Slots past usableSlots still being written (a shrink waits for them before it cuts the data file). */
  private writingAbove = 0;
  private drained: (() => void) | undefined;

  constructor(
    private readonly state: CacheState,
    private readonly commit: GroupCommit,
  ) {
    this.reserve = reserveFor(state.usableSlots);
    this.disk = { configuredCapacityBytes: state.usableSlots * state.blockSize };
  }

  /** Shrinks finished: a write that failed for space after starting before the last one needs no other. */
  get shrinkCount(): number {
    return this.shrinks;
  }

  /**
   * A free slot (state WRITING), evicting when none is free; -1 when nothing
   * can be evicted because every slot is being written.
   */
  async allocate(): Promise<number> {
    for (let attempt = 0; attempt < 1000; attempt++) {
      if (this.state.failed) throw this.state.failed;
      const slot = this.takeFree();
      if (slot >= 0) return slot;
      // Evicted slots are reusable once their invalidation is durable.
      if (this.state.index.retired === 0 && !this.evictOne()) return -1;
      await this.commit.durable();
    }
    return -1;
  }

  /** A free slot (state WRITING) without waiting, topping up the reserve; -1 when none is free now. */
  takeFree(): number {
    const slot = this.state.index.popFree();
    if (slot >= 0) this.evictAhead();
    return slot;
  }

  /** A slot a put took that no record maps goes back (to the free list, or out of use past a shrink). */
  freeWritten(slot: number): void {
    this.state.freeSlot(slot);
    if (slot >= this.state.usableSlots && --this.writingAbove === 0) this.drained?.();
  }

  /**
   * A block write failed for lack of space: its blocks are dropped (the put
   * resolves; a later miss reads storage again) and the cache shrinks, once
   * for all the writes that failed before the shrink was done.
   */
  noSpace(err: unknown, doing: string, shrinksBefore: number): Promise<void> {
    return this.shrinkOnce(err, doing, shrinksBefore, FILES.data);
  }

  /** A journal append found the disk full: shrinking the data file frees room for it. */
  journalFull(err: unknown): Promise<void> {
    return this.shrinkOnce(err, 'appending to the cache journal', this.shrinks, FILES.journal);
  }

  private async shrinkOnce(err: unknown, doing: string, shrinksBefore: number, file: string): Promise<void> {
    this.state.counters.noSpaceWrites++;
    if (!this.shrinking && this.shrinks === shrinksBefore) {
      const reason = fromSystemError(err, join(this.state.dir, file), doing).message;
      this.shrinking = this.shrinkForSpace(reason).finally(() => {
        this.shrinking = undefined;
        this.shrinks++;
      });
    }
    await this.shrinking;
  }

  /** Keeps `reserve` slots free or freeing, so that puts rarely wait for a commit. */
  private evictAhead(): void {
    if (this.reserve === 0) return;
    const index = this.state.index;
    const short = this.reserve - (index.freeCount + index.retired);
    if (short <= 0) return;
    for (let i = 0; i < short + this.reserve && this.evictOne(); i++);
    this.commit.kick(false);
  }

  private evictOne(): boolean {
    const slot = this.state.index.victim();
    if (slot < 0) return false;
    this.commit.invalidate(slot);
    this.state.counters.evictions++;
    return true;
  }

  /**
   * Shrinks the cache to what the disk held minus a margin (shrunkSlots):
   * blocks in slots past the new end leave the index, and once no write to
   * those slots is in flight the data file is cut there. Safe at any crash
   * point: a durable record that still maps a slot past the cut is dropped
   * at load (the data file is too short for it), and nothing writes past the
   * cut any more. A compaction then records the new slot count. Never rejects.
   */
  private async shrinkForSpace(reason: string): Promise<void> {
    const { state } = this;
    if (state.closed || state.failed) return;
    const bs = state.blockSize;
    const from = state.usableSlots;
    const allocated = await state.files.data.stat().then((st) => st.blocks * 512, () => from * bs);
    const target = shrunkSlots(allocated, bs, from, MIN_SLOTS);
    if (target >= from) {
      if (!this.loggedAtMinimum) {
        this.loggedAtMinimum = true;
        state.log.warn(`cache ${state.dir}: the disk is full (${reason}) and the cache is at its smallest (${mib(from * bs)}); blocks that do not fit are not cached`);
      }
      return;
    }
    state.usableSlots = target;
    this.reserve = reserveFor(target);
    state.index.dropFreeFrom(target);
    let dropped = 0;
    for (let slot = target; slot < from; slot++) {
      const slotState = state.index.state[slot];
      if (slotState === SlotState.LIVE) {
        this.commit.invalidate(slot);
        dropped++;
      } else if (slotState === SlotState.WRITING) {
        this.writingAbove++;
      }
    }
    if (this.writingAbove > 0) await new Promise<void>((resolve) => (this.drained = resolve));
    this.drained = undefined;
    try {
      await state.files.data.truncate(target * bs);
    } catch (err) {
      state.fail(err, 'shrinking the cache data file');
      return;
    }
    this.commit.kick(true);
    const room = await measureRoom(state.dir, SPACE_FILES);
    if (room) this.disk.filesystem = room;
    this.disk.shrunk = { capacityBytes: target * bs, reason, at: new Date().toISOString(), times: (this.disk.shrunk?.times ?? 0) + 1 };
    state.log.warn(
      `cache ${state.dir}: the disk is full (${reason}); the cache now holds at most ${mib(target * bs)} ` +
        `(was ${mib(from * bs)}, configured ${mib(this.disk.configuredCapacityBytes)}), ${dropped} cached blocks past that dropped`,
    );
    // Not awaited: a journal commit waiting for this shrink holds the lane the compaction needs.
    if (!state.closed && !state.failed) this.commit.compactLater();
  }
}

/** Free slots kept ahead of demand for a cache of `slots`. */
function reserveFor(slots: number): number {
  return slots >= 1024 ? Math.min(1024, Math.floor(slots / 64)) : 0;
}
