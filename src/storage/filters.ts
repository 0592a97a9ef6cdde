/**
 * Storage filters, layered like nbdkit's: each wraps a Storage and changes one
 * thing. Reads through openSource() pass through the same filter.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { StorageReadError } from '../errors.js';
import type { ByteSource } from '../image/types.js';
import type { ObjectStat, OpenOptions, PutOptions, Storage } from './types.js';

/** Base filter: forwards everything; subclasses override readHook. */
abstract class StorageFilter implements Storage {
  constructor(protected readonly inner: Storage) {}

  get description(): string {
    return this.inner.description;
  }

  get opensWithHead(): boolean | undefined {
    return this.inner.opensWithHead;
  }

  /** Called around every data read (ranged reads, gets, source reads). */
  protected abstract readHook<T>(key: string, bytes: number, doRead: () => Promise<T>): Promise<T>;

  stat(key: string): Promise<ObjectStat | undefined> {
    return this.inner.stat(key);
  }

  read(key: string, offset: number, length: number): Promise<Buffer> {
    return this.readHook(key, length, () => this.inner.read(key, offset, length));
  }

  async get(key: string): Promise<Buffer> {
    return this.readHook(key, 0, () => this.inner.get(key));
  }

  put(key: string, body: Buffer | AsyncIterable<Buffer>, options?: PutOptions): Promise<ObjectStat> {
    return this.inner.put(key, body, options);
  }

  list(prefix?: string): Promise<ObjectStat[]> {
    return this.inner.list(prefix);
  }

  async openSource(key: string, options?: OpenOptions): Promise<ByteSource> {
    // An open that reads a head is a data read (an object store's ranged GET); a plain open is a HEAD.
    const head = options?.head ?? 0;
    const source = head > 0 && options?.known === undefined && this.inner.opensWithHead === true
      ? await this.readHook(key, head, () => this.inner.openSource(key, options))
      : await this.inner.openSource(key, options);
    // Reads inside the head held since the open are no requests: not counted, delayed or retried.
    const held = source.headLength ?? 0;
    const inHead = (offset: number, length: number): boolean => offset + length <= held;
    return {
      name: source.name,
      size: source.size,
      stamp: source.stamp,
      version: source.version,
      ...(source.modifiedMs === undefined ? {} : { modifiedMs: source.modifiedMs }),
      ...(held > 0 ? { headLength: held } : {}),
      read: (offset, length) => (inHead(offset, length) ? source.read(offset, length) : this.readHook(key, length, () => source.read(offset, length))),
      ...(source.readInto === undefined
        ? {}
        : {
            readInto: (offset: number, length: number, target: Buffer, targetOffset: number) =>
              inHead(offset, length)
                ? source.readInto!(offset, length, target, targetOffset)
                : this.readHook(key, length, () => source.readInto!(offset, length, target, targetOffset)),
          }),
      close: () => source.close(),
    };
  }

  resolveRelative(fromKey: string, name: string): string {
    return this.inner.resolveRelative(fromKey, name);
  }
}

export interface FaultOptions {
  /** Delay added to every read request, in milliseconds (like nbdkit's delay filter). */
  delayMs?: number;
  /** Fraction of read requests that fail with an I/O error (like nbdkit's error filter). */
  errorRate?: number;
  /** Random source in [0, 1), for reproducible tests. */
  random?: () => number;
}

/**
 * Emulates remote storage: every read request waits delayMs (requests overlap,
 * as on a network) and a fraction fail.
 */
export class FaultyStorage extends StorageFilter {
  private readonly delayMs: number;
  private readonly errorRate: number;
  private readonly random: () => number;

  constructor(inner: Storage, options: FaultOptions) {
    super(inner);
    this.delayMs = options.delayMs ?? 0;
    this.errorRate = options.errorRate ?? 0;
    this.random = options.random ?? Math.random;
  }

  protected async readHook<T>(key: string, _bytes: number, doRead: () => Promise<T>): Promise<T> {
    if (this.delayMs > 0) await sleep(this.delayMs);
    if (this.errorRate > 0 && this.random() < this.errorRate) {
      throw new StorageReadError('injected storage read error', { file: key });
    }
    return doRead();
  }
}

export interface StorageCounters {
  readRequests: number;
  readBytes: number;
}

/** What a storage key holds, for counting reads by purpose. */
export type StorageKeyKind = 'image' | 'segment' | 'map';

export function storageKeyKind(key: string): StorageKeyKind {
  if (key.endsWith('.bcseg')) return 'segment';
  if (key.endsWith('.bcmap')) return 'map';
  return 'image';
}

/** Counts read requests, bytes and failed requests that reach the storage system, in all and by kind of object. */
export class CountingStorage extends StorageFilter {
  readonly counters: StorageCounters = { readRequests: 0, readBytes: 0 };
  readonly byKind: Record<StorageKeyKind, { requests: number; bytes: number; errors: number }> = {
    image: { requests: 0, bytes: 0, errors: 0 },
    segment: { requests: 0, bytes: 0, errors: 0 },
    map: { requests: 0, bytes: 0, errors: 0 },
  };

  protected async readHook<T>(key: string, bytes: number, doRead: () => Promise<T>): Promise<T> {
    const kind = this.byKind[storageKeyKind(key)];
    this.counters.readRequests++;
    kind.requests++;
    let result: T;
    try {
      result = await doRead();
    } catch (err) {
      kind.errors++;
      throw err;
    }
    // A read into the caller's buffer returns nothing: it read the `bytes` asked for; an open with a head read its head.
    const n = Buffer.isBuffer(result) ? result.length : headLengthOf(result) ?? bytes;
    this.counters.readBytes += n;
    kind.bytes += n;
    return result;
  }
}

export interface RetryOptions {
  /** Attempts after the first, at most. */
  retries: number;
  /** Delay before the first retry, ms; it doubles for each further one. */
  baseDelayMs: number;
  /** Largest delay between two attempts, ms. */
  maxDelayMs?: number;
  /** No retry starts later than this after the first attempt, ms. */
  deadlineMs?: number;
  /** Random source in [0, 1), for reproducible tests. */
  random?: () => number;
  /** Called before each retry (for logs). */
  onRetry?: (key: string, attempt: number, delayMs: number, err: StorageReadError) => void;
  /** Called when a read fails after its last retry. */
  onGiveUp?: (key: string, attempts: number, err: StorageReadError) => void;
}

export interface RetryCounters {
  /** Read requests sent again after a StorageReadError. */
  retries: number;
  /** Reads that succeeded on a retry. */
  recovered: number;
  /** Reads that failed with StorageReadError on every attempt (the caller got the error). */
  failed: number;
}

/**
 * Sends a read that failed with StorageReadError again, up to `retries`
 * times, with exponential backoff and jitter (each delay is drawn from the
 * upper half of its doubling step, so concurrent readers spread out). Other
 * errors (a changed image, a read past the end, a missing object) are final
 * and pass at once.
 */
export class RetryingStorage extends StorageFilter {
  readonly counters: RetryCounters = { retries: 0, recovered: 0, failed: 0 };
  private readonly maxDelayMs: number;
  private readonly random: () => number;

  constructor(inner: Storage, private readonly options: RetryOptions) {
    super(inner);
    this.maxDelayMs = options.maxDelayMs ?? 1000;
    this.random = options.random ?? Math.random;
  }

  protected async readHook<T>(key: string, _bytes: number, doRead: () => Promise<T>): Promise<T> {
    const started = Date.now();
    for (let attempt = 0; ; attempt++) {
      try {
        const result = await doRead();
        if (attempt > 0) this.counters.recovered++;
        return result;
      } catch (err) {
        if (!(err instanceof StorageReadError)) throw err;
        const step = Math.min(this.maxDelayMs, this.options.baseDelayMs * 2 ** attempt);
        const delayMs = step / 2 + (this.random() * step) / 2;
        const late = this.options.deadlineMs !== undefined && Date.now() + delayMs - started > this.options.deadlineMs;
        if (attempt >= this.options.retries || late) {
          this.counters.failed++;
          this.options.onGiveUp?.(key, attempt + 1, err);
          throw err;
        }
        this.counters.retries++;
        this.options.onRetry?.(key, attempt + 1, delayMs, err);
        await sleep(delayMs);
      }
    }
  }
}

/** The head an open read (a source opened with OpenOptions.head), if `value` is such a source. */
function headLengthOf(value: unknown): number | undefined {
  if (typeof value !== 'object' || value === null || !('headLength' in value)) return undefined;
  const n = (value as { headLength: unknown }).headLength;
  return typeof n === 'number' ? n : undefined;
}
