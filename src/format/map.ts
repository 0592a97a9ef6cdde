/**
 * The boot workload map (.bcmap): which blocks of one image version a boot
 * reads, plus an optional per-block history of the last K boots. Byte layout:
 * docs/formats.md, "Map (.bcmap)".
 */
import { createHash } from 'node:crypto';
import { constants as bufferConstants } from 'node:buffer';
import { InvalidMapError, MismatchError, UsageError } from '../errors.js';
import { FileByteSource } from '../image/file-source.js';
import { writeFileAtomic } from './atomic-write.js';
import { Bitmap, MAX_BITMAP_BITS, RankSelectIndex, hasBitsPastLength, popcount32 } from './bitmap.js';
import {
  MAX_BLOCK_SIZE,
  MIN_BLOCK_SIZE,
  identityToBytes,
  isAllZero,
  isValidBlockSize,
  isValidIdentity,
  readSafeU64,
  shortHex,
  writeU64,
} from './binary.js';

export const MAP_MAGIC = Buffer.from('BCMAP\0\r\n', 'latin1');
export const MAP_VERSION = 1;
export const MAP_HEADER_LENGTH = 128;
/** Flags (header offset 20). Bit 0: a history section follows the bitmap. */
export const MAP_FLAG_HISTORY = 1 << 0;
/**
 * Flags bit 1 (docs/formats.md, "Map (.bcmap)"): the bitmap is the block set
 * of the published segment, held while the history's policy set drifted
 * from it by less than a material change; only with bit 0.
 */
export const MAP_FLAG_HELD_SET = 1 << 1;
const KNOWN_FLAGS = MAP_FLAG_HISTORY | MAP_FLAG_HELD_SET;
/** History entries: u64 block index + u16 seen mask. */
export const HISTORY_ENTRY_LENGTH = 10;
/** Boots a history mask can hold (it is a u16). */
export const MAX_HISTORY_WINDOW = 16;

// Header field offsets (docs/formats.md, "Map header").
const OFF_VERSION = 8;
const OFF_HEADER_LENGTH = 12;
const OFF_BLOCK_SIZE = 16;
const OFF_FLAGS = 20;
const OFF_VIRTUAL_SIZE = 24;
const OFF_BLOCK_COUNT = 32;
const OFF_IDENTITY = 40;
const OFF_BOOTS = 72;
const OFF_HISTORY_WINDOW = 76;
const OFF_HISTORY_MIN_SEEN = 77;
const OFF_HISTORY_RECORDED = 78;
const OFF_RESERVED_1 = 79;
const OFF_HISTORY_COUNT = 80;
const OFF_RESERVED_2 = 88;
const OFF_CHECKSUM = 96;
const CHECKSUM_LENGTH = 32;

/**
 * Per-block boot history. For each listed block, bit j of `seen` is set when
 * the block was read in the j-th most recent boot (bit 0: the latest).
 * Blocks never read in the last `recorded` boots are not listed.
 */
export interface BlockHistory {
  /** K: boots a mask remembers (1..16). */
  window: number;
  /** M: the policy's "seen in at least M boots" (1..K). */
  minSeen: number;
  /** Boots actually recorded in the masks (1..K); fewer than K while warming up. */
  recorded: number;
  /** Block indices, strictly ascending. */
  blocks: Uint32Array;
  /** Seen masks, parallel to `blocks`; each non-zero and < 2^recorded. */
  seen: Uint16Array;
}

/** The "seen in at least M of the last K boots" merge policy. */
export interface MergePolicy {
  minSeen: number;
  window: number;
}

/** Keeps blocks read in at least 2 of the last 4 boots. */
export const DEFAULT_MERGE_POLICY: MergePolicy = { minSeen: 2, window: 4 };

export interface BootMapFields {
  blockSize: number;
  virtualSize: number;
  /** Hex SHA-256 image identity (DiskImage.identity). */
  identity: string;
  /** Boots merged into this map. */
  boots: number;
  bitmap: Bitmap;
  history?: BlockHistory | undefined;
  /** The bitmap is a held set (MAP_FLAG_HELD_SET): it need not be the history's policy set. */
  heldSet?: boolean;
}

/** What mergeBoots needs from one boot: its blocks and what they belong to. */
export interface BootRecord {
  blockSize: number;
  virtualSize: number;
  identity: string;
  bitmap: Bitmap;
}

export function blockCountFor(virtualSize: number, blockSize: number): number {
  return Math.ceil(virtualSize / blockSize);
}

export class BootMap {
  readonly version = MAP_VERSION;
  readonly blockSize: number;
  readonly virtualSize: number;
  readonly blockCount: number;
  readonly identity: string;
  readonly boots: number;
  readonly bitmap: Bitmap;
  readonly history: BlockHistory | undefined;
  /** See MAP_FLAG_HELD_SET. */
  readonly heldSet: boolean;
  private cachedIndex: RankSelectIndex | undefined;

  constructor(fields: BootMapFields) {
    const problem = checkMapFields(fields);
    if (problem) throw new RangeError(problem);
    this.blockSize = fields.blockSize;
    this.virtualSize = fields.virtualSize;
    this.blockCount = blockCountFor(fields.virtualSize, fields.blockSize);
    this.identity = fields.identity;
    this.boots = fields.boots;
    this.bitmap = fields.bitmap;
    this.history = fields.history;
    this.heldSet = fields.heldSet ?? false;
  }

  /** An empty map (no blocks, no boots) for an image. */
  static empty(geometry: { blockSize: number; virtualSize: number; identity: string }): BootMap {
    return new BootMap({ ...geometry, boots: 0, bitmap: new Bitmap(blockCountFor(geometry.virtualSize, geometry.blockSize)) });
  }

  /** Rank/select index over the bitmap (built on first use, rebuilt if the bitmap changed). */
  get index(): RankSelectIndex {
    if (!this.cachedIndex || this.cachedIndex.bitmap.generation !== this.bitmap.generation) {
      this.cachedIndex = new RankSelectIndex(this.bitmap);
    }
    return this.cachedIndex;
  }

  /** Number of blocks set (the segment's block count). */
  get blocksSet(): number {
    return this.index.total;
  }

  /**
   * SHA-256 (hex) over what a segment layout depends on:
   * u32le(blockSize) || u64le(virtualSize) || bitmap bytes.
   */
  mapDigest(): string {
    const prefix = Buffer.alloc(12);
    prefix.writeUInt32LE(this.blockSize, 0);
    writeU64(prefix, this.virtualSize, 4);
    return createHash('sha256').update(prefix).update(this.bitmap.bytes).digest('hex');
  }

  serialize(): Buffer {
    return serializeMap(this);
  }

  static parse(buf: Buffer, name = '<map>'): BootMap {
    return parseMap(buf, name);
  }
}

/** First problem with a set of map fields, or undefined. */
function checkMapFields(f: BootMapFields): string | undefined {
  if (!isValidBlockSize(f.blockSize)) {
    return `block size ${f.blockSize} is not a power of two between ${MIN_BLOCK_SIZE} and ${MAX_BLOCK_SIZE}`;
  }
  if (!Number.isSafeInteger(f.virtualSize) || f.virtualSize < 0) return `virtual size ${f.virtualSize} is invalid`;
  const blockCount = blockCountFor(f.virtualSize, f.blockSize);
  if (blockCount > MAX_BITMAP_BITS) {
    return `${blockCount} blocks is more than a map can hold (${MAX_BITMAP_BITS}); use a larger block size`;
  }
  if (!isValidIdentity(f.identity)) return `image identity ${JSON.stringify(f.identity)} is not 64 lowercase hex digits`;
  if (!Number.isInteger(f.boots) || f.boots < 0 || f.boots > 0xffff_ffff) return `boot count ${f.boots} is invalid`;
  if (f.bitmap.length !== blockCount) {
    return `bitmap has ${f.bitmap.length} bits, expected ${blockCount} (virtual size ${f.virtualSize} / block size ${f.blockSize})`;
  }
  if (f.heldSet && !f.history) return 'a held block set needs a history';
  if (f.history) return checkHistory(f.history, f.bitmap, f.boots, f.heldSet ?? false);
  return undefined;
}

/** Checks a history section against its bitmap and boot count. */
function checkHistory(h: BlockHistory, bitmap: Bitmap, boots: number, heldSet: boolean): string | undefined {
  if (!Number.isInteger(h.window) || h.window < 1 || h.window > MAX_HISTORY_WINDOW) {
    return `history window ${h.window} is out of range (1..${MAX_HISTORY_WINDOW})`;
  }
  if (!Number.isInteger(h.minSeen) || h.minSeen < 1 || h.minSeen > h.window) {
    return `history min-seen ${h.minSeen} is out of range (1..${h.window})`;
  }
  if (!Number.isInteger(h.recorded) || h.recorded < 1 || h.recorded > h.window || h.recorded > boots) {
    return `history records ${h.recorded} boots, which must be 1..${Math.min(h.window, boots)}`;
  }
  if (h.blocks.length !== h.seen.length) return 'history block and mask lists differ in length';
  const threshold = Math.min(h.minSeen, h.recorded);
  const limit = 1 << h.recorded;
  // Walk the history and the bitmap together: a bit must be set exactly when
  // its block was seen in at least `threshold` recorded boots.
  let expectedNext = 0; // bits in [expectedNext, block) must be clear
  for (let e = 0; e < h.blocks.length; e++) {
    const block = h.blocks[e];
    const seen = h.seen[e];
    if (e > 0 && block <= h.blocks[e - 1]) return `history entry ${e} (block ${block}) is not in ascending block order`;
    if (block >= bitmap.length) return `history entry ${e} names block ${block}, past the last block (${bitmap.length - 1})`;
    if (seen === 0 || seen >= limit) {
      return `history entry ${e} (block ${block}) has mask 0x${seen.toString(16)}, outside 1..0x${(limit - 1).toString(16)}`;
    }
    const stray = heldSet ? -1 : bitmap.nextSetBit(expectedNext);
    if (stray >= 0 && stray < block) return `bitmap block ${stray} is set but has no history entry`;
    const shouldBeSet = popcount32(seen) >= threshold;
    if (!heldSet && bitmap.get(block) !== shouldBeSet) {
      return `bitmap block ${block} is ${shouldBeSet ? 'clear' : 'set'} but its history says it was seen in ${popcount32(seen)} of ${h.recorded} boots (policy: ${h.minSeen} of ${h.window})`;
    }
    expectedNext = block + 1;
  }
  const stray = heldSet ? -1 : bitmap.nextSetBit(expectedNext);
  if (stray >= 0) return `bitmap block ${stray} is set but has no history entry`;
  return undefined;
}

/** Encodes a map (docs/formats.md, "Map (.bcmap)"). */
export function serializeMap(map: BootMap): Buffer {
  const bitmapBytes = map.bitmap.bytes;
  const history = map.history;
  const entries = history ? history.blocks.length : 0;
  const buf = Buffer.alloc(MAP_HEADER_LENGTH + bitmapBytes.length + entries * HISTORY_ENTRY_LENGTH);
  MAP_MAGIC.copy(buf, 0);
  buf.writeUInt32LE(MAP_VERSION, OFF_VERSION);
  buf.writeUInt32LE(MAP_HEADER_LENGTH, OFF_HEADER_LENGTH);
  buf.writeUInt32LE(map.blockSize, OFF_BLOCK_SIZE);
  buf.writeUInt32LE((history ? MAP_FLAG_HISTORY : 0) | (map.heldSet ? MAP_FLAG_HELD_SET : 0), OFF_FLAGS);
  writeU64(buf, map.virtualSize, OFF_VIRTUAL_SIZE);
  writeU64(buf, map.blockCount, OFF_BLOCK_COUNT);
  identityToBytes(map.identity).copy(buf, OFF_IDENTITY);
  buf.writeUInt32LE(map.boots, OFF_BOOTS);
  if (history) {
    buf.writeUInt8(history.window, OFF_HISTORY_WINDOW);
    buf.writeUInt8(history.minSeen, OFF_HISTORY_MIN_SEEN);
    buf.writeUInt8(history.recorded, OFF_HISTORY_RECORDED);
    writeU64(buf, entries, OFF_HISTORY_COUNT);
  }
  bitmapBytes.copy(buf, MAP_HEADER_LENGTH);
  let pos = MAP_HEADER_LENGTH + bitmapBytes.length;
  for (let e = 0; e < entries; e++) {
    writeU64(buf, history!.blocks[e], pos);
    buf.writeUInt16LE(history!.seen[e], pos + 8);
    pos += HISTORY_ENTRY_LENGTH;
  }
  createHash('sha256').update(buf).digest().copy(buf, OFF_CHECKSUM);
  return buf;
}

/** Header fields, validated against each other and against the file size. */
interface MapHeader {
  version: number;
  headerLength: number;
  blockSize: number;
  flags: number;
  virtualSize: number;
  blockCount: number;
  identity: string;
  boots: number;
  historyWindow: number;
  historyMinSeen: number;
  historyRecorded: number;
  historyCount: number;
  bitmapLength: number;
  totalLength: number;
}

/**
 * Decodes and checks the header, including that the sizes it gives add up to
 * `fileSize` exactly. `head` holds the first min(fileSize, 128) bytes.
 */
function decodeMapHeader(head: Buffer, fileSize: number, name: string): MapHeader {
  const fail = (message: string): never => {
    throw new InvalidMapError(message, { file: name });
  };
  if (fileSize < MAP_MAGIC.length || !head.subarray(0, MAP_MAGIC.length).equals(MAP_MAGIC)) {
    fail('not a bootcache map (bad magic)');
  }
  if (fileSize < MAP_HEADER_LENGTH) fail(`truncated header: file is ${fileSize} bytes, the header alone is ${MAP_HEADER_LENGTH}`);
  const version = head.readUInt32LE(OFF_VERSION);
  if (version !== MAP_VERSION) fail(`unsupported map version ${version} (this build reads version ${MAP_VERSION})`);
  const headerLength = head.readUInt32LE(OFF_HEADER_LENGTH);
  if (headerLength < MAP_HEADER_LENGTH || headerLength > 65536 || headerLength % 8 !== 0) {
    fail(`header length ${headerLength} is invalid`);
  }
  const blockSize = head.readUInt32LE(OFF_BLOCK_SIZE);
  if (!isValidBlockSize(blockSize)) fail(`block size ${blockSize} is not a power of two between ${MIN_BLOCK_SIZE} and ${MAX_BLOCK_SIZE}`);
  const flags = head.readUInt32LE(OFF_FLAGS);
  if ((flags & ~KNOWN_FLAGS) !== 0) fail(`unknown flags 0x${(flags & ~KNOWN_FLAGS).toString(16)}`);
  const virtualSize = readSafeU64(head, OFF_VIRTUAL_SIZE);
  if (virtualSize < 0) fail('virtual size is too large');
  const blockCount = readSafeU64(head, OFF_BLOCK_COUNT);
  const expectedBlocks = blockCountFor(virtualSize, blockSize);
  if (blockCount !== expectedBlocks) {
    fail(`block count ${blockCount} does not match virtual size ${virtualSize} / block size ${blockSize} (expected ${expectedBlocks})`);
  }
  if (blockCount > MAX_BITMAP_BITS) fail(`${blockCount} blocks is more than a map can hold (${MAX_BITMAP_BITS})`);
  const identity = head.subarray(OFF_IDENTITY, OFF_IDENTITY + 32).toString('hex');
  const boots = head.readUInt32LE(OFF_BOOTS);
  const historyWindow = head.readUInt8(OFF_HISTORY_WINDOW);
  const historyMinSeen = head.readUInt8(OFF_HISTORY_MIN_SEEN);
  const historyRecorded = head.readUInt8(OFF_HISTORY_RECORDED);
  const historyCount = readSafeU64(head, OFF_HISTORY_COUNT);
  if (head.readUInt8(OFF_RESERVED_1) !== 0 || !isAllZero(head.subarray(OFF_RESERVED_2, OFF_RESERVED_2 + 8))) {
    fail('reserved header bytes are not zero');
  }
  if (flags & MAP_FLAG_HELD_SET && !(flags & MAP_FLAG_HISTORY)) fail('the held-set flag (bit 1) is set without the history flag (bit 0)');
  if (flags & MAP_FLAG_HISTORY) {
    if (historyCount < 0 || historyCount > blockCount) fail(`history has ${historyCount} entries, more than the ${blockCount} blocks`);
  } else if (historyWindow !== 0 || historyMinSeen !== 0 || historyRecorded !== 0 || historyCount !== 0) {
    fail('history fields are set but the history flag is not');
  }
  const bitmapLength = Math.ceil(blockCount / 8);
  const totalLength = headerLength + bitmapLength + historyCount * HISTORY_ENTRY_LENGTH;
  if (totalLength !== fileSize) {
    fail(
      `file is ${fileSize} bytes but its header describes ${totalLength} ` +
        `(${headerLength} header + ${bitmapLength} bitmap + ${historyCount} history entries)` +
        (fileSize < totalLength ? ': truncated' : ''),
    );
  }
  return {
    version, headerLength, blockSize, flags, virtualSize, blockCount, identity, boots,
    historyWindow, historyMinSeen, historyRecorded, historyCount, bitmapLength, totalLength,
  };
}

/** Decodes a whole .bcmap file held in `buf`, checking everything. */
export function parseMap(buf: Buffer, name = '<map>'): BootMap {
  const header = decodeMapHeader(buf.subarray(0, MAP_HEADER_LENGTH), buf.length, name);
  const fail = (message: string): never => {
    throw new InvalidMapError(message, { file: name });
  };
  const stored = Buffer.from(buf.subarray(OFF_CHECKSUM, OFF_CHECKSUM + CHECKSUM_LENGTH));
  const actual = createHash('sha256')
    .update(buf.subarray(0, OFF_CHECKSUM))
    .update(Buffer.alloc(CHECKSUM_LENGTH))
    .update(buf.subarray(OFF_CHECKSUM + CHECKSUM_LENGTH))
    .digest();
  if (!stored.equals(actual)) fail('checksum mismatch: the file is corrupted');

  const bitmapBytes = buf.subarray(header.headerLength, header.headerLength + header.bitmapLength);
  if (hasBitsPastLength(bitmapBytes, header.blockCount)) fail(`bits are set past the last block (${header.blockCount - 1})`);
  const bitmap = Bitmap.fromBytes(bitmapBytes, header.blockCount);

  let history: BlockHistory | undefined;
  if (header.flags & MAP_FLAG_HISTORY) {
    const blocks = new Uint32Array(header.historyCount);
    const seen = new Uint16Array(header.historyCount);
    let pos = header.headerLength + header.bitmapLength;
    for (let e = 0; e < header.historyCount; e++) {
      const block = readSafeU64(buf, pos);
      if (block < 0 || block >= header.blockCount) {
        fail(`history entry ${e} names block ${block < 0 ? buf.readBigUInt64LE(pos) : block}, past the last block (${header.blockCount - 1})`);
      }
      blocks[e] = block;
      seen[e] = buf.readUInt16LE(pos + 8);
      pos += HISTORY_ENTRY_LENGTH;
    }
    history = {
      window: header.historyWindow,
      minSeen: header.historyMinSeen,
      recorded: header.historyRecorded,
      blocks,
      seen,
    };
  }
  const fields: BootMapFields = {
    blockSize: header.blockSize,
    virtualSize: header.virtualSize,
    identity: header.identity,
    boots: header.boots,
    bitmap,
    history,
    heldSet: (header.flags & MAP_FLAG_HELD_SET) !== 0,
  };
  const problem = checkMapFields(fields);
  if (problem) fail(problem);
  return new BootMap(fields);
}

/** Reads and checks a .bcmap file; sizes are checked against the file size before any large read. */
export async function loadMap(path: string): Promise<BootMap> {
  const file = await FileByteSource.open(path);
  try {
    const head = await file.read(0, Math.min(file.size, MAP_HEADER_LENGTH));
    decodeMapHeader(head, file.size, path);
    if (file.size > bufferConstants.MAX_LENGTH) {
      throw new InvalidMapError(`file is too large to load (${file.size} bytes)`, { file: path });
    }
    return parseMap(await file.read(0, file.size), path);
  } finally {
    await file.close().catch(() => undefined);
  }
}

/** Writes a map atomically (temp file, fsync, rename). */
export async function saveMap(path: string, map: BootMap): Promise<void> {
  await writeFileAtomic(path, serializeMap(map));
}

/**
 * Folds one boot into the previous map with the "seen in at least M of the
 * last K boots" policy (docs/formats.md, "Merging boots"):
 * - each block's mask shifts left by one and gains bit 0 if this boot read it,
 *   keeping K bits; blocks whose mask becomes 0 leave the history;
 * - with R = min(recorded boots, K), a block is in the map when its mask has
 *   at least min(M, R) bits set (so the first boot alone gives a full map);
 * - a map without history counts as one recorded boot (its bitmap).
 * So a block read once stays out once R >= M > 1, and a block no longer read
 * leaves the map within K - M + 1 boots and the history after K boots.
 */
export function mergeBoots(previous: BootMap | undefined, boot: BootRecord, policy: MergePolicy): BootMap {
  const { minSeen, window } = policy;
  if (!Number.isInteger(window) || window < 1 || window > MAX_HISTORY_WINDOW) {
    throw new UsageError(`merge window ${window} is out of range (1..${MAX_HISTORY_WINDOW} boots)`);
  }
  if (!Number.isInteger(minSeen) || minSeen < 1 || minSeen > window) {
    throw new UsageError(`merge min-seen ${minSeen} is out of range (1..${window}, the window)`);
  }
  const blockCount = blockCountFor(boot.virtualSize, boot.blockSize);
  if (boot.bitmap.length !== blockCount) {
    throw new RangeError(`boot bitmap has ${boot.bitmap.length} bits, expected ${blockCount}`);
  }
  if (previous) {
    if (previous.identity !== boot.identity) {
      throw new MismatchError(
        `previous map is for image ${shortHex(previous.identity)}, this boot is for ${shortHex(boot.identity)}`,
      );
    }
    if (previous.blockSize !== boot.blockSize || previous.virtualSize !== boot.virtualSize) {
      throw new MismatchError(
        `previous map has block size ${previous.blockSize} and virtual size ${previous.virtualSize}, ` +
          `this boot ${boot.blockSize} and ${boot.virtualSize}`,
      );
    }
  }

  // Previous masks, as sorted (block, mask) lists.
  let prevBlocks: Uint32Array;
  let prevSeen: Uint16Array;
  let prevRecorded: number;
  if (previous?.history) {
    prevBlocks = previous.history.blocks;
    prevSeen = previous.history.seen;
    prevRecorded = previous.history.recorded;
  } else if (previous && previous.boots > 0) {
    prevBlocks = new Uint32Array(previous.blocksSet);
    let e = 0;
    for (const run of previous.bitmap.runs()) for (let b = run.start; b < run.start + run.length; b++) prevBlocks[e++] = b;
    prevSeen = new Uint16Array(prevBlocks.length).fill(1);
    prevRecorded = 1;
  } else {
    prevBlocks = new Uint32Array(0);
    prevSeen = new Uint16Array(0);
    prevRecorded = 0;
  }

  const recorded = Math.min(prevRecorded + 1, window);
  const threshold = Math.min(minSeen, recorded);
  const keep = (1 << window) - 1;
  const capacity = prevBlocks.length + boot.bitmap.popcount();
  const outBlocks = new Uint32Array(capacity);
  const outSeen = new Uint16Array(capacity);
  const bitmap = new Bitmap(blockCount);
  let n = 0;
  const emit = (block: number, mask: number): void => {
    if (mask === 0) return;
    outBlocks[n] = block;
    outSeen[n] = mask;
    n++;
    if (popcount32(mask) >= threshold) bitmap.set(block);
  };
  let p = 0;
  let next = boot.bitmap.nextSetBit(0);
  while (p < prevBlocks.length || next >= 0) {
    const prevBlock = p < prevBlocks.length ? prevBlocks[p] : Infinity;
    if (next >= 0 && next < prevBlock) {
      emit(next, 1);
      next = boot.bitmap.nextSetBit(next + 1);
    } else if (next === prevBlock) {
      emit(next, ((prevSeen[p] << 1) | 1) & keep);
      p++;
      next = boot.bitmap.nextSetBit(next + 1);
    } else {
      emit(prevBlock, (prevSeen[p] << 1) & keep);
      p++;
    }
  }
  return new BootMap({
    blockSize: boot.blockSize,
    virtualSize: boot.virtualSize,
    identity: boot.identity,
    boots: Math.min((previous?.boots ?? 0) + 1, 0xffff_ffff),
    bitmap,
    history: {
      window,
      minSeen,
      recorded,
      blocks: outBlocks.slice(0, n),
      seen: outSeen.slice(0, n),
    },
  });
}
