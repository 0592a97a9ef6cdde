/**
 * The image index (.bcidx): a SHA-256 digest for every block of an image
 * that holds data (is not all zeros), in ascending block order, with a
 * bitmap of those blocks. With it a cache keyed by content serves any block
 * it already holds without a storage read, whichever image put it there.
 * Byte layout: docs/formats.md, "Image index (.bcidx)".
 */
import { constants as bufferConstants } from 'node:buffer';
import { createHash } from 'node:crypto';
import { posix } from 'node:path';
import { InvalidIndexError, MismatchError } from '../errors.js';
import { FileByteSource } from '../image/file-source.js';
import { Bitmap, MAX_BITMAP_BITS, RankSelectIndex, hasBitsPastLength } from './bitmap.js';
import {
  MAX_BLOCK_SIZE,
  MIN_BLOCK_SIZE,
  identityToBytes,
  sha256FromHex,
  sha256WithFieldZeroed,
  isAllZero,
  isValidBlockSize,
  readSafeU64,
  shortHex,
  writeU64,
} from './binary.js';
import { blockCountFor } from './map.js';
import { BLOCK_DIGEST_LENGTH, BLOCK_DIGEST_SHA256, type SegmentSource } from './segment.js';

export const INDEX_MAGIC = Buffer.from('BCIDX\0\r\n', 'latin1');
export const INDEX_VERSION = 1;
/** Header bytes before the previous-version key. */
export const INDEX_FIXED_HEADER_LENGTH = 208;
/** Longest previous-version key, in UTF-8 bytes. */
export const MAX_PREVIOUS_KEY_BYTES = 1024;
/** Largest header: fixed part, key and padding, with room to grow (as for maps and segments). */
const MAX_HEADER_LENGTH = 65536;
/**
 * Bytes read at once when an index is opened: the header, the bitmap and
 * (up to about 30,000 data blocks) the digest table in one request, since on
 * an object store each read is a round trip.
 */
export const INDEX_HEAD_READ = 1024 * 1024;

// Header field offsets (docs/formats.md, "Image index header").
const OFF_VERSION = 8;
const OFF_HEADER_LENGTH = 12;
const OFF_BLOCK_SIZE = 16;
const OFF_FLAGS = 20;
const OFF_VIRTUAL_SIZE = 24;
const OFF_BLOCK_COUNT = 32;
const OFF_IDENTITY = 40;
const OFF_DATA_BLOCKS = 72;
const OFF_BITMAP_OFFSET = 80;
const OFF_DIGEST_OFFSET = 88;
const OFF_DIGEST_LENGTH = 96;
const OFF_DIGEST_ALGORITHM = 100;
const OFF_PREVIOUS_LENGTH = 104;
const OFF_RESERVED = 108;
const OFF_BITMAP_SHA256 = 112;
const OFF_TABLE_SHA256 = 144;
const OFF_HEADER_CHECKSUM = 176;
const OFF_PREVIOUS_KEY = INDEX_FIXED_HEADER_LENGTH;

/** Everything the header says. Digests and identity are lowercase hex. */
export interface ImageIndexHeader {
  version: number;
  headerLength: number;
  blockSize: number;
  flags: number;
  virtualSize: number;
  /** ceil(virtualSize / blockSize). */
  blockCount: number;
  identity: string;
  /** Blocks that hold data: set bits, digest table entries. */
  dataBlocks: number;
  bitmapOffset: number;
  digestOffset: number;
  digestAlgorithm: typeof BLOCK_DIGEST_SHA256;
  digestLength: number;
  bitmapSha256: string;
  digestTableSha256: string;
  /** The image this one is a new version of (see checkPreviousKey), or null. */
  previous: string | null;
}

export interface ImageIndexLayout {
  headerLength: number;
  /** The bitmap: [bitmapOffset, bitmapOffset + bitmapLength). */
  bitmapOffset: number;
  bitmapLength: number;
  /** The digest table: [digestOffset, digestOffset + digestTableLength). */
  digestOffset: number;
  digestTableLength: number;
  fileSize: number;
}

/** Where everything goes, for `blockCount` blocks of which `dataBlocks` hold data. */
export function indexLayout(blockCount: number, dataBlocks: number, previousKeyLength = 0): ImageIndexLayout {
  const headerLength = Math.ceil((INDEX_FIXED_HEADER_LENGTH + previousKeyLength) / 8) * 8;
  const bitmapLength = Math.ceil(blockCount / 8);
  const digestOffset = headerLength + bitmapLength;
  const digestTableLength = dataBlocks * BLOCK_DIGEST_LENGTH;
  return { headerLength, bitmapOffset: headerLength, bitmapLength, digestOffset, digestTableLength, fileSize: digestOffset + digestTableLength };
}

/**
 * First problem with a previous-version key, or undefined. A key starting
 * with `./` or `../` is relative to the image's directory; any other key is
 * relative to the storage root. Either way it is a plain relative path:
 * 1..1024 UTF-8 bytes, no control characters or backslashes, no empty,
 * `.` or `..` segments past the leading `./` or `../` ones, no scheme.
 */
export function checkPreviousKey(key: string): string | undefined {
  const bytes = Buffer.byteLength(key, 'utf8');
  if (bytes === 0) return 'the previous-version key is empty';
  if (bytes > MAX_PREVIOUS_KEY_BYTES) return `the previous-version key is ${bytes} bytes, at most ${MAX_PREVIOUS_KEY_BYTES}`;
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f\\]/.test(key)) return 'the previous-version key has a control character or a backslash';
  if (key.startsWith('/')) return `the previous-version key ${JSON.stringify(key)} is absolute: give it relative to the storage root, or to the image's directory with ./ or ../`;
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(key)) return `the previous-version key ${JSON.stringify(key)} is a URL: give it relative to the storage root, or to the image's directory with ./ or ../`;
  const segments = key.split('/');
  let i = 0;
  if (segments[0] === '.') i = 1;
  else while (segments[i] === '..') i++;
  if (i === segments.length) return `the previous-version key ${JSON.stringify(key)} names a directory, not an image`;
  for (; i < segments.length; i++) {
    const s = segments[i];
    if (s === '' || s === '.' || s === '..') return `the previous-version key ${JSON.stringify(key)} has an empty, . or .. segment past its start`;
  }
  return undefined;
}

/**
 * The storage key of the previous version named by `previous` in the index
 * of the image at storage key `imageKey` (docs/formats.md, "Previous
 * version"). Throws RangeError when it climbs above the storage root.
 */
export function resolvePreviousKey(imageKey: string, previous: string): string {
  const problem = checkPreviousKey(previous);
  if (problem) throw new RangeError(problem);
  if (!previous.startsWith('./') && !previous.startsWith('../')) return previous;
  const resolved = posix.normalize(posix.join(posix.dirname(imageKey), previous));
  if (resolved === '..' || resolved.startsWith('../') || resolved.startsWith('/')) {
    throw new RangeError(`previous-version key ${JSON.stringify(previous)} of ${imageKey} climbs above the storage root`);
  }
  return resolved;
}

/** Fields a writer provides; the layout fields follow from them. */
export interface ImageIndexHeaderFields {
  blockSize: number;
  virtualSize: number;
  identity: string;
  dataBlocks: number;
  bitmapSha256: string;
  digestTableSha256: string;
  previous?: string | null | undefined;
}

/** Encodes the header (headerLength bytes: fixed part, previous key, zero padding), including its checksum. */
export function encodeIndexHeader(fields: ImageIndexHeaderFields): Buffer {
  if (!isValidBlockSize(fields.blockSize)) {
    throw new RangeError(`block size ${fields.blockSize} is not a power of two between ${MIN_BLOCK_SIZE} and ${MAX_BLOCK_SIZE}`);
  }
  const blockCount = indexBlockCount(fields.virtualSize, fields.blockSize);
  if (!Number.isSafeInteger(fields.dataBlocks) || fields.dataBlocks < 0 || fields.dataBlocks > blockCount) {
    throw new RangeError(`${fields.dataBlocks} data blocks is out of range (0..${blockCount})`);
  }
  const previous = fields.previous ?? null;
  if (previous !== null) {
    const problem = checkPreviousKey(previous);
    if (problem) throw new RangeError(problem);
  }
  const key = Buffer.from(previous ?? '', 'utf8');
  const layout = indexLayout(blockCount, fields.dataBlocks, key.length);
  const buf = Buffer.alloc(layout.headerLength);
  INDEX_MAGIC.copy(buf, 0);
  buf.writeUInt32LE(INDEX_VERSION, OFF_VERSION);
  buf.writeUInt32LE(layout.headerLength, OFF_HEADER_LENGTH);
  buf.writeUInt32LE(fields.blockSize, OFF_BLOCK_SIZE);
  writeU64(buf, fields.virtualSize, OFF_VIRTUAL_SIZE);
  writeU64(buf, blockCount, OFF_BLOCK_COUNT);
  identityToBytes(fields.identity).copy(buf, OFF_IDENTITY);
  writeU64(buf, fields.dataBlocks, OFF_DATA_BLOCKS);
  writeU64(buf, layout.bitmapOffset, OFF_BITMAP_OFFSET);
  writeU64(buf, layout.digestOffset, OFF_DIGEST_OFFSET);
  buf.writeUInt32LE(BLOCK_DIGEST_LENGTH, OFF_DIGEST_LENGTH);
  buf.writeUInt32LE(BLOCK_DIGEST_SHA256, OFF_DIGEST_ALGORITHM);
  buf.writeUInt32LE(key.length, OFF_PREVIOUS_LENGTH);
  sha256FromHex(fields.bitmapSha256, 'bitmap SHA-256').copy(buf, OFF_BITMAP_SHA256);
  sha256FromHex(fields.digestTableSha256, 'digest table SHA-256').copy(buf, OFF_TABLE_SHA256);
  key.copy(buf, OFF_PREVIOUS_KEY);
  sha256WithFieldZeroed(buf, OFF_HEADER_CHECKSUM).copy(buf, OFF_HEADER_CHECKSUM);
  return buf;
}

/** Blocks of an index: ceil(virtualSize / blockSize), at most MAX_BITMAP_BITS. */
export function indexBlockCount(virtualSize: number, blockSize: number): number {
  if (!Number.isSafeInteger(virtualSize) || virtualSize < 0) throw new RangeError(`virtual size ${virtualSize} is invalid`);
  const blockCount = blockCountFor(virtualSize, blockSize);
  if (blockCount > MAX_BITMAP_BITS) {
    throw new RangeError(`${blockCount} blocks is more than an index can hold (${MAX_BITMAP_BITS}); use a larger block size`);
  }
  return blockCount;
}



function sha256Hex(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/**
 * A whole index in memory: the bitmap of data blocks and their digests
 * (32 bytes each, ascending block order). For tests and small images;
 * buildImageIndex streams the table of large ones.
 */
export function serializeImageIndex(fields: {
  blockSize: number;
  virtualSize: number;
  identity: string;
  bitmap: Bitmap;
  digests: Buffer;
  previous?: string | null;
}): Buffer {
  const blockCount = indexBlockCount(fields.virtualSize, fields.blockSize);
  if (fields.bitmap.length !== blockCount) throw new RangeError(`bitmap has ${fields.bitmap.length} bits, expected ${blockCount}`);
  const dataBlocks = fields.bitmap.popcount();
  if (fields.digests.length !== dataBlocks * BLOCK_DIGEST_LENGTH) {
    throw new RangeError(`${fields.digests.length} digest bytes for ${dataBlocks} data blocks (32 each)`);
  }
  const header = encodeIndexHeader({
    ...fields,
    dataBlocks,
    bitmapSha256: sha256Hex(fields.bitmap.bytes),
    digestTableSha256: sha256Hex(fields.digests),
  });
  return Buffer.concat([header, fields.bitmap.bytes, fields.digests]);
}

/** What an index is read from: a local file, an object in a store, a buffer (see bufferSource). */
export type IndexSource = SegmentSource;

export interface ImageIndexOpenOptions {
  /** close() closes the source too (default false; open() of a path owns its file). */
  ownsSource?: boolean;
  /**
   * Read the digest table now (default true). With false only the header
   * and bitmap are read: hasData() and dataRank() answer at once, and
   * digestOf() after loadTable().
   */
  loadTable?: boolean;
  /**
   * Accept a digest table that does not match its SHA-256 in the header and
   * say so in tableIntact (verify names the bad entries); by default that
   * is an InvalidIndexError.
   */
  allowDamagedTable?: boolean;
}

/**
 * An opened, checked image index. digestOf(block) is a bit test, a rank
 * (one superblock lookup and at most 15 word popcounts) and a view into the
 * table: no allocation, no I/O.
 */
export class ImageIndex {
  private table: Buffer | undefined;
  private intact = true;
  private readonly ranks: RankSelectIndex;

  private constructor(
    readonly source: IndexSource,
    readonly header: ImageIndexHeader,
    /** Bit b set: block b holds data and has a digest. Do not modify it. */
    readonly bitmap: Bitmap,
    /** The first bytes read at open, until the table is cut from them. */
    private head: Buffer,
    private readonly options: ImageIndexOpenOptions,
  ) {
    this.ranks = new RankSelectIndex(bitmap);
  }

  /** Opens a local .bcidx file or any IndexSource (an object in a store, a buffer). */
  static async open(from: string | IndexSource, options: ImageIndexOpenOptions = {}): Promise<ImageIndex> {
    if (typeof from !== 'string') return ImageIndex.fromSource(from, options);
    const source = await FileByteSource.open(from);
    try {
      return await ImageIndex.fromSource(source, { ...options, ownsSource: true });
    } catch (err) {
      await source.close().catch(() => undefined);
      throw err;
    }
  }

  /** An index held in memory (serializeImageIndex's output). */
  static parse(buf: Buffer, name = '<index>', options: Omit<ImageIndexOpenOptions, 'ownsSource' | 'loadTable'> = {}): Promise<ImageIndex> {
    return ImageIndex.fromSource(
      {
        name,
        size: buf.length,
        async read(offset, length) {
          return buf.subarray(offset, offset + length);
        },
      },
      options,
    );
  }

  private static async fromSource(source: IndexSource, options: ImageIndexOpenOptions): Promise<ImageIndex> {
    const fail = (message: string): never => {
      throw new InvalidIndexError(message, { file: source.name });
    };
    const size = source.size;
    const head = await source.read(0, Math.min(size, INDEX_HEAD_READ));
    const region = (offset: number, length: number): Promise<Buffer> =>
      offset + length <= head.length ? Promise.resolve(head.subarray(offset, offset + length)) : source.read(offset, length);
    if (!head.subarray(0, Math.min(size, INDEX_MAGIC.length)).equals(INDEX_MAGIC)) fail('not a bootcache image index (bad magic)');
    if (size < INDEX_FIXED_HEADER_LENGTH) fail(`truncated header: file is ${size} bytes, the header alone is ${INDEX_FIXED_HEADER_LENGTH}`);
    const fixed = await region(0, INDEX_FIXED_HEADER_LENGTH);
    const version = fixed.readUInt32LE(OFF_VERSION);
    if (version !== INDEX_VERSION) fail(`unsupported index version ${version} (this build reads version ${INDEX_VERSION})`);
    const previousLength = fixed.readUInt32LE(OFF_PREVIOUS_LENGTH);
    if (previousLength > MAX_PREVIOUS_KEY_BYTES) fail(`previous-version key length ${previousLength} is more than ${MAX_PREVIOUS_KEY_BYTES}`);
    const minHeader = indexLayout(0, 0, previousLength).headerLength;
    const headerLength = fixed.readUInt32LE(OFF_HEADER_LENGTH);
    if (headerLength < minHeader || headerLength > MAX_HEADER_LENGTH || headerLength % 8 !== 0) {
      fail(`header length ${headerLength} is invalid (a multiple of 8 from ${minHeader} to ${MAX_HEADER_LENGTH})`);
    }
    if (headerLength > size) fail(`truncated header: file is ${size} bytes, the header says ${headerLength}`);
    const raw = await region(0, headerLength);
    if (!sha256WithFieldZeroed(raw, OFF_HEADER_CHECKSUM).equals(raw.subarray(OFF_HEADER_CHECKSUM, OFF_HEADER_CHECKSUM + 32))) {
      fail('header checksum mismatch: the header is corrupted');
    }
    const blockSize = raw.readUInt32LE(OFF_BLOCK_SIZE);
    if (!isValidBlockSize(blockSize)) fail(`block size ${blockSize} is not a power of two between ${MIN_BLOCK_SIZE} and ${MAX_BLOCK_SIZE}`);
    const flags = raw.readUInt32LE(OFF_FLAGS);
    if (flags !== 0) fail(`unknown flags 0x${flags.toString(16)}`);
    const virtualSize = readSafeU64(raw, OFF_VIRTUAL_SIZE);
    if (virtualSize < 0) fail('virtual size is too large');
    const blockCount = readSafeU64(raw, OFF_BLOCK_COUNT);
    const expectedBlocks = blockCountFor(virtualSize, blockSize);
    if (blockCount !== expectedBlocks) {
      fail(`block count ${blockCount} does not match virtual size ${virtualSize} / block size ${blockSize} (expected ${expectedBlocks})`);
    }
    if (blockCount > MAX_BITMAP_BITS) fail(`${blockCount} blocks is more than an index can hold (${MAX_BITMAP_BITS})`);
    const dataBlocks = readSafeU64(raw, OFF_DATA_BLOCKS);
    if (dataBlocks < 0 || dataBlocks > blockCount) fail(`data block count ${dataBlocks} is more than the image's ${blockCount} blocks`);
    const digestLength = raw.readUInt32LE(OFF_DIGEST_LENGTH);
    const digestAlgorithm = raw.readUInt32LE(OFF_DIGEST_ALGORITHM);
    if (digestAlgorithm !== BLOCK_DIGEST_SHA256 || digestLength !== BLOCK_DIGEST_LENGTH) {
      fail(`unsupported block digest (algorithm ${digestAlgorithm}, ${digestLength} bytes)`);
    }
    if (raw.readUInt32LE(OFF_RESERVED) !== 0 || !isAllZero(raw.subarray(OFF_PREVIOUS_KEY + previousLength))) {
      fail('reserved header bytes are not zero');
    }
    let previous: string | null = null;
    if (previousLength > 0) {
      const keyBytes = raw.subarray(OFF_PREVIOUS_KEY, OFF_PREVIOUS_KEY + previousLength);
      const key = keyBytes.toString('utf8');
      if (!Buffer.from(key, 'utf8').equals(keyBytes)) fail('the previous-version key is not valid UTF-8');
      const problem = checkPreviousKey(key);
      if (problem) fail(problem);
      previous = key;
    }
    // The layout is fixed by the header length, the block count and the data block count.
    const layout = indexLayout(blockCount, dataBlocks, headerLength - INDEX_FIXED_HEADER_LENGTH);
    const bitmapOffset = readSafeU64(raw, OFF_BITMAP_OFFSET);
    const digestOffset = readSafeU64(raw, OFF_DIGEST_OFFSET);
    if (bitmapOffset !== layout.bitmapOffset || digestOffset !== layout.digestOffset) {
      fail(`bitmap offset ${bitmapOffset} / digest offset ${digestOffset} do not match the layout (${layout.bitmapOffset} / ${layout.digestOffset})`);
    }
    if (size !== layout.fileSize) {
      fail(
        `file is ${size} bytes but its header describes ${layout.fileSize} ` +
          `(${headerLength} header + ${layout.bitmapLength} bitmap + ${dataBlocks} digests of ${BLOCK_DIGEST_LENGTH} bytes)` +
          (size < layout.fileSize ? ': truncated' : ''),
      );
    }
    if (layout.digestTableLength > bufferConstants.MAX_LENGTH) fail(`digest table is too large to load (${layout.digestTableLength} bytes)`);
    const header: ImageIndexHeader = {
      version,
      headerLength,
      blockSize,
      flags,
      virtualSize,
      blockCount,
      identity: raw.subarray(OFF_IDENTITY, OFF_IDENTITY + 32).toString('hex'),
      dataBlocks,
      bitmapOffset,
      digestOffset,
      digestAlgorithm: BLOCK_DIGEST_SHA256,
      digestLength,
      bitmapSha256: raw.subarray(OFF_BITMAP_SHA256, OFF_BITMAP_SHA256 + 32).toString('hex'),
      digestTableSha256: raw.subarray(OFF_TABLE_SHA256, OFF_TABLE_SHA256 + 32).toString('hex'),
      previous,
    };
    const bitmapBytes = await region(bitmapOffset, layout.bitmapLength);
    if (sha256Hex(bitmapBytes) !== header.bitmapSha256) fail('bitmap does not match its SHA-256 in the header: the bitmap is corrupted');
    if (hasBitsPastLength(bitmapBytes, blockCount)) fail(`bits are set past the last block (${blockCount - 1})`);
    const bitmap = Bitmap.fromBytes(bitmapBytes, blockCount);
    const set = bitmap.popcount();
    if (set !== dataBlocks) fail(`bitmap has ${set} blocks set, the header says ${dataBlocks} data blocks`);
    const index = new ImageIndex(source, header, bitmap, head, options);
    if (options.loadTable ?? true) await index.loadTable();
    return index;
  }

  /** Reads and checks the digest table (one read, or none when it came with the header); idempotent. */
  async loadTable(): Promise<void> {
    if (this.table) return;
    const { digestOffset, dataBlocks, digestTableSha256 } = this.header;
    const length = dataBlocks * BLOCK_DIGEST_LENGTH;
    const table = digestOffset + length <= this.head.length
      ? Buffer.from(this.head.subarray(digestOffset, digestOffset + length))
      : await this.source.read(digestOffset, length);
    this.intact = sha256Hex(table) === digestTableSha256;
    if (!this.intact && !this.options.allowDamagedTable) {
      throw new InvalidIndexError('digest table does not match its SHA-256 in the header: the digest table is corrupted', { file: this.name });
    }
    this.table = table;
    this.head = Buffer.alloc(0);
  }

  get name(): string {
    return this.source.name;
  }
  get blockSize(): number {
    return this.header.blockSize;
  }
  get virtualSize(): number {
    return this.header.virtualSize;
  }
  get blockCount(): number {
    return this.header.blockCount;
  }
  get identity(): string {
    return this.header.identity;
  }
  get dataBlocks(): number {
    return this.header.dataBlocks;
  }
  get previous(): string | null {
    return this.header.previous;
  }
  get tableLoaded(): boolean {
    return this.table !== undefined;
  }
  /** False when the loaded table does not match its SHA-256 (only with allowDamagedTable). */
  get tableIntact(): boolean {
    return this.intact;
  }

  /** True when this index was made from `image` (same identity and virtual size). */
  matches(image: { identity: string; virtualSize: number }): boolean {
    return image.identity === this.identity && image.virtualSize === this.virtualSize;
  }

  /** Throws MismatchError (exit 1) unless this index was made from `image`. */
  checkMatches(image: { identity: string; virtualSize: number; name?: string }): void {
    const name = image.name ?? 'the image';
    if (image.identity !== this.identity) {
      throw new MismatchError(
        `index is for image identity ${shortHex(this.identity)} but ${name} has identity ${shortHex(image.identity)} (the image was rewritten or is another image)`,
        { file: this.name },
      );
    }
    if (image.virtualSize !== this.virtualSize) {
      throw new MismatchError(`index is for a ${this.virtualSize}-byte disk but ${name} is ${image.virtualSize} bytes`, { file: this.name });
    }
  }

  /** True when block `block` holds data (has a digest); false when it reads as zeros. */
  hasData(block: number): boolean {
    return this.bitmap.get(block);
  }

  /** Position of a data block's digest in the table (rank over the bitmap); -1 for a zero block. */
  dataRank(block: number): number {
    return this.bitmap.get(block) ? this.ranks.rank(block) : -1;
  }

  /**
   * The SHA-256 of block `block` (a view into the table: do not modify it),
   * or undefined when the block reads as zeros. Needs the table loaded.
   */
  digestOf(block: number): Buffer | undefined {
    if (!this.bitmap.get(block)) return undefined;
    return this.digestAt(this.ranks.rank(block));
  }

  /** The digest of the data block with rank `rank` (the rank-th data block). */
  digestAt(rank: number): Buffer {
    const table = this.table;
    if (!table) throw new Error(`${this.name}: the digest table is not loaded (call loadTable())`);
    if (!Number.isInteger(rank) || rank < 0 || rank >= this.header.dataBlocks) {
      throw new RangeError(`digest rank ${rank} is outside the table (${this.header.dataBlocks} entries)`);
    }
    return table.subarray(rank * BLOCK_DIGEST_LENGTH, (rank + 1) * BLOCK_DIGEST_LENGTH);
  }

  /** The whole digest table (32 bytes per data block, in block order). Needs the table loaded. */
  get digestTable(): Buffer {
    if (!this.table) throw new Error(`${this.name}: the digest table is not loaded (call loadTable())`);
    return this.table;
  }

  /** The block index of the data block with rank `rank`. */
  blockAt(rank: number): number {
    return this.ranks.select(rank);
  }

  async close(): Promise<void> {
    if (this.options.ownsSource) await this.source.close?.();
  }
}
