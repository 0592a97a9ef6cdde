/**
 * Records one boot: the set of blocks a VM reads from the open of an export
 * until the boot ends, and decides when it has ended.
 *
 * The boot ends at the first of:
 * - idle: no new block read for `idleMs`, once at least `minReads` reads were seen;
 * - window: `windowMs` after the boot started;
 * - mark-booted: the explicit signal (agent mark-booted EXPORT);
 * - closed: the last connection went away.
 *
 * Defaults come from the real Debian 12 boot trace (test/data/): its longest
 * pause between reads of new blocks is 9.1 s (GRUB has loaded the kernel and
 * initramfs; the kernel starts under TCG), the next longest 0.9 s. An idle
 * gap of 20 s (about 2x the longest) does not cut such a boot short, and the
 * 5 minute window bounds a boot that never goes idle.
 */

import { Bitmap } from '../format/bitmap.js';

export type BootEndReason = 'idle' | 'window' | 'mark-booted' | 'closed';

export interface BootPolicy {
  idleMs: number;
  windowMs: number;
  minReads: number;
}

export const DEFAULT_BOOT_POLICY: BootPolicy = { idleMs: 20_000, windowMs: 300_000, minReads: 64 };

export interface BootSummary {
  state: 'recording' | 'complete';
  reads: number;
  bytes: number;
  blocks: number;
  startedAt: number;
  durationMs: number;
  endReason?: BootEndReason;
}

export class BootRecorder {
  /** Bit i set when block i was read during the boot. */
  readonly bitmap: Bitmap;
  reads = 0;
  bytes = 0;
  blocks = 0;
  private lastNewBlockAt: number;
  private endedAt: number | undefined;
  endReason: BootEndReason | undefined;

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
    }
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

  summary(now: number): BootSummary {
    const s: BootSummary = {
      state: this.recording ? 'recording' : 'complete',
      reads: this.reads,
      bytes: this.bytes,
      blocks: this.blocks,
      startedAt: this.startedAt,
      durationMs: (this.endedAt ?? now) - this.startedAt,
    };
    if (this.endReason) s.endReason = this.endReason;
    return s;
  }
}
