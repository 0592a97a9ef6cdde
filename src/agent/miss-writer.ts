/**
 * Writes the blocks read on cache misses into the cache in batches. One put
 * per missed block costs a positional write and a journal record each, and
 * on a first boot (thousands of small misses) those writes compete with the
 * boot's own storage reads for the thread pool. Batching them per space over
 * a short window turns them into a few writev calls and one group commit.
 *
 * The blocks stay readable from memory meanwhile: the caller keeps each one
 * in its in-flight table until the returned promise settles.
 */
import type { BlockCache, CacheBlockKind, CacheEntry } from './block-cache.js';

export interface MissWriterOptions {
  /** Longest a queued block waits before its batch is written, ms. */
  delayMs: number;
  /** A batch is written at once when it holds this many blocks (bounds the memory held). */
  maxBlocks: number;
}

export const DEFAULT_MISS_WRITER: MissWriterOptions = { delayMs: 5, maxBlocks: 256 };

interface Batch {
  space: string;
  kind: CacheBlockKind;
  entries: CacheEntry[];
  done: Promise<void>;
  resolve: () => void;
  timer: NodeJS.Timeout | undefined;
}

export class MissWriter {
  private readonly batches = new Map<string, Batch>();

  constructor(
    private readonly cache: BlockCache,
    private readonly options: MissWriterOptions = DEFAULT_MISS_WRITER,
  ) {}

  /** Queues one block; settles (never rejects: the cache is an optimisation) once it is written or dropped. */
  queue(space: string, block: number, data: Buffer, kind: CacheBlockKind): Promise<void> {
    const key = `${kind}:${space}`;
    let batch = this.batches.get(key);
    if (!batch) {
      let resolve!: () => void;
      const done = new Promise<void>((r) => (resolve = r));
      batch = { space, kind, entries: [], done, resolve, timer: undefined };
      this.batches.set(key, batch);
      const b = batch;
      batch.timer = setTimeout(() => this.flushBatch(key, b), this.options.delayMs);
    }
    batch.entries.push({ block, data });
    const done = batch.done;
    if (batch.entries.length >= this.options.maxBlocks) this.flushBatch(key, batch);
    return done;
  }

  /** Writes everything queued now (shutdown, tests). */
  async flush(): Promise<void> {
    const pending = [...this.batches].map(([key, batch]) => {
      this.flushBatch(key, batch);
      return batch.done;
    });
    await Promise.all(pending);
  }

  private flushBatch(key: string, batch: Batch): void {
    if (this.batches.get(key) !== batch) return;
    this.batches.delete(key);
    if (batch.timer) clearTimeout(batch.timer);
    let write: Promise<void>;
    try {
      write = this.cache.putMany(batch.space, batch.entries, batch.kind);
    } catch {
      write = Promise.resolve();
    }
    write.then(() => batch.resolve(), () => batch.resolve());
  }
}
