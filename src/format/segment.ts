/**
 * The boot segment (.bcseg): the blocks a map selects, back to back in
 * ascending block order, with a per-block checksum table. Byte layout:
 * docs/formats.md, "Segment (.bcseg)".
 */
import { createHash, hash } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { InvalidSegmentError } from '../errors.js';
import { FileByteSource } from '../image/file-source.js';
import {
  MAX_BLOCK_SIZE,
  MIN_BLOCK_SIZE,
  identityToBytes,
  isAllZero,
  isValidBlockSize,
  readSafeU64,
  writeU64,
} from './binary.js';
import { MAX_BITMAP_BITS } from './bitmap.js';

export const SEGMENT_MAGIC = Buffer.from('BCSEG\0\r\n', 'latin1');
export const SEGMENT_VERSION = 1;
export const SEGMENT_HEADER_LENGTH = 224;
/** The data area starts on a multiple of this (page / direct-I/O friendly). */
export const SEGMENT_DATA_ALIGNMENT = 4096;
/**
 * Bytes read at once when a segment is opened: the header and, for segments
 * of up to about 65,000 blocks (256 MiB of 4 KiB blocks), the whole checksum
 * table, in one request instead of three.
 */
const SEGMENT_HEAD_READ = 1024 * 1024;

/**
 * Per-block checksum algorithms (docs/formats.md, "Segment header",
 * checksumAlgorithm). Both are unkeyed: they catch damage, and the header's
 * tableSha256 and dataSha256 cover the whole file.
 * - 1: the first 16 bytes of the block's SHA-256. Read, no longer written.
 * - 2: the block's CRC-32 (ISO-HDLC, zlib's `crc32`), u32 little-endian.
 *   Written: it is the checksum the cache keeps per slot, so the prefetch
 *   checks a block and hands the cache its checksum in one pass, computed
 *   once instead of twice.
 */
export const BLOCK_CHECKSUM_SHA256_128 = 1;
export const BLOCK_CHECKSUM_CRC32 = 2;
export type BlockChecksumAlgorithm = typeof BLOCK_CHECKSUM_SHA256_128 | typeof BLOCK_CHECKSUM_CRC32;
/** The algorithm new segments are written with. */
export const BLOCK_CHECKSUM_ALGORITHM: BlockChecksumAlgorithm = BLOCK_CHECKSUM_CRC32;

function isBlockChecksumAlgorithm(n: number): n is BlockChecksumAlgorithm {
  return n === BLOCK_CHECKSUM_SHA256_128 || n === BLOCK_CHECKSUM_CRC32;
}

/** Bytes of one checksum table entry. */
export function blockChecksumLength(algorithm: BlockChecksumAlgorithm): number {
  return algorithm === BLOCK_CHECKSUM_SHA256_128 ? 16 : 4;
}

/** Table entry length of new segments. */
export const BLOCK_CHECKSUM_LENGTH = blockChecksumLength(BLOCK_CHECKSUM_ALGORITHM);

// Header field offsets (docs/formats.md, "Segment header").
const OFF_VERSION = 8;
const OFF_HEADER_LENGTH = 12;
const OFF_BLOCK_SIZE = 16;
const OFF_FLAGS = 20;
const OFF_BLOCK_COUNT = 24;
const OFF_VIRTUAL_SIZE = 32;
const OFF_IDENTITY = 40;
const OFF_MAP_DIGEST = 72;
const OFF_DATA_SHA256 = 104;
const OFF_TABLE_SHA256 = 136;
const OFF_TABLE_OFFSET = 168;
const OFF_DATA_OFFSET = 176;
const OFF_CHECKSUM_LENGTH = 184;
const OFF_CHECKSUM_ALGORITHM = 188;
const OFF_HEADER_CHECKSUM = 192;

/** Everything the header says. Digests and identity are lowercase hex. */
export interface SegmentHeader {
  version: number;
  headerLength: number;
  blockSize: number;
  flags: number;
  /** Blocks in the segment (the map's popcount). */
  blockCount: number;
  virtualSize: number;
  identity: string;
  mapDigest: string;
  /** SHA-256 of the block data in segment order. */
  dataSha256: string;
  /** SHA-256 of the checksum table area [tableOffset, dataOffset). */
  tableSha256: string;
  tableOffset: number;
  dataOffset: number;
  checksumAlgorithm: BlockChecksumAlgorithm;
  /** Bytes per checksum table entry. */
  checksumLength: number;
}

/** Fields a writer provides; the layout fields follow from them. */
export interface SegmentHeaderFields {
  blockSize: number;
  blockCount: number;
  virtualSize: number;
  identity: string;
  mapDigest: string;
  dataSha256: string;
  tableSha256: string;
  /** Default BLOCK_CHECKSUM_ALGORITHM. */
  checksumAlgorithm?: BlockChecksumAlgorithm;
}

export interface SegmentLayout {
  tableOffset: number;
  tableLength: number;
  dataOffset: number;
  fileSize: number;
}

/** Where the table and data go for `blockCount` blocks of `blockSize` bytes. */
export function segmentLayout(blockCount: number, blockSize: number, checksumLength = BLOCK_CHECKSUM_LENGTH): SegmentLayout {
  const tableOffset = SEGMENT_HEADER_LENGTH;
  const tableLength = blockCount * checksumLength;
  const dataOffset = alignUp(tableOffset + tableLength, SEGMENT_DATA_ALIGNMENT);
  return { tableOffset, tableLength, dataOffset, fileSize: dataOffset + blockCount * blockSize };
}

function alignUp(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment;
}

/** The table entry of one full block under `algorithm`. */
export function blockChecksum(block: Uint8Array, algorithm: BlockChecksumAlgorithm = BLOCK_CHECKSUM_ALGORITHM): Buffer {
  const entry = Buffer.alloc(blockChecksumLength(algorithm));
  writeBlockChecksums(block, block.length, entry, 0, algorithm);
  return entry;
}

/** Writes the table entries of the whole blocks in `data` into `table` from `at`; returns the end. */
export function writeBlockChecksums(
  data: Uint8Array,
  blockSize: number,
  table: Uint8Array,
  at: number,
  algorithm: BlockChecksumAlgorithm = BLOCK_CHECKSUM_ALGORITHM,
): number {
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  for (let o = 0; o < data.length; o += blockSize) {
    const block = data.subarray(o, o + blockSize);
    if (algorithm === BLOCK_CHECKSUM_CRC32) {
      view.setUint32(at, crc32(block), true);
      at += 4;
    } else {
      table.set(hash('sha256', block, 'buffer').subarray(0, 16), at);
      at += 16;
    }
  }
  return at;
}

/** Encodes the header, including its checksum. */
export function encodeSegmentHeader(fields: SegmentHeaderFields): Buffer {
  const algorithm = fields.checksumAlgorithm ?? BLOCK_CHECKSUM_ALGORITHM;
  const layout = segmentLayout(fields.blockCount, fields.blockSize, blockChecksumLength(algorithm));
  const buf = Buffer.alloc(SEGMENT_HEADER_LENGTH);
  SEGMENT_MAGIC.copy(buf, 0);
  buf.writeUInt32LE(SEGMENT_VERSION, OFF_VERSION);
  buf.writeUInt32LE(SEGMENT_HEADER_LENGTH, OFF_HEADER_LENGTH);
  buf.writeUInt32LE(fields.blockSize, OFF_BLOCK_SIZE);
  buf.writeUInt32LE(0, OFF_FLAGS);
  writeU64(buf, fields.blockCount, OFF_BLOCK_COUNT);
  writeU64(buf, fields.virtualSize, OFF_VIRTUAL_SIZE);
  identityToBytes(fields.identity).copy(buf, OFF_IDENTITY);
  hexDigest(fields.mapDigest, 'map digest').copy(buf, OFF_MAP_DIGEST);
  hexDigest(fields.dataSha256, 'data SHA-256').copy(buf, OFF_DATA_SHA256);
  hexDigest(fields.tableSha256, 'table SHA-256').copy(buf, OFF_TABLE_SHA256);
  writeU64(buf, layout.tableOffset, OFF_TABLE_OFFSET);
  writeU64(buf, layout.dataOffset, OFF_DATA_OFFSET);
  buf.writeUInt32LE(blockChecksumLength(algorithm), OFF_CHECKSUM_LENGTH);
  buf.writeUInt32LE(algorithm, OFF_CHECKSUM_ALGORITHM);
  createHash('sha256').update(buf).digest().copy(buf, OFF_HEADER_CHECKSUM);
  return buf;
}

function hexDigest(hex: string, what: string): Buffer {
  if (!/^[0-9a-f]{64}$/.test(hex)) throw new RangeError(`${what} must be 64 lowercase hex digits`);
  return Buffer.from(hex, 'hex');
}

/** Computes the header checksum of `header` (the checksum field taken as zero). */
function headerChecksum(header: Buffer): Buffer {
  return createHash('sha256')
    .update(header.subarray(0, OFF_HEADER_CHECKSUM))
    .update(Buffer.alloc(32))
    .update(header.subarray(OFF_HEADER_CHECKSUM + 32))
    .digest();
}

/**
 * Builds a whole segment in memory from its metadata and the block data
 * (blockCount × blockSize bytes, in segment order). For tests and small
 * segments; buildSegment streams large ones.
 */
export function serializeSegment(
  meta: { blockSize: number; virtualSize: number; identity: string; mapDigest: string; checksumAlgorithm?: BlockChecksumAlgorithm },
  data: Buffer,
): Buffer {
  if (data.length % meta.blockSize !== 0) throw new RangeError('segment data is not a whole number of blocks');
  const algorithm = meta.checksumAlgorithm ?? BLOCK_CHECKSUM_ALGORITHM;
  const blockCount = data.length / meta.blockSize;
  const layout = segmentLayout(blockCount, meta.blockSize, blockChecksumLength(algorithm));
  const file = Buffer.alloc(layout.fileSize);
  writeBlockChecksums(data, meta.blockSize, file, layout.tableOffset, algorithm);
  data.copy(file, layout.dataOffset);
  const header = encodeSegmentHeader({
    ...meta,
    blockCount,
    dataSha256: createHash('sha256').update(data).digest('hex'),
    tableSha256: createHash('sha256').update(file.subarray(layout.tableOffset, layout.dataOffset)).digest('hex'),
  });
  header.copy(file, 0);
  return file;
}

/** What a SegmentReader reads from: a local file, an object in a store, a buffer. */
export interface SegmentSource {
  readonly name: string;
  readonly size: number;
  /** Exactly `length` bytes at `offset`. */
  read(offset: number, length: number): Promise<Buffer>;
  close?(): Promise<void>;
}

/** A SegmentSource over a buffer (tests, data already in memory). */
export function bufferSource(buf: Buffer, name = '<segment>'): SegmentSource {
  return {
    name,
    size: buf.length,
    async read(offset, length) {
      if (offset < 0 || length < 0 || offset + length > buf.length) {
        throw new RangeError(`read of ${length} bytes at ${offset} is past the end (${buf.length} bytes)`);
      }
      return buf.subarray(offset, offset + length);
    },
  };
}

/**
 * Decodes and checks a segment header and its checksum table. Every size is
 * checked against the source size before anything is allocated or read.
 */
export class SegmentReader {
  private constructor(
    readonly source: SegmentSource,
    readonly header: SegmentHeader,
    /** The checksum table, header.checksumLength bytes per block. */
    private readonly table: Buffer,
    private readonly ownsSource: boolean,
  ) {}

  static async open(path: string): Promise<SegmentReader> {
    const source = await FileByteSource.open(path);
    try {
      return await SegmentReader.fromSource(source, { ownsSource: true });
    } catch (err) {
      await source.close().catch(() => undefined);
      throw err;
    }
  }

  static async fromSource(source: SegmentSource, options: { ownsSource?: boolean } = {}): Promise<SegmentReader> {
    const fail = (message: string): never => {
      throw new InvalidSegmentError(message, { file: source.name });
    };
    const size = source.size;
    // One request for header and table in the common case (on an object store each read is a round trip).
    const head = await source.read(0, Math.min(size, SEGMENT_HEAD_READ));
    const region = (offset: number, length: number): Promise<Buffer> =>
      offset + length <= head.length ? Promise.resolve(head.subarray(offset, offset + length)) : source.read(offset, length);
    const magic = head.subarray(0, Math.min(size, SEGMENT_MAGIC.length));
    if (!magic.equals(SEGMENT_MAGIC)) fail('not a bootcache segment (bad magic)');
    if (size < SEGMENT_HEADER_LENGTH) fail(`truncated header: file is ${size} bytes, the header alone is ${SEGMENT_HEADER_LENGTH}`);
    const fixed = await region(0, SEGMENT_HEADER_LENGTH);
    const version = fixed.readUInt32LE(OFF_VERSION);
    if (version !== SEGMENT_VERSION) fail(`unsupported segment version ${version} (this build reads version ${SEGMENT_VERSION})`);
    const headerLength = fixed.readUInt32LE(OFF_HEADER_LENGTH);
    if (headerLength < SEGMENT_HEADER_LENGTH || headerLength > 65536 || headerLength % 8 !== 0) {
      fail(`header length ${headerLength} is invalid`);
    }
    if (headerLength > size) fail(`truncated header: file is ${size} bytes, the header says ${headerLength}`);
    const raw = headerLength === SEGMENT_HEADER_LENGTH ? fixed : await region(0, headerLength);
    if (!headerChecksum(raw).equals(raw.subarray(OFF_HEADER_CHECKSUM, OFF_HEADER_CHECKSUM + 32))) {
      fail('header checksum mismatch: the header is corrupted');
    }

    const blockSize = raw.readUInt32LE(OFF_BLOCK_SIZE);
    if (!isValidBlockSize(blockSize)) fail(`block size ${blockSize} is not a power of two between ${MIN_BLOCK_SIZE} and ${MAX_BLOCK_SIZE}`);
    const flags = raw.readUInt32LE(OFF_FLAGS);
    if (flags !== 0) fail(`unknown flags 0x${flags.toString(16)}`);
    const blockCount = readSafeU64(raw, OFF_BLOCK_COUNT);
    const virtualSize = readSafeU64(raw, OFF_VIRTUAL_SIZE);
    if (virtualSize < 0) fail('virtual size is too large');
    const imageBlocks = Math.ceil(virtualSize / blockSize);
    if (blockCount < 0 || blockCount > imageBlocks || blockCount > MAX_BITMAP_BITS) {
      fail(`block count ${blockCount} is more than the image has (${imageBlocks} blocks of ${blockSize} bytes)`);
    }
    const checksumLength = raw.readUInt32LE(OFF_CHECKSUM_LENGTH);
    const algorithmField = raw.readUInt32LE(OFF_CHECKSUM_ALGORITHM);
    const algorithm = isBlockChecksumAlgorithm(algorithmField) ? algorithmField : undefined;
    if (algorithm === undefined || checksumLength !== blockChecksumLength(algorithm)) {
      return fail(`unsupported block checksum (algorithm ${algorithmField}, ${checksumLength} bytes)`);
    }
    if (headerLength > SEGMENT_HEADER_LENGTH && !isAllZero(raw.subarray(SEGMENT_HEADER_LENGTH))) {
      fail('reserved header bytes are not zero');
    }
    const layout = segmentLayout(blockCount, blockSize, checksumLength);
    const tableOffset = readSafeU64(raw, OFF_TABLE_OFFSET);
    const dataOffset = readSafeU64(raw, OFF_DATA_OFFSET);
    // The v1 layout is fixed by the header length and the block count.
    const expectedTable = headerLength;
    const expectedData = alignUp(expectedTable + layout.tableLength, SEGMENT_DATA_ALIGNMENT);
    if (tableOffset !== expectedTable || dataOffset !== expectedData) {
      fail(`table offset ${tableOffset} / data offset ${dataOffset} do not match the layout (${expectedTable} / ${expectedData})`);
    }
    const expectedSize = dataOffset + blockCount * blockSize;
    if (size !== expectedSize) {
      fail(
        `file is ${size} bytes but its header describes ${expectedSize} ` +
          `(${blockCount} blocks of ${blockSize} bytes from offset ${dataOffset})` +
          (size < expectedSize ? ': truncated' : ''),
      );
    }
    const header: SegmentHeader = {
      version,
      headerLength,
      blockSize,
      flags,
      blockCount,
      virtualSize,
      identity: raw.subarray(OFF_IDENTITY, OFF_IDENTITY + 32).toString('hex'),
      mapDigest: raw.subarray(OFF_MAP_DIGEST, OFF_MAP_DIGEST + 32).toString('hex'),
      dataSha256: raw.subarray(OFF_DATA_SHA256, OFF_DATA_SHA256 + 32).toString('hex'),
      tableSha256: raw.subarray(OFF_TABLE_SHA256, OFF_TABLE_SHA256 + 32).toString('hex'),
      tableOffset,
      dataOffset,
      checksumAlgorithm: algorithm,
      checksumLength,
    };
    const tableArea = await region(tableOffset, dataOffset - tableOffset);
    if (createHash('sha256').update(tableArea).digest('hex') !== header.tableSha256) {
      fail('checksum table does not match its SHA-256 in the header: the table is corrupted');
    }
    const table = Buffer.from(tableArea.subarray(0, layout.tableLength));
    return new SegmentReader(source, header, table, options.ownsSource ?? false);
  }

  get name(): string {
    return this.source.name;
  }
  get blockSize(): number {
    return this.header.blockSize;
  }
  get blockCount(): number {
    return this.header.blockCount;
  }
  get virtualSize(): number {
    return this.header.virtualSize;
  }
  get identity(): string {
    return this.header.identity;
  }
  get mapDigest(): string {
    return this.header.mapDigest;
  }
  get dataSha256(): string {
    return this.header.dataSha256;
  }
  get dataOffset(): number {
    return this.header.dataOffset;
  }
  /** Bytes of block data (blockCount × blockSize). */
  get dataLength(): number {
    return this.header.blockCount * this.header.blockSize;
  }

  /** File offset of the block with rank `rank`. */
  blockOffset(rank: number): number {
    this.checkRank(rank, 1);
    return this.header.dataOffset + rank * this.header.blockSize;
  }

  get checksumAlgorithm(): BlockChecksumAlgorithm {
    return this.header.checksumAlgorithm;
  }

  /** The stored checksum of the block with rank `rank` (a view into the table). */
  blockChecksum(rank: number): Buffer {
    return this.blockChecksums(rank, 1);
  }

  /** The stored checksums of blocks [rank, rank + count) (a view into the table). */
  blockChecksums(rank: number, count: number): Buffer {
    this.checkRank(rank, count);
    const length = this.header.checksumLength;
    return this.table.subarray(rank * length, (rank + count) * length);
  }

  /** The stored CRC-32 of block `rank`, when the segment's checksums are CRC-32s (else undefined). */
  storedCrc32(rank: number): number | undefined {
    if (this.header.checksumAlgorithm !== BLOCK_CHECKSUM_CRC32) return undefined;
    this.checkRank(rank, 1);
    return this.table.readUInt32LE(rank * 4);
  }

  /** True when `data` (one full block) matches the stored checksum of block `rank`. */
  verifyBlock(rank: number, data: Uint8Array): boolean {
    if (data.length !== this.header.blockSize) return false;
    const crc = this.storedCrc32(rank);
    if (crc !== undefined) return crc32(data) === crc;
    return blockChecksum(data, this.header.checksumAlgorithm).equals(this.blockChecksum(rank));
  }

  /** Reads `count` consecutive blocks starting at rank `rank`. */
  async readBlocks(rank: number, count = 1): Promise<Buffer> {
    this.checkRank(rank, count);
    return this.source.read(this.header.dataOffset + rank * this.header.blockSize, count * this.header.blockSize);
  }

  async close(): Promise<void> {
    if (this.ownsSource) await this.source.close?.();
  }

  private checkRank(rank: number, count: number): void {
    if (!Number.isInteger(rank) || !Number.isInteger(count) || rank < 0 || count < 0 || rank + count > this.header.blockCount) {
      throw new RangeError(`block rank ${rank}${count === 1 ? '' : `..${rank + count - 1}`} is outside the segment (${this.header.blockCount} blocks)`);
    }
  }
}
