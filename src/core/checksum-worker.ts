/**
 * Per-block tables (checksums, digests) on a worker thread, so that they run
 * in parallel with the main thread's SHA-256 over the whole data
 * (buildSegment, verify hash every byte more than once). Data goes to the
 * worker in SharedArrayBuffer-backed buffers, so nothing is copied on the way.
 */
import { Worker } from 'node:worker_threads';
import { blockHashLength, writeBlockHashes, type BlockHashKind } from '../format/segment.js';
import { HELPER_RESOURCE_LIMITS, helperThreadsThatFit } from '../process/address-space.js';

/**
 * The worker: receives {id, data, offset, length, blockSize, kinds}, answers
 * {id, tables} (one per kind) or {id, error}. The same entries as
 * writeBlockHashes (docs/formats.md, "Segment (.bcseg)": checksum and digest
 * tables).
 */
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { hash } = require('node:crypto');
const { crc32 } = require('node:zlib');
const LENGTHS = { crc32: 4, 'sha256-128': 16, sha256: 32 };
parentPort.on('message', ({ id, data, offset, length, blockSize, kinds }) => {
  try {
    const bytes = new Uint8Array(data, offset, length);
    const tables = kinds.map((kind) => {
      const entry = LENGTHS[kind];
      if (entry === undefined) throw new Error('unknown table kind ' + kind);
      const table = new Uint8Array((length / blockSize) * entry);
      const view = new DataView(table.buffer);
      for (let o = 0, t = 0; o < length; o += blockSize, t += entry) {
        const block = bytes.subarray(o, o + blockSize);
        if (kind === 'crc32') view.setUint32(t, crc32(block), true);
        else table.set(hash('sha256', block, 'buffer').subarray(0, entry), t);
      }
      return table.buffer;
    });
    parentPort.postMessage({ id, tables }, tables);
  } catch (err) {
    parentPort.postMessage({ id, error: String(err && err.message || err) });
  }
});
`;

interface Pending {
  resolve: (tables: Buffer[]) => void;
  reject: (err: Error) => void;
}

/** Per-block tables (one entry per block and kind, see writeBlockHashes) of whole-block buffers. */
export interface BlockChecksummer {
  /**
   * One table per kind, in the order asked. `data` is a whole number of
   * blocks; worker-backed checksummers want it in a SharedArrayBuffer.
   */
  tables(data: Buffer, blockSize: number, kinds: readonly BlockHashKind[]): Promise<Buffer[]>;
  /** True when `data` must live in a SharedArrayBuffer (see sharedBuffer). */
  readonly wantsShared: boolean;
  close(): Promise<void>;
}

/** Tables on the calling thread. */
export const inlineChecksummer: BlockChecksummer = {
  wantsShared: false,
  async tables(data, blockSize, kinds) {
    return kinds.map((kind) => hashTable(data, blockSize, kind));
  },
  async close() {},
};

/** The table of `kind` for the whole blocks in `data`. */
export function hashTable(data: Uint8Array, blockSize: number, kind: BlockHashKind): Buffer {
  const table = Buffer.allocUnsafe((data.length / blockSize) * blockHashLength(kind));
  writeBlockHashes(data, blockSize, table, 0, kind);
  return table;
}

class WorkerChecksummer implements BlockChecksummer {
  readonly wantsShared = true;
  private readonly pending = new Map<number, Pending>();
  private nextId = 0;
  private failure: Error | undefined;

  // Not unref'd: while a result is awaited the worker may be the only thing
  // keeping the event loop alive. close() (always called) terminates it.
  constructor(private readonly worker: Worker) {
    worker.on('message', (msg: { id: number; tables?: ArrayBuffer[]; error?: string }) => {
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      if (msg.tables) p.resolve(msg.tables.map((table) => Buffer.from(table)));
      else p.reject(new Error(`checksum worker: ${msg.error ?? 'no result'}`));
    });
    worker.on('error', (err) => this.fail(err));
    worker.on('exit', (code) => this.fail(new Error(`checksum worker exited with code ${code}`)));
  }

  private fail(err: Error): void {
    this.failure ??= err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  tables(data: Buffer, blockSize: number, kinds: readonly BlockHashKind[]): Promise<Buffer[]> {
    if (!(data.buffer instanceof SharedArrayBuffer)) return inlineChecksummer.tables(data, blockSize, kinds);
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise<Buffer[]>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, data: data.buffer, offset: data.byteOffset, length: data.length, blockSize, kinds });
    });
  }

  async close(): Promise<void> {
    this.failure ??= new Error('checksum worker closed');
    await this.worker.terminate();
  }
}

/** Below this many bytes a worker (about 30 ms to start) does not pay off. */
const WORKER_MIN_BYTES = 16 * 1024 * 1024;

/**
 * A worker-backed checksummer when asked for and the work is large enough to
 * pay for a thread; else the inline one. The worker is opt-in: it shortens
 * the wall time only when a core is idle, and costs more CPU in total (a copy
 * into shared memory unless the image can read into a buffer, and messages),
 * so on a busy host it is slower (measured on a loaded 2-core VM).
 */
export function createChecksummer(totalBytes: number, useWorker = false): BlockChecksummer {
  if (!useWorker || totalBytes < WORKER_MIN_BYTES || helperThreadsThatFit(1) === 0) return inlineChecksummer;
  try {
    return new WorkerChecksummer(new Worker(WORKER_SOURCE, { eval: true, resourceLimits: HELPER_RESOURCE_LIMITS }));
  } catch {
    return inlineChecksummer;
  }
}

/** A Buffer backed by a SharedArrayBuffer (so a worker can read it in place). */
export function sharedBuffer(length: number): Buffer {
  return Buffer.from(new SharedArrayBuffer(length));
}
