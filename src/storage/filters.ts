/**
 * Storage filters, layered like nbdkit's: each wraps a Storage and changes one
 * thing. Reads through openSource() pass through the same filter.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { StorageIOError } from '../errors.js';
import type { ByteSource } from '../image/types.js';
import type { ObjectStat, Storage } from './types.js';

/** Base filter: forwards everything; subclasses override readHook. */
abstract class StorageFilter implements Storage {
  constructor(protected readonly inner: Storage) {}

  get description(): string {
    return this.inner.description;
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

  put(key: string, body: Buffer | AsyncIterable<Buffer>): Promise<ObjectStat> {
    return this.inner.put(key, body);
  }

  list(prefix?: string): Promise<ObjectStat[]> {
    return this.inner.list(prefix);
  }

  async openSource(key: string): Promise<ByteSource> {
    const source = await this.inner.openSource(key);
    return {
      name: source.name,
      size: source.size,
      stamp: source.stamp,
      read: (offset, length) => this.readHook(key, length, () => source.read(offset, length)),
      ...(source.readInto === undefined
        ? {}
        : {
            readInto: (offset: number, length: number, target: Buffer, targetOffset: number) =>
              this.readHook(key, length, () => source.readInto!(offset, length, target, targetOffset)),
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
      throw new StorageIOError('injected storage read error', { file: key });
    }
    return doRead();
  }
}

export interface StorageCounters {
  readRequests: number;
  readBytes: number;
}

/** Counts read requests and bytes that reach the storage system. */
export class CountingStorage extends StorageFilter {
  readonly counters: StorageCounters = { readRequests: 0, readBytes: 0 };

  protected async readHook<T>(_key: string, bytes: number, doRead: () => Promise<T>): Promise<T> {
    this.counters.readRequests++;
    const result = await doRead();
    // A read into the caller's buffer returns nothing: it read the `bytes` asked for.
    this.counters.readBytes += Buffer.isBuffer(result) ? result.length : bytes;
    return result;
  }
}
