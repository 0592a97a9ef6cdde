import { closeSync, openSync, readSync } from 'node:fs';
import { setImmediate as yieldToLoop } from 'node:timers/promises';

/**
 * Equal-sized buffers kept for reuse, shared by every prefetch stream of the
 * agent. A fresh buffer costs a page fault per 4 KiB on first touch, many
 * times the cost of the read into it, and a cold boot's first reads wait on
 * exactly those chunks. So the agent faults its pool in once (prefault) and
 * streams keep reusing it. The pool never holds more than maxIdle buffers,
 * however many streams ran at once: it does not grow with a peak.
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
   * Fills the pool up to maxIdle buffers, touching every page from user space
   * and from the kernel, so later reads into them fault nothing. 1 MiB per
   * event-loop turn (signals and a stop() are handled meanwhile); the agent
   * awaits it before it listens. Returns early once the pool is closed.
   */
  async prefault(): Promise<void> {
    const step = 1024 * 1024;
    const zero = openDevZero();
    try {
      for (let n = this.maxIdle - this.idle.length; n > 0 && !this.closed; n--) {
        const buf = Buffer.allocUnsafeSlow(this.bufferBytes);
        this.allocated++;
        for (let at = 0; at < buf.length; at += step) {
          const end = Math.min(buf.length, at + step);
          buf.fill(0, at, end);
          if (zero !== undefined) writeFromKernel(zero, buf, at, end);
          await yieldToLoop();
          if (this.closed) return;
        }
        this.give(buf);
      }
    } finally {
      if (zero !== undefined) closeSync(zero);
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

/** A descriptor of /dev/zero, or undefined where there is none. */
function openDevZero(): number | undefined {
  try {
    return openSync('/dev/zero', 'r');
  } catch {
    return undefined;
  }
}

/**
 * Has the kernel write zeros over buf[start, end) (a read of /dev/zero).
 * Under a shadow-paging hypervisor the kernel's first write into a page
 * faults again even when the process has touched that page itself (user and
 * kernel mode have separate shadow page tables), so a buffer filled from user
 * space alone still makes the first segment read into it slow
 * (docs/benchmarks-agent.md has the figures).
 */
export function writeFromKernel(zeroFd: number, buf: Buffer, start: number, end: number): void {
  for (let at = start; at < end; ) {
    const n = readSync(zeroFd, buf, at, end - at, null);
    if (n <= 0) return;
    at += n;
  }
}
