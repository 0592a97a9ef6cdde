import { createHash, randomBytes } from 'node:crypto';
import { open, readFile, readdir, rm, writeFile, mkdtemp, stat, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildMapFromTrace } from '../../src/core/build-map.js';
import { buildSegment } from '../../src/core/build-segment.js';
import { detectFileKind, inspectMap, inspectSegment } from '../../src/core/inspect.js';
import { verifySegment } from '../../src/core/verify.js';
import { FileNotFoundError, InvalidMapError, InvalidSegmentError, MismatchError } from '../../src/errors.js';
import { isTempName } from '../../src/format/atomic-write.js';
import { Bitmap } from '../../src/format/bitmap.js';
import { BootMap, saveMap } from '../../src/format/map.js';
import { BLOCK_CHECKSUM_SHA256_128, SegmentReader, serializeSegment } from '../../src/format/segment.js';
import { readTrace, type TraceEvent } from '../../src/format/trace.js';
import { FileByteSource } from '../../src/image/file-source.js';
import { RawImage } from '../../src/image/raw.js';
import type { DiskImage } from '../../src/image/types.js';

const TRACE = fileURLToPath(new URL('../data/debian12-minbase-boot.csv', import.meta.url));
const BS = 4096;
/** 64 MiB plus a partial last block. */
const IMAGE_SIZE = 64 * 1024 * 1024 + 1000;
const LAST_BLOCK = Math.ceil(IMAGE_SIZE / BS) - 1;

let dir: string;
let imagePath: string;
let imageBytes: Buffer;

async function openRaw(path = imagePath): Promise<RawImage> {
  return RawImage.open(await FileByteSource.open(path));
}

/** The trace's reads that fit in the test image, plus the partial last block. */
async function traceMap(image: DiskImage): Promise<BootMap> {
  const events: TraceEvent[] = [];
  for await (const e of readTrace(TRACE)) if (e.offset + e.length <= image.virtualSize) events.push(e);
  events.push({ line: 0, tUs: 0, op: 'read', offset: image.virtualSize - 10, length: 10 });
  return (await buildMapFromTrace(image, events)).map;
}

/** Runs of random lengths at random places, some single blocks, some long. */
function randomMap(image: DiskImage, seed: number): BootMap {
  const blocks = Math.ceil(image.virtualSize / BS);
  const bitmap = new Bitmap(blocks);
  let x = seed;
  const rand = (n: number) => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0) % n);
  for (let i = 0; i < 200; i++) {
    const start = rand(blocks);
    bitmap.setRange(start, Math.min(blocks, start + 1 + (rand(4) === 0 ? rand(300) : rand(8))));
  }
  return new BootMap({ blockSize: BS, virtualSize: image.virtualSize, identity: image.identity, boots: 1, bitmap });
}

/** Checks every block of the segment against the image file, independently of verify. */
async function expectSegmentMatchesImage(segmentPath: string, map: BootMap): Promise<void> {
  const file = await readFile(segmentPath);
  const reader = await SegmentReader.open(segmentPath);
  try {
    expect(reader.blockCount).toBe(map.blocksSet);
    expect(file.length).toBe(reader.dataOffset + map.blocksSet * BS);
    const padded = Buffer.concat([imageBytes, Buffer.alloc(LAST_BLOCK * BS + BS - imageBytes.length)]);
    for (let r = 0; r < map.blocksSet; r++) {
      const block = map.index.select(r);
      const expected = padded.subarray(block * BS, (block + 1) * BS);
      const actual = file.subarray(reader.dataOffset + r * BS, reader.dataOffset + (r + 1) * BS);
      if (!actual.equals(expected)) throw new Error(`rank ${r} (block ${block}) differs from the image`);
      // Version 2: the stored digest is the SHA-256 of the image's block.
      if (!reader.blockDigest(r).equals(createHash('sha256').update(expected).digest())) throw new Error(`rank ${r}: wrong digest`);
    }
    expect(reader.header.version).toBe(2);
    expect(reader.dataSha256).toBe(createHash('sha256').update(file.subarray(reader.dataOffset)).digest('hex'));
  } finally {
    await reader.close();
  }
}

async function flipByte(path: string, offset: number): Promise<void> {
  const fh = await open(path, 'r+');
  const b = Buffer.alloc(1);
  await fh.read(b, 0, 1, offset);
  b[0] ^= 0x5a;
  await fh.write(b, 0, 1, offset);
  await fh.close();
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bootcache-core-'));
  imagePath = join(dir, 'disk.raw');
  imageBytes = randomBytes(IMAGE_SIZE);
  await writeFile(imagePath, imageBytes);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('buildSegment', () => {
  it('copies the blocks of a trace map in rank order, zero-padding the last block', async () => {
    const image = await openRaw();
    try {
      const map = await traceMap(image);
      expect(map.blocksSet).toBeGreaterThan(1000);
      expect(map.bitmap.get(LAST_BLOCK)).toBe(true);
      const out = join(dir, 'trace.bcseg');
      const progress: number[] = [];
      const result = await buildSegment(image, map, out, { onProgress: (done, total) => progress.push(done / total) });
      expect(result.blocks).toBe(map.blocksSet);
      expect(result.bytes).toBe(map.blocksSet * BS);
      expect(result.fileBytes).toBe((await stat(out)).size);
      expect(result.identity).toBe(image.identity);
      expect(result.mapDigest).toBe(map.mapDigest());
      expect(progress.at(-1)).toBe(1);
      expect(progress).toEqual([...progress].sort((a, b) => a - b));
      await expectSegmentMatchesImage(out, map);
      const report = await verifySegment(image, map, out);
      expect(report.ok).toBe(true);
      expect(report.problems).toEqual([]);
      expect(report.blocksChecked).toBe(map.blocksSet);
    } finally {
      await image.close();
    }
  });

  it('handles random maps with small chunks, any read-ahead, with and without the checksum worker', async () => {
    const image = await openRaw();
    try {
      for (const [seed, readChunkBytes, readAhead, checksumWorker] of [
        [1, 64 * 1024, 1, false],
        [2, 16 * BS, 4, true],
        [3, 1024 * 1024, 2, true],
        [4, 1024 * 1024, 3, undefined],
      ] as const) {
        const map = randomMap(image, seed);
        const out = join(dir, `random-${seed}.bcseg`);
        const result = await buildSegment(image, map, out, { readChunkBytes, readAhead, checksumWorker });
        expect(result.blocks).toBe(map.blocksSet);
        await expectSegmentMatchesImage(out, map);
        const report = await verifySegment(image, map, out, { readChunkBytes: 3 * BS, checksumWorker: !checksumWorker });
        expect(report.ok).toBe(true);
      }
    } finally {
      await image.close();
    }
  });

  it('reads into reused buffers when the image supports readInto', async () => {
    const image = await openRaw();
    const fh = await open(imagePath, 'r');
    let intoCalls = 0;
    const readIntoImage = Object.assign(Object.create(image) as DiskImage, {
      read: () => Promise.reject(new Error('read() should not be used')),
      readInto: async (offset: number, length: number, target: Uint8Array, targetOffset: number) => {
        intoCalls++;
        expect(offset + length).toBeLessThanOrEqual(IMAGE_SIZE);
        const { bytesRead } = await fh.read(target, targetOffset, length, offset);
        expect(bytesRead).toBe(length);
      },
    });
    try {
      for (const checksumWorker of [false, true]) {
        // Small chunks so every buffer of the ring is reused many times, with
        // the partial last block landing in a buffer that held other data.
        const map = randomMap(image, 23);
        map.bitmap.setRange(LAST_BLOCK - 40, LAST_BLOCK + 1);
        const out = join(dir, `into-${checksumWorker}.bcseg`);
        await buildSegment(readIntoImage, map, out, { readChunkBytes: 7 * BS, checksumWorker });
        await expectSegmentMatchesImage(out, map);
        expect((await verifySegment(image, map, out)).ok).toBe(true);
      }
      expect(intoCalls).toBeGreaterThan(100);
    } finally {
      await fh.close();
      await image.close();
    }
  });

  it('keeps reads bounded: at most readAhead chunks in flight', async () => {
    const image = await openRaw();
    let inFlight = 0;
    let maxInFlight = 0;
    const counting: DiskImage = Object.assign(Object.create(image) as DiskImage, {
      read: async (offset: number, length: number) => {
        inFlight += length;
        maxInFlight = Math.max(maxInFlight, inFlight);
        try {
          return await image.read(offset, length);
        } finally {
          inFlight -= length;
        }
      },
    });
    try {
      const map = randomMap(image, 7);
      map.bitmap.setRange(0, 8192); // a 32 MiB run
      await buildSegment(counting, map, join(dir, 'bounded.bcseg'), { readChunkBytes: 1 << 20, readAhead: 3 });
      expect(maxInFlight).toBeGreaterThan(1 << 20);
      expect(maxInFlight).toBeLessThanOrEqual(3 << 20);
    } finally {
      await image.close();
    }
  });

  it('builds an empty segment from an empty map', async () => {
    const image = await openRaw();
    try {
      const map = BootMap.empty({ blockSize: BS, virtualSize: image.virtualSize, identity: image.identity });
      const out = join(dir, 'empty.bcseg');
      const result = await buildSegment(image, map, out);
      expect(result.blocks).toBe(0);
      expect((await stat(out)).size).toBe(4096);
      expect((await verifySegment(image, map, out)).ok).toBe(true);
      expect((await inspectSegment(out)).blocks).toBe(0);
    } finally {
      await image.close();
    }
  });

  it('refuses a map made for another image or size', async () => {
    const image = await openRaw();
    try {
      const map = randomMap(image, 3);
      const other = new BootMap({ ...map, identity: 'f'.repeat(64), bitmap: map.bitmap });
      await expect(buildSegment(image, other, join(dir, 'x.bcseg'))).rejects.toThrow(MismatchError);
      const resized = BootMap.empty({ blockSize: BS, virtualSize: image.virtualSize - 1000, identity: image.identity });
      await expect(buildSegment(image, resized, join(dir, 'x.bcseg'))).rejects.toThrow(/disk/);
      expect((await readdir(dir)).includes('x.bcseg')).toBe(false);
    } finally {
      await image.close();
    }
  });

  it('leaves no segment and no temp file when a read fails midway', async () => {
    const image = await openRaw();
    let reads = 0;
    const failing: DiskImage = Object.assign(Object.create(image) as DiskImage, {
      read: async (offset: number, length: number) => {
        if (++reads === 20) throw new Error('storage went away');
        return image.read(offset, length);
      },
    });
    try {
      const out = join(dir, 'failed.bcseg');
      await expect(buildSegment(failing, randomMap(image, 5), out, { readChunkBytes: 64 * 1024 })).rejects.toThrow('storage went away');
      const names = await readdir(dir);
      expect(names.includes('failed.bcseg')).toBe(false);
      expect(names.filter(isTempName)).toEqual([]);
    } finally {
      await image.close();
    }
  });
});

describe('verifySegment', () => {
  it('finds a flipped data byte and reports its rank and image offset', async () => {
    const image = await openRaw();
    try {
      const map = randomMap(image, 11);
      const out = join(dir, 'flip.bcseg');
      await buildSegment(image, map, out);
      const reader = await SegmentReader.open(out);
      const rank = Math.floor(map.blocksSet / 2);
      const offset = reader.blockOffset(rank) + 123;
      await reader.close();
      await flipByte(out, offset);
      const inline = await verifySegment(image, map, out, { checksumWorker: false });
      const report = await verifySegment(image, map, out, { checksumWorker: true });
      expect(inline).toEqual(report);
      expect(report.ok).toBe(false);
      expect(report.checks).toEqual({ header: 'pass', identity: 'pass', mapDigest: 'pass', checksums: 'fail', digests: 'fail', data: 'fail' });
      expect(report.checksumMismatches).toBe(1);
      expect(report.digestMismatches).toBe(1);
      // The table still names the image's content: the segment's copy is what is damaged.
      expect(report.imageDigestMismatches).toBe(0);
      expect(report.dataMismatches).toBe(1);
      const block = map.index.select(rank);
      expect(report.mismatches).toEqual([{ rank, block, imageOffset: block * BS, reason: 'checksum+digest+data' }]);
      expect(report.problems.join('\n')).toMatch(/1 of \d+ blocks do not match their stored checksums/);
      expect(report.problems.join('\n')).toMatch(/1 of \d+ blocks do not match their stored digests/);
      expect(report.problems.join('\n')).toMatch(/data SHA-256/);
    } finally {
      await image.close();
    }
  });

  it('checks segments with SHA-256 block checksums (written before CRC-32), inline and on the worker', async () => {
    const image = await openRaw();
    try {
      // 20 MiB of blocks: enough for the worker (16 MiB or more).
      const bitmap = new Bitmap(Math.ceil(image.virtualSize / BS));
      bitmap.setRange(0, 5000);
      const map = new BootMap({ blockSize: BS, virtualSize: image.virtualSize, identity: image.identity, boots: 1, bitmap });
      const out = join(dir, 'sha.bcseg');
      const meta = { blockSize: BS, virtualSize: image.virtualSize, identity: image.identity, mapDigest: map.mapDigest() };
      await writeFile(out, serializeSegment({ ...meta, checksumAlgorithm: BLOCK_CHECKSUM_SHA256_128, version: 1 }, imageBytes.subarray(0, 5000 * BS)));
      for (const checksumWorker of [false, true]) {
        const report = await verifySegment(image, map, out, { checksumWorker });
        expect(report.ok).toBe(true);
        expect(report.checks.digests).toBe('skip');
      }
      const reader = await SegmentReader.open(out);
      const offset = reader.blockOffset(4321) + 9;
      await reader.close();
      await flipByte(out, offset);
      for (const checksumWorker of [false, true]) {
        const report = await verifySegment(image, map, out, { checksumWorker });
        expect(report.checksumMismatches).toBe(1);
        expect(report.mismatches).toEqual([{ rank: 4321, block: 4321, imageOffset: 4321 * BS, reason: 'checksum+data' }]);
      }
      expect((await inspectSegment(out)).blockChecksum).toBe('sha256-128');
    } finally {
      await image.close();
    }
  });

  it('detects a rewritten image: identity mismatch and the changed block', async () => {
    const copy = join(dir, 'rewritten.raw');
    await writeFile(copy, imageBytes);
    const before = await openRaw(copy);
    const map = randomMap(before, 13);
    const out = join(dir, 'rewritten.bcseg');
    await buildSegment(before, map, out);
    await before.close();
    const block = map.index.select(5);
    await flipByte(copy, block * BS + 7);
    const after = await openRaw(copy);
    try {
      expect(after.identity).not.toBe(map.identity);
      const report = await verifySegment(after, map, out);
      expect(report.ok).toBe(false);
      expect(report.checks.identity).toBe('fail');
      expect(report.checks.checksums).toBe('pass');
      expect(report.checks.data).toBe('fail');
      // The stored digest names the old content, not the image's.
      expect(report.checks.digests).toBe('fail');
      expect(report.digestMismatches).toBe(0);
      expect(report.imageDigestMismatches).toBe(1);
      expect(report.problems.join('\n')).toMatch(/1 of \d+ stored digests are not the SHA-256 of the image's block/);
      expect(report.mismatches).toEqual([{ rank: 5, block, imageOffset: block * BS, reason: 'data' }]);
      expect(report.problems[0]).toMatch(/image rewritten/);
      await expect(buildSegment(after, map, join(dir, 'again.bcseg'))).rejects.toThrow(MismatchError);
    } finally {
      await after.close();
    }
  });

  it('reports a segment built from another map', async () => {
    const image = await openRaw();
    try {
      const map = randomMap(image, 17);
      const out = join(dir, 'othermap.bcseg');
      await buildSegment(image, map, out);
      const bits = map.bitmap.clone();
      bits.set(bits.nextClearBit(0));
      const other = new BootMap({ ...map, bitmap: bits });
      const report = await verifySegment(image, other, out);
      expect(report.ok).toBe(false);
      expect(report.checks.mapDigest).toBe('fail');
      expect(report.checks.data).toBe('skip');
      expect(report.checks.checksums).toBe('pass');
      expect(report.blocksChecked).toBe(map.blocksSet);
      // Same block count, other bits: digest differs and the data no longer lines up.
      const moved = map.bitmap.clone();
      const first = moved.nextSetBit(0);
      moved.clear(first);
      moved.set(moved.nextClearBit(first + 1));
      const shifted = await verifySegment(image, new BootMap({ ...map, bitmap: moved }), out);
      expect(shifted.checks.mapDigest).toBe('fail');
      expect(shifted.checks.data).toBe('fail');
    } finally {
      await image.close();
    }
  });

  it('refuses a damaged header, checksum table or a truncated segment as malformed (InvalidSegmentError), not a report', async () => {
    const image = await openRaw();
    try {
      const map = randomMap(image, 19);
      const out = join(dir, 'badheader.bcseg');
      await buildSegment(image, map, out);
      const reader = await SegmentReader.open(out);
      const { tableOffset, dataOffset } = reader.header;
      await reader.close();
      await flipByte(out, 60);
      await expect(verifySegment(image, map, out)).rejects.toThrow(InvalidSegmentError);
      await expect(verifySegment(image, map, out)).rejects.toThrow(/header checksum mismatch/);
      await flipByte(out, 60);
      await flipByte(out, tableOffset + 3); // in the checksum table
      await expect(verifySegment(image, map, out)).rejects.toThrow(/checksum table does not match .*: the table is corrupted/);
      await flipByte(out, tableOffset + 3);
      await truncate(out, 272 + 100); // inside the digest table
      await expect(verifySegment(image, map, out)).rejects.toThrow(InvalidSegmentError);
      await expect(verifySegment(image, map, out)).rejects.toThrow(new RegExp(`file is 372 bytes but its header describes \\d+ .*from offset ${dataOffset}\\): truncated$`));
      await expect(verifySegment(image, map, join(dir, 'missing.bcseg'))).rejects.toThrow(FileNotFoundError);
    } finally {
      await image.close();
    }
  });

  it('reports a flipped byte in the digest table as that block\'s digest mismatch', async () => {
    const image = await openRaw();
    try {
      const map = randomMap(image, 23);
      const out = join(dir, 'baddigest.bcseg');
      await buildSegment(image, map, out);
      const rank = map.blocksSet - 2;
      await flipByte(out, 272 + rank * 32 + 17);
      for (const checksumWorker of [false, true]) {
        const report = await verifySegment(image, map, out, { checksumWorker });
        expect(report.ok).toBe(false);
        expect(report.checks).toEqual({ header: 'pass', identity: 'pass', mapDigest: 'pass', checksums: 'pass', digests: 'fail', data: 'pass' });
        expect(report.digestMismatches).toBe(1);
        const block = map.index.select(rank);
        expect(report.mismatches).toEqual([{ rank, block, imageOffset: block * BS, reason: 'digest' }]);
        expect(report.problems.join('\n')).toMatch(/digest table does not match its SHA-256 in the header/);
        expect(report.adoptable).toBe(false);
      }
      // Anything but verify refuses the segment outright.
      await expect(inspectSegment(out)).rejects.toThrow(/the digest table is corrupted/);
    } finally {
      await image.close();
    }
  });

  it('verifies a version 1 segment (no digests) as before', async () => {
    const image = await openRaw();
    try {
      const map = randomMap(image, 29);
      const out = join(dir, 'v1.bcseg');
      const built = await buildSegment(image, map, out, { version: 1 });
      expect(built.version).toBe(1);
      const reader = await SegmentReader.open(out);
      expect(reader.header.version).toBe(1);
      expect(reader.hasDigests).toBe(false);
      expect(reader.dataOffset).toBe(Math.ceil((224 + 4 * map.blocksSet) / 4096) * 4096);
      await reader.close();
      const report = await verifySegment(image, map, out);
      expect(report.ok).toBe(true);
      expect(report.checks.digests).toBe('skip');
      expect(report.problems).toEqual(['no block digests: a version 1 segment']);
      expect((await inspectSegment(out)).blockDigest).toBeNull();
      await flipByte(out, built.fileBytes - 5);
      const bad = await verifySegment(image, map, out);
      expect(bad.ok).toBe(false);
      expect(bad.mismatches).toEqual([expect.objectContaining({ rank: map.blocksSet - 1, reason: 'checksum+data' })]);
    } finally {
      await image.close();
    }
  });
});

describe('inspect and detectFileKind', () => {
  it('summarises maps and segments and tells files apart by magic', async () => {
    const image = await openRaw();
    try {
      const map = await traceMap(image);
      const mapPath = join(dir, 'i.bcmap');
      const segPath = join(dir, 'i.bcseg');
      await saveMap(mapPath, map);
      const built = await buildSegment(image, map, segPath);
      expect(await inspectMap(mapPath)).toEqual({
        kind: 'map',
        path: mapPath,
        version: 1,
        blockSize: BS,
        virtualSize: IMAGE_SIZE,
        blockCount: LAST_BLOCK + 1,
        blocksSet: map.blocksSet,
        bytes: map.blocksSet * BS,
        runs: map.bitmap.countRuns(),
        boots: 1,
        identity: image.identity,
        mapDigest: map.mapDigest(),
        history: null,
      });
      const seg = await inspectSegment(segPath);
      expect(seg).toMatchObject({
        kind: 'segment',
        version: 2,
        blockChecksum: 'crc32',
        blockDigest: 'sha256',
        blocks: map.blocksSet,
        bytes: map.blocksSet * BS,
        blockSize: BS,
        identity: image.identity,
        mapDigest: map.mapDigest(),
        dataSha256: built.dataSha256,
        fileBytes: built.fileBytes,
      });
      expect(await detectFileKind(mapPath)).toBe('map');
      expect(await detectFileKind(segPath)).toBe('segment');
      expect(await detectFileKind(imagePath)).toBe('image');
      const tiny = join(dir, 'tiny');
      await writeFile(tiny, 'BC');
      expect(await detectFileKind(tiny)).toBe('image');
      await expect(detectFileKind(join(dir, 'nope'))).rejects.toThrow(FileNotFoundError);
      await expect(inspectMap(segPath)).rejects.toThrow(InvalidMapError);
      await expect(inspectSegment(mapPath)).rejects.toThrow(InvalidSegmentError);
    } finally {
      await image.close();
    }
  });
});
