/**
 * The lifecycle of an image's boot recordings: a BootRecorder opened by the
 * first connection, its end-of-boot timer (idle gap, window), the explicit
 * ends (mark-booted, last connection closed) and the image's data bytes that
 * the whole-disk-read rule needs. The cache manager feeds it the guest's
 * reads; what to do with a finished recording is the agent's (onEnd).
 */
import { imageDataBytes } from '../image/data-bytes.js';
import type { DiskImage } from '../image/types.js';
import { BootRecorder, type BootPolicy, type BootSummary } from './boot-recorder.js';

export class BootLifecycle {
  private boot: BootRecorder | undefined;
  private lastBoot: BootRecorder | undefined;
  private timer: NodeJS.Timeout | undefined;
  /** Bytes of data in the image (allocated extents), learnt once a recording may need them (BootPolicy.maxShare). */
  private dataBytes: number | undefined;
  private dataBytesPending: Promise<number> | undefined;

  constructor(
    private readonly image: DiskImage,
    private readonly blockSize: number,
    private readonly policy: BootPolicy,
    private readonly now: () => number,
    /** Called once per recording, when it ends (idle, window, max-share, mark-booted, closed). */
    private readonly onEnd: (boot: BootRecorder) => void,
  ) {}

  /** Whether a recording is in progress. */
  get recording(): boolean {
    return this.boot !== undefined;
  }

  /** Starts a recording unless one is in progress (the first connection). */
  start(): void {
    if (this.boot) return;
    this.boot = new BootRecorder(this.image.virtualSize, this.blockSize, this.policy, this.now());
    if (this.dataBytes !== undefined) this.boot.setDataBytes(this.dataBytes, this.now());
    this.armTimer();
  }

  /** Records a guest read; false when no recording is in progress. */
  record(offset: number, length: number): boolean {
    const boot = this.boot;
    if (!boot) return false;
    boot.recordRead(offset, length, this.now());
    if (!boot.recording) this.finish(boot);
    else if (boot.wantsDataBytes) this.learnDataBytes();
    return true;
  }

  /** Ends the recording in progress for an explicit reason. */
  end(reason: 'mark-booted' | 'closed'): void {
    const boot = this.boot;
    if (!boot) return;
    boot.end(reason, this.now());
    this.finish(boot);
  }

  /** Ends the recording in progress (mark-booted) and sums it up; else the last one's summary. */
  markBooted(): BootSummary | undefined {
    const boot = this.boot;
    if (!boot) return this.lastBoot?.summary(this.now());
    this.end('mark-booted');
    return boot.summary(this.now());
  }

  summary(): BootSummary | undefined {
    return (this.boot ?? this.lastBoot)?.summary(this.now());
  }

  /** Stops the timer; the recording in progress, if any, is dropped. */
  dispose(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private armTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    const boot = this.boot;
    if (!boot) return;
    const delay = Math.max(10, boot.nextDeadline() - this.now());
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (this.boot !== boot) return;
      if (boot.checkEnd(this.now())) this.finish(boot);
      else this.armTimer();
    }, delay);
    this.timer.unref();
  }

  private finish(boot: BootRecorder): void {
    this.dispose();
    this.boot = undefined;
    this.lastBoot = boot;
    this.onEnd(boot);
  }

  /**
   * Learns the image's data bytes for the maxShare limit, and ends the
   * recording if it is already over it. Asked only once a recording is half
   * way to the floor, so a boot's reads never compete with a qcow2 image's
   * L2 table reads for it. (A recording that ends before the answer keeps
   * the looser limit taken of the virtual size.)
   */
  private learnDataBytes(): void {
    if (this.dataBytesPending) return;
    this.dataBytesPending = imageDataBytes(this.image).catch(() => this.image.virtualSize);
    void this.dataBytesPending.then((bytes) => {
      this.dataBytes = bytes;
      const current = this.boot;
      if (!current) return;
      current.setDataBytes(bytes, this.now());
      if (!current.recording) this.finish(current);
    });
  }
}
