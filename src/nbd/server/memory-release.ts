/**
 * Gives the memory of dropped reply buffers back soon after many of them
 * became garbage at once (clients that held many unread replies went away).
 *
 * A Buffer's memory is freed only when V8 collects the Buffer, and V8
 * collects on allocation: an agent that goes quiet after a storm keeps the
 * storm's buffers until the next busy moment. So after such a release the
 * server asks for one full collection. `global.gc` exists only under
 * --expose-gc; the flag set at run time applies to new contexts, so the
 * function is taken from one (the way the expose-gc package does it).
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

type Collect = () => void;

let collect: Collect | null | undefined;

function collector(): Collect | null {
  if (collect !== undefined) return collect;
  const existing = (globalThis as { gc?: unknown }).gc;
  if (typeof existing === 'function') {
    collect = existing as Collect;
    return collect;
  }
  try {
    setFlagsFromString('--expose-gc');
    const gc: unknown = runInNewContext('gc');
    collect = typeof gc === 'function' ? (gc as Collect) : null;
  } catch {
    collect = null;
  } finally {
    setFlagsFromString('--no-expose-gc');
  }
  return collect;
}

/** Dropped bytes that make a collection worth its pause (a full one stops the event loop for a moment). */
const COLLECT_AFTER_BYTES = 32 * 1024 * 1024;
/** Releases in quick succession (a storm's clients leaving together) share one collection. */
const COLLECT_DELAY_MS = 1000;

/** Counts dropped buffer bytes and runs one collection shortly after enough accumulated. */
export class MemoryRelease {
  private dropped = 0;
  private timer: NodeJS.Timeout | null = null;

  /** `bytes` of buffers just became garbage. */
  noteDropped(bytes: number): void {
    this.dropped += bytes;
    if (this.dropped < COLLECT_AFTER_BYTES || this.timer !== null) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.dropped = 0;
      collector()?.();
    }, COLLECT_DELAY_MS);
    this.timer.unref();
  }

  /** Cancels a pending collection (server closed). */
  cancel(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  }
}
