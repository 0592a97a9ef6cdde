import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FileNotFoundError, InvalidSegmentError } from '../../src/errors.js';
import {
  BLOCK_CHECKSUM_CRC32,
  BLOCK_CHECKSUM_LENGTH,
  BLOCK_CHECKSUM_SHA256_128,
  SEGMENT_DATA_ALIGNMENT,
  SEGMENT_HEADER_LENGTH,
  SegmentReader,
  blockChecksum,
  bufferSource,
  segmentLayout,
  serializeSegment,
} from '../../src/format/segment.js';

const ID = 'd'.repeat(64);
const DIGEST = 'e'.repeat(64);

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bootcache-seg-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const segmentArb = fc
  .record({
    algorithm: fc.constantFrom(BLOCK_CHECKSUM_CRC32, BLOCK_CHECKSUM_SHA256_128),
    blockSize: fc.integer({ min: 9, max: 14 }).map((s) => 2 ** s),
    blocks: fc.integer({ min: 0, max: 300 }),
    extraBlocks: fc.nat(1000),
    seed: fc.nat(),
  })
  .map(({ algorithm, blockSize, blocks, extraBlocks, seed }) => {
    const data = Buffer.alloc(blocks * blockSize);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ seed) >>> 0, i);
    return { algorithm, blockSize, data, virtualSize: (blocks + extraBlocks) * blockSize };
  });

function sampleSegment(blocks = 5, blockSize = 4096): { file: Buffer; data: Buffer } {
  const data = randomBytes(blocks * blockSize);
  return { data, file: serializeSegment({ blockSize, virtualSize: 1000 * blockSize, identity: ID, mapDigest: DIGEST }, data) };
}

/** Recomputes the header checksum after a deliberate edit. */
function resealHeader(file: Buffer): Buffer {
  file.fill(0, 192, 224);
  createHash('sha256').update(file.subarray(0, SEGMENT_HEADER_LENGTH)).digest().copy(file, 192);
  return file;
}

const open = (file: Buffer) => SegmentReader.fromSource(bufferSource(file, 's.bcseg'));

describe('segment format', () => {
  it('round-trips through serializeSegment/SegmentReader (property)', async () => {
    await fc.assert(
      fc.asyncProperty(segmentArb, async ({ algorithm, blockSize, data, virtualSize }) => {
        const file = serializeSegment({ blockSize, virtualSize, identity: ID, mapDigest: DIGEST, checksumAlgorithm: algorithm }, data);
        const blocks = data.length / blockSize;
        const layout = segmentLayout(blocks, blockSize, algorithm === BLOCK_CHECKSUM_CRC32 ? 4 : 16);
        expect(file.length).toBe(layout.fileSize);
        expect(layout.dataOffset % SEGMENT_DATA_ALIGNMENT).toBe(0);
        const reader = await open(file);
        expect(reader.blockCount).toBe(blocks);
        expect(reader.blockSize).toBe(blockSize);
        expect(reader.virtualSize).toBe(virtualSize);
        expect(reader.identity).toBe(ID);
        expect(reader.mapDigest).toBe(DIGEST);
        expect(reader.dataSha256).toBe(createHash('sha256').update(data).digest('hex'));
        expect(reader.checksumAlgorithm).toBe(algorithm);
        for (let r = 0; r < blocks; r++) {
          const block = data.subarray(r * blockSize, (r + 1) * blockSize);
          expect(reader.blockOffset(r)).toBe(layout.dataOffset + r * blockSize);
          expect(file.subarray(reader.blockOffset(r), reader.blockOffset(r) + blockSize).equals(block)).toBe(true);
          expect(reader.blockChecksum(r).equals(blockChecksum(block, algorithm))).toBe(true);
          expect(reader.storedCrc32(r)).toBe(algorithm === BLOCK_CHECKSUM_CRC32 ? crc32(block) : undefined);
          expect(reader.verifyBlock(r, block)).toBe(true);
        }
        if (blocks > 0) {
          expect((await reader.readBlocks(0, blocks)).equals(data)).toBe(true);
          const other = Buffer.from(data.subarray(0, blockSize));
          other[0] ^= 1;
          expect(reader.verifyBlock(0, other)).toBe(false);
        }
      }),
      { numRuns: 100 },
    );
  });

  it('lays out the header as documented', async () => {
    const { file, data } = sampleSegment(3);
    expect(file.subarray(0, 8).toString('latin1')).toBe('BCSEG\0\r\n');
    expect(file.readUInt32LE(8)).toBe(1);
    expect(file.readUInt32LE(12)).toBe(224);
    expect(file.readUInt32LE(16)).toBe(4096);
    expect(file.readBigUInt64LE(24)).toBe(3n);
    expect(file.readBigUInt64LE(32)).toBe(4096000n);
    expect(file.subarray(40, 72).toString('hex')).toBe(ID);
    expect(file.subarray(72, 104).toString('hex')).toBe(DIGEST);
    expect(file.subarray(104, 136).toString('hex')).toBe(createHash('sha256').update(data).digest('hex'));
    expect(file.subarray(136, 168).toString('hex')).toBe(createHash('sha256').update(file.subarray(224, 4096)).digest('hex'));
    expect(file.readBigUInt64LE(168)).toBe(224n);
    expect(file.readBigUInt64LE(176)).toBe(4096n);
    expect(file.readUInt32LE(184)).toBe(4);
    expect(file.readUInt32LE(188)).toBe(2);
    // Table entry 1 = CRC-32 of block 1, little-endian; the rest of the page is zero.
    expect(file.readUInt32LE(224 + 4)).toBe(crc32(data.subarray(4096, 8192)));
    expect(file.subarray(224 + 12, 4096).every((b) => b === 0)).toBe(true);
    expect(file.subarray(4096).equals(data)).toBe(true);
  });

  it('still reads segments with SHA-256 block checksums (algorithm 1, written before CRC-32)', async () => {
    const data = randomBytes(3 * 4096);
    const file = serializeSegment({ blockSize: 4096, virtualSize: 4096000, identity: ID, mapDigest: DIGEST, checksumAlgorithm: BLOCK_CHECKSUM_SHA256_128 }, data);
    expect(file.readUInt32LE(184)).toBe(16);
    expect(file.readUInt32LE(188)).toBe(1);
    // Table entry 1 = first 16 bytes of SHA-256(block 1).
    expect(file.subarray(224 + 16, 224 + 32).toString('hex')).toBe(
      createHash('sha256').update(data.subarray(4096, 8192)).digest('hex').slice(0, 32),
    );
    const reader = await open(file);
    expect(reader.checksumAlgorithm).toBe(BLOCK_CHECKSUM_SHA256_128);
    expect(reader.storedCrc32(1)).toBeUndefined();
    expect(reader.verifyBlock(1, data.subarray(4096, 8192))).toBe(true);
    const other = Buffer.from(data.subarray(4096, 8192));
    other[100] ^= 4;
    expect(reader.verifyBlock(1, other)).toBe(false);
  });

  it('puts data after a table that spans more than one page', async () => {
    const blocks = 1000; // 224 + 1000 * 4 = 4224 bytes of header + table
    const layout = segmentLayout(blocks, 512);
    expect(layout.dataOffset).toBe(8192);
    expect((await open(sampleSegment(blocks, 512).file)).blockOffset(999)).toBe(8192 + 999 * 512);
  });

  it('rejects ranks out of range', async () => {
    const reader = await open(sampleSegment(2).file);
    expect(() => reader.blockOffset(2)).toThrow(RangeError);
    expect(() => reader.blockChecksum(-1)).toThrow(RangeError);
    await expect(reader.readBlocks(1, 2)).rejects.toThrow(RangeError);
    expect(reader.verifyBlock(0, Buffer.alloc(10))).toBe(false);
  });
});

describe('SegmentReader rejects damaged segments', () => {
  const cases: Array<[string, (f: Buffer) => Buffer, RegExp]> = [
    ['wrong magic', (f) => (f.write('BCMAP', 0, 'latin1'), f), /bad magic/],
    ['wrong version', (f) => (f.writeUInt32LE(9, 8), f), /unsupported segment version 9/],
    ['flipped header byte', (f) => ((f[50] ^= 0x80), f), /header checksum mismatch/],
    ['flipped data digest byte', (f) => ((f[110] ^= 0x01), f), /header checksum mismatch/],
    ['flipped table byte', (f) => ((f[SEGMENT_HEADER_LENGTH + 3] ^= 0x01), f), /table is corrupted/],
    ['non-zero table padding', (f) => ((f[4000] = 1), f), /table is corrupted/],
    ['truncated data', (f) => f.subarray(0, f.length - 1), /truncated/],
    ['truncated header', (f) => f.subarray(0, 100), /truncated header/],
    ['only the magic', (f) => f.subarray(0, 8), /truncated header/],
    ['empty', () => Buffer.alloc(0), /bad magic/],
    ['appended bytes', (f) => Buffer.concat([f, Buffer.alloc(4096)]), /describes/],
    ['bad header length', (f) => (f.writeUInt32LE(225, 12), f), /header length 225/],
    ['bad block size', (f) => resealHeader((f.writeUInt32LE(4095, 16), f)), /block size 4095/],
    ['unknown flags', (f) => resealHeader((f.writeUInt32LE(2, 20), f)), /unknown flags/],
    ['block count beyond the image', (f) => resealHeader((f.writeBigUInt64LE(1001n, 24), f)), /more than the image has/],
    ['absurd block count', (f) => resealHeader((f.writeBigUInt64LE(2n ** 60n, 24), f)), /more than the image has/],
    ['moved data offset', (f) => resealHeader((f.writeBigUInt64LE(8192n, 176), f)), /do not match the layout/],
    ['unknown checksum algorithm', (f) => resealHeader((f.writeUInt32LE(3, 188), f)), /unsupported block checksum \(algorithm 3, 4 bytes\)/],
    ['checksum length not the algorithm\'s', (f) => resealHeader((f.writeUInt32LE(16, 184), f)), /unsupported block checksum \(algorithm 2, 16 bytes\)/],
    ['more blocks than the file holds', (f) => resealHeader((f.writeBigUInt64LE(50n, 24), f)), /truncated/],
  ];
  for (const [name, damage, message] of cases) {
    it(name, async () => {
      const err = await open(damage(sampleSegment().file)).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(InvalidSegmentError);
      expect((err as Error).message).toMatch(message);
      expect((err as Error).message.startsWith('s.bcseg: ')).toBe(true);
    });
  }

  it('does not read or allocate past what the file size allows', async () => {
    const { file } = sampleSegment();
    // 2^31 blocks with a consistent layout (4-byte table entries): only the file size gives it away.
    file.writeBigUInt64LE(2n ** 50n, 32);
    file.writeBigUInt64LE(2n ** 31n, 24);
    file.writeBigUInt64LE(2n ** 33n + 4096n, 176);
    resealHeader(file);
    const reads: Array<[number, number]> = [];
    const source = bufferSource(file, 's.bcseg');
    const spy = { ...source, read: (o: number, l: number) => (reads.push([o, l]), source.read(o, l)) };
    await expect(SegmentReader.fromSource(spy)).rejects.toThrow(/truncated/);
    // One read of the file's head (at most 1 MiB); never the 8 GiB table the header claims.
    expect(reads).toEqual([[0, file.length]]);
  });

  it('opens a segment with one read when header and table fit in the first MiB', async () => {
    const { file } = sampleSegment(5);
    const source = bufferSource(file, 's.bcseg');
    const reads: Array<[number, number]> = [];
    const spy = { ...source, read: (o: number, l: number) => (reads.push([o, l]), source.read(o, l)) };
    const reader = await SegmentReader.fromSource(spy);
    expect(reader.blockCount).toBe(5);
    expect(reads).toEqual([[0, file.length]]);
  });

  it('opens files by path, and reports missing ones', async () => {
    const { file, data } = sampleSegment(4);
    const path = join(dir, 'a.bcseg');
    await writeFile(path, file);
    const reader = await SegmentReader.open(path);
    expect((await reader.readBlocks(3)).equals(data.subarray(3 * 4096))).toBe(true);
    expect(reader.blockChecksum(3).length).toBe(BLOCK_CHECKSUM_LENGTH);
    await reader.close();
    await expect(SegmentReader.open(join(dir, 'none.bcseg'))).rejects.toThrow(FileNotFoundError);
    file[5000] ^= 1; // data is not checked on open (verify does that) ...
    await writeFile(path, file);
    const opened = await SegmentReader.open(path);
    // ... but the block no longer matches its checksum.
    expect(opened.verifyBlock(0, await opened.readBlocks(0))).toBe(false);
    await opened.close();
  });
});
