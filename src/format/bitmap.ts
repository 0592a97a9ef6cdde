/**
 * Block bitmaps and their rank/select index (docs/formats.md, "Bitmap" and
 * "Rank/select index").
 *
 * Bit i is block i, stored LSB-first: byte i >> 3, bit i & 7. The bits live in
 * a word-aligned buffer so scans can look at 32 bits at a time; on a
 * little-endian host, 32-bit word w holds bits 32w..32w+31 in the same order.
 *
 * Bit indices are at most MAX_BITMAP_BITS - 1 < 2^32, so `>>> 5` and `>>> 3`
 * are exact; multiplications (w * 32) are used instead of `<<` to stay
 * clear of the signed 32-bit range.
 */
import { endianness } from 'node:os';

if (endianness() !== 'LE') {
  // The word view below assumes that byte 4w+k is bits 8k..8k+7 of word w.
  throw new Error('bootcache bitmaps need a little-endian host');
}

/** Largest bitmap length: bit indices and counts must fit in a u32. */
export const MAX_BITMAP_BITS = 0xffff_ffff;

/** Bits per superblock of the rank/select index (16 words). */
export const SUPERBLOCK_BITS = 512;
const WORDS_PER_SUPERBLOCK = SUPERBLOCK_BITS / 32;

/** Number of set bits in a 32-bit word (SWAR popcount). */
export function popcount32(x: number): number {
  x = x - ((x >>> 1) & 0x55555555);
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  x = (x + (x >>> 4)) & 0x0f0f0f0f;
  return Math.imul(x, 0x01010101) >>> 24;
}

/** Index of the lowest set bit of a non-zero 32-bit word. */
function lowestBit(x: number): number {
  return 31 - Math.clz32(x & -x);
}

/** A maximal run of set bits [start, start + length). */
export interface BitRun {
  start: number;
  length: number;
}

export class Bitmap {
  /** Number of bits (blocks). */
  readonly length: number;
  /** The bits as 32-bit words; bits past `length` are always zero. */
  readonly words: Uint32Array;
  /** The bits as bytes, exactly ceil(length / 8) of them (a view, not a copy). */
  readonly bytes: Buffer;
  private generationCounter = 0;

  constructor(length: number) {
    if (!Number.isSafeInteger(length) || length < 0 || length > MAX_BITMAP_BITS) {
      throw new RangeError(`bitmap length ${length} is out of range (0..${MAX_BITMAP_BITS})`);
    }
    this.length = length;
    this.words = new Uint32Array(Math.ceil(length / 32));
    this.bytes = Buffer.from(this.words.buffer, 0, Math.ceil(length / 8));
  }

  /** Copies `bytes` (LSB-first) into a new bitmap. Bits past `length` must be clear. */
  static fromBytes(bytes: Uint8Array, length: number): Bitmap {
    const bitmap = new Bitmap(length);
    if (bytes.length !== bitmap.bytes.length) {
      throw new RangeError(`a bitmap of ${length} bits takes ${bitmap.bytes.length} bytes, got ${bytes.length}`);
    }
    if (hasBitsPastLength(bytes, length)) throw new RangeError(`bits are set past bit ${length}`);
    bitmap.bytes.set(bytes);
    return bitmap;
  }

  /** Bitmap with the given bit indices set. */
  static fromIndices(length: number, indices: Iterable<number>): Bitmap {
    const bitmap = new Bitmap(length);
    for (const i of indices) bitmap.set(i);
    return bitmap;
  }

  /** Changes on every mutation; indexes use it to detect that they are stale. */
  get generation(): number {
    return this.generationCounter;
  }

  get(i: number): boolean {
    this.checkIndex(i);
    return ((this.words[i >>> 5] >>> (i & 31)) & 1) === 1;
  }

  set(i: number): void {
    this.checkIndex(i);
    this.words[i >>> 5] |= 1 << (i & 31);
    this.generationCounter++;
  }

  clear(i: number): void {
    this.checkIndex(i);
    this.words[i >>> 5] &= ~(1 << (i & 31));
    this.generationCounter++;
  }

  /** Sets bits [start, end). */
  setRange(start: number, end: number): void {
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end > this.length || start > end) {
      throw new RangeError(`bit range [${start}, ${end}) is outside the bitmap (${this.length} bits)`);
    }
    if (start === end) return;
    const first = start >>> 5;
    const last = (end - 1) >>> 5;
    const headMask = -1 << (start & 31);
    const tailMask = -1 >>> (31 - ((end - 1) & 31));
    if (first === last) {
      this.words[first] |= headMask & tailMask;
    } else {
      this.words[first] |= headMask;
      this.words.fill(0xffffffff, first + 1, last);
      this.words[last] |= tailMask;
    }
    this.generationCounter++;
  }

  /** Sets every bit that is set in `other` (same length). */
  orWith(other: Bitmap): void {
    this.checkSameLength(other);
    for (let w = 0; w < this.words.length; w++) this.words[w] |= other.words[w];
    this.generationCounter++;
  }

  popcount(): number {
    let n = 0;
    const words = this.words;
    for (let w = 0; w < words.length; w++) {
      const x = words[w];
      if (x !== 0) n += popcount32(x);
    }
    return n;
  }

  /** Number of maximal runs of set bits. */
  countRuns(): number {
    let runs = 0;
    let carry = 0; // bit 31 of the previous word: a run continuing into this word
    const words = this.words;
    for (let w = 0; w < words.length; w++) {
      const x = words[w];
      if (x !== 0) {
        // A run starts at bit b when b is set and the bit before it is clear.
        const starts = x & ~((x << 1) | carry);
        if (starts !== 0) runs += popcount32(starts);
      }
      carry = x >>> 31;
    }
    return runs;
  }

  /** Index of the first set bit at or after `from`, or -1. */
  nextSetBit(from: number): number {
    if (from >= this.length) return -1;
    if (from < 0) from = 0;
    const words = this.words;
    let w = from >>> 5;
    let x = words[w] & (-1 << (from & 31));
    while (x === 0) {
      if (++w >= words.length) return -1;
      x = words[w];
    }
    return w * 32 + lowestBit(x);
  }

  /** Index of the first clear bit at or after `from`, or `length` if none. */
  nextClearBit(from: number): number {
    if (from >= this.length) return this.length;
    if (from < 0) from = 0;
    const words = this.words;
    let w = from >>> 5;
    let x = ~words[w] & (-1 << (from & 31));
    while (x === 0) {
      if (++w >= words.length) return this.length;
      x = ~words[w];
    }
    return Math.min(this.length, w * 32 + lowestBit(x));
  }

  /** Maximal runs of set bits in ascending order, starting at or after `from`. */
  *runs(from = 0): Generator<BitRun> {
    let start = this.nextSetBit(from);
    while (start >= 0) {
      const end = this.nextClearBit(start);
      yield { start, length: end - start };
      start = this.nextSetBit(end);
    }
  }

  /** Set bit indices in ascending order. */
  *indices(): Generator<number> {
    for (const run of this.runs()) {
      for (let i = run.start; i < run.start + run.length; i++) yield i;
    }
  }

  equals(other: Bitmap): boolean {
    if (other.length !== this.length) return false;
    for (let w = 0; w < this.words.length; w++) if (this.words[w] !== other.words[w]) return false;
    return true;
  }

  clone(): Bitmap {
    const copy = new Bitmap(this.length);
    copy.words.set(this.words);
    return copy;
  }

  private checkIndex(i: number): void {
    if (!Number.isInteger(i) || i < 0 || i >= this.length) {
      throw new RangeError(`bit ${i} is outside the bitmap (${this.length} bits)`);
    }
  }

  private checkSameLength(other: Bitmap): void {
    if (other.length !== this.length) {
      throw new RangeError(`bitmap lengths differ (${this.length} and ${other.length} bits)`);
    }
  }
}

/** True when `bytes` has a set bit at an index >= `length` (in its last byte or beyond). */
export function hasBitsPastLength(bytes: Uint8Array, length: number): boolean {
  const fullBytes = length >>> 3;
  const tailBits = length & 7;
  for (let b = fullBytes + (tailBits === 0 ? 0 : 1); b < bytes.length; b++) if (bytes[b] !== 0) return true;
  if (tailBits !== 0 && fullBytes < bytes.length && (bytes[fullBytes] & (0xff << tailBits) & 0xff) !== 0) return true;
  return false;
}

/**
 * Rank/select over a snapshot of a bitmap. `cumulative[s]` is the number of
 * set bits before superblock s (SUPERBLOCK_BITS bits each), so rank is one
 * lookup plus at most 15 word popcounts, and select is a binary search over
 * the superblocks plus a scan of at most 16 words.
 */
export class RankSelectIndex {
  /** Total number of set bits. */
  readonly total: number;
  private readonly cumulative: Uint32Array;
  private readonly generation: number;

  constructor(readonly bitmap: Bitmap) {
    const words = bitmap.words;
    const superblocks = Math.ceil(words.length / WORDS_PER_SUPERBLOCK);
    const cumulative = new Uint32Array(superblocks + 1);
    let count = 0;
    for (let s = 0; s < superblocks; s++) {
      cumulative[s] = count;
      const end = Math.min(words.length, (s + 1) * WORDS_PER_SUPERBLOCK);
      for (let w = s * WORDS_PER_SUPERBLOCK; w < end; w++) {
        const x = words[w];
        if (x !== 0) count += popcount32(x);
      }
    }
    cumulative[superblocks] = count;
    this.cumulative = cumulative;
    this.total = count;
    this.generation = bitmap.generation;
  }

  /** Number of set bits before bit i (0 <= i <= length). */
  rank(i: number): number {
    this.checkFresh();
    const bitmap = this.bitmap;
    if (!Number.isInteger(i) || i < 0 || i > bitmap.length) {
      throw new RangeError(`rank(${i}) is outside the bitmap (${bitmap.length} bits)`);
    }
    if (i === bitmap.length) return this.total;
    const words = bitmap.words;
    const wordIndex = i >>> 5;
    const superblock = Math.floor(wordIndex / WORDS_PER_SUPERBLOCK);
    let count = this.cumulative[superblock];
    for (let w = superblock * WORDS_PER_SUPERBLOCK; w < wordIndex; w++) count += popcount32(words[w]);
    const bit = i & 31;
    if (bit !== 0) count += popcount32(words[wordIndex] & (0xffffffff >>> (32 - bit)));
    return count;
  }

  /** Index of the set bit with rank r (0-based: select(0) is the first set bit). */
  select(r: number): number {
    this.checkFresh();
    if (!Number.isInteger(r) || r < 0 || r >= this.total) {
      throw new RangeError(`select(${r}) is out of range: the bitmap has ${this.total} set bits`);
    }
    // Last superblock whose cumulative count is <= r.
    const cumulative = this.cumulative;
    let lo = 0;
    let hi = cumulative.length - 2;
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if (cumulative[mid] <= r) lo = mid;
      else hi = mid - 1;
    }
    let remaining = r - cumulative[lo];
    const words = this.bitmap.words;
    for (let w = lo * WORDS_PER_SUPERBLOCK; w < words.length; w++) {
      let x = words[w];
      const n = popcount32(x);
      if (remaining < n) {
        for (; remaining > 0; remaining--) x &= x - 1; // drop the lowest set bit
        return w * 32 + lowestBit(x);
      }
      remaining -= n;
    }
    throw new Error('rank/select index is inconsistent with its bitmap');
  }

  private checkFresh(): void {
    if (this.bitmap.generation !== this.generation) {
      throw new Error('rank/select index is stale: the bitmap changed after the index was built');
    }
  }
}
