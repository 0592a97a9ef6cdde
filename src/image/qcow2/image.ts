/**
 * Read-only qcow2 reader (QEMU docs/interop/qcow2.rst): versions 2 and 3,
 * backing chains, zero clusters, extended L2 entries with subclusters,
 * deflate and zstd compressed clusters. Byte-identical to
 * `qemu-img convert -O raw` on the same image.
 *
 * Read path (readInto; read() is readInto on a fresh buffer): the guest range
 * is mapped to runs (see mapping.ts); host-contiguous data is read straight
 * into the caller's buffer in source reads of up to MAX_SOURCE_READ, zeros
 * are filled in, backing reads recurse. Nearby compressed clusters share one
 * source read into reused shared memory and are decompressed in parallel on
 * worker threads (decode-pool.ts), then copied to the caller's buffer;
 * partially read compressed clusters are kept in a small cache
 * (CLUSTER_CACHE_BUDGET) so that sequential small reads do not decompress a
 * cluster again and again.
 */
import { InvalidImageError, UnsupportedImageError } from '../../errors.js';
import { computeIdentity, sha256Hex } from '../identity.js';
import { checkTarget, readSourceInto } from '../file-source.js';
import { checkRange } from '../raw.js';
import type { ByteSource, DiskImage, ExtentKind, ImageExtent, ImageFormat, LayerInfo } from '../types.js';
import { Semaphore, SharedScratch, sharedScratch } from './buffers.js';
import { sharedDecodePool } from './decode-pool.js';
import { HEADER_PROBE_SIZE, parseFixedHeader, parseHeader, type Qcow2Header } from './header.js';
import { BufferLru } from './lru.js';
import { checkBitmaps } from './bitmaps.js';
import { ClusterMap, type Run } from './mapping.js';
import { checkSnapshotTable } from './snapshots.js';
import { L1_ENTRY_SIZE, SNAPSHOT_HEADER_SIZE } from './spec.js';

export { QCOW2_MAGIC } from './spec.js';

/** Largest single read issued to the source. */
export const MAX_SOURCE_READ = 4 * 1024 * 1024;
/**
 * Largest source read for a group of compressed clusters: small enough that
 * reading one group overlaps with decompressing the previous one.
 */
const MAX_COMPRESSED_GROUP_READ = 1024 * 1024;
/** Source reads (or compressed groups) in flight per read() call. */
const READ_CONCURRENCY = 8;
/** Decompressed clusters kept for the next read (at least 2, whatever the cluster size). */
const CLUSTER_CACHE_BUDGET = 4 * 1024 * 1024;
/** Decompressed bytes of one group at most (at least one cluster). */
const MAX_DECOMPRESSED_GROUP = 2 * 1024 * 1024;
/** Scratch memory of the compressed groups in flight per image (at least 2 groups). */
const COMPRESSED_IN_FLIGHT_BUDGET = 32 * 1024 * 1024;
/** Compressed groups in flight per image at most: a few per decode worker. */
const MAX_COMPRESSED_IN_FLIGHT = 8;

export interface Qcow2OpenContext {
  /** Open tables and data even when the corrupt bit is set. */
  force: boolean;
  /** Opens the backing file named in the header (relative to this image). */
  openBacking(name: string, format: ImageFormat | undefined): Promise<DiskImage>;
}

const hex = (n: number): string => `0x${n.toString(16)}`;

export class Qcow2Image implements DiskImage {
  readonly format = 'qcow2' as const;
  readonly identity: string;
  private readonly clusterCache: BufferLru<number>;
  /** Clusters per compressed group at most. */
  private readonly maxGroupClusters: number;
  /** Shared buffers for the compressed data and the decompressed clusters of a group. */
  private readonly compressedScratch: SharedScratch;
  private readonly decodedScratch: SharedScratch;
  /** Bounds the compressed groups in flight, and so the scratch memory they hold. */
  private readonly compressedGroups: Semaphore;
  private closed = false;

  private constructor(
    private readonly source: ByteSource,
    readonly header: Qcow2Header,
    private readonly map: ClusterMap,
    private readonly layerInfo: LayerInfo,
    private readonly backing: DiskImage | undefined,
  ) {
    this.clusterCache = new BufferLru<number>(CLUSTER_CACHE_BUDGET, 2);
    // A group's data spans at most MAX_COMPRESSED_GROUP_READ bytes, or one
    // cluster's compressed data, which the descriptor's sector count limits to
    // 2^(cluster_bits - 8) sectors = 2 clusters ("Compressed Clusters Descriptor").
    this.maxGroupClusters = Math.max(1, Math.floor(MAX_DECOMPRESSED_GROUP / header.clusterSize));
    this.compressedScratch = sharedScratch(Math.max(MAX_COMPRESSED_GROUP_READ, 2 * header.clusterSize));
    this.decodedScratch = sharedScratch(this.maxGroupClusters * header.clusterSize);
    const groupBytes = this.compressedScratch.size + this.decodedScratch.size;
    this.compressedGroups = new Semaphore(
      Math.max(2, Math.min(MAX_COMPRESSED_IN_FLIGHT, Math.floor(COMPRESSED_IN_FLIGHT_BUDGET / groupBytes))),
    );
    this.identity = computeIdentity('qcow2', header.virtualSize, this.layers());
  }

  /**
   * Opens `source` as qcow2. On success the image owns `source` and the
   * backing image; on failure the caller still owns `source`.
   */
  static async open(source: ByteSource, ctx: Qcow2OpenContext): Promise<Qcow2Image> {
    const file = source.name;
    const head = await source.read(0, Math.min(source.size, HEADER_PROBE_SIZE));
    const { clusterSize } = parseFixedHeader(head, source.size, file);
    const headerCluster = await source.read(0, Math.min(source.size, clusterSize));
    const { header } = parseHeader(headerCluster, source.size, file, { force: ctx.force });
    const l1 = header.l1Size > 0 ? await source.read(header.l1TableOffset, header.l1Size * L1_ENTRY_SIZE) : Buffer.alloc(0);
    // Tables that do not change guest data, but whose damage makes QEMU refuse the image.
    if (header.nbSnapshots > 0) await checkSnapshotTable(source, header);
    if (header.bitmaps !== undefined) await checkBitmaps(source, header, header.bitmaps);

    let backingFormat: ImageFormat | undefined;
    if (header.backingFormat !== undefined) {
      if (header.backingFormat !== 'raw' && header.backingFormat !== 'qcow2') {
        throw new UnsupportedImageError(
          `backing file format ${JSON.stringify(header.backingFormat)} is not supported (only raw and qcow2)`,
          { file },
        );
      }
      backingFormat = header.backingFormat;
    }

    const map = new ClusterMap(source, header, l1);
    const layerInfo: LayerInfo = {
      name: file,
      format: 'qcow2',
      virtualSize: header.virtualSize,
      fileSize: source.size,
      version: header.version,
      clusterSize,
      compressionType: header.compressionType,
      extendedL2: header.extendedL2,
      allocatedBytes: estimateAllocatedBytes(header, source.size, map.l2TableOffsets().size),
      stamp: source.stamp,
      metadata: sha256Hex(headerCluster, l1),
    };
    if (header.backingFile !== undefined) layerInfo.backingFile = header.backingFile;
    if (header.backingFormat !== undefined) layerInfo.backingFormat = header.backingFormat;

    const backing = header.backingFile !== undefined ? await ctx.openBacking(header.backingFile, backingFormat) : undefined;
    return new Qcow2Image(source, header, map, layerInfo, backing);
  }

  get name(): string {
    return this.source.name;
  }

  get virtualSize(): number {
    return this.header.virtualSize;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkRange(this, offset, length);
    this.checkOpen();
    const out = Buffer.allocUnsafe(length);
    await this.readInto(offset, length, out, 0);
    return out;
  }

  /**
   * Guest bytes [offset, offset + length) into target[targetOffset ...]:
   * data clusters are read straight into `target`, zeros are filled in,
   * backing reads recurse, compressed clusters are decompressed and copied.
   * On failure the target range holds unspecified bytes, and no read is
   * still writing into it.
   */
  async readInto(offset: number, length: number, target: Buffer, targetOffset: number): Promise<void> {
    checkRange(this, offset, length);
    this.checkOpen();
    checkTarget(target, targetOffset, length);
    if (length === 0) return;
    const runs = await this.map.runs(offset, length, false);
    // Guest offset g lands at target[base + g].
    const base = targetOffset - offset;
    const jobs: Array<() => Promise<void>> = [];
    for (let i = 0; i < runs.length; ) {
      const run = runs[i]!;
      const at = base + run.guest;
      switch (run.kind) {
        case 'zero':
          target.fill(0, at, at + run.length);
          i++;
          break;
        case 'data':
          for (let done = 0; done < run.length; done += MAX_SOURCE_READ) {
            const n = Math.min(MAX_SOURCE_READ, run.length - done);
            const d = done;
            jobs.push(() => this.readHostInto(run.host + d, n, run.guest + d, target, at + d));
          }
          i++;
          break;
        case 'unallocated':
          this.planBackingRead(run, target, at, jobs);
          i++;
          break;
        case 'compressed': {
          const group = [run];
          let j = i + 1;
          for (; j < runs.length; j++) {
            const next = runs[j]!;
            const prev = group[group.length - 1]!;
            if (
              next.kind !== 'compressed' ||
              next.host < prev.host ||
              next.host > prev.host + prev.csize + this.header.clusterSize ||
              next.host + next.csize - run.host > MAX_COMPRESSED_GROUP_READ ||
              group.length >= this.maxGroupClusters
            ) {
              break;
            }
            group.push(next);
          }
          jobs.push(() => this.readCompressed(group, target, base));
          i = j;
          break;
        }
      }
    }
    if (jobs.length === 1) await jobs[0]!();
    else await runLimited(jobs, READ_CONCURRENCY);
  }

  /**
   * Extents through the chain ("Cluster mapping"): data, compressed and zero
   * clusters (or subclusters, "Extended L2 Entries") are this layer's (depth
   * 0); unallocated ones are the backing file's within its size (its depths
   * plus one), and zeros past its end are this layer's, still unallocated.
   */
  async extents(offset: number, length: number): Promise<ImageExtent[]> {
    checkRange(this, offset, length);
    this.checkOpen();
    const result: ImageExtent[] = [];
    const push = (kind: ExtentKind, depth: number, off: number, len: number): void => {
      if (len <= 0) return;
      const last = result[result.length - 1];
      if (last && last.kind === kind && last.depth === depth && last.offset + last.length === off) last.length += len;
      else result.push({ offset: off, length: len, kind, depth });
    };
    if (length === 0) return result;
    const runs = await this.map.runs(offset, length, true);
    for (const run of runs) {
      if (run.kind !== 'unallocated') {
        push(run.kind === 'zero' ? 'zero' : 'data', 0, run.guest, run.length);
        continue;
      }
      // Unallocated here: the backing image decides, within its size.
      const runEnd = run.guest + run.length;
      const backingEnd = this.backing ? Math.min(runEnd, this.backing.virtualSize) : run.guest;
      if (backingEnd > run.guest) {
        for (const ext of await this.backing!.extents(run.guest, backingEnd - run.guest)) {
          push(ext.kind, ext.depth + 1, ext.offset, ext.length);
        }
      }
      push('unallocated', 0, Math.max(run.guest, backingEnd), runEnd - Math.max(run.guest, backingEnd));
    }
    return result;
  }

  layers(): LayerInfo[] {
    return [{ ...this.layerInfo }, ...(this.backing ? this.backing.layers() : [])];
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.map.clearCache();
    this.clusterCache.clear();
    const results = await Promise.allSettled([this.source.close(), this.backing?.close()]);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  private checkOpen(): void {
    if (this.closed) throw new InvalidImageError('image is closed', { file: this.name });
  }

  /** Host bytes of this layer's file into target[at ...], refusing ranges past its end. */
  private readHostInto(host: number, length: number, guest: number, target: Buffer, at: number): Promise<void> {
    if (host + length > this.source.size) {
      return Promise.reject(
        new InvalidImageError(
          `data for guest offset ${hex(guest)} (host offset ${hex(host)}, ${length} bytes) is past the end of the file (${this.source.size} bytes)`,
          { file: this.name },
        ),
      );
    }
    return readSourceInto(this.source, host, length, target, at);
  }

  /** Unallocated here: backing data within its size, zeros beyond ("Cluster mapping"). */
  private planBackingRead(run: Run, target: Buffer, at: number, jobs: Array<() => Promise<void>>): void {
    const backing = this.backing;
    const inBacking = backing ? Math.max(0, Math.min(run.guest + run.length, backing.virtualSize) - run.guest) : 0;
    target.fill(0, at + inBacking, at + run.length);
    for (let done = 0; done < inBacking; done += MAX_SOURCE_READ) {
      const n = Math.min(MAX_SOURCE_READ, inBacking - done);
      const d = done;
      jobs.push(() => readSourceInto(backing!, run.guest + d, n, target, at + d));
    }
  }

  /**
   * Reads a group of compressed clusters whose data lies close together in
   * the file with one source read into shared scratch memory, has the decode
   * workers decompress them into more shared scratch memory, and copies them
   * to target[base + guest].
   */
  private async readCompressed(group: Run[], target: Buffer, base: number): Promise<void> {
    const missing: Run[] = [];
    for (const run of group) {
      const cached = this.clusterCache.get(run.host);
      if (cached) copyRun(cached, run, target, base);
      else missing.push(run);
    }
    if (missing.length === 0) return;
    const fileSize = this.source.size;
    for (const run of missing) {
      // The data must start inside the file; its last sector may run past EOF.
      if (run.host >= fileSize) {
        throw new InvalidImageError(
          `bad compressed cluster descriptor for guest offset ${hex(run.clusterGuest)}: data offset ${hex(run.host)} is past the end of the file (${fileSize} bytes)`,
          { file: this.name },
        );
      }
    }
    const start = missing[0]!.host;
    let end = start;
    for (const run of missing) end = Math.max(end, run.host + run.csize);
    const clusterSize = this.header.clusterSize;

    await this.compressedGroups.acquire();
    const input = this.compressedScratch.take(end - start);
    const output = this.decodedScratch.take(missing.length * clusterSize);
    try {
      const inFile = Math.min(end, fileSize) - start;
      await readSourceInto(this.source, start, inFile, input, 0);
      // QEMU reads the part of the last sector past EOF as zeros; so do we.
      input.fill(0, inFile, end - start);
      const errors = await sharedDecodePool().decode({
        type: this.header.compressionType,
        clusterSize,
        input: input.subarray(0, end - start),
        offsets: missing.map((run) => run.host - start),
        lengths: missing.map((run) => run.csize),
        output,
      });
      missing.forEach((run, i) => {
        const error = errors[i];
        if (error !== null && error !== undefined) {
          throw new InvalidImageError(
            `compressed cluster at guest offset ${hex(run.clusterGuest)} (host offset ${hex(run.host)}) cannot be decompressed: ${error}`,
            { file: this.name },
          );
        }
        const cluster = output.subarray(i * clusterSize, (i + 1) * clusterSize);
        copyRun(cluster, run, target, base);
        if (run.length < clusterSize) {
          // The scratch buffer is reused: the cache keeps a copy (Buffer.from
          // would copy byte by byte from shared memory).
          const copy = Buffer.allocUnsafeSlow(clusterSize);
          cluster.copy(copy);
          this.clusterCache.set(run.host, copy);
        }
      });
    } finally {
      this.compressedScratch.give(input);
      this.decodedScratch.give(output);
      this.compressedGroups.release();
    }
  }
}

function copyRun(cluster: Buffer, run: Run, target: Buffer, base: number): void {
  const from = run.guest - run.clusterGuest;
  cluster.copy(target, base + run.guest, from, from + run.length);
}

/**
 * Approximate host bytes of data clusters: the file size minus the metadata
 * we can count without reading more than the L1 table (header cluster, L1
 * and L2 tables, refcount table and an estimate of its blocks, snapshot
 * table). Freed clusters still inside the file are counted as data.
 */
function estimateAllocatedBytes(header: Qcow2Header, fileSize: number, l2Tables: number): number {
  const cs = header.clusterSize;
  const clustersOf = (bytes: number): number => Math.ceil(bytes / cs);
  const refblockEntries = (cs * 8) / 2 ** header.refcountOrder;
  const metadataClusters =
    1 +
    clustersOf(header.l1Size * L1_ENTRY_SIZE) +
    l2Tables +
    header.refcountTableClusters +
    Math.ceil(clustersOf(fileSize) / refblockEntries) +
    clustersOf(header.nbSnapshots * SNAPSHOT_HEADER_SIZE);
  return Math.max(0, fileSize - metadataClusters * cs);
}

/**
 * Runs async jobs with at most `limit` in flight; stops starting new ones
 * after a failure, and rejects with the first failure only once every
 * started job has settled (they write into the caller's buffer).
 */
async function runLimited(jobs: Array<() => Promise<void>>, limit: number): Promise<void> {
  let next = 0;
  let failure: { error: unknown } | undefined;
  const worker = async (): Promise<void> => {
    while (failure === undefined && next < jobs.length) {
      const job = jobs[next++]!;
      try {
        await job();
      } catch (error) {
        failure ??= { error };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, jobs.length) }, worker));
  if (failure !== undefined) throw failure.error;
}
