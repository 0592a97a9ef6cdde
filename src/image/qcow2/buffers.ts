/**
 * Reusable buffers and a counting semaphore for the compressed read path.
 * Taking a buffer used before avoids faulting in fresh memory on every read,
 * which on some hosts costs more than the read itself.
 */

/** Idle scratch buffers of one size, in shared memory (decode workers read and write them in place). */
export class SharedScratch {
  private readonly idle: Buffer[] = [];

  constructor(
    readonly size: number,
    /** At most this many idle buffers are kept. */
    private readonly keep: number,
  ) {}

  /** A buffer of at least `length` bytes; hand it back with give(). */
  take(length: number): Buffer {
    if (length > this.size) return sharedBuffer(length);
    return this.idle.pop() ?? sharedBuffer(this.size);
  }

  /** Returns a buffer from take(); nothing may use it afterwards. */
  give(buf: Buffer): void {
    if (buf.length === this.size && this.idle.length < this.keep) this.idle.push(buf);
  }
}

function sharedBuffer(length: number): Buffer {
  return Buffer.from(new SharedArrayBuffer(length));
}

const scratchBySize = new Map<number, SharedScratch>();
/** Idle scratch memory kept per buffer size, shared by every open image. */
const SCRATCH_IDLE_BUDGET = 16 * 1024 * 1024;

/** The process-wide scratch pool for buffers of `size` bytes. */
export function sharedScratch(size: number): SharedScratch {
  let pool = scratchBySize.get(size);
  if (!pool) {
    pool = new SharedScratch(size, Math.max(2, Math.floor(SCRATCH_IDLE_BUDGET / size)));
    scratchBySize.set(size, pool);
  }
  return pool;
}

/** At most `limit` holders at a time; the others wait in order. */
export class Semaphore {
  private active = 0;
  private readonly waiting: Array<() => void> = [];

  constructor(private readonly limit: number) {}

  async acquire(): Promise<void> {
    if (this.active < this.limit) {
      this.active++;
      return;
    }
    await new Promise<void>((resolve) => this.waiting.push(resolve));
  }

  release(): void {
    const next = this.waiting.shift();
    if (next) next(); // the slot passes straight to the next holder
    else this.active--;
  }
}
