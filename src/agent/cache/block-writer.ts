/**
 * The write path. Every put is a batch (put() is a batch of one): its keys
 * are locked, free slots are taken together, each run of consecutive slots
 * is written with one writev, and the batch's records join one group commit.
 */
import { crc32 } from 'node:zlib';
import { AgentError, fromSystemError } from '../../errors.js';
import type { CacheBlockKind, CacheEntry } from '../block-cache.js';
import type { CacheState } from './cache-state.js';
import { isNoSpace } from './disk-space.js';
import { coalesceViews, pwriteAll, writevAll } from './file-io.js';
import type { GroupCommit } from './group-commit.js';
import type { Reclaimer } from './reclaim.js';
import { SlotFlag, type Space } from './slot-index.js';
import { isSpaceHex } from './snapshot.js';

interface Write {
  block: number;
  data: Buffer;
  crc: number;
  slot: number;
}

export class BlockWriter {
  constructor(
    private readonly state: CacheState,
    private readonly commit: GroupCommit,
    private readonly reclaim: Reclaimer,
  ) {}

  /** The space named `hex`; a new one is recorded in the next commit. */
  intern(hex: string): Space {
    const index = this.state.index;
    const known = index.spaces.get(hex);
    if (known) return known;
    if (!isSpaceHex(hex)) {
      throw new AgentError(`cache: space ${JSON.stringify(hex.slice(0, 140))} is not a lowercase hex string of 1 to 128 digits`);
    }
    const sp = index.space(hex);
    this.commit.records.space(sp.id, hex);
    return sp;
  }

  /** Checks and stores the entries (see CacheDevice.putMany); a block listed twice keeps its last data. */
  async putMany(space: string, entries: readonly CacheEntry[], kind: CacheBlockKind): Promise<void> {
    if (kind !== 'boot' && kind !== 'other') throw new AgentError(`cache put: unknown block kind ${JSON.stringify(kind)}`);
    const byBlock = new Map<number, CacheEntry>();
    for (const entry of entries) {
      this.checkEntry(entry);
      byBlock.set(entry.block, entry);
    }
    if (byBlock.size === 0) return;
    const sp = this.intern(space);
    // Keys are locked in ascending order, so two overlapping batches never wait on each other.
    const blocks = [...byBlock.keys()].sort((a, b) => a - b);
    // One promise stands for the whole batch in every key it locks (a prefetch batch locks thousands).
    let release!: () => void;
    const batch = new Promise<void>((resolve) => (release = resolve));
    let locked = 0;
    this.state.opBegin();
    try {
      for (const block of blocks) {
        for (let prior = sp.writers.get(block); prior; prior = sp.writers.get(block)) await prior;
        sp.writers.set(block, batch);
        locked++;
      }
      await this.writeLocked(sp, byBlock, kind === 'boot');
    } finally {
      for (let i = 0; i < locked; i++) sp.writers.delete(blocks[i]!);
      release();
      this.state.opEnd();
    }
  }

  private checkEntry({ block, data, crc }: CacheEntry): void {
    if (!Number.isSafeInteger(block) || block < 0) throw new AgentError(`cache put: block ${block} is not a block index`);
    if (data.length !== this.state.blockSize) {
      throw new AgentError(`cache put: ${data.length} bytes of data, expected the block size ${this.state.blockSize}`);
    }
    if (crc !== undefined && !(Number.isInteger(crc) && crc >= 0 && crc <= 0xffffffff)) {
      throw new AgentError(`cache put: CRC-32 ${crc} of block ${block} is not a 32-bit unsigned integer`);
    }
  }

  /** Runs with every key of `byBlock` locked. */
  private async writeLocked(sp: Space, byBlock: Map<number, CacheEntry>, boot: boolean): Promise<void> {
    const { state, commit, reclaim } = this;
    const index = state.index;
    const writes: Write[] = [];
    let promoted = false;
    // In the order given, not the (locking) order of the keys: slots are taken in this order, so a
    // segment chunk's blocks land in consecutive slots in their order in memory, one write for the
    // run (coalesceViews), also when they are keyed by content.
    for (const [block, { data, crc: given }] of byBlock) {
      const crc = given ?? crc32(data);
      const existing = sp.blocks.get(block);
      if (existing !== undefined && index.crcOf[existing] === crc && !(index.flags[existing] & SlotFlag.UNVERIFIED)) {
        // The same bytes again: no write; a boot put still marks it as a boot block.
        if (boot && !(index.flags[existing] & SlotFlag.BOOT)) {
          index.promoteToBoot(existing);
          commit.records.put(sp.id, block, existing, true, crc);
          promoted = true;
        }
        index.touch(existing);
        continue;
      }
      writes.push({ block, data, crc, slot: -1 });
    }
    if (promoted) commit.kick(false);
    if (writes.length === 0) return;
    const epoch = sp.epoch;
    const taken: Write[] = [];
    try {
      for (const w of writes) {
        // Free slots are taken without yielding, so concurrent batches do not
        // interleave their slots and each batch stays readable with few preads (getRun).
        w.slot = reclaim.takeFree();
        if (w.slot < 0) w.slot = await reclaim.allocate();
        if (w.slot < 0) state.counters.droppedPuts++;
        else taken.push(w);
      }
    } catch (err) {
      for (const w of taken) reclaim.freeWritten(w.slot);
      throw err;
    }
    if (taken.length === 0) return;
    const shrinks = reclaim.shrinkCount;
    const failure = await this.writeSlots(taken);
    if (failure) {
      for (const w of taken) reclaim.freeWritten(w.slot); // no record maps them: still free
      const doing = taken.length === 1 ? `writing cache slot ${taken[0]!.slot}` : `writing ${taken.length} cache slots`;
      if (isNoSpace(failure.reason)) return reclaim.noSpace(failure.reason, doing, shrinks);
      throw fromSystemError(failure.reason, state.dataPath, doing);
    }
    commit.dataWritten();
    if (state.failed || sp.epoch !== epoch) {
      // Invalidated (or the device failed) while the bytes were written: they never land.
      for (const w of taken) reclaim.freeWritten(w.slot);
      if (state.failed) throw state.failed;
      return;
    }
    // All records in one synchronous step: they join the same group commit, after the data fdatasync.
    for (const w of taken) {
      if (w.slot >= state.usableSlots) {
        // The cache shrank past it while it was written.
        reclaim.freeWritten(w.slot);
        state.counters.droppedPuts++;
        continue;
      }
      let blockBoot = boot;
      const old = sp.blocks.get(w.block);
      if (old !== undefined) {
        blockBoot ||= (index.flags[old] & SlotFlag.BOOT) !== 0;
        commit.retire(old); // superseded by the put record below, free once it is durable
      }
      index.attach(w.slot, sp, w.block, blockBoot, w.crc);
      commit.records.put(sp.id, w.block, w.slot, blockBoot, w.crc);
    }
    commit.kick(false);
  }

  /** Writes the blocks to their slots, one writev per run of consecutive slots; the first failure, if any. */
  private async writeSlots(taken: Write[]): Promise<PromiseRejectedResult | undefined> {
    const { files, blockSize } = this.state;
    // Fresh slots come off the free stack in order, so sorting makes long runs.
    taken.sort((a, b) => a.slot - b.slot);
    const runs: Promise<void>[] = [];
    for (let i = 0; i < taken.length; ) {
      let j = i + 1;
      while (j < taken.length && taken[j]!.slot === taken[j - 1]!.slot + 1) j++;
      const position = taken[i]!.slot * blockSize;
      const chunks = j === i + 1 ? [taken[i]!.data] : coalesceViews(taken.slice(i, j).map((w) => w.data));
      runs.push(chunks.length === 1 ? pwriteAll(files.data.fd, chunks[0]!, position) : writevAll(files.data, chunks, position));
      i = j;
    }
    const results = await Promise.allSettled(runs);
    return results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  }
}
