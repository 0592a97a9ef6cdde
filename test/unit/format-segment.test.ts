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
  SEGMENT_V1_HEADER_LENGTH,
  SegmentReader,
  blockChecksum,
  blockDigest,
  bufferSource,
  segmentLayout,
  serializeSegment,
  type SegmentVersion,
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
    // Version 2 has CRC-32 checksums only.
    format: fc.constantFrom(
      { version: 2 as const, algorithm: BLOCK_CHECKSUM_CRC32 },
      { version: 1 as const, algorithm: BLOCK_CHECKSUM_CRC32 },
      { version: 1 as const, algorithm: BLOCK_CHECKSUM_SHA256_128 },
    ),
    blockSize: fc.integer({ min: 9, max: 14 }).map((s) => 2 ** s),
    blocks: fc.integer({ min: 0, max: 300 }),
    extraBlocks: fc.nat(1000),
    seed: fc.nat(),
  })
  .map(({ format, blockSize, blocks, extraBlocks, seed }) => {
    const data = Buffer.alloc(blocks * blockSize);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ seed) >>> 0, i);
    return { ...format, blockSize, data, virtualSize: (blocks + extraBlocks) * blockSize };
  });

function sampleSegment(blocks = 5, blockSize = 4096, version?: SegmentVersion): { file: Buffer; data: Buffer } {
  const data = randomBytes(blocks * blockSize);
  return {
    data,
    file: serializeSegment({ blockSize, virtualSize: 1000 * blockSize, identity: ID, mapDigest: DIGEST, ...(version ? { version } : {}) }, data),
  };
}

/** Recomputes the header checksum (over the header length the file states) after a deliberate edit. */
function resealHeader(file: Buffer): Buffer {
  file.fill(0, 192, 224);
  createHash('sha256').update(file.subarray(0, file.readUInt32LE(12))).digest().copy(file, 192);
  return file;
}

const open = (file: Buffer) => SegmentReader.fromSource(bufferSource(file, 's.bcseg'));
const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

/** The fields both versions share, [0, 136), of a sampleSegment(3) file. */
function expectHeaderStart(file: Buffer, data: Buffer, version: number, headerLength: number): void {
  expect(file.subarray(0, 8).toString('latin1')).toBe('BCSEG\0\r\n');
  expect(file.readUInt32LE(8)).toBe(version);
  expect(file.readUInt32LE(12)).toBe(headerLength);
  expect(file.readUInt32LE(16)).toBe(4096);
  expect(file.readUInt32LE(20)).toBe(0);
  expect(file.readBigUInt64LE(24)).toBe(3n);
  expect(file.readBigUInt64LE(32)).toBe(4096000n);
  expect(file.subarray(40, 72).toString('hex')).toBe(ID);
  expect(file.subarray(72, 104).toString('hex')).toBe(DIGEST);
  expect(file.subarray(104, 136).toString('hex')).toBe(sha256(data));
}

/**
 * The same segment with a header 64 bytes longer (`fill` in the extra bytes):
 * every offset after the header moves by 64 and the header is resealed.
 */
function longerHeader(file: Buffer, fill: number): Buffer {
  const headerLength = file.readUInt32LE(12);
  const version = file.readUInt32LE(8);
  const blocks = Number(file.readBigUInt64LE(24));
  const blockSize = file.readUInt32LE(16);
  const oldTable = Number(file.readBigUInt64LE(168));
  const oldData = Number(file.readBigUInt64LE(176));
  const layout = segmentLayout(blocks, blockSize, { version: version === 1 ? 1 : 2, headerLength: headerLength + 64 });
  const out = Buffer.alloc(layout.fileSize);
  file.copy(out, 0, 0, headerLength);
  out.fill(fill, headerLength, headerLength + 64);
  file.copy(out, layout.digestOffset, headerLength, oldTable + blocks * file.readUInt32LE(184));
  file.copy(out, layout.dataOffset, oldData);
  out.writeUInt32LE(headerLength + 64, 12);
  out.writeBigUInt64LE(BigInt(layout.tableOffset), 168);
  out.writeBigUInt64LE(BigInt(layout.dataOffset), 176);
  if (version === 2) out.writeBigUInt64LE(BigInt(layout.digestOffset), 224);
  createHash('sha256').update(out.subarray(layout.tableOffset, layout.dataOffset)).digest().copy(out, 136);
  return resealHeader(out);
}

describe('segment format', () => {
  it('round-trips through serializeSegment/SegmentReader (property)', async () => {
    await fc.assert(
      fc.asyncProperty(segmentArb, async ({ version, algorithm, blockSize, data, virtualSize }) => {
        const file = serializeSegment({ blockSize, virtualSize, identity: ID, mapDigest: DIGEST, checksumAlgorithm: algorithm, version }, data);
        const blocks = data.length / blockSize;
        const layout = segmentLayout(blocks, blockSize, { version, checksumAlgorithm: algorithm });
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
        expect(reader.header.version).toBe(version);
        expect(reader.hasDigests).toBe(version === 2);
        expect(reader.digestTableIntact).toBe(true);
        for (let r = 0; r < blocks; r++) {
          const block = data.subarray(r * blockSize, (r + 1) * blockSize);
          expect(reader.blockOffset(r)).toBe(layout.dataOffset + r * blockSize);
          expect(file.subarray(reader.blockOffset(r), reader.blockOffset(r) + blockSize).equals(block)).toBe(true);
          expect(reader.blockChecksum(r).equals(blockChecksum(block, algorithm))).toBe(true);
          expect(reader.storedCrc32(r)).toBe(algorithm === BLOCK_CHECKSUM_CRC32 ? crc32(block) : undefined);
          expect(reader.verifyBlock(r, block)).toBe(true);
          if (version === 2) expect(reader.blockDigest(r).equals(createHash('sha256').update(block).digest())).toBe(true);
          else expect(() => reader.blockDigest(r)).toThrow(/no block digests/);
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

  it('lays out a version 2 header and its tables as documented', async () => {
    const { file, data } = sampleSegment(3);
    expectHeaderStart(file, data, 2, 272);
    // Digest table at 272 (3 × 32 bytes), checksum table right after it at 368 (3 × 4), padding to 4096.
    expect(file.subarray(136, 168).toString('hex')).toBe(sha256(file.subarray(368, 4096)));
    expect(file.readBigUInt64LE(168)).toBe(368n);
    expect(file.readBigUInt64LE(176)).toBe(4096n);
    expect(file.readUInt32LE(184)).toBe(4);
    expect(file.readUInt32LE(188)).toBe(2);
    const header = Buffer.from(file.subarray(0, 272));
    header.fill(0, 192, 224);
    expect(file.subarray(192, 224).toString('hex')).toBe(sha256(header));
    expect(file.readBigUInt64LE(224)).toBe(272n);
    expect(file.readUInt32LE(232)).toBe(32);
    expect(file.readUInt32LE(236)).toBe(1);
    expect(file.subarray(240, 272).toString('hex')).toBe(sha256(file.subarray(272, 368)));
    for (let r = 0; r < 3; r++) {
      const block = data.subarray(r * 4096, (r + 1) * 4096);
      expect(file.subarray(272 + 32 * r, 272 + 32 * (r + 1)).toString('hex')).toBe(sha256(block));
      expect(blockDigest(block).toString('hex')).toBe(sha256(block));
      expect(file.readUInt32LE(368 + 4 * r)).toBe(crc32(block));
    }
    expect(file.subarray(380, 4096).every((b) => b === 0)).toBe(true);
    expect(file.subarray(4096).equals(data)).toBe(true);
  });

  it('writes version 1 (no digests) on request, laid out as documented', async () => {
    const { file, data } = sampleSegment(3, 4096, 1);
    expectHeaderStart(file, data, 1, 224);
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
    const file = serializeSegment(
      { blockSize: 4096, virtualSize: 4096000, identity: ID, mapDigest: DIGEST, checksumAlgorithm: BLOCK_CHECKSUM_SHA256_128, version: 1 },
      data,
    );
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

  it('puts data after tables that span more than one page', async () => {
    // Version 2: 272 + 1000 * (32 + 4) = 36272 bytes of header and tables.
    const layout = segmentLayout(1000, 512);
    expect(layout).toMatchObject({ digestOffset: 272, digestTableLength: 32000, tableOffset: 32272, tableLength: 4000, dataOffset: 36864 });
    expect((await open(sampleSegment(1000, 512).file)).blockOffset(999)).toBe(36864 + 999 * 512);
    // Version 1: 224 + 1000 * 4 = 4224.
    expect(segmentLayout(1000, 512, { version: 1 })).toMatchObject({ digestTableLength: 0, tableOffset: 224, dataOffset: 8192 });
    expect((await open(sampleSegment(1000, 512, 1).file)).blockOffset(999)).toBe(8192 + 999 * 512);
  });

  it('refuses to write a version 2 header with SHA-256 checksums or without the digest table hash', () => {
    expect(() => serializeSegment({ blockSize: 512, virtualSize: 5120, identity: ID, mapDigest: DIGEST, checksumAlgorithm: BLOCK_CHECKSUM_SHA256_128 }, Buffer.alloc(512))).toThrow(
      /version 2 segments use CRC-32/,
    );
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
  // sampleSegment(): 5 blocks, version 2: digest table [272, 432), checksum table [432, 452), data at 4096.
  const cases: Array<[string, (f: Buffer) => Buffer, RegExp]> = [
    ['wrong magic', (f) => (f.write('BCMAP', 0, 'latin1'), f), /bad magic/],
    ['wrong version', (f) => (f.writeUInt32LE(9, 8), f), /unsupported segment version 9 \(this build reads versions 1 and 2\)/],
    ['flipped header byte', (f) => ((f[50] ^= 0x80), f), /header checksum mismatch/],
    ['flipped data digest byte', (f) => ((f[110] ^= 0x01), f), /header checksum mismatch/],
    ['flipped digest table hash byte', (f) => ((f[250] ^= 0x01), f), /header checksum mismatch/],
    ['flipped table byte', (f) => ((f[432 + 3] ^= 0x01), f), /checksum table does not match .*: the table is corrupted/],
    ['flipped digest table byte', (f) => ((f[272 + 40] ^= 0x01), f), /digest table does not match its SHA-256 in the header: the digest table is corrupted/],
    ['truncated digest table', (f) => f.subarray(0, 300), /truncated/],
    ['version 2 header cut short', (f) => f.subarray(0, 250), /truncated header: file is 250 bytes, a version 2 header alone is 272/],
    ['version 2 header length of version 1', (f) => resealHeader((f.writeUInt32LE(224, 12), f)), /header length 224 is invalid/],
    ['unknown digest algorithm', (f) => resealHeader((f.writeUInt32LE(2, 236), f)), /unsupported block digest \(algorithm 2, 32 bytes\)/],
    ['digest length not the algorithm\'s', (f) => resealHeader((f.writeUInt32LE(16, 232), f)), /unsupported block digest \(algorithm 1, 16 bytes\)/],
    ['moved digest table', (f) => resealHeader((f.writeBigUInt64LE(280n, 224), f)), /digest table offset 280 does not match the layout \(272\)/],
    ['SHA-256 checksums in version 2', (f) => resealHeader((f.writeUInt32LE(1, 188), f.writeUInt32LE(16, 184), f)), /unsupported block checksum \(algorithm 1, 16 bytes\) in a version 2 segment/],
    ['longer header with non-zero reserved bytes', (f) => longerHeader(f, 1), /reserved header bytes are not zero/],
    ['non-zero table padding', (f) => ((f[4000] = 1), f), /table is corrupted/],
    ['truncated data', (f) => f.subarray(0, f.length - 1), /truncated/],
    ['truncated header', (f) => f.subarray(0, 100), /truncated header/],
    ['only the magic', (f) => f.subarray(0, 8), /truncated header/],
    ['empty', () => Buffer.alloc(0), /bad magic/],
    ['appended bytes', (f) => Buffer.concat([f, Buffer.alloc(4096)]), /describes/],
    ['bad header length', (f) => (f.writeUInt32LE(275, 12), f), /header length 275/],
    ['bad block size', (f) => resealHeader((f.writeUInt32LE(4095, 16), f)), /block size 4095/],
    ['unknown flags', (f) => resealHeader((f.writeUInt32LE(2, 20), f)), /unknown flags/],
    ['block count beyond the image', (f) => resealHeader((f.writeBigUInt64LE(1001n, 24), f)), /more than the image has/],
    ['absurd block count', (f) => resealHeader((f.writeBigUInt64LE(2n ** 60n, 24), f)), /more than the image has/],
    ['moved data offset', (f) => resealHeader((f.writeBigUInt64LE(8192n, 176), f)), /do not match the layout/],
    ['unknown checksum algorithm', (f) => resealHeader((f.writeUInt32LE(3, 188), f)), /unsupported block checksum \(algorithm 3, 4 bytes\)/],
    ['checksum length not the algorithm\'s', (f) => resealHeader((f.writeUInt32LE(16, 184), f)), /unsupported block checksum \(algorithm 2, 16 bytes\)/],
    // 50 blocks: tables [272, 1872) and [1872, 2072), data still at 4096; the file holds 5 blocks.
    ['more blocks than the file holds', (f) => resealHeader((f.writeBigUInt64LE(50n, 24), f.writeBigUInt64LE(1872n, 168), f)), /truncated/],
  ];
  const v1Cases: Array<[string, (f: Buffer) => Buffer, RegExp]> = [
    ['flipped table byte', (f) => ((f[SEGMENT_V1_HEADER_LENGTH + 3] ^= 0x01), f), /table is corrupted/],
    ['bad header length', (f) => (f.writeUInt32LE(225, 12), f), /header length 225/],
    ['truncated header', (f) => f.subarray(0, 100), /truncated header/],
    ['truncated table', (f) => f.subarray(0, 230), /truncated/],
    ['more blocks than the file holds', (f) => resealHeader((f.writeBigUInt64LE(50n, 24), f)), /truncated/],
    ['unknown checksum algorithm', (f) => resealHeader((f.writeUInt32LE(3, 188), f)), /unsupported block checksum \(algorithm 3, 4 bytes\) in a version 1 segment/],
    ['longer header with non-zero reserved bytes', (f) => longerHeader(f, 1), /reserved header bytes are not zero/],
  ];
  for (const [version, list] of [[2, cases], [1, v1Cases]] as const) {
    for (const [name, damage, message] of list) {
      it(`version ${version}: ${name}`, async () => {
        const err = await open(damage(sampleSegment(5, 4096, version).file)).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(InvalidSegmentError);
        expect((err as Error).message).toMatch(message);
        expect((err as Error).message.startsWith('s.bcseg: ')).toBe(true);
        expect((err as Error).message).not.toMatch(/\n/);
      });
    }
  }

  it('reads longer headers with zero reserved bytes (both versions)', async () => {
    for (const version of [1, 2] as const) {
      const { file, data } = sampleSegment(5, 4096, version);
      const reader = await open(longerHeader(file, 0));
      expect(reader.header.headerLength).toBe(version === 1 ? 224 + 64 : 272 + 64);
      expect((await reader.readBlocks(0, 5)).equals(data)).toBe(true);
      if (version === 2) expect(reader.blockDigest(4).equals(blockDigest(data.subarray(4 * 4096)))).toBe(true);
    }
  });

  it('opens a segment with a damaged digest table when asked, and says so', async () => {
    const { file, data } = sampleSegment(5);
    file[272 + 32 * 2] ^= 0x01;
    const reader = await SegmentReader.fromSource(bufferSource(file, 's.bcseg'), { allowDamagedDigests: true });
    expect(reader.digestTableIntact).toBe(false);
    expect(reader.blockDigest(2).equals(blockDigest(data.subarray(2 * 4096, 3 * 4096)))).toBe(false);
    expect(reader.blockDigest(1).equals(blockDigest(data.subarray(4096, 2 * 4096)))).toBe(true);
    // The checksum table is still checked.
    file[432] ^= 0x01;
    await expect(SegmentReader.fromSource(bufferSource(file, 's.bcseg'), { allowDamagedDigests: true })).rejects.toThrow(/the table is corrupted/);
  });

  it('does not read or allocate past what the file size allows', async () => {
    const { file } = sampleSegment();
    // 2^31 blocks with a consistent layout (32-byte digests, 4-byte checksums): only the file size gives it away.
    file.writeBigUInt64LE(2n ** 50n, 32);
    file.writeBigUInt64LE(2n ** 31n, 24);
    file.writeBigUInt64LE(272n + 2n ** 36n, 168);
    file.writeBigUInt64LE(2n ** 36n + 2n ** 33n + 4096n, 176);
    resealHeader(file);
    const reads: Array<[number, number]> = [];
    const source = bufferSource(file, 's.bcseg');
    const spy = { ...source, read: (o: number, l: number) => (reads.push([o, l]), source.read(o, l)) };
    await expect(SegmentReader.fromSource(spy)).rejects.toThrow(/truncated/);
    // One read of the file's head (at most 1 MiB); never the 72 GiB of tables the header claims.
    expect(reads).toEqual([[0, file.length]]);
  });

  it('opens a segment with one read when header and tables fit in the first MiB', async () => {
    const { file } = sampleSegment(5);
    const source = bufferSource(file, 's.bcseg');
    const reads: Array<[number, number]> = [];
    const spy = { ...source, read: (o: number, l: number) => (reads.push([o, l]), source.read(o, l)) };
    const reader = await SegmentReader.fromSource(spy);
    expect(reader.blockCount).toBe(5);
    expect(reads).toEqual([[0, file.length]]);
  });

  it('reads the tables of a larger segment with one more read, after the first MiB', async () => {
    // 40,000 blocks of 512 B: 1.44 MB of tables, more than the first read takes.
    const file = serializeSegment({ blockSize: 512, virtualSize: 40_000 * 512, identity: ID, mapDigest: DIGEST }, randomBytes(40_000 * 512));
    const source = bufferSource(file, 's.bcseg');
    const reads: Array<[number, number]> = [];
    const spy = { ...source, read: (o: number, l: number) => (reads.push([o, l]), source.read(o, l)) };
    const reader = await SegmentReader.fromSource(spy);
    expect(reads).toEqual([
      [0, 1024 * 1024],
      [272, reader.dataOffset - 272],
    ]);
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
