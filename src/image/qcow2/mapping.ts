/**
 * Guest-to-host mapping of one qcow2 layer ("Cluster mapping" and "Extended
 * L2 Entries" in qcow2.rst): turns a guest range into runs of data, compressed
 * clusters, zeros and unallocated space, one L2 entry at a time.
 *
 * L2 tables are cached in an LRU with a byte budget (L2_CACHE_BUDGET, at least
 * L2_CACHE_MIN_TABLES tables): 8 MiB holds 128 tables of 64 KiB, which map
 * 64 GiB of guest space with standard entries.
 */
import { InvalidImageError } from '../../errors.js';
import type { ByteSource } from '../types.js';
import type { Qcow2Header } from './header.js';
import { BufferLru } from './lru.js';
import {
  COMPRESSED_SECTOR_SIZE,
  L1E_OFFSET_HI_MASK,
  L1E_OFFSET_LO_MASK,
  L1E_RESERVED_HI_MASK,
  L1E_RESERVED_LO_MASK,
  L1_ENTRY_SIZE,
  L2E_COMPRESSED_HI_BIT,
  L2E_COPIED_HI_BIT,
  L2E_RESERVED_HI_MASK,
  L2E_RESERVED_LO_MASK,
  L2E_OFFSET_HI_MASK,
  L2E_OFFSET_LO_MASK,
  L2E_ZERO_LO_BIT,
  MAX_HOST_OFFSET_BITS,
  SUBCLUSTERS_PER_CLUSTER,
  compressedOffsetBits,
} from './spec.js';

export const L2_CACHE_BUDGET = 8 * 1024 * 1024;
export const L2_CACHE_MIN_TABLES = 4;

export type RunKind = 'data' | 'compressed' | 'zero' | 'unallocated';

export interface Run {
  kind: RunKind;
  /** Guest offset and length of the run. */
  guest: number;
  length: number;
  /** data: host offset of `guest`. compressed: host offset of the compressed stream. */
  host: number;
  /** compressed: bytes from `host` to the end of the stream's last sector. */
  csize: number;
  /** compressed: guest offset where the cluster starts. */
  clusterGuest: number;
}

const TWO_32 = 2 ** 32;
const hex = (n: number): string => `0x${n.toString(16)}`;
/** A 64-bit entry from its two 32-bit halves, for messages. */
const entryHex = (hi: number, lo: number): string =>
  `0x${(hi >>> 0).toString(16).padStart(8, '0')}${(lo >>> 0).toString(16).padStart(8, '0')}`;

export class ClusterMap {
  private readonly clusterSize: number;
  private readonly subclusterSize: number;
  /** Guest bytes mapped by one L2 table. */
  private readonly l2Span: number;
  private readonly l2Cache = new BufferLru<number>(L2_CACHE_BUDGET, L2_CACHE_MIN_TABLES);
  private readonly l2Pending = new Map<number, Promise<Buffer>>();
  private readonly csizeShift: bigint;
  private readonly coffsetMask: bigint;
  private readonly csizeMask: bigint;

  constructor(
    private readonly source: ByteSource,
    private readonly header: Qcow2Header,
    private readonly l1: Buffer,
  ) {
    this.clusterSize = header.clusterSize;
    this.subclusterSize = header.clusterSize / SUBCLUSTERS_PER_CLUSTER;
    this.l2Span = header.clusterSize * header.l2Entries;
    // "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8); offset in bits
    // 0..x-1, additional sector count in bits x..61.
    const x = compressedOffsetBits(header.clusterBits);
    this.csizeShift = BigInt(x);
    this.coffsetMask = (1n << BigInt(x)) - 1n;
    this.csizeMask = (1n << BigInt(header.clusterBits - 8)) - 1n;
  }

  /** Host offsets of the L2 tables the L1 table references (for size estimates). */
  l2TableOffsets(): Set<number> {
    const offsets = new Set<number>();
    for (let i = 0; i < this.header.l1Size; i++) {
      const offset = this.l1EntryOffset(i);
      if (offset !== 0) offsets.add(offset);
    }
    return offsets;
  }

  /**
   * Runs covering [offset, offset + length), in guest order, adjacent runs of
   * the same kind merged (data runs only when their host ranges are contiguous,
   * unless `forExtents`, where compressed clusters also count as data).
   */
  async runs(offset: number, length: number, forExtents: boolean): Promise<Run[]> {
    const runs: Run[] = [];
    const push = (kind: RunKind, guest: number, len: number, host: number, csize = 0, clusterGuest = 0): void => {
      if (forExtents && kind === 'compressed') kind = 'data';
      const last = runs[runs.length - 1];
      if (
        last !== undefined &&
        last.kind === kind &&
        kind !== 'compressed' &&
        (kind !== 'data' || forExtents || last.host + last.length === host)
      ) {
        last.length += len;
        return;
      }
      runs.push({ kind, guest, length: len, host, csize, clusterGuest });
    };

    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const l1Index = Math.floor(pos / this.l2Span);
      const tableEnd = Math.min(end, (l1Index + 1) * this.l2Span);
      // Past the L1 table (only possible for a size QEMU rounded down) is unallocated.
      const l2Offset = l1Index < this.header.l1Size ? this.checkedL1EntryOffset(l1Index) : 0;
      if (l2Offset === 0) {
        // "L1 table entry": offset 0 means the whole L2 range is unallocated.
        push('unallocated', pos, tableEnd - pos, 0);
        pos = tableEnd;
        continue;
      }
      const table = await this.loadL2(l2Offset, l1Index);
      while (pos < tableEnd) {
        const clusterIndex = Math.floor(pos / this.clusterSize);
        const clusterStart = clusterIndex * this.clusterSize;
        const clusterEnd = Math.min(clusterStart + this.clusterSize, tableEnd);
        const l2Index = clusterIndex - l1Index * this.header.l2Entries;
        this.mapCluster(table, l2Offset, l2Index, clusterStart, pos, clusterEnd, push);
        pos = clusterEnd;
      }
    }
    return runs;
  }

  /** Maps [from, to) inside one guest cluster through its L2 entry. */
  private mapCluster(
    table: Buffer,
    l2Offset: number,
    l2Index: number,
    clusterStart: number,
    from: number,
    to: number,
    push: (kind: RunKind, guest: number, len: number, host: number, csize?: number, clusterGuest?: number) => void,
  ): void {
    const e = l2Index * this.header.l2EntrySize;
    const hi = table.readUInt32BE(e);
    const lo = table.readUInt32BE(e + 4);
    const extended = this.header.extendedL2;
    const where = (): string =>
      `guest offset ${hex(clusterStart)} (L2 table at ${hex(l2Offset)}, index ${l2Index})`;
    // "Extended L2 Entries": bits 0-31 of the bitmap are allocation, bits 32-63 "reads as zeros".
    const zeroMask = extended ? table.readUInt32BE(e + 8) : 0;
    const allocMask = extended ? table.readUInt32BE(e + 12) : 0;

    const invalid = (why: string): InvalidImageError =>
      new InvalidImageError(`invalid L2 entry ${entryHex(hi, lo)} for ${where()}: ${why}`, { file: this.source.name });

    // "L2 table entry", bit 62: compressed cluster.
    if (hi & L2E_COMPRESSED_HI_BIT) {
      // "L2 table entry", bit 63: 0 for compressed clusters.
      if (hi & L2E_COPIED_HI_BIT) throw invalid('compressed cluster with the copied flag (bit 63) set');
      // "Subcluster Allocation Bitmap (for compressed clusters)": reserved, must be 0.
      if (zeroMask !== 0 || allocMask !== 0) throw invalid('compressed cluster with a non-zero subcluster bitmap');
      const entry = (BigInt(hi) << 32n) | BigInt(lo);
      const coffset = entry & this.coffsetMask;
      // The offset field may not use bits above 55.
      if (coffset >> BigInt(MAX_HOST_OFFSET_BITS) !== 0n || coffset > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw new InvalidImageError(`bad compressed cluster descriptor for ${where()}: host offset 0x${coffset.toString(16)} is out of range`, {
          file: this.source.name,
        });
      }
      const host = Number(coffset);
      const sectors = Number((entry >> this.csizeShift) & this.csizeMask) + 1;
      const csize = sectors * COMPRESSED_SECTOR_SIZE - (host % COMPRESSED_SECTOR_SIZE);
      push('compressed', from, to - from, host, csize, clusterStart);
      return;
    }

    // "Standard Cluster Descriptor": reserved bits, for every kind of entry
    // (data, zero, unallocated), as qemu-img check does.
    const reservedLo = extended ? L2E_RESERVED_LO_MASK | L2E_ZERO_LO_BIT : L2E_RESERVED_LO_MASK;
    if ((hi & L2E_RESERVED_HI_MASK) !== 0 || (lo & reservedLo) !== 0) throw invalid('reserved bits are set');
    // "Standard Cluster Descriptor", bits 9-55: host cluster offset.
    const hostCluster = (hi & L2E_OFFSET_HI_MASK) * TWO_32 + ((lo & L2E_OFFSET_LO_MASK) >>> 0);
    // Bits 9-55: offset 0 with bit 63 set means host offset 0 in an external data file, which we do not have.
    if (hostCluster === 0 && hi & L2E_COPIED_HI_BIT) throw invalid('offset 0 with the copied flag (bit 63) set');
    // Bits 9-55 "must be aligned to a cluster boundary", whatever the entry's kind (QEMU's
    // qcow2_get_host_offset refuses a misaligned zero cluster too).
    if (hostCluster % this.clusterSize !== 0) {
      throw invalid(`host cluster offset ${hex(hostCluster)} is not cluster aligned`);
    }
    if (!extended) {
      // "Standard Cluster Descriptor", bit 0: reads as zeros (version 3 only).
      if (lo & L2E_ZERO_LO_BIT) {
        if (this.header.version < 3) throw invalid('zero cluster flag in a version 2 image');
        push('zero', from, to - from, 0);
        return;
      }
      if (hostCluster === 0) {
        push('unallocated', from, to - from, 0);
        return;
      }
      push('data', from, to - from, hostCluster + (from - clusterStart));
      return;
    }

    // "Subcluster Allocation Bitmap (for standard clusters)", QEMU's qcow2_get_subcluster_type rules.
    if (hostCluster === 0 && allocMask !== 0) throw invalid('unallocated cluster with allocated subclusters');
    if ((allocMask & zeroMask) !== 0) throw invalid('subcluster both allocated and reading as zeros');
    // Fast paths: one state for the whole cluster.
    if (zeroMask === 0xffffffff) {
      push('zero', from, to - from, 0);
      return;
    }
    if (allocMask === 0xffffffff) {
      push('data', from, to - from, hostCluster + (from - clusterStart));
      return;
    }
    if (allocMask === 0 && zeroMask === 0) {
      push('unallocated', from, to - from, 0);
      return;
    }
    const state = (sc: number): RunKind =>
      (zeroMask >>> sc) & 1 ? 'zero' : (allocMask >>> sc) & 1 ? 'data' : 'unallocated';
    const sub = this.subclusterSize;
    let sc = Math.floor((from - clusterStart) / sub);
    const scEnd = Math.ceil((to - clusterStart) / sub);
    while (sc < scEnd) {
      const kind = state(sc);
      let next = sc + 1;
      while (next < scEnd && state(next) === kind) next++;
      const a = Math.max(from, clusterStart + sc * sub);
      const b = Math.min(to, clusterStart + next * sub);
      push(kind, a, b - a, kind === 'data' ? hostCluster + (a - clusterStart) : 0);
      sc = next;
    }
  }

  /** The L2 table offset of an L1 entry the guest uses, refusing reserved bits ("L1 table entry"). */
  private checkedL1EntryOffset(index: number): number {
    const hi = this.l1.readUInt32BE(index * L1_ENTRY_SIZE);
    const lo = this.l1.readUInt32BE(index * L1_ENTRY_SIZE + 4);
    if ((hi & L1E_RESERVED_HI_MASK) !== 0 || (lo & L1E_RESERVED_LO_MASK) !== 0) {
      throw new InvalidImageError(`invalid L1 entry ${entryHex(hi, lo)} (L1 index ${index}): reserved bits are set`, {
        file: this.source.name,
      });
    }
    return this.l1EntryOffset(index);
  }

  /** "L1 table entry", bits 9-55: L2 table offset (0: unallocated). */
  private l1EntryOffset(index: number): number {
    const hi = this.l1.readUInt32BE(index * L1_ENTRY_SIZE) & L1E_OFFSET_HI_MASK;
    const lo = (this.l1.readUInt32BE(index * L1_ENTRY_SIZE + 4) & L1E_OFFSET_LO_MASK) >>> 0;
    return hi * TWO_32 + lo;
  }

  private async loadL2(l2Offset: number, l1Index: number): Promise<Buffer> {
    const cached = this.l2Cache.get(l2Offset);
    if (cached) return cached;
    const pending = this.l2Pending.get(l2Offset);
    if (pending) return pending;
    const file = this.source.name;
    if (l2Offset % this.clusterSize !== 0) {
      throw new InvalidImageError(`L2 table offset ${hex(l2Offset)} (L1 index ${l1Index}) is not cluster aligned`, { file });
    }
    if (l2Offset + this.clusterSize > this.source.size) {
      throw new InvalidImageError(
        `L2 table at offset ${hex(l2Offset)} (L1 index ${l1Index}) is past the end of the file (${this.source.size} bytes)`,
        { file },
      );
    }
    const load = this.source.read(l2Offset, this.clusterSize).then(
      (table) => {
        this.l2Pending.delete(l2Offset);
        this.l2Cache.set(l2Offset, table);
        return table;
      },
      (err: unknown) => {
        this.l2Pending.delete(l2Offset);
        throw err;
      },
    );
    this.l2Pending.set(l2Offset, load);
    return load;
  }

  clearCache(): void {
    this.l2Cache.clear();
  }
}
