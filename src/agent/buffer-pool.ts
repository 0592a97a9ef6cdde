import { setImmediate as yieldToLoop } from 'node:timers/promises';

/**
 * Equal-sized buffers kept for reuse, shared by every prefetch stream of the
 * agent. A fresh buffer costs a page fault per 4 KiB on first touch: reading
 * 8 MiB of segment into a fresh buffer took 31 ms here, into a reused one
 * 1.7 ms, and a cold boot's first reads waited on exactly those chunks. So the
 * agent faults its pool in once (prefault) and streams keep reusing it.
 */
export class BufferPool {
  private readonly idle: Buffer[] = [];
  private allocated = 0;
  private closed = false;

  constructor(
    /** Size of every pooled buffer. */
    readonly bufferBytes: number,
    /** Idle buffers kept at most; more are left to the garbage collector. */
    readonly maxIdle: number,
  ) {}

  /** A buffer of at least `bytes` (a pooled one when they fit). */
  take(bytes = this.bufferBytes): Buffer {
    if (bytes > this.bufferBytes) return Buffer.allocUnsafeSlow(bytes);
    const buf = this.idle.pop();
    if (buf) return buf;
    this.allocated++;
    return Buffer.allocUnsafeSlow(this.bufferBytes);
  }

  /** Hands a buffer from take() back; the caller must not touch it afterwards. */
  give(buf: Buffer): void {
    if (!this.closed && buf.length === this.bufferBytes && this.idle.length < this.maxIdle) this.idle.push(buf);
  }

  /**
   * Fills the pool up to maxIdle buffers, touching every page so later reads
   * into them fault nothing. 1 MiB per event-loop turn: the agent keeps
   * serving meanwhile.
   */
  async prefault(): Promise<void> {
    const step = 1024 * 1024;
    for (let n = this.maxIdle - this.idle.length; n > 0 && !this.closed; n--) {
      const buf = Buffer.allocUnsafeSlow(this.bufferBytes);
      this.allocated++;
      for (let at = 0; at < buf.length; at += step) {
        buf.fill(0, at, Math.min(buf.length, at + step));
        await yieldToLoop();
        if (this.closed) return;
      }
      this.give(buf);
    }
  }

  /** Drops the idle buffers (a stream's own pool, when it ends). */
  clear(): void {
    this.idle.length = 0;
  }

  /** Drops the idle buffers and keeps none from now on; a prefault in progress stops. */
  close(): void {
    this.closed = true;
    this.clear();
  }

  /** Buffer size, how many it keeps at most, how many it holds now, how many it ever allocated. */
  stats(): { bufferBytes: number; maxIdle: number; idle: number; allocated: number } {
    return { bufferBytes: this.bufferBytes, maxIdle: this.maxIdle, idle: this.idle.length, allocated: this.allocated };
  }
}
