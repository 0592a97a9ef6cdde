/**
 * Records one boot: the set of blocks a VM reads from the open of an export
 * until the boot ends, and decides when it has ended.
 *
 * The boot ends at the first of:
 * - idle: no new block read for `idleMs`, once at least `minReads` reads were seen;
 * - window: `windowMs` after the boot started;
 * - mark-booted: the explicit signal (agent mark-booted EXPORT);
 * - closed: the last connection went away;
 * - max-share: the recording's distinct blocks passed `maxShare` of the
 *   image's data (and `maxShareFloor` bytes). That is a whole-disk read (a
 *   copy, a backup, `qemu-img convert` or `nbdcopy` from the export), not a
 *   boot: the recording ends there and is discarded (state 'discarded').
 *
 * Defaults come from the real Debian 12 boot trace (test/data/): the idle gap
 * is about twice the boot's longest pause between reads of new blocks (while
 * the kernel starts), and the window bounds a boot that never goes idle. A
 * boot reads a small share of its image's data and a copy reads all of it:
 * a share of 0.5 ends a copy half way, and the floor keeps every boot of a
 * small image whose boot reads most of its data (a minimal guest, the demo
 * image). The figures are in docs/agent.md, "Recording boots".
 */

import { Bitmap } from '../format/bitmap.js';

export type BootEndReason = 'idle' | 'window' | 'mark-booted' | 'closed' | 'max-share';

export interface BootPolicy {
  idleMs: number;
  windowMs: number;
  minReads: number;
  /** Largest share (0..1] of the image's data a boot may read; 0: no limit. */
  maxShare: number;
  /** Bytes of distinct blocks below which maxShare never applies. */
  maxShareFloor: number;
}

export const DEFAULT_BOOT_POLICY: BootPolicy = {
  idleMs: 20_000,
  windowMs: 300_000,
  minReads: 64,
  maxShare: 0.5,
  maxShareFloor: 256 * 1024 * 1024,
};

export interface BootSummary {
  state: 'recording' | 'complete' | 'discarded';
  reads: number;
  bytes: number;
  blocks: number;
  startedAt: number;
  durationMs: number;
  endReason?: BootEndReason;
  /** Why the recording was not merged into the map (state 'discarded'). */
  discardReason?: string;
}

/** The fate of a finished recording (BootRecorder.verdict). */
export type BootVerdict =
  | { action: 'publish' }
  | { action: 'skip'; reason: 'changed' | 'empty' | 'probe' }
  | { action: 'discard'; reason: string };

export class BootRecorder {
  /** Bit i set when block i was read during the boot. */
  readonly bitmap: Bitmap;
  reads = 0;
  bytes = 0;
  blocks = 0;
  private lastNewBlockAt: number;
  private endedAt: number | undefined;
  endReason: BootEndReason | undefined;
  /** Set when the recording read too much of the image to be a boot. */
  discardReason: string | undefined;
  /**
   * Bytes of data in the image (its allocated extents), once known; until
   * then maxShare is taken of the virtual size (a looser limit).
   */
  private dataBytes: number | undefined;

  constructor(
    readonly virtualSize: number,
    readonly blockSize: number,
    readonly policy: BootPolicy,
    readonly startedAt: number,
  ) {
    this.bitmap = new Bitmap(Math.ceil(virtualSize / blockSize));
    this.lastNewBlockAt = startedAt;
  }

  get recording(): boolean {
    return this.endReason === undefined;
  }

  /** Records a read at time `now` (ms); ignored once the boot has ended. */
  recordRead(offset: number, length: number, now: number): void {
    if (!this.recording || length <= 0) return;
    if (this.checkEnd(now)) return;
    this.reads++;
    this.bytes += length;
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((offset + length - 1) / this.blockSize);
    let added = 0;
    for (let block = first; block <= last && block < this.bitmap.length; block++) {
      if (!this.bitmap.get(block)) {
        this.bitmap.set(block);
        added++;
      }
    }
    if (added > 0) {
      this.blocks += added;
      this.lastNewBlockAt = now;
      this.checkShare(now);
    }
  }

  /** maxShare applies: on, and the recording is past the floor. */
  private get pastFloor(): boolean {
    return this.policy.maxShare > 0 && this.blocks * this.blockSize > this.policy.maxShareFloor;
  }

  /** The recording is half way to the floor and the image's data size is not known yet: time to learn it. */
  get wantsDataBytes(): boolean {
    return this.recording && this.dataBytes === undefined && this.policy.maxShare > 0 &&
      this.blocks * this.blockSize * 2 > this.policy.maxShareFloor;
  }

  /** The image's data bytes are known: ends (and discards) the recording if it is already over the limit. */
  setDataBytes(dataBytes: number, now: number): void {
    this.dataBytes = dataBytes;
    this.checkShare(now);
  }

  /** Distinct bytes a boot may read before it counts as a whole-disk read. */
  limitBytes(): number {
    const data = this.dataBytes ?? this.virtualSize;
    return Math.max(this.policy.maxShareFloor, Math.floor(this.policy.maxShare * data));
  }

  private checkShare(now: number): void {
    if (!this.recording || !this.pastFloor) return;
    const read = this.blocks * this.blockSize;
    const limit = this.limitBytes();
    if (read <= limit) return;
    const data = this.dataBytes ?? this.virtualSize;
    this.discardReason = `read ${mib(read)} of distinct blocks, more than ${this.policy.maxShare} of the image's ` +
      `${mib(data)} of data (boot.maxShare, limit ${mib(limit)}): a whole-disk read (a copy or a backup), not a boot`;
    this.end('max-share', now);
  }

  /** Ends the boot if the idle gap or the window has passed; returns the reason. */
  checkEnd(now: number): BootEndReason | undefined {
    if (!this.recording) return this.endReason;
    if (now - this.startedAt >= this.policy.windowMs) return this.end('window', this.startedAt + this.policy.windowMs);
    if (this.reads >= this.policy.minReads && now - this.lastNewBlockAt >= this.policy.idleMs) {
      // The boot really ended at its last new block; the idle gap only confirms it.
      return this.end('idle', this.lastNewBlockAt);
    }
    return undefined;
  }

  /** Ends the boot now for an explicit reason (mark-booted, last close). */
  end(reason: BootEndReason, at: number): BootEndReason {
    if (this.recording) {
      this.endReason = reason;
      this.endedAt = at;
    }
    return this.endReason!;
  }

  /** When checkEnd should be called next, so a timer can end the boot on time. */
  nextDeadline(): number {
    const window = this.startedAt + this.policy.windowMs;
    return this.reads >= this.policy.minReads ? Math.min(window, this.lastNewBlockAt + this.policy.idleMs) : window;
  }

  /**
   * What becomes of this finished recording: published as a boot, skipped
   * (recorded on a version of the image that changed, read nothing, or a
   * probe), or discarded (a whole-disk read, see maxShare).
   */
  verdict(imageChanged: boolean): BootVerdict {
    // Its map and segment would describe neither version.
    if (imageChanged) return { action: 'skip', reason: 'changed' };
    // A copy or a backup: merged, it would put every data block in the segment.
    if (this.discardReason !== undefined) return { action: 'discard', reason: this.discardReason };
    if (this.blocks === 0) return { action: 'skip', reason: 'empty' };
    // A probe (qemu-img info, nbdinfo, a health check) reads a few blocks. Merged as
    // boots, a few probes would out-vote the real boots (M of the last K) and shrink
    // the segment to the probe's blocks. mark-booted is the operator's word: it counts.
    if (this.reads < this.policy.minReads && this.endReason !== 'mark-booted') return { action: 'skip', reason: 'probe' };
    return { action: 'publish' };
  }

  summary(now: number): BootSummary {
    const s: BootSummary = {
      state: this.recording ? 'recording' : this.discardReason === undefined ? 'complete' : 'discarded',
      reads: this.reads,
      bytes: this.bytes,
      blocks: this.blocks,
      startedAt: this.startedAt,
      durationMs: (this.endedAt ?? now) - this.startedAt,
    };
    if (this.endReason) s.endReason = this.endReason;
    if (this.discardReason !== undefined) s.discardReason = this.discardReason;
    return s;
  }
}

function mib(bytes: number): string {
  return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
}
