/**
 * The cache index journal: an append-only file of small self-checking
 * records, replayed on top of the snapshot (snapshot.ts) at start-up.
 * Layout (all integers little-endian) is documented in docs/cache-device.md.
 *
 * Every record is framed as [u8 type][u8 flags][u16 bodyLength][body][u32 crc]
 * and padded to a multiple of 4 bytes. The CRC-32 covers type..body and is
 * seeded with the journal's random salt (from its header), so records left
 * over from any other journal file (an older epoch, stale disk blocks) never
 * pass as records of this one.
 */
import { crc32 } from 'node:zlib';

export const JOURNAL_MAGIC = Buffer.from('BCCACHEJ', 'latin1');
export const JOURNAL_VERSION = 1;
export const JOURNAL_HEADER_SIZE = 32;

export const RecordType = {
  /** Interns a space identity as a small integer: id, hex string. */
  SPACE: 1,
  /** (space, block) now lives in slot, whose data has this CRC-32; flags bit 0: boot block. */
  PUT: 2,
  /** The slot no longer holds anything. */
  INVALIDATE: 3,
  /** An image of the space booted at this time (ms since the epoch). */
  BOOTED: 4,
  /** Every block of the space is dropped. */
  DROP_SPACE: 5,
} as const;

export const PUT_FLAG_BOOT = 1;
/** Longest space identity accepted (hex characters). */
export const MAX_SPACE_HEX = 128;
const MAX_BODY = 4 + 4 + MAX_SPACE_HEX;
const FRAME_OVERHEAD = 8;

export interface JournalHeader {
  blockSize: number;
  slotCount: number;
  /** Equals the snapshot's epoch when this journal continues that snapshot. */
  epoch: number;
  /** Seeds every record CRC of this file. */
  salt: number;
}

export function encodeJournalHeader(h: JournalHeader): Buffer {
  const buf = Buffer.alloc(JOURNAL_HEADER_SIZE);
  JOURNAL_MAGIC.copy(buf, 0);
  buf.writeUInt32LE(JOURNAL_VERSION, 8);
  buf.writeUInt32LE(h.blockSize, 12);
  buf.writeUInt32LE(h.slotCount, 16);
  buf.writeUInt32LE(h.epoch, 20);
  buf.writeUInt32LE(h.salt, 24);
  buf.writeUInt32LE(crc32(buf.subarray(0, 28)), 28);
  return buf;
}

/** The header, or a one-line reason why it is not one. */
export function decodeJournalHeader(buf: Buffer): JournalHeader | string {
  if (buf.length < JOURNAL_HEADER_SIZE) return `journal is ${buf.length} bytes, shorter than its header`;
  if (!buf.subarray(0, 8).equals(JOURNAL_MAGIC)) return 'journal has a bad magic number';
  if (buf.readUInt32LE(28) !== crc32(buf.subarray(0, 28))) return 'journal header checksum mismatch';
  const version = buf.readUInt32LE(8);
  if (version !== JOURNAL_VERSION) return `journal version ${version} is not supported`;
  return {
    blockSize: buf.readUInt32LE(12),
    slotCount: buf.readUInt32LE(16),
    epoch: buf.readUInt32LE(20),
    salt: buf.readUInt32LE(24),
  };
}

/**
 * Appends encoded records into 64 KiB chunks: no per-record buffers, and a
 * batch is written with one writev.
 */
export class RecordBuffer {
  private static readonly CHUNK = 64 * 1024;
  readonly chunks: Buffer[] = [];
  /** Allocated on the first record: an idle batch costs nothing. */
  private current = Buffer.alloc(0);
  private used = 0;
  bytes = 0;
  count = 0;

  constructor(private salt: number) {}

  /** Re-seals every record with another salt (the batch goes to another journal file after all). */
  resalt(salt: number): void {
    this.salt = salt;
    for (const chunk of [...this.chunks, this.current.subarray(0, this.used)]) {
      for (let at = 0; at < chunk.length; ) {
        const crcAt = at + 4 + chunk.readUInt16LE(at + 2);
        chunk.writeUInt32LE(crc32(chunk.subarray(at, crcAt), salt), crcAt);
        at = crcAt + 4;
      }
    }
  }

  space(id: number, hex: string): void {
    const body = 8 + pad4(hex.length);
    const at = this.begin(RecordType.SPACE, 0, body);
    this.current.writeUInt32LE(id, at);
    this.current.writeUInt16LE(hex.length, at + 4);
    this.current.writeUInt16LE(0, at + 6);
    this.current.fill(0, at + 8, at + body);
    this.current.write(hex, at + 8, 'latin1');
    this.end(at, body);
  }

  put(spaceId: number, block: number, slot: number, boot: boolean, crc: number): void {
    const at = this.begin(RecordType.PUT, boot ? PUT_FLAG_BOOT : 0, 20);
    const b = this.current;
    b.writeUInt32LE(spaceId, at);
    b.writeUInt32LE(block >>> 0, at + 4);
    b.writeUInt32LE(Math.floor(block / 0x1_0000_0000), at + 8);
    b.writeUInt32LE(slot, at + 12);
    b.writeUInt32LE(crc, at + 16);
    this.end(at, 20);
  }

  invalidate(slot: number): void {
    const at = this.begin(RecordType.INVALIDATE, 0, 4);
    this.current.writeUInt32LE(slot, at);
    this.end(at, 4);
  }

  booted(spaceId: number, time: number): void {
    const at = this.begin(RecordType.BOOTED, 0, 16);
    this.current.writeUInt32LE(spaceId, at);
    this.current.writeUInt32LE(0, at + 4);
    this.current.writeDoubleLE(time, at + 8);
    this.end(at, 16);
  }

  dropSpace(spaceId: number): void {
    const at = this.begin(RecordType.DROP_SPACE, 0, 4);
    this.current.writeUInt32LE(spaceId, at);
    this.end(at, 4);
  }

  /** The encoded records, in order. Nothing may be appended afterwards. */
  take(): Buffer[] {
    if (this.used > 0) this.chunks.push(this.current.subarray(0, this.used));
    this.current = Buffer.alloc(0);
    this.used = 0;
    return this.chunks;
  }

  /** Writes the frame header; returns the body offset in `current`. */
  private begin(type: number, flags: number, body: number): number {
    if (this.used + body + FRAME_OVERHEAD > this.current.length) {
      if (this.used > 0) this.chunks.push(this.current.subarray(0, this.used));
      this.current = Buffer.allocUnsafe(RecordBuffer.CHUNK);
      this.used = 0;
    }
    const b = this.current;
    b[this.used] = type;
    b[this.used + 1] = flags;
    b.writeUInt16LE(body, this.used + 2);
    return this.used + 4;
  }

  private end(bodyAt: number, body: number): void {
    const start = bodyAt - 4;
    const crcAt = bodyAt + body;
    this.current.writeUInt32LE(crc32(this.current.subarray(start, crcAt), this.salt), crcAt);
    const size = crcAt + 4 - start;
    this.used += size;
    this.bytes += size;
    this.count++;
  }
}

function pad4(n: number): number {
  return (n + 3) & ~3;
}

/** One decoded record; the scanner reuses a single object (no allocation per record). */
export interface JournalRecord {
  type: number;
  flags: number;
  spaceId: number;
  hex: string;
  block: number;
  slot: number;
  crc: number;
  time: number;
}

export interface ScanResult {
  /** Offset just past the last valid record: where appending continues. */
  validEnd: number;
  records: number;
  /** Bytes skipped because they were not valid records. */
  damagedBytes: number;
  /** Records that were intact but made no sense (unknown space, slot out of range, ...). */
  rejected: number;
  /** True when valid records follow damaged bytes: damage a crash cannot explain. */
  damagedInMiddle: boolean;
}

/**
 * Scans the records after the header. Invalid bytes are skipped in 4-byte
 * steps until a record verifies again. `apply` returns false for a record
 * that verified but does not fit the index (it is then counted as rejected).
 */
export function scanJournal(buf: Buffer, salt: number, apply: (rec: JournalRecord) => boolean): ScanResult {
  const rec: JournalRecord = { type: 0, flags: 0, spaceId: 0, hex: '', block: 0, slot: 0, crc: 0, time: 0 };
  const result: ScanResult = { validEnd: JOURNAL_HEADER_SIZE, records: 0, damagedBytes: 0, rejected: 0, damagedInMiddle: false };
  let at = JOURNAL_HEADER_SIZE;
  let damageStart = -1;
  while (at + FRAME_OVERHEAD <= buf.length) {
    const size = frameAt(buf, at, salt, rec);
    if (size === 0) {
      if (damageStart < 0) damageStart = at;
      at += 4;
      continue;
    }
    if (damageStart >= 0) {
      result.damagedBytes += at - damageStart;
      result.damagedInMiddle = true;
      damageStart = -1;
    }
    result.records++;
    if (!apply(rec)) result.rejected++;
    at += size;
    result.validEnd = at;
  }
  // Whatever follows the last valid record is a torn or garbage tail.
  result.damagedBytes += buf.length - result.validEnd;
  return result;
}

/** Decodes the record at `at` into `rec`; returns its size, or 0 when it is not a valid record. */
function frameAt(buf: Buffer, at: number, salt: number, rec: JournalRecord): number {
  const type = buf[at]!;
  const body = buf.readUInt16LE(at + 2);
  if (type < RecordType.SPACE || type > RecordType.DROP_SPACE || body > MAX_BODY || (body & 3) !== 0) return 0;
  const crcAt = at + 4 + body;
  if (crcAt + 4 > buf.length) return 0;
  if (buf.readUInt32LE(crcAt) !== crc32(buf.subarray(at, crcAt), salt)) return 0;
  const b = at + 4;
  rec.type = type;
  rec.flags = buf[at + 1]!;
  switch (type) {
    case RecordType.SPACE: {
      if (body < 8) return 0;
      const len = buf.readUInt16LE(b + 4);
      if (len === 0 || len > MAX_SPACE_HEX || pad4(len) + 8 !== body) return 0;
      rec.spaceId = buf.readUInt32LE(b);
      rec.hex = buf.toString('latin1', b + 8, b + 8 + len);
      break;
    }
    case RecordType.PUT:
      if (body !== 20) return 0;
      rec.spaceId = buf.readUInt32LE(b);
      rec.block = buf.readUInt32LE(b + 4) + buf.readUInt32LE(b + 8) * 0x1_0000_0000;
      rec.slot = buf.readUInt32LE(b + 12);
      rec.crc = buf.readUInt32LE(b + 16);
      break;
    case RecordType.INVALIDATE:
      if (body !== 4) return 0;
      rec.slot = buf.readUInt32LE(b);
      break;
    case RecordType.BOOTED:
      if (body !== 16) return 0;
      rec.spaceId = buf.readUInt32LE(b);
      rec.time = buf.readDoubleLE(b + 8);
      break;
    case RecordType.DROP_SPACE:
      if (body !== 4) return 0;
      rec.spaceId = buf.readUInt32LE(b);
      break;
  }
  return crcAt + 4 - at;
}
