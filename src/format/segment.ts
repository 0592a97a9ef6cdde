/**
 * The boot segment (.bcseg): the blocks a map selects, back to back in
 * ascending block order, with a per-block checksum table and (version 2) a
 * per-block content digest table. Byte layout: docs/formats.md,
 * "Segment (.bcseg)".
 */
import { createHash, hash } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { InvalidSegmentError } from '../errors.js';
import { FileByteSource } from '../image/file-source.js';
import {
  MAX_BLOCK_SIZE,
  MIN_BLOCK_SIZE,
  identityToBytes,
  sha256FromHex,
  sha256WithFieldZeroed,
  isAllZero,
  isValidBlockSize,
  readSafeU64,
  writeU64,
} from './binary.js';
import { MAX_BITMAP_BITS } from './bitmap.js';

export const SEGMENT_MAGIC = Buffer.from('BCSEG\0\r\n', 'latin1');
/** Segment versions this build reads (docs/formats.md, "Segment (.bcseg)"). */
export type SegmentVersion = 1 | 2;
/** The version new segments are written with. */
export const SEGMENT_VERSION: SegmentVersion = 2;
/** Fixed header length of each version: version 2 adds the digest fields at 224. */
export const SEGMENT_V1_HEADER_LENGTH = 224;
export const SEGMENT_V2_HEADER_LENGTH = 272;
/** Header length of new segments. */
export const SEGMENT_HEADER_LENGTH = SEGMENT_V2_HEADER_LENGTH;

export function segmentHeaderLength(version: SegmentVersion): number {
  return version === 1 ? SEGMENT_V1_HEADER_LENGTH : SEGMENT_V2_HEADER_LENGTH;
}

function isSegmentVersion(n: number): n is SegmentVersion {
  return n === 1 || n === 2;
}
/** The data area starts on a multiple of this (page / direct-I/O friendly). */
export const SEGMENT_DATA_ALIGNMENT = 4096;
/**
 * Bytes read at once when a segment is opened: the header and, for version 2
 * segments of up to about 29,000 blocks (113 MiB of 4 KiB blocks; 36 table
 * bytes per block), the digest and checksum tables, in one request instead
 * of three.
 */
export const SEGMENT_HEAD_READ = 1024 * 1024;

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

/**
 * Per-block content digests (version 2; docs/formats.md, "Digest table"):
 * algorithm 1 is the block's whole SHA-256 (32 bytes), the only one defined.
 */
export const BLOCK_DIGEST_SHA256 = 1;
export type BlockDigestAlgorithm = typeof BLOCK_DIGEST_SHA256;
export const BLOCK_DIGEST_LENGTH = 32;

/**
 * What one table entry holds, for the table writers: a checksum
 * (checksumAlgorithm 2 or 1) or a digest (digestAlgorithm 1).
 */
export type BlockHashKind = 'crc32' | 'sha256-128' | 'sha256';

export function checksumKind(algorithm: BlockChecksumAlgorithm): BlockHashKind {
  return algorithm === BLOCK_CHECKSUM_CRC32 ? 'crc32' : 'sha256-128';
}

/** Bytes of one entry of `kind`. */
export function blockHashLength(kind: BlockHashKind): number {
  return kind === 'crc32' ? 4 : kind === 'sha256-128' ? 16 : 32;
}

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
// Version 2 only.
const OFF_DIGEST_OFFSET = 224;
const OFF_DIGEST_LENGTH = 232;
const OFF_DIGEST_ALGORITHM = 236;
const OFF_DIGEST_TABLE_SHA256 = 240;

/** The digest table of a version 2 segment, as its header describes it. */
export interface SegmentDigestTable {
  algorithm: BlockDigestAlgorithm;
  /** Bytes per entry. */
  length: number;
  /** File offset of the table (= headerLength). */
  offset: number;
  /** SHA-256 of the table, [offset, offset + length × blockCount). */
  tableSha256: string;
}

/** Everything the header says. Digests and identity are lowercase hex. */
export interface SegmentHeader {
  version: SegmentVersion;
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
  /** Per-block content digests (version 2); null in version 1. */
  digests: SegmentDigestTable | null;
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
  /** Default BLOCK_CHECKSUM_ALGORITHM; version 2 allows CRC-32 only. */
  checksumAlgorithm?: BlockChecksumAlgorithm;
  /** Default SEGMENT_VERSION. */
  version?: SegmentVersion;
  /** SHA-256 of the digest table; required in version 2. */
  digestTableSha256?: string;
}

/** What the layout depends on besides the block count and size. */
export interface SegmentFormat {
  /** Default SEGMENT_VERSION. */
  version?: SegmentVersion;
  /** Default BLOCK_CHECKSUM_ALGORITHM. */
  checksumAlgorithm?: BlockChecksumAlgorithm;
  /** Default the version's fixed header length. */
  headerLength?: number;
}

export interface SegmentLayout {
  version: SegmentVersion;
  headerLength: number;
  /** The digest table: [digestOffset, digestOffset + digestTableLength); empty in version 1. */
  digestOffset: number;
  digestTableLength: number;
  /** The checksum table: [tableOffset, tableOffset + tableLength), then zero padding up to dataOffset. */
  tableOffset: number;
  tableLength: number;
  dataOffset: number;
  fileSize: number;
}

/** Where the tables and data go for `blockCount` blocks of `blockSize` bytes (docs/formats.md, "Segment (.bcseg)"). */
export function segmentLayout(blockCount: number, blockSize: number, format: SegmentFormat = {}): SegmentLayout {
  const version = format.version ?? SEGMENT_VERSION;
  const headerLength = format.headerLength ?? segmentHeaderLength(version);
  const digestOffset = headerLength;
  const digestTableLength = version === 1 ? 0 : blockCount * BLOCK_DIGEST_LENGTH;
  const tableOffset = digestOffset + digestTableLength;
  const tableLength = blockCount * blockChecksumLength(format.checksumAlgorithm ?? BLOCK_CHECKSUM_ALGORITHM);
  const dataOffset = alignUp(tableOffset + tableLength, SEGMENT_DATA_ALIGNMENT);
  return { version, headerLength, digestOffset, digestTableLength, tableOffset, tableLength, dataOffset, fileSize: dataOffset + blockCount * blockSize };
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

/** Writes the checksum table entries of the whole blocks in `data` into `table` from `at`; returns the end. */
export function writeBlockChecksums(
  data: Uint8Array,
  blockSize: number,
  table: Uint8Array,
  at: number,
  algorithm: BlockChecksumAlgorithm = BLOCK_CHECKSUM_ALGORITHM,
): number {
  return writeBlockHashes(data, blockSize, table, at, checksumKind(algorithm));
}

/** The digest table entry (SHA-256) of one full block. */
export function blockDigest(block: Uint8Array): Buffer {
  return hash('sha256', block, 'buffer');
}

/** Writes entries of `kind` for the whole blocks in `data` into `table` from `at`; returns the end. */
export function writeBlockHashes(data: Uint8Array, blockSize: number, table: Uint8Array, at: number, kind: BlockHashKind): number {
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  for (let o = 0; o < data.length; o += blockSize) {
    const block = data.subarray(o, o + blockSize);
    if (kind === 'crc32') {
      view.setUint32(at, crc32(block), true);
      at += 4;
    } else {
      const digest = hash('sha256', block, 'buffer');
      const length = kind === 'sha256' ? 32 : 16;
      table.set(length === 32 ? digest : digest.subarray(0, length), at);
      at += length;
    }
  }
  return at;
}

/** Encodes the header, including its checksum. */
export function encodeSegmentHeader(fields: SegmentHeaderFields): Buffer {
  const algorithm = fields.checksumAlgorithm ?? BLOCK_CHECKSUM_ALGORITHM;
  const version = fields.version ?? SEGMENT_VERSION;
  if (version === 2 && algorithm !== BLOCK_CHECKSUM_CRC32) throw new RangeError('version 2 segments use CRC-32 block checksums');
  const layout = segmentLayout(fields.blockCount, fields.blockSize, { version, checksumAlgorithm: algorithm });
  const buf = Buffer.alloc(layout.headerLength);
  SEGMENT_MAGIC.copy(buf, 0);
  buf.writeUInt32LE(version, OFF_VERSION);
  buf.writeUInt32LE(layout.headerLength, OFF_HEADER_LENGTH);
  buf.writeUInt32LE(fields.blockSize, OFF_BLOCK_SIZE);
  buf.writeUInt32LE(0, OFF_FLAGS);
  writeU64(buf, fields.blockCount, OFF_BLOCK_COUNT);
  writeU64(buf, fields.virtualSize, OFF_VIRTUAL_SIZE);
  identityToBytes(fields.identity).copy(buf, OFF_IDENTITY);
  sha256FromHex(fields.mapDigest, 'map digest').copy(buf, OFF_MAP_DIGEST);
  sha256FromHex(fields.dataSha256, 'data SHA-256').copy(buf, OFF_DATA_SHA256);
  sha256FromHex(fields.tableSha256, 'table SHA-256').copy(buf, OFF_TABLE_SHA256);
  writeU64(buf, layout.tableOffset, OFF_TABLE_OFFSET);
  writeU64(buf, layout.dataOffset, OFF_DATA_OFFSET);
  buf.writeUInt32LE(blockChecksumLength(algorithm), OFF_CHECKSUM_LENGTH);
  buf.writeUInt32LE(algorithm, OFF_CHECKSUM_ALGORITHM);
  if (version === 2) {
    writeU64(buf, layout.digestOffset, OFF_DIGEST_OFFSET);
    buf.writeUInt32LE(BLOCK_DIGEST_LENGTH, OFF_DIGEST_LENGTH);
    buf.writeUInt32LE(BLOCK_DIGEST_SHA256, OFF_DIGEST_ALGORITHM);
    sha256FromHex(fields.digestTableSha256 ?? '', 'digest table SHA-256').copy(buf, OFF_DIGEST_TABLE_SHA256);
  }
  createHash('sha256').update(buf).digest().copy(buf, OFF_HEADER_CHECKSUM);
  return buf;
}



/**
 * Builds a whole segment in memory from its metadata and the block data
 * (blockCount × blockSize bytes, in segment order). For tests and small
 * segments; buildSegment streams large ones.
 */
export function serializeSegment(
  meta: {
    blockSize: number;
    virtualSize: number;
    identity: string;
    mapDigest: string;
    checksumAlgorithm?: BlockChecksumAlgorithm;
    version?: SegmentVersion;
  },
  data: Buffer,
): Buffer {
  if (data.length % meta.blockSize !== 0) throw new RangeError('segment data is not a whole number of blocks');
  const algorithm = meta.checksumAlgorithm ?? BLOCK_CHECKSUM_ALGORITHM;
  const blockCount = data.length / meta.blockSize;
  const layout = segmentLayout(blockCount, meta.blockSize, { version: meta.version ?? SEGMENT_VERSION, checksumAlgorithm: algorithm });
  const file = Buffer.alloc(layout.fileSize);
  writeBlockChecksums(data, meta.blockSize, file, layout.tableOffset, algorithm);
  if (layout.version === 2) writeBlockHashes(data, meta.blockSize, file, layout.digestOffset, 'sha256');
  data.copy(file, layout.dataOffset);
  const sha256 = (from: number, to: number): string => createHash('sha256').update(file.subarray(from, to)).digest('hex');
  const header = encodeSegmentHeader({
    ...meta,
    version: layout.version,
    blockCount,
    dataSha256: createHash('sha256').update(data).digest('hex'),
    tableSha256: sha256(layout.tableOffset, layout.dataOffset),
    ...(layout.version === 2 ? { digestTableSha256: sha256(layout.digestOffset, layout.tableOffset) } : {}),
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

export interface SegmentOpenOptions {
  /** close() closes the source too (default false; open() owns its file). */
  ownsSource?: boolean;
  /**
   * Open even when the digest table does not match its SHA-256 in the
   * header, and say so in digestTableIntact (verify names the bad entries);
   * by default that is an InvalidSegmentError, as for the checksum table.
   */
  allowDamagedDigests?: boolean;
}

/**
 * Decodes and checks a segment header and its tables (digests, checksums).
 * Every size is checked against the source size before anything is
 * allocated or read.
 */
export class SegmentReader {
  private constructor(
    readonly source: SegmentSource,
    readonly header: SegmentHeader,
    /** The checksum table, header.checksumLength bytes per block. */
    private readonly table: Buffer,
    /** The digest table, BLOCK_DIGEST_LENGTH bytes per block (empty in version 1). */
    private readonly digestTable: Buffer,
    /** False when the digest table does not match header.digests.tableSha256 (only with allowDamagedDigests). */
    readonly digestTableIntact: boolean,
    private readonly ownsSource: boolean,
  ) {}

  static async open(path: string, options: Omit<SegmentOpenOptions, 'ownsSource'> = {}): Promise<SegmentReader> {
    const source = await FileByteSource.open(path);
    try {
      return await SegmentReader.fromSource(source, { ...options, ownsSource: true });
    } catch (err) {
      await source.close().catch(() => undefined);
      throw err;
    }
  }

  static async fromSource(source: SegmentSource, options: SegmentOpenOptions = {}): Promise<SegmentReader> {
    const fail = (message: string): never => {
      throw new InvalidSegmentError(message, { file: source.name });
    };
    const size = source.size;
    // One request for header and tables in the common case (on an object store each read is a round trip).
    const head = await source.read(0, Math.min(size, SEGMENT_HEAD_READ));
    const region = (offset: number, length: number): Promise<Buffer> =>
      offset + length <= head.length ? Promise.resolve(head.subarray(offset, offset + length)) : source.read(offset, length);
    const magic = head.subarray(0, Math.min(size, SEGMENT_MAGIC.length));
    if (!magic.equals(SEGMENT_MAGIC)) fail('not a bootcache segment (bad magic)');
    if (size < SEGMENT_V1_HEADER_LENGTH) fail(`truncated header: file is ${size} bytes, the header alone is ${SEGMENT_V1_HEADER_LENGTH}`);
    const versionField = (await region(0, SEGMENT_V1_HEADER_LENGTH)).readUInt32LE(OFF_VERSION);
    const version = isSegmentVersion(versionField) ? versionField : fail(`unsupported segment version ${versionField} (this build reads versions 1 and 2)`);
    const fixedLength = segmentHeaderLength(version);
    if (size < fixedLength) fail(`truncated header: file is ${size} bytes, a version ${version} header alone is ${fixedLength}`);
    const fixed = await region(0, fixedLength);
    const headerLength = fixed.readUInt32LE(OFF_HEADER_LENGTH);
    if (headerLength < fixedLength || headerLength > 65536 || headerLength % 8 !== 0) {
      fail(`header length ${headerLength} is invalid (version ${version}: a multiple of 8 from ${fixedLength} to 65536)`);
    }
    if (headerLength > size) fail(`truncated header: file is ${size} bytes, the header says ${headerLength}`);
    const raw = headerLength === fixedLength ? fixed : await region(0, headerLength);
    if (!sha256WithFieldZeroed(raw, OFF_HEADER_CHECKSUM).equals(raw.subarray(OFF_HEADER_CHECKSUM, OFF_HEADER_CHECKSUM + 32))) {
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
    if (algorithm === undefined || checksumLength !== blockChecksumLength(algorithm) || (version === 2 && algorithm !== BLOCK_CHECKSUM_CRC32)) {
      return fail(`unsupported block checksum (algorithm ${algorithmField}, ${checksumLength} bytes) in a version ${version} segment`);
    }
    let digestOffsetField = 0;
    let digestTableSha256 = '';
    if (version === 2) {
      const digestLength = raw.readUInt32LE(OFF_DIGEST_LENGTH);
      const digestAlgorithm = raw.readUInt32LE(OFF_DIGEST_ALGORITHM);
      if (digestAlgorithm !== BLOCK_DIGEST_SHA256 || digestLength !== BLOCK_DIGEST_LENGTH) {
        fail(`unsupported block digest (algorithm ${digestAlgorithm}, ${digestLength} bytes)`);
      }
      digestOffsetField = readSafeU64(raw, OFF_DIGEST_OFFSET);
      digestTableSha256 = raw.subarray(OFF_DIGEST_TABLE_SHA256, OFF_DIGEST_TABLE_SHA256 + 32).toString('hex');
    }
    if (headerLength > fixedLength && !isAllZero(raw.subarray(fixedLength))) {
      fail('reserved header bytes are not zero');
    }
    // The layout is fixed by the version, the header length and the block count.
    const layout = segmentLayout(blockCount, blockSize, { version, checksumAlgorithm: algorithm, headerLength });
    if (version === 2 && digestOffsetField !== layout.digestOffset) {
      fail(`digest table offset ${digestOffsetField} does not match the layout (${layout.digestOffset})`);
    }
    const tableOffset = readSafeU64(raw, OFF_TABLE_OFFSET);
    const dataOffset = readSafeU64(raw, OFF_DATA_OFFSET);
    if (tableOffset !== layout.tableOffset || dataOffset !== layout.dataOffset) {
      fail(`table offset ${tableOffset} / data offset ${dataOffset} do not match the layout (${layout.tableOffset} / ${layout.dataOffset})`);
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
      digests:
        version === 2
          ? { algorithm: BLOCK_DIGEST_SHA256, length: BLOCK_DIGEST_LENGTH, offset: layout.digestOffset, tableSha256: digestTableSha256 }
          : null,
    };
    // Digest table, checksum table and padding: one read, [digestOffset, dataOffset).
    const tables = await region(layout.digestOffset, dataOffset - layout.digestOffset);
    const tableArea = tables.subarray(tableOffset - layout.digestOffset);
    if (createHash('sha256').update(tableArea).digest('hex') !== header.tableSha256) {
      fail('checksum table does not match its SHA-256 in the header: the table is corrupted');
    }
    const digestArea = tables.subarray(0, layout.digestTableLength);
    const digestTableIntact = version === 1 || createHash('sha256').update(digestArea).digest('hex') === digestTableSha256;
    if (!digestTableIntact && !options.allowDamagedDigests) {
      fail('digest table does not match its SHA-256 in the header: the digest table is corrupted');
    }
    return new SegmentReader(
      source,
      header,
      Buffer.from(tableArea.subarray(0, layout.tableLength)),
      Buffer.from(digestArea),
      digestTableIntact,
      options.ownsSource ?? false,
    );
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

  /** True when the segment carries per-block content digests (version 2). */
  get hasDigests(): boolean {
    return this.header.digests !== null;
  }

  /** The stored SHA-256 of block `rank` (a view into the digest table); throws on a version 1 segment. */
  blockDigest(rank: number): Buffer {
    return this.blockDigests(rank, 1);
  }

  /** The stored digests of blocks [rank, rank + count) (a view into the digest table); throws on a version 1 segment. */
  blockDigests(rank: number, count: number): Buffer {
    if (!this.header.digests) throw new RangeError(`${this.name} is a version ${this.header.version} segment: it has no block digests`);
    this.checkRank(rank, count);
    return this.digestTable.subarray(rank * BLOCK_DIGEST_LENGTH, (rank + count) * BLOCK_DIGEST_LENGTH);
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
