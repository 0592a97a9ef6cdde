/**
 * The cache device's journal writer: records queue in a pending batch and
 * go out in one group commit (data fdatasync, journal append, journal
 * fdatasync), after which the slots the batch freed may be written again.
 * Compaction replaces snapshot and journal through the same lane, so
 * commits and compactions never overlap.
 */
import { type FileHandle } from 'node:fs/promises';
import { fromSystemError } from '../../errors.js';
import { randomSalt, snapshotEpochOnDisk, writeIndexFiles } from './cache-files.js';
import type { CacheState } from './cache-state.js';
import { isNoSpace } from './disk-space.js';
import { writevAll } from './file-io.js';
import { JOURNAL_HEADER_SIZE, RecordBuffer } from './journal.js';
import { SlotState } from './slot-index.js';
import { encodeSnapshot } from './snapshot.js';

/** Records wait at most this long for companions... */
const COMMIT_DELAY_MS = 4;
/** ...or until this many are queued. */
const COMMIT_MAX_RECORDS = 4096;
/** Compact when the journal outgrows this plus twice the snapshot's size. */
const COMPACT_MIN_JOURNAL = 8 * 1024 * 1024;
const SNAPSHOT_BYTES_PER_ENTRY = 24;

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

/** Where the journal stands when the device opens. */
export interface JournalPosition {
  epoch: number;
  salt: number;
  journalSize: number;
}

export class GroupCommit {
  private pending: Batch;
  /** The batch being committed (or covered by a compaction in progress). */
  private inflight: Batch | undefined;
  private timer: NodeJS.Timeout | undefined;
  private commitQueued = false;
  /** Serializes commits and compactions. */
  private writerTail: Promise<void> = Promise.resolve();
  /** Set when a data write finished since the last fdatasync of the data file. */
  private dataDirty = false;
  private epoch: number;
  private salt: number;
  private size: number;

  /** `journalFull` frees disk room after an append found the disk full (see reclaim.ts). */
  constructor(
    private readonly state: CacheState,
    at: JournalPosition,
    private readonly journalFull: (err: unknown) => Promise<void>,
  ) {
    this.epoch = at.epoch;
    this.salt = at.salt;
    this.size = at.journalSize;
    this.pending = new Batch(at.salt);
  }

  get journalBytes(): number {
    return this.size;
  }

  /** The records of the next commit. */
  get records(): RecordBuffer {
    return this.pending.records;
  }

  /** Data was written: the next commit fdatasyncs the data file before its records. */
  dataWritten(): void {
    this.dataDirty = true;
  }

  /** Takes a mapped slot out of the index at once; it is reused only once the pending batch is durable. */
  retire(slot: number): void {
    const index = this.state.index;
    index.detach(slot);
    index.state[slot] = SlotState.RETIRED;
    index.retired++;
    this.pending.freed.push(slot);
  }

  /** retire() with the record that says so (eviction, a failed checksum, a shrink). */
  invalidate(slot: number): void {
    this.retire(slot);
    this.pending.records.invalidate(slot);
  }

  /** Schedules a commit of the pending batch: soon (`now`), or after a short delay to gather companions. */
  kick(now: boolean): void {
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
  async durable(): Promise<void> {
    const target = this.pending.empty ? this.inflight : this.pending;
    if (!target) return;
    if (target === this.pending) this.kick(true);
    await target.done;
  }

  /**
   * Writes the index as a new snapshot and starts an empty journal (the
   * epoch goes up by one). Records queued before the capture are covered by
   * the snapshot and never appended; their batch completes with it.
   */
  compact(): Promise<void> {
    return this.exclusive(() => this.compactLocked());
  }

  /** compact() without waiting for it: a caller in the commit lane would wait for itself. */
  compactLater(): void {
    void this.compact().catch((err: unknown) => this.state.log.warn(`cache compaction failed: ${(err as Error).message}`));
  }

  /** Waits for the commit or compaction under way and stops the commit timer (the device is closing). */
  async stop(): Promise<void> {
    await this.writerTail;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
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
    if (this.size > COMPACT_MIN_JOURNAL + 2 * SNAPSHOT_BYTES_PER_ENTRY * this.state.index.mapped) {
      await this.compactLocked().catch((err: unknown) => this.state.log.warn(`cache compaction failed: ${(err as Error).message}`));
    }
  }

  /** One group commit: data fdatasync, journal append, journal fdatasync, then freed slots become reusable. */
  private async commitBatch(batch: Batch): Promise<void> {
    const { files } = this.state;
    this.inflight = batch;
    try {
      if (this.state.failed) throw this.state.failed;
      if (this.dataDirty) {
        this.dataDirty = false;
        await files.data.datasync();
      }
      const bytes = batch.records.bytes;
      const records = batch.records.take();
      for (let attempt = 1; ; attempt++) {
        try {
          // Rewritten from the same offset on a retry: a partial append is overwritten.
          await writevAll(files.journal, records, this.size);
          await files.journal.datasync();
          break;
        } catch (err) {
          // The blocks filled the disk before the journal could grow: shrinking the data file
          // frees room, then the append goes again, once.
          if (!isNoSpace(err) || attempt > 1) throw err;
          await this.journalFull(err);
          if (this.state.failed) throw this.state.failed;
        }
      }
      this.size += bytes;
    } catch (err) {
      const error = this.state.fail(err, 'committing the cache journal');
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
      this.state.index.retired--;
      this.state.freeSlot(slot);
    }
    batch.resolve();
  }

  /** Runs inside exclusive(); encoding the index synchronously is what makes the capture consistent. */
  private async compactLocked(): Promise<void> {
    const { state } = this;
    if (state.failed) throw state.failed;
    const epoch = (this.epoch + 1) >>> 0;
    const salt = randomSalt();
    // Capture the index and the records it covers in one synchronous step.
    // One slot count for the snapshot and the journal header, even if a shrink comes between
    // (their headers must agree; a data file shorter than the count is handled at load).
    const slotCount = state.usableSlots;
    const snapshot = encodeSnapshot(state.index, { blockSize: state.blockSize, slotCount, epoch });
    const covered = this.pending;
    this.pending = new Batch(salt);
    this.inflight = covered;
    let journal: FileHandle;
    try {
      // Every slot the snapshot maps was written before the capture: make those bytes durable first.
      this.dataDirty = false;
      await state.files.data.datasync();
      journal = await writeIndexFiles(state.dir, snapshot, { blockSize: state.blockSize, slotCount, epoch, salt });
    } catch (err) {
      const error = fromSystemError(err, state.dir, 'compacting the cache index');
      this.inflight = undefined;
      if ((await snapshotEpochOnDisk(state.dir)) !== this.epoch) {
        // The old journal no longer counts on disk: nothing can be committed safely any more.
        state.fail(error, 'compacting the cache index');
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
    const old = state.files.journal;
    state.files.journal = journal;
    this.size = JOURNAL_HEADER_SIZE;
    this.epoch = epoch;
    this.salt = salt;
    this.inflight = undefined;
    await old.close().catch(() => undefined);
    this.release(covered);
    this.kick(false);
  }
}
