/**
 * Decoding of qcow2 compressed clusters (deflate and zstd) on worker threads.
 * On the main thread it would stall other I/O and use one core; and Node's
 * asynchronous zlib calls cost more per 64 KiB cluster than the inflate
 * itself (a stream object, an error object and a close per call), while a
 * worker inflates with the one-shot synchronous call. Each batch is spread
 * over up to MAX_WORKERS workers (one per core). Input and output live in
 * SharedArrayBuffers the caller reuses, so nothing is copied on the way and
 * no fresh memory is faulted in per batch. Workers are unref'd while idle so
 * they never keep the process alive. Under an address-space limit only as
 * many workers start as the limit leaves room for (see address-space.ts);
 * with none, or if workers cannot be started, clusters are decoded on the
 * calling thread.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import * as zlib from 'node:zlib';
import { inflateQcow2Cluster } from './decompress.js';
import { ResourceLimitError } from '../../errors.js';
import { HELPER_RESOURCE_LIMITS, helperThreadsThatFit } from '../../process/address-space.js';
import type { CompressionType } from './header.js';
import { libzstdPaths, libzstdUnavailable, loadLibzstd, startLibzstd } from './libzstd.js';
import { decodeZstdCluster, type LibzstdModule } from './zstd.js';

const MAX_WORKERS = 4;

/** Compressed clusters to decode in one go. */
export interface ClusterBatch {
  type: CompressionType;
  clusterSize: number;
  /** Holds the compressed data of every cluster; best in shared memory (else it is copied there). */
  input: Uint8Array;
  /** Cluster i is input[offsets[i], offsets[i] + lengths[i]). */
  offsets: number[];
  lengths: number[];
  /** Cluster i decodes into output[i × clusterSize ...]; best in shared memory (else it is copied from there). */
  output: Uint8Array;
}
/** A message carries at least this much output (so that the round trip pays off), unless the batch is smaller. */
const MIN_BYTES_PER_MESSAGE = 256 * 1024;
/** Batches with at most this much output are decoded inline: cheaper than a round trip. */
const INLINE_MAX_BYTES = 16 * 1024;

interface WorkerRequest {
  id: number;
  type: ClusterBatch['type'];
  clusterSize: number;
  input: SharedArrayBuffer;
  inputOffset: number;
  inputLength: number;
  output: SharedArrayBuffer;
  outputOffset: number;
  outputLength: number;
  /** Cluster indexes in the batch, with their compressed offsets and lengths. */
  indexes: number[];
  offsets: number[];
  lengths: number[];
}

interface WorkerReply {
  id: number;
  errors: Array<string | null>;
}

interface PoolWorker {
  worker: Worker;
  pending: Map<number, { resolve(reply: WorkerReply): void; reject(err: Error): void; bytes: number }>;
  pendingBytes: number;
}

function workerSource(libzstd: { module: string; wasm: string }): string {
  return `'use strict';
const { parentPort } = require('node:worker_threads');
const zlib = require('node:zlib');
const startLibzstd = ${startLibzstd.toString()};
let libzstdReady;
const loadLibzstd = () => (libzstdReady ??= startLibzstd(require(${JSON.stringify(libzstd.module)}), require('node:fs').readFileSync(${JSON.stringify(libzstd.wasm)})));
const decodeZstdCluster = ${decodeZstdCluster.toString()};
const inflateQcow2Cluster = ${inflateQcow2Cluster.toString()};
const decodeOne = ${decodeOne.toString()};
parentPort.on('message', async (m) => {
  const zstd = m.type === 'zstd' ? await loadLibzstd() : undefined;
  const input = new Uint8Array(m.input, m.inputOffset, m.inputLength);
  const output = new Uint8Array(m.output, m.outputOffset, m.outputLength);
  const errors = [];
  for (let k = 0; k < m.indexes.length; k++) {
    const i = m.indexes[k];
    const src = input.subarray(m.offsets[k], m.offsets[k] + m.lengths[k]);
    errors.push(await decodeOne(m.type, src, m.clusterSize, output.subarray(i * m.clusterSize, (i + 1) * m.clusterSize), zlib, zstd, decodeZstdCluster, inflateQcow2Cluster));
  }
  parentPort.postMessage({ id: m.id, errors });
});
`;
}

/**
 * Decodes one cluster into `out`; null on success, else the error message.
 * Serialised into the workers: self-contained, dependencies as parameters.
 */
async function decodeOne(
  type: ClusterBatch['type'],
  src: Uint8Array,
  clusterSize: number,
  out: Uint8Array,
  z: typeof zlib,
  zstd: LibzstdModule | undefined,
  decodeZstd: typeof decodeZstdCluster,
  inflate: typeof inflateQcow2Cluster,
): Promise<string | null> {
  try {
    if (type === 'zstd') decodeZstd(src, clusterSize, zstd!, out);
    else await inflate(z, src, clusterSize, out);
    return null;
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    return type === 'zstd' && !message.startsWith('zstd: ') ? `zstd: ${message}` : message;
  }
}

const isShared = (a: Uint8Array): boolean => a.buffer instanceof SharedArrayBuffer;

/** A copy of `a` in shared memory. */
function sharedCopy(a: Uint8Array): Uint8Array {
  const copy = new Uint8Array(new SharedArrayBuffer(a.length));
  copy.set(a);
  return copy;
}

export class DecodePool {
  private readonly workers: PoolWorker[] = [];
  private size: number;
  private sized = false;
  private nextId = 1;
  private disabled = false;
  private source: string | undefined;

  constructor(size = Math.min(MAX_WORKERS, Math.max(1, availableParallelism()))) {
    this.size = size;
  }

  /**
   * Decodes every cluster of `batch` into its output; each result is null
   * or the error message for that cluster alone.
   */
  async decode(batch: ClusterBatch): Promise<Array<string | null>> {
    const count = batch.offsets.length;
    if (count === 0) return [];
    if (batch.output.length < count * batch.clusterSize) {
      throw new RangeError(`output of ${batch.output.length} bytes for ${count} clusters of ${batch.clusterSize} bytes`);
    }
    if (batch.type === 'zstd') {
      const unavailable = libzstdUnavailable();
      if (unavailable !== undefined) throw new ResourceLimitError(unavailable);
    }
    const bytes = count * batch.clusterSize;
    const workers = bytes <= INLINE_MAX_BYTES ? [] : this.ensureWorkers();
    if (workers.length === 0) return this.decodeInline(batch);

    const input = isShared(batch.input) ? batch.input : sharedCopy(batch.input);
    const output = isShared(batch.output) ? batch.output : new Uint8Array(new SharedArrayBuffer(bytes));
    // Contiguous slices, one per worker, each worth a round trip.
    const slices = Math.max(1, Math.min(workers.length, count, Math.floor(bytes / MIN_BYTES_PER_MESSAGE)));
    const per = Math.ceil(count / slices);
    const parts: Array<Promise<WorkerReply>> = [];
    for (let first = 0; first < count; first += per) {
      const indexes: number[] = [];
      for (let i = first; i < Math.min(count, first + per); i++) indexes.push(i);
      const target = workers.reduce((best, w) => (w.pendingBytes < best.pendingBytes ? w : best));
      parts.push(
        this.send(target, {
          id: this.nextId++,
          type: batch.type,
          clusterSize: batch.clusterSize,
          input: input.buffer as SharedArrayBuffer,
          inputOffset: input.byteOffset,
          inputLength: input.byteLength,
          output: output.buffer as SharedArrayBuffer,
          outputOffset: output.byteOffset,
          outputLength: bytes,
          indexes,
          offsets: indexes.map((i) => batch.offsets[i]!),
          lengths: indexes.map((i) => batch.lengths[i]!),
        }),
      );
    }
    const replies = await Promise.all(parts);
    if (output !== batch.output) batch.output.set(output.subarray(0, bytes));
    return replies.flatMap((r) => r.errors);
  }

  /**
   * Decodes each source into a new cluster (copying on the way); each result
   * is the cluster or the Error for that source alone.
   */
  async decodeMany(type: ClusterBatch['type'], sources: Uint8Array[], clusterSize: number): Promise<Array<Buffer | Error>> {
    let total = 0;
    for (const s of sources) total += s.length;
    const input = new Uint8Array(new SharedArrayBuffer(Math.max(1, total)));
    const offsets: number[] = [];
    const lengths: number[] = [];
    let at = 0;
    for (const s of sources) {
      input.set(s, at);
      offsets.push(at);
      lengths.push(s.length);
      at += s.length;
    }
    const output = Buffer.from(new SharedArrayBuffer(Math.max(1, sources.length * clusterSize)));
    const errors = await this.decode({ type, clusterSize, input, offsets, lengths, output });
    return errors.map((e, i) => (e === null ? Buffer.from(output.subarray(i * clusterSize, (i + 1) * clusterSize)) : new Error(e)));
  }

  private async decodeInline(batch: ClusterBatch): Promise<Array<string | null>> {
    const errors: Array<string | null> = [];
    const zstd = batch.type === 'zstd' ? await loadLibzstd() : undefined;
    for (let i = 0; i < batch.offsets.length; i++) {
      const src = batch.input.subarray(batch.offsets[i]!, batch.offsets[i]! + batch.lengths[i]!);
      const out = batch.output.subarray(i * batch.clusterSize, (i + 1) * batch.clusterSize);
      errors.push(await decodeOne(batch.type, src, batch.clusterSize, out, zlib, zstd, decodeZstdCluster, inflateQcow2Cluster));
    }
    return errors;
  }

  private send(target: PoolWorker, request: WorkerRequest): Promise<WorkerReply> {
    return new Promise<WorkerReply>((resolve, reject) => {
      if (target.pending.size === 0) target.worker.ref();
      target.pending.set(request.id, { resolve, reject, bytes: request.outputLength });
      target.pendingBytes += request.outputLength;
      target.worker.postMessage(request);
    });
  }

  private ensureWorkers(): PoolWorker[] {
    if (this.disabled) return [];
    if (!this.sized) {
      this.sized = true;
      this.size = helperThreadsThatFit(this.size);
      this.disabled = this.size === 0;
      if (this.disabled) return [];
    }
    while (this.workers.length < this.size) {
      try {
        this.source ??= workerSource(libzstdPaths());
        this.workers.push(this.startWorker(this.source));
      } catch {
        this.disabled = this.workers.length === 0;
        break;
      }
    }
    return this.workers;
  }

  private startWorker(source: string): PoolWorker {
    const worker = new Worker(source, { eval: true, resourceLimits: HELPER_RESOURCE_LIMITS });
    const entry: PoolWorker = { worker, pending: new Map(), pendingBytes: 0 };
    worker.on('message', (reply: WorkerReply) => {
      const pending = entry.pending.get(reply.id);
      if (!pending) return;
      entry.pending.delete(reply.id);
      entry.pendingBytes -= pending.bytes;
      if (entry.pending.size === 0) worker.unref();
      pending.resolve(reply);
    });
    const fail = (err: Error): void => {
      const index = this.workers.indexOf(entry);
      if (index !== -1) this.workers.splice(index, 1);
      for (const p of entry.pending.values()) p.reject(new Error(`decompression worker failed: ${err.message}`));
      entry.pending.clear();
      entry.pendingBytes = 0;
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`exited with code ${code}`)));
    // After the listeners: adding a 'message' listener refs the worker's port again,
    // and an idle worker that was never sent a batch would then keep the process alive.
    worker.unref();
    return entry;
  }
}

let shared: DecodePool | undefined;

/** The process-wide pool, started on first use. */
export function sharedDecodePool(): DecodePool {
  shared ??= new DecodePool();
  return shared;
}
