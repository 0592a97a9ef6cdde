/**
 * The cache index snapshot: the whole index at one moment, written by
 * compaction (temp file, fsync, rename) and loaded at start-up before the
 * journal of the same epoch is replayed on top. Entries are stored in
 * eviction order so that recency survives a restart. Layout (little-endian)
 * is documented in docs/cache-device.md.
 */
import { crc32 } from 'node:zlib';
import { SlotFlag, SlotState, type SlotIndex, type SlotList, type Space } from './slot-index.js';
import { MAX_SPACE_HEX } from './journal.js';

export const SNAPSHOT_MAGIC = Buffer.from('BCCACHES', 'latin1');
export const SNAPSHOT_VERSION = 1;
export const SNAPSHOT_HEADER_SIZE = 40;
const ENTRY_SIZE = 24;
const SPACE_FIXED = 20;

export interface SnapshotHeader {
  blockSize: number;
  slotCount: number;
  epoch: number;
  spaceCount: number;
  entryCount: number;
}

/** Fills fixed-size chunks; the snapshot of a large cache is never one huge buffer. */
class ChunkWriter {
  private static readonly CHUNK = 1024 * 1024;
  readonly chunks: Buffer[] = [];
  private buf = Buffer.allocUnsafe(ChunkWriter.CHUNK);
  private dv = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.length);
  private at = 0;
  crc = 0;

  /** Room for n more bytes at `offset`. */
  reserve(n: number): void {
    if (this.at + n > this.buf.length) this.cut();
  }

  /** The current chunk (Buffer methods) and a DataView on it (fast little-endian stores). */
  get buffer(): Buffer {
    return this.buf;
  }

  get view(): DataView {
    return this.dv;
  }

  get offset(): number {
    return this.at;
  }

  advance(n: number): void {
    this.at += n;
  }

  finish(): Buffer[] {
    this.cut();
    return this.chunks;
  }

  private cut(): void {
    if (this.at === 0) return;
    const chunk = this.buf.subarray(0, this.at);
    this.crc = crc32(chunk, this.crc);
    this.chunks.push(chunk);
    this.buf = Buffer.allocUnsafe(ChunkWriter.CHUNK);
    this.dv = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.length);
    this.at = 0;
  }
}

/**
 * Encodes the index (its mapped slots only) as snapshot chunks: header,
 * body, then the body's CRC-32 as the last 4 bytes.
 */
export function encodeSnapshot(index: SlotIndex, meta: { blockSize: number; slotCount: number; epoch: number }): Buffer[] {
  const w = new ChunkWriter();
  const spaces = index.spacesById.filter((sp): sp is Space => sp !== undefined);
  const rank = new Map<Space, number>();
  for (const sp of index.bootOrder()) rank.set(sp, rank.size + 1);
  for (const sp of spaces) {
    const len = sp.hex.length;
    const size = SPACE_FIXED + pad4(len);
    w.reserve(size);
    const b = w.buffer;
    const o = w.offset;
    b.writeUInt32LE(sp.id, o);
    b.writeUInt32LE(rank.get(sp) ?? 0, o + 4);
    b.writeDoubleLE(sp.lastBootedAt ?? Number.NaN, o + 8);
    b.writeUInt16LE(len, o + 16);
    b.writeUInt16LE(0, o + 18);
    b.fill(0, o + SPACE_FIXED, o + size);
    b.write(sp.hex, o + SPACE_FIXED, 'latin1');
    w.advance(size);
  }
  let entries = 0;
  const { spaceOf, blockOf, crcOf, flags } = index;
  const keep = SlotFlag.BOOT | SlotFlag.UNVERIFIED;
  const writeList = (list: SlotList): void => {
    for (let slot = list.head; slot >= 0; slot = index.nextSlot(slot)) {
      w.reserve(ENTRY_SIZE);
      const v = w.view;
      const o = w.offset;
      const block = blockOf[slot];
      v.setUint32(o, slot, true);
      v.setUint32(o + 4, spaceOf[slot], true);
      v.setUint32(o + 8, block >>> 0, true);
      v.setUint32(o + 12, Math.floor(block / 0x1_0000_0000), true);
      v.setUint32(o + 16, crcOf[slot], true);
      v.setUint32(o + 20, flags[slot] & keep, true);
      w.advance(ENTRY_SIZE);
      entries++;
    }
  };
  writeList(index.other);
  for (const sp of index.bootOrder()) writeList(sp.boot);
  const body = w.finish();
  const trailer = Buffer.alloc(4);
  trailer.writeUInt32LE(w.crc >>> 0);

  const header = Buffer.alloc(SNAPSHOT_HEADER_SIZE);
  SNAPSHOT_MAGIC.copy(header, 0);
  header.writeUInt32LE(SNAPSHOT_VERSION, 8);
  header.writeUInt32LE(meta.blockSize, 12);
  header.writeUInt32LE(meta.slotCount, 16);
  header.writeUInt32LE(meta.epoch, 20);
  header.writeUInt32LE(spaces.length, 24);
  header.writeUInt32LE(entries, 28);
  header.writeUInt32LE(0, 32);
  header.writeUInt32LE(crc32(header.subarray(0, 36)), 36);
  return [header, ...body, trailer];
}

/** The header, or a one-line reason why the file is not a usable snapshot. */
export function decodeSnapshotHeader(buf: Buffer): SnapshotHeader | string {
  if (buf.length < SNAPSHOT_HEADER_SIZE + 4) return `snapshot is ${buf.length} bytes, shorter than its header`;
  if (!buf.subarray(0, 8).equals(SNAPSHOT_MAGIC)) return 'snapshot has a bad magic number';
  if (buf.readUInt32LE(36) !== crc32(buf.subarray(0, 36))) return 'snapshot header checksum mismatch';
  const version = buf.readUInt32LE(8);
  if (version !== SNAPSHOT_VERSION) return `snapshot version ${version} is not supported`;
  return {
    blockSize: buf.readUInt32LE(12),
    slotCount: buf.readUInt32LE(16),
    epoch: buf.readUInt32LE(20),
    spaceCount: buf.readUInt32LE(24),
    entryCount: buf.readUInt32LE(28),
  };
}

/**
 * Loads the snapshot body into an empty index whose slot count is at least
 * header.slotCount. Entries at slots >= `usable` are skipped (the cache
 * shrank). Returns a one-line reason when the body is damaged or
 * inconsistent (the index is then left partly filled and must be discarded).
 */
export function loadSnapshot(buf: Buffer, header: SnapshotHeader, index: SlotIndex, usable: number): string | undefined {
  const bodyEnd = buf.length - 4;
  if (buf.readUInt32LE(bodyEnd) !== crc32(buf.subarray(SNAPSHOT_HEADER_SIZE, bodyEnd))) {
    return 'snapshot body checksum mismatch';
  }
  let at = SNAPSHOT_HEADER_SIZE;
  const ranked: { sp: Space; rank: number }[] = [];
  for (let i = 0; i < header.spaceCount; i++) {
    if (at + SPACE_FIXED > bodyEnd) return 'snapshot space table is truncated';
    const id = buf.readUInt32LE(at);
    const rank = buf.readUInt32LE(at + 4);
    const bootedAt = buf.readDoubleLE(at + 8);
    const len = buf.readUInt16LE(at + 16);
    if (len === 0 || len > MAX_SPACE_HEX || at + SPACE_FIXED + pad4(len) > bodyEnd) return 'snapshot space entry is malformed';
    const hex = buf.toString('latin1', at + SPACE_FIXED, at + SPACE_FIXED + len);
    if (!isSpaceHex(hex)) return 'snapshot space identity is not a hex string';
    if (id > 0xffffff || index.spacesById[id] !== undefined || index.spaces.has(hex)) return 'snapshot space table has duplicates';
    const sp = index.space(hex, id);
    if (!Number.isNaN(bootedAt)) sp.lastBootedAt = bootedAt;
    if (rank > 0) ranked.push({ sp, rank });
    at += SPACE_FIXED + pad4(len);
  }
  if (bodyEnd - at !== header.entryCount * ENTRY_SIZE) return 'snapshot entry table has the wrong size';
  const v = new DataView(buf.buffer, buf.byteOffset, buf.length);
  for (let i = 0; i < header.entryCount; i++, at += ENTRY_SIZE) {
    const slot = v.getUint32(at, true);
    const sp = index.spacesById[v.getUint32(at + 4, true)];
    const block = v.getUint32(at + 8, true) + v.getUint32(at + 12, true) * 0x1_0000_0000;
    const crc = v.getUint32(at + 16, true);
    const flags = v.getUint32(at + 20, true);
    if (slot >= header.slotCount || sp === undefined || !Number.isSafeInteger(block)) return 'snapshot entry is out of range';
    if (index.state[slot] === SlotState.LIVE || sp.blocks.has(block)) return 'snapshot maps a slot or a block twice';
    if (slot >= usable) continue;
    index.attach(slot, sp, block, (flags & SlotFlag.BOOT) !== 0, crc, flags);
  }
  index.setBootOrder(ranked.sort((a, b) => a.rank - b.rank).map((r) => r.sp));
  return undefined;
}

export function isSpaceHex(hex: string): boolean {
  return hex.length > 0 && hex.length <= MAX_SPACE_HEX && /^[0-9a-f]+$/.test(hex);
}

function pad4(n: number): number {
  return (n + 3) & ~3;
}
