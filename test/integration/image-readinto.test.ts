/**
 * readInto() against read() and `qemu-img convert -O raw`: raw and qcow2
 * images (data, zero and unallocated clusters, zlib and zstd compression,
 * extended L2, backing chains), unaligned offsets, reused and shared target
 * buffers, and the error cases.
 */
import { randomBytes } from 'node:crypto';
import { open, readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildSegment } from '../../src/core/build-segment.js';
import { verifySegment } from '../../src/core/verify.js';
import { InvalidImageError, StorageIOError } from '../../src/errors.js';
import { Bitmap } from '../../src/format/bitmap.js';
import { BootMap } from '../../src/format/map.js';
import { SegmentReader } from '../../src/format/segment.js';
import { FileByteSource, hasUsableReadInto, readSourceInto } from '../../src/image/file-source.js';
import { openImage } from '../../src/image/open.js';
import type { DiskImage } from '../../src/image/types.js';
import { convertToRaw, qemuImg, qemuIo, removeTmpDir, tmpDir } from '../helpers/qemu.js';
import { prng } from '../helpers/random.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** Bytes around each target range that readInto must leave alone. */
const GUARD = 77;
const GUARD_BYTE = 0xee;

let root: string;
const fixtures = new Map<string, string>();


/** Random, compressible text, zeros and patterns, one kind per MiB. */
function mixedBytes(size: number): Buffer {
  const buf = Buffer.alloc(size);
  const text = Buffer.from('readInto fixture: compressible words, repeated often enough. ');
  for (let off = 0, i = 0; off < size; off += MiB, i++) {
    const n = Math.min(MiB, size - off);
    if (i % 4 === 0) randomBytes(n).copy(buf, off);
    else if (i % 4 === 1) for (let p = off; p < off + n; p += text.length) text.copy(buf, p, 0, Math.min(text.length, off + n - p));
    else if (i % 4 === 3) buf.fill(i & 0xff, off, off + n);
  }
  return buf;
}

function expectSame(actual: Buffer, expected: Buffer, what: string): void {
  if (actual.equals(expected)) return;
  let at = 0;
  while (at < Math.min(actual.length, expected.length) && actual[at] === expected[at]) at++;
  expect.fail(`${what}: differs at byte ${at} (got ${actual[at]}, want ${expected[at]}; lengths ${actual.length}/${expected.length})`);
}

/**
 * readInto at `offset` into a reused, dirty buffer at an odd target offset:
 * must equal `expected` and leave the guard bytes on both sides untouched.
 */
async function checkRange(img: DiskImage, expected: Buffer, scratch: Buffer, offset: number, length: number, what: string): Promise<void> {
  const at = GUARD + (offset % 13);
  scratch.fill(GUARD_BYTE, 0, at + length + GUARD);
  await img.readInto!(offset, length, scratch, at);
  expectSame(scratch.subarray(at, at + length), expected.subarray(offset, offset + length), `${what} readInto(${offset}, ${length})`);
  for (const b of [...scratch.subarray(0, at), ...scratch.subarray(at + length, at + length + GUARD)]) {
    if (b !== GUARD_BYTE) expect.fail(`${what} readInto(${offset}, ${length}) wrote outside its target range`);
  }
}

/** The full comparison of readInto with read() and with qemu-img convert. */
async function checkImage(path: string): Promise<void> {
  // qemu-img rounds raw sizes up to whole sectors; a raw image is its file.
  const expected = path.endsWith('.raw') ? await readFile(path) : await convertToRaw(path);
  const img = await openImage(path);
  try {
    expect(typeof img.readInto).toBe('function');
    expect(img.virtualSize).toBe(expected.length);
    const scratch = Buffer.alloc(expected.length + 2 * GUARD + 16);
    // The whole disk at once, then sequential pieces of awkward sizes.
    await checkRange(img, expected, scratch, 0, expected.length, 'whole');
    for (const [start, step] of [[0, 4 * MiB], [0, 7919], [12345, MiB + 3], [511, 65537 * 3]] as const) {
      for (let off = start; off < expected.length; off += step) {
        await checkRange(img, expected, scratch, off, Math.min(step, expected.length - off), `sequential ${step}`);
      }
    }
    // Random unaligned ranges, each also through read().
    const rand = prng(expected.length);
    for (let i = 0; i < 120; i++) {
      const off = Math.floor(rand() * expected.length);
      const n = Math.min(expected.length - off, Math.floor(rand() * 300 * KiB));
      await checkRange(img, expected, scratch, off, n, 'random');
      expectSame(await img.read(off, n), expected.subarray(off, off + n), `read(${off}, ${n})`);
    }
    // Parallel reads into disjoint parts of one dirty buffer.
    const all = Buffer.alloc(expected.length, GUARD_BYTE);
    const pieces = 24;
    await Promise.all(
      Array.from({ length: pieces }, (_, k) => {
        const from = Math.floor((expected.length / pieces) * k);
        const to = Math.floor((expected.length / pieces) * (k + 1));
        return img.readInto!(from, to - from, all, from);
      }),
    );
    expectSame(all, expected, 'parallel readInto');
  } finally {
    await img.close();
  }
}

beforeAll(async () => {
  root = await tmpDir('bootcache-readinto-');
  const mixed = join(root, 'mixed.raw');
  await writeFile(mixed, mixedBytes(24 * MiB + 3 * 512));
  fixtures.set('raw', mixed);
  const odd = join(root, 'odd.raw');
  await writeFile(odd, randomBytes(3 * MiB + 1001));
  fixtures.set('raw-odd-size', odd);

  const make = async (name: string, build: (path: string) => Promise<unknown>): Promise<string> => {
    const path = join(root, `${name}.qcow2`);
    await build(path);
    fixtures.set(name, path);
    return path;
  };
  const patterns = [
    'write -P 0xaa 100k 3k',
    'write -z 1M 128k',
    'write -z -u 2M 64k',
    'discard 3M 192k',
    'write -P 0x77 5M 4k',
    'write -z 5M 2k',
    'write -P 0x5a 23M 1M',
  ];
  await make('plain-64k', async (p) => {
    await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=64k', mixed, p]);
    await qemuIo(p, 'qcow2', patterns);
  });
  await make('plain-512', async (p) => {
    await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', odd, p]);
    await qemuIo(p, 'qcow2', ['write -z 1000 3000', 'discard 64k 4k', 'write -P 0x12 100001 333']);
  });
  await make('zlib-64k', (p) => qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', mixed, p]));
  await make('zlib-2m-rewritten', async (p) => {
    await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=2M', mixed, p]);
    await qemuIo(p, 'qcow2', ['write -P 0x61 1040k 8k', 'write -z 4M 2M', 'discard 8M 2M', 'write -c -P 0x62 8M 2M']);
  });
  await make('zstd-64k', (p) => qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', mixed, p]));
  await make('zstd-512', (p) => qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512,compression_type=zstd', odd, p]));
  // Extended L2 over a raw backing file: unallocated subclusters show the backing data.
  await make('extl2-over-raw', async (p) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', 'odd.raw', '-F', 'raw', p, '5M']);
    await qemuIo(p, 'qcow2', ['write -P 0x11 0 4k', 'write -z 8k 4k', 'write -z -u 64k 64k', 'write -c -P 0x55 1M 64k', 'write -P 0x66 2050k 2k']);
  });
  // A chain of three, compressed at the bottom, growing: past the backing's end reads zeros.
  await make('chain-base', async (p) => {
    await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', odd, p]);
  });
  await make('chain-mid', async (p) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'chain-base.qcow2', '-F', 'qcow2', p, '6M']);
    await qemuIo(p, 'qcow2', ['write -P 0x21 60k 10k', 'write -z 1M 64k', 'write -P 0x22 4M 100k']);
  });
  await make('chain-top', async (p) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'chain-mid.qcow2', '-F', 'qcow2', p, `${7 * MiB + 512}`]);
    await qemuIo(p, 'qcow2', ['write -P 0x31 4k 4k', 'write -c -P 0x32 2M 64k', 'discard 4100k 8k', 'write -P 0x33 7M 512']);
  });
}, 120_000);

afterAll(async () => {
  if (root) await removeTmpDir(root);
});

describe('readInto gives the bytes read() and qemu-img convert give', () => {
  for (const name of [
    'raw', 'raw-odd-size', 'plain-64k', 'plain-512', 'zlib-64k', 'zlib-2m-rewritten', 'zstd-64k', 'zstd-512',
    'extl2-over-raw', 'chain-mid', 'chain-top',
  ]) {
    it(name, async () => {
      await checkImage(fixtures.get(name)!);
    }, 120_000);
  }
});

describe('readInto edge cases', () => {
  it('refuses ranges outside the disk or the target buffer, and closed images', async () => {
    for (const name of ['raw', 'zlib-64k']) {
      const img = await openImage(fixtures.get(name)!);
      const buf = Buffer.alloc(4096);
      await expect(img.readInto!(img.virtualSize - 10, 11, Buffer.alloc(64), 0)).rejects.toThrow(InvalidImageError);
      await expect(img.readInto!(-1, 1, buf, 0)).rejects.toThrow(InvalidImageError);
      await expect(img.readInto!(0, 4096, buf, 1)).rejects.toThrow(RangeError);
      await expect(img.readInto!(0, 10, buf, -1)).rejects.toThrow(RangeError);
      await img.readInto!(img.virtualSize, 0, buf, 4096); // empty read at the end is fine
      await img.close();
      if (name !== 'raw') await expect(img.readInto!(0, 10, buf, 0)).rejects.toThrow(/closed/);
    }
  });

  it('FileByteSource.readInto refuses reads past the end of the file', async () => {
    const source = await FileByteSource.open(fixtures.get('raw-odd-size')!);
    try {
      const buf = Buffer.alloc(2048);
      await expect(source.readInto(source.size - 1000, 1001, buf, 0)).rejects.toThrow(StorageIOError);
      await source.readInto(source.size - 1000, 1000, buf, 1000);
      expect(buf.subarray(1000, 2000)).toEqual(await source.read(source.size - 1000, 1000));
    } finally {
      await source.close();
    }
  });

  it('a data cluster past the end of the file fails the read', async () => {
    const path = join(root, 'truncated.qcow2');
    await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', fixtures.get('raw-odd-size')!, path]);
    await truncate(path, 2 * MiB);
    const img = await openImage(path, { format: 'qcow2' });
    try {
      await expect(img.readInto!(0, img.virtualSize, Buffer.alloc(img.virtualSize), 0)).rejects.toThrow(/past the end of the file/);
    } finally {
      await img.close();
    }
  });

  it('wrappers that override only read() are read through read()', async () => {
    const img = await openImage(fixtures.get('plain-64k')!);
    try {
      let reads = 0;
      const counting = Object.assign(Object.create(img) as DiskImage, {
        read: (offset: number, length: number) => {
          reads++;
          return img.read(offset, length);
        },
      });
      expect(hasUsableReadInto(img)).toBe(true);
      expect(hasUsableReadInto(counting)).toBe(false);
      const target = Buffer.alloc(100 * KiB);
      await readSourceInto(counting, 5000, 90 * KiB, target, 7);
      expect(reads).toBe(1);
      expect(target.subarray(7, 7 + 90 * KiB)).toEqual(await img.read(5000, 90 * KiB));
      const withInto = Object.assign(Object.create(img) as DiskImage, { readInto: img.readInto!.bind(img) });
      expect(hasUsableReadInto(withInto)).toBe(true);
    } finally {
      await img.close();
    }
  });
});

describe('build-segment and verify read qcow2 images into reused buffers', () => {
  it('copies the right blocks and finds each flipped byte, whatever the chunk size and read-ahead', async () => {
    const BS = 4096;
    for (const name of ['zlib-64k', 'chain-top']) {
      const path = fixtures.get(name)!;
      const expected = await convertToRaw(path);
      const img = await openImage(path);
      try {
        const blocks = Math.ceil(img.virtualSize / BS);
        const bitmap = new Bitmap(blocks);
        const rand = prng(blocks);
        for (let i = 0; i < 150; i++) {
          const start = Math.floor(rand() * blocks);
          bitmap.setRange(start, Math.min(blocks, start + 1 + Math.floor(rand() * (i % 5 === 0 ? 200 : 6))));
        }
        bitmap.set(blocks - 1);
        const map = new BootMap({ blockSize: BS, virtualSize: img.virtualSize, identity: img.identity, boots: 1, bitmap });
        const out = join(root, `${name}.bcseg`);
        await buildSegment(img, map, out, { readChunkBytes: 5 * BS, readAhead: 2 });

        const file = await readFile(out);
        const reader = await SegmentReader.open(out);
        const dataOffset = reader.dataOffset;
        await reader.close();
        const padded = Buffer.concat([expected, Buffer.alloc(blocks * BS - expected.length)]);
        for (let r = 0; r < map.blocksSet; r++) {
          const block = map.index.select(r);
          expectSame(file.subarray(dataOffset + r * BS, dataOffset + (r + 1) * BS), padded.subarray(block * BS, (block + 1) * BS), `${name} rank ${r}`);
        }

        for (const [readChunkBytes, readAhead, checksumWorker] of [[3 * BS, 1, false], [7 * BS, 3, true], [4 * MiB, 2, false]] as const) {
          const report = await verifySegment(img, map, out, { readChunkBytes, readAhead, checksumWorker });
          expect(report.ok, report.problems.join('; ')).toBe(true);
        }
        const ranks = [0, 1, Math.floor(map.blocksSet / 3), Math.floor(map.blocksSet / 2) + 1, map.blocksSet - 1];
        const fh = await open(out, 'r+');
        for (const r of ranks) {
          const at = dataOffset + r * BS + (r % BS);
          const b = Buffer.alloc(1);
          await fh.read(b, 0, 1, at);
          b[0] ^= 0x5a;
          await fh.write(b, 0, 1, at);
        }
        await fh.close();
        for (const [readChunkBytes, readAhead] of [[3 * BS, 1], [7 * BS, 3]] as const) {
          const report = await verifySegment(img, map, out, { readChunkBytes, readAhead, maxMismatches: 100 });
          expect(report.ok).toBe(false);
          expect(report.mismatches.map((m) => [m.rank, m.block, m.reason])).toEqual(
            ranks.map((r) => [r, map.index.select(r), 'checksum+digest+data']),
          );
        }
      } finally {
        await img.close();
      }
    }
  }, 120_000);
});
