import { createHash } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { InvalidIndexError, MismatchError } from '../../src/errors.js';
import { Bitmap } from '../../src/format/bitmap.js';
import {
  INDEX_FIXED_HEADER_LENGTH,
  INDEX_MAGIC,
  ImageIndex,
  checkPreviousKey,
  indexLayout,
  resolvePreviousKey,
  serializeImageIndex,
  type IndexSource,
} from '../../src/format/image-index.js';
import { bufferSource } from '../../src/format/segment.js';

const ID = 'a'.repeat(64);
const sha = (b: Uint8Array): Buffer => createHash('sha256').update(b).digest();

/** An index of `blockCount` blocks with data in `blocks`, each block's digest the SHA-256 of its number. */
function makeIndex(blockCount: number, blocks: number[], options: { blockSize?: number; previous?: string; virtualSize?: number } = {}) {
  const blockSize = options.blockSize ?? 4096;
  const bitmap = Bitmap.fromIndices(blockCount, blocks);
  const sorted = [...new Set(blocks)].sort((a, b) => a - b);
  const digests = Buffer.concat(sorted.map((b) => sha(Buffer.from(`block ${b}`))));
  const file = serializeImageIndex({
    blockSize,
    virtualSize: options.virtualSize ?? blockCount * blockSize,
    identity: ID,
    bitmap,
    digests,
    previous: options.previous ?? null,
  });
  return { file, sorted };
}

/** Recomputes the header checksum after a test edits a header field (so the field's own check is reached). */
function resign(file: Buffer): Buffer {
  const headerLength = file.readUInt32LE(12);
  file.fill(0, 176, 208);
  createHash('sha256').update(file.subarray(0, headerLength)).digest().copy(file, 176);
  return file;
}

async function openError(file: Buffer): Promise<InvalidIndexError> {
  const err = await ImageIndex.parse(file, 'x.bcidx').then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(InvalidIndexError);
  const e = err as InvalidIndexError;
  expect(e.message).not.toContain('\n');
  expect(e.message).toMatch(/^x\.bcidx: /);
  expect(e.code).toBe('BC_INVALID_INDEX');
  expect(e.exitCode).toBe(3);
  return e;
}

describe('image index format', () => {
  it('round-trips: header fields, bitmap, digestOf for data blocks, undefined for zero blocks', async () => {
    const { file, sorted } = makeIndex(1000, [0, 1, 2, 500, 999], { previous: '../v1/debian12.qcow2' });
    expect(file.subarray(0, 8)).toEqual(INDEX_MAGIC);
    const layout = indexLayout(1000, 5, Buffer.byteLength('../v1/debian12.qcow2'));
    expect(layout.headerLength).toBe(232); // 208 + 20, rounded up to 8
    expect(file.length).toBe(layout.fileSize);
    expect(file.length).toBe(232 + 125 + 5 * 32);
    const index = await ImageIndex.parse(file);
    expect(index.header).toMatchObject({ version: 1, blockSize: 4096, blockCount: 1000, dataBlocks: 5, identity: ID, previous: '../v1/debian12.qcow2' });
    for (const b of sorted) expect(index.digestOf(b)).toEqual(sha(Buffer.from(`block ${b}`)));
    for (const b of [3, 4, 499, 501, 998]) {
      expect(index.digestOf(b)).toBeUndefined();
      expect(index.hasData(b)).toBe(false);
      expect(index.dataRank(b)).toBe(-1);
    }
    expect(index.dataRank(500)).toBe(3);
    expect(index.blockAt(3)).toBe(500);
    expect(index.digestAt(4)).toEqual(index.digestOf(999));
    expect(() => index.digestOf(1000)).toThrow(RangeError);
  });

  it('property: any bitmap and block size round-trips, digestOf matches the table in block order', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 9, max: 16 }).map((s) => 2 ** s),
        fc.integer({ min: 0, max: 3000 }),
        fc.integer({ min: 0, max: 511 }),
        fc.array(fc.nat(), { maxLength: 200 }),
        async (blockSize, blocks, tail, picks) => {
          const virtualSize = Math.max(0, blocks * blockSize - (blocks > 0 ? tail % blockSize : 0));
          const blockCount = Math.ceil(virtualSize / blockSize);
          const set = blockCount === 0 ? [] : picks.map((p) => p % blockCount);
          const { file, sorted } = makeIndex(blockCount, set, { blockSize, virtualSize });
          const index = await ImageIndex.parse(file);
          expect(index.blockCount).toBe(blockCount);
          expect(index.dataBlocks).toBe(sorted.length);
          sorted.forEach((b, rank) => {
            expect(index.dataRank(b)).toBe(rank);
            expect(index.digestOf(b)).toEqual(sha(Buffer.from(`block ${b}`)));
          });
        },
      ),
      { numRuns: 60 },
    );
  });

  it('an image without data (all zeros) is a header and a bitmap', async () => {
    const { file } = makeIndex(64, []);
    expect(file.length).toBe(INDEX_FIXED_HEADER_LENGTH + 8);
    const index = await ImageIndex.parse(file);
    expect(index.dataBlocks).toBe(0);
    expect(index.digestOf(0)).toBeUndefined();
  });

  it('opens with one read when header, bitmap and table fit in the first MiB; lazily without the table', async () => {
    const { file } = makeIndex(4096, [1, 2, 3, 4000]);
    const reads: Array<[number, number]> = [];
    const counting = (inner: IndexSource): IndexSource => ({
      ...inner,
      read: (offset, length) => {
        reads.push([offset, length]);
        return inner.read(offset, length);
      },
    });
    await ImageIndex.open(counting(bufferSource(file)));
    expect(reads).toEqual([[0, file.length]]);

    const lazy = await ImageIndex.open(bufferSource(file), { loadTable: false });
    expect(lazy.tableLoaded).toBe(false);
    expect(lazy.hasData(4000)).toBe(true);
    expect(() => lazy.digestOf(4000)).toThrow(/not loaded/);
    await lazy.loadTable();
    expect(lazy.digestOf(4000)).toEqual(sha(Buffer.from('block 4000')));
  });

  it('a large table comes with one more read', async () => {
    // 40,000 data blocks: 1.28 MiB of digests, past the first MiB.
    const blocks = Array.from({ length: 40_000 }, (_, i) => i * 2);
    const { file } = makeIndex(80_000, blocks);
    const reads: number[] = [];
    const source = bufferSource(file);
    const index = await ImageIndex.open({ ...source, read: (o, l) => (reads.push(l), source.read(o, l)) });
    expect(reads).toEqual([1024 * 1024, 40_000 * 32]);
    expect(index.digestOf(79_998)).toEqual(sha(Buffer.from('block 79998')));
  });

  it('checks that it belongs to an image (identity and virtual size)', async () => {
    const index = await ImageIndex.parse(makeIndex(16, [1]).file);
    expect(index.matches({ identity: ID, virtualSize: 16 * 4096 })).toBe(true);
    expect(index.matches({ identity: 'b'.repeat(64), virtualSize: 16 * 4096 })).toBe(false);
    expect(index.matches({ identity: ID, virtualSize: 4096 })).toBe(false);
    expect(() => index.checkMatches({ identity: 'b'.repeat(64), virtualSize: 16 * 4096, name: 'disk.qcow2' })).toThrow(MismatchError);
    expect(() => index.checkMatches({ identity: 'b'.repeat(64), virtualSize: 16 * 4096, name: 'disk.qcow2' })).toThrow(/identity aaaaaaaaaaaaaaaa… but disk\.qcow2 has identity bbbb/);
  });

  describe('damage is a one-line InvalidIndexError naming the file', () => {
    const good = (): Buffer => Buffer.from(makeIndex(1000, [0, 5, 6, 700], { previous: 'v1/disk.qcow2' }).file);
    const cases: Array<[string, (f: Buffer) => Buffer, RegExp]> = [
      ['another file', () => Buffer.from('BCMAP\0\r\n' + 'x'.repeat(300)), /not a bootcache image index \(bad magic\)/],
      ['an empty file', () => Buffer.alloc(0), /bad magic/],
      ['a truncated header', (f) => f.subarray(0, 100), /truncated header: file is 100 bytes/],
      ['another version', (f) => (f.writeUInt32LE(2, 8), f), /unsupported index version 2/],
      ['a flipped header byte', (f) => (f[30] ^= 1, f), /header checksum mismatch/],
      ['a flipped previous-key byte', (f) => (f[210] ^= 1, f), /header checksum mismatch/],
      ['a bad header length', (f) => resign((f.writeUInt32LE(212, 12), f)), /header length 212 is invalid/],
      ['unknown flags', (f) => resign((f.writeUInt32LE(4, 20), f)), /unknown flags 0x4/],
      ['a block count that does not fit', (f) => resign((f.writeBigUInt64LE(999n, 32), f)), /block count 999 does not match/],
      ['more data blocks than the bitmap has', (f) => resign((f.writeBigUInt64LE(5n, 72), f)), /file is \d+ bytes but its header describes/],
      ['another digest algorithm', (f) => resign((f.writeUInt32LE(2, 100), f)), /unsupported block digest \(algorithm 2, 32 bytes\)/],
      ['reserved bytes', (f) => resign((f.writeUInt32LE(1, 108), f)), /reserved header bytes are not zero/],
      ['a bad previous key', (f) => resign((f.write('/', 208), f)), /previous-version key "\/1\/disk.qcow2" is absolute/],
      ['a flipped bitmap byte', (f) => (f[224 + 10] ^= 1, f), /bitmap does not match its SHA-256/],
      ['a flipped digest byte', (f) => (f[f.length - 1] ^= 1, f), /digest table does not match its SHA-256/],
      ['a truncated table', (f) => f.subarray(0, f.length - 1), /header describes \d+ .*: truncated$/],
      ['trailing bytes', (f) => Buffer.concat([f, Buffer.alloc(1)]), /header describes/],
    ];
    for (const [what, damage, message] of cases) {
      it(what, async () => {
        expect((await openError(damage(good()))).message).toMatch(message);
      });
    }

    it('a bitmap whose popcount is not the data block count (even with matching checksums)', async () => {
      const f = good();
      f[224] |= 0x02; // block 1: now 5 bits set, 4 digests
      createHash('sha256').update(f.subarray(224, 224 + 125)).digest().copy(f, 112);
      expect((await openError(resign(f))).message).toMatch(/bitmap has 5 blocks set, the header says 4 data blocks/);
    });

    it('allowDamagedTable opens a damaged table and says so', async () => {
      const f = good();
      f[f.length - 1] ^= 1;
      const index = await ImageIndex.parse(f, 'x.bcidx', { allowDamagedTable: true });
      expect(index.tableIntact).toBe(false);
      expect(index.digestOf(700)![31]).toBe(sha(Buffer.from('block 700'))[31]! ^ 1);
    });
  });
});

describe('previous-version keys', () => {
  it('accepts keys relative to the storage root or (./, ../) to the image directory', () => {
    for (const key of ['v1/debian12.qcow2', 'debian12.qcow2', './debian12-v1.qcow2', '../v1/debian12.qcow2', '../../a/b.raw', 'images/ünïcode.qcow2']) {
      expect(checkPreviousKey(key), key).toBeUndefined();
    }
  });

  it('refuses absolute, URL, directory, dot-segment, control-character and over-long keys', () => {
    for (const key of ['', '/srv/images/v1.qcow2', 's3://bucket/v1.qcow2', '..', '../', './', 'v1/', 'v1//x', 'v1/../x', 'a/./b', '../a/../b', 'a\nb', 'a\\b', 'x'.repeat(1025)]) {
      expect(checkPreviousKey(key), JSON.stringify(key)).toBeDefined();
    }
  });

  it('resolves against the image key', () => {
    expect(resolvePreviousKey('golden/v2/debian12.qcow2', 'golden/v1/debian12.qcow2')).toBe('golden/v1/debian12.qcow2');
    expect(resolvePreviousKey('golden/v2/debian12.qcow2', '../v1/debian12.qcow2')).toBe('golden/v1/debian12.qcow2');
    expect(resolvePreviousKey('golden/debian12-v2.qcow2', './debian12-v1.qcow2')).toBe('golden/debian12-v1.qcow2');
    expect(resolvePreviousKey('debian12-v2.qcow2', './debian12-v1.qcow2')).toBe('debian12-v1.qcow2');
    expect(() => resolvePreviousKey('v2/debian12.qcow2', '../../x.qcow2')).toThrow(/climbs above the storage root/);
  });
});
