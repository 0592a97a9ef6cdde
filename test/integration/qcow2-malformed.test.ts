/**
 * Malformed and unsupported qcow2 images, modelled on qemu-iotests 036
 * (feature bits), 060 (corruption), 080 (header and table bounds) and 271
 * (extended L2 bitmaps): each must fail with the right error class and a
 * one-line message, never a crash, hang or huge allocation.
 */
import { copyFile, mkdir, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  BackingChainError,
  CorruptImageError,
  InvalidImageError,
  UnsupportedImageError,
  type BootcacheError,
} from '../../src/errors.js';
import { openImage } from '../../src/image/open.js';
import type { OpenImageOptions } from '../../src/image/types.js';
import {
  be32,
  be64,
  convertToRaw,
  patchFile,
  qemuImg,
  qemuIo,
  readFileRange,
  removeTmpDir,
  tmpDir,
} from '../helpers/qemu.js';

type ErrorClass = abstract new (...args: never[]) => BootcacheError;

const KiB = 1024;
const MiB = 1024 * KiB;

// qcow2 header field offsets ("Header" in qcow2.rst).
const H = {
  magic: 0,
  version: 4,
  backingFileOffset: 8,
  backingFileSize: 16,
  clusterBits: 20,
  size: 24,
  cryptMethod: 32,
  l1Size: 36,
  l1TableOffset: 40,
  refcountTableOffset: 48,
  refcountTableClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64,
  incompatible: 72,
  autoclear: 88,
  refcountOrder: 96,
  headerLength: 100,
  compressionType: 104,
} as const;

let dir: string;
/** Valid images the variants are copied from. */
const base = { v3: '', v2: '', extl2: '', zlib: '', zstd: '', zlib512: '', backed: '' };
let counter = 0;

async function variant(from: string, patches: Array<[number, Buffer | number[]]> = []): Promise<string> {
  const path = join(dir, `variant-${++counter}.qcow2`);
  await copyFile(from, path);
  for (const [offset, bytes] of patches) await patchFile(path, offset, bytes);
  return path;
}

async function header(path: string): Promise<Buffer> {
  return readFileRange(path, 0, 112);
}

async function l1Entry(path: string, index = 0): Promise<{ at: number; value: bigint }> {
  const h = await header(path);
  const at = Number(h.readBigUInt64BE(H.l1TableOffset)) + index * 8;
  return { at, value: (await readFileRange(path, at, 8)).readBigUInt64BE(0) };
}

/** File offset of the L2 entry for guest cluster `index` (first L2 table). */
async function l2EntryAt(path: string, index: number, entrySize = 8): Promise<number> {
  const { value } = await l1Entry(path);
  return Number(value & 0x00fffffffffffe00n) + index * entrySize;
}

function check(err: unknown, cls: ErrorClass, pattern: RegExp): void {
  expect(err).toBeInstanceOf(cls);
  const message = (err as Error).message;
  expect(message).toMatch(pattern);
  expect(message).not.toContain('\n');
}

async function expectOpenError(path: string, cls: ErrorClass, pattern: RegExp, options?: OpenImageOptions): Promise<void> {
  const err = await openImage(path, options).then(
    async (img) => {
      await img.close();
      return new Error('opened without error');
    },
    (e: unknown) => e,
  );
  check(err, cls, pattern);
}

/** Opens fine, but reading [offset, offset+length) (and optionally extents) fails. */
async function expectReadError(
  path: string,
  cls: ErrorClass,
  pattern: RegExp,
  offset = 0,
  length = 64 * KiB,
  extentsToo = false,
): Promise<void> {
  const img = await openImage(path);
  try {
    check(await img.read(offset, length).then(() => new Error('read without error'), (e: unknown) => e), cls, pattern);
    if (extentsToo) {
      check(await img.extents(offset, length).then(() => new Error('extents without error'), (e: unknown) => e), cls, pattern);
    }
  } finally {
    await img.close();
  }
}

beforeAll(async () => {
  dir = await tmpDir('bootcache-qcow2-bad-');
  const dataCmds = ['write -P 0x11 0 128k', 'write -P 0x22 1M 64k'];
  base.v3 = join(dir, 'v3.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base.v3, '16M']);
  await qemuIo(base.v3, 'qcow2', dataCmds);
  base.v2 = join(dir, 'v2.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', base.v2, '16M']);
  await qemuIo(base.v2, 'qcow2', dataCmds);
  base.extl2 = join(dir, 'extl2.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', base.extl2, '16M']);
  await qemuIo(base.extl2, 'qcow2', ['write -P 0x11 0 4k', 'write -c -P 0x33 128k 64k']);
  const text = Buffer.alloc(4 * MiB);
  // Pseudo-random letters: compressible, but each cluster still needs several sectors.
  for (let i = 0, r = 1; i < text.length; i++) {
    r = (Math.imul(r, 1103515245) + 12345) >>> 0;
    text[i] = 97 + (r >>> 28);
  }
  const raw = join(dir, 'text.raw');
  await writeFile(raw, text);
  base.zlib = join(dir, 'zlib.qcow2');
  await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, base.zlib]);
  base.zstd = join(dir, 'zstd.qcow2');
  await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', raw, base.zstd]);
  base.zlib512 = join(dir, 'zlib512.qcow2');
  await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', raw, base.zlib512]);
  await writeFile(join(dir, 'backing.raw'), Buffer.alloc(1 * MiB, 0x5a));
  base.backed = join(dir, 'backed.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'backing.raw', '-F', 'raw', base.backed, '2M']);
}, 300_000);

afterAll(async () => {
  if (dir) await removeTmpDir(dir);
});

describe('header checks (qemu-iotests 080 style)', () => {
  it('bad magic, when the format is forced', async () => {
    await expectOpenError(await variant(base.v3, [[H.magic, be32(0x12345678)]]), InvalidImageError, /bad magic/, { format: 'qcow2' });
    const empty = join(dir, 'empty.qcow2');
    await writeFile(empty, Buffer.alloc(0));
    await expectOpenError(empty, InvalidImageError, /bad magic/, { format: 'qcow2' });
  });

  it('versions other than 2 and 3', async () => {
    await expectOpenError(await variant(base.v3, [[H.version, be32(1)]]), UnsupportedImageError, /version 1 is not supported/);
    await expectOpenError(await variant(base.v3, [[H.version, be32(4)]]), UnsupportedImageError, /version 4 is not supported/);
    await expectOpenError(await variant(base.v3, [[H.version, be32(0xffffffff)]]), UnsupportedImageError, /version 4294967295/);
  });

  it('cluster_bits out of range', async () => {
    for (const bits of [0, 8, 22, 63, 0xffffffff]) {
      await expectOpenError(await variant(base.v3, [[H.clusterBits, be32(bits)]]), InvalidImageError, /cluster_bits is \d+/);
    }
  });

  it('header_length too short or larger than a cluster', async () => {
    await expectOpenError(await variant(base.v3, [[H.headerLength, be32(100)]]), InvalidImageError, /header is too short/);
    await expectOpenError(await variant(base.v3, [[H.headerLength, be32(0x10008)]]), InvalidImageError, /exceeds the cluster size/);
  });

  it('huge virtual sizes', async () => {
    await expectOpenError(await variant(base.v3, [[H.size, be64(1n << 63n)]]), InvalidImageError, /size .* too large/);
    await expectOpenError(await variant(base.v3, [[H.size, be64(2n ** 53n)]]), InvalidImageError, /too large/);
    // Representable, but the L1 table does not cover it.
    await expectOpenError(await variant(base.v3, [[H.size, be64(2n ** 50n)]]), InvalidImageError, /L1 table is too small/);
  });

  it('L1 table: too large, too small, misaligned, past the end of the file', async () => {
    await expectOpenError(await variant(base.v3, [[H.l1Size, be32(0x10000000)]]), InvalidImageError, /L1 table is too large/);
    await expectOpenError(await variant(base.v3, [[H.l1Size, be32(0x3fffff)]]), InvalidImageError, /L1 table .* past the end of the file/);
    await expectOpenError(await variant(base.v3, [[H.l1Size, be32(0)]]), InvalidImageError, /L1 table is too small/);
    const h = await header(base.v3);
    const l1 = h.readBigUInt64BE(H.l1TableOffset);
    await expectOpenError(await variant(base.v3, [[H.l1TableOffset, be64(l1 + 512n)]]), InvalidImageError, /L1 table offset .* not aligned/);
    await expectOpenError(await variant(base.v3, [[H.l1TableOffset, be64(1n << 40n)]]), InvalidImageError, /L1 table .* past the end/);
    await expectOpenError(await variant(base.v3, [[H.l1TableOffset, be64(1n << 60n)]]), InvalidImageError, /l1_table_offset .* too large/);
    await expectOpenError(await variant(base.v3, [[H.l1TableOffset, be64(0)]]), InvalidImageError, /overlaps the qcow2 header/);
  });

  it('refcount table: missing, huge, misaligned, past the end of the file', async () => {
    await expectOpenError(await variant(base.v3, [[H.refcountTableClusters, be32(0)]]), InvalidImageError, /no reference count table/);
    await expectOpenError(await variant(base.v3, [[H.refcountTableClusters, be32(0xffffffff)]]), InvalidImageError, /reference count table is too large/);
    await expectOpenError(await variant(base.v3, [[H.refcountTableOffset, be64(0x10200)]]), InvalidImageError, /reference count table offset .* not aligned/);
    await expectOpenError(await variant(base.v3, [[H.refcountTableOffset, be64(1n << 45n)]]), InvalidImageError, /reference count table .* past the end/);
  });

  it('snapshot table: too many, misaligned, past the end of the file', async () => {
    await expectOpenError(await variant(base.v3, [[H.nbSnapshots, be32(0x10000000)]]), InvalidImageError, /snapshot table is too large/);
    await expectOpenError(
      await variant(base.v3, [[H.nbSnapshots, be32(1)], [H.snapshotsOffset, be64(0x10001)]]),
      InvalidImageError,
      /snapshot table offset .* not aligned/,
    );
    await expectOpenError(
      await variant(base.v3, [[H.nbSnapshots, be32(1)], [H.snapshotsOffset, be64(1n << 40n)]]),
      InvalidImageError,
      /snapshot table .* past the end/,
    );
  });

  it('backing file name offset and size', async () => {
    await expectOpenError(await variant(base.backed, [[H.backingFileOffset, be64(0x10001)]]), InvalidImageError, /backing file name offset/);
    await expectOpenError(await variant(base.backed, [[H.backingFileSize, be32(2000)]]), InvalidImageError, /backing file name is too long/);
    const h = await header(base.backed);
    const at = Number(h.readBigUInt64BE(H.backingFileOffset));
    // Runs past the end of the first cluster.
    await expectOpenError(await variant(base.backed, [[H.backingFileSize, be32(65536 - at + 1)]]), InvalidImageError, /too long/);
  });

  it('refcount_order above 6', async () => {
    await expectOpenError(await variant(base.v3, [[H.refcountOrder, be32(7)]]), InvalidImageError, /refcount_order 7/);
  });

  it('header extension running past the header area', async () => {
    const h = await header(base.v3);
    const first = h.readUInt32BE(H.headerLength);
    await expectOpenError(await variant(base.v3, [[first + 4, be32(0xfff0)]]), InvalidImageError, /header extension .* too large/);
    await expectOpenError(await variant(base.v3, [[first + 4, be32(0xffffffff)]]), InvalidImageError, /header extension .* too large/);
  });

  it('truncated files: header only, L1 table cut off', async () => {
    for (const size of [3, 50, 104, 4096]) {
      const p = await variant(base.v3);
      await truncate(p, size);
      await expectOpenError(p, InvalidImageError, /truncated|bad magic/, { format: 'qcow2' });
    }
    const p = await variant(base.v3);
    const h = await header(p);
    await truncate(p, Number(h.readBigUInt64BE(H.l1TableOffset)) + 4);
    await expectOpenError(p, InvalidImageError, /past the end of the file/);
  });
});

describe('feature bits (qemu-iotests 036 style)', () => {
  it('unknown incompatible bits are refused and named', async () => {
    await expectOpenError(await variant(base.v3, [[H.incompatible, be64(1n << 5n)]]), UnsupportedImageError, /unknown incompatible feature bit 5/);
    await expectOpenError(
      await variant(base.v3, [[H.incompatible, be64((1n << 63n) | (1n << 40n))]]),
      UnsupportedImageError,
      /bit 40, unknown incompatible feature bit 63/,
    );
  });

  it('uses the feature name table for the message', async () => {
    // Rewrite the first feature table entry to name incompatible bit 7.
    const head = await readFileRange(base.v3, 0, 64 * KiB);
    let off = head.readUInt32BE(H.headerLength);
    while (head.readUInt32BE(off) !== 0x6803f857) off += 8 + Math.ceil(head.readUInt32BE(off + 4) / 8) * 8;
    const entry = Buffer.alloc(48);
    entry[0] = 0; // incompatible
    entry[1] = 7;
    entry.write('my_future_feature', 2);
    const p = await variant(base.v3, [[off + 8, entry], [H.incompatible, be64((1n << 7n) | (1n << 9n))]]);
    await expectOpenError(p, UnsupportedImageError, /"my_future_feature" \(incompatible bit 7\), unknown incompatible feature bit 9/);
  });

  it('the corrupt bit needs force, and then the image reads like qemu-img', async () => {
    const p = await variant(base.v3, [[H.incompatible, be64(1n << 1n)]]);
    await expectOpenError(p, CorruptImageError, /corrupt/);
    const img = await openImage(p, { force: true });
    try {
      const expected = await convertToRaw(p);
      expect((await img.read(0, img.virtualSize)).equals(expected)).toBe(true);
    } finally {
      await img.close();
    }
  });

  it('the dirty bit is fine for reading', async () => {
    const p = await variant(base.v3, [[H.incompatible, be64(1n)]]);
    const img = await openImage(p);
    try {
      expect((await img.read(0, 4)).equals(Buffer.alloc(4, 0x11))).toBe(true);
    } finally {
      await img.close();
    }
  });

  it('compression type field and bit must agree', async () => {
    await expectOpenError(await variant(base.v3, [[H.compressionType, [1]]]), InvalidImageError, /compression type incompatible feature bit is not set/);
    await expectOpenError(await variant(base.v3, [[H.incompatible, be64(1n << 3n)]]), InvalidImageError, /compression_type is deflate/);
    await expectOpenError(
      await variant(base.v3, [[H.incompatible, be64(1n << 3n)], [H.compressionType, [7]]]),
      UnsupportedImageError,
      /unknown qcow2 compression type 7/,
    );
  });

  it('extended L2 entries need clusters of at least 16 KiB', async () => {
    await expectOpenError(await variant(base.extl2, [[H.clusterBits, be32(13)]]), InvalidImageError, /extended L2 entries need clusters/);
  });

  it('raw external data bit without a data file', async () => {
    await expectOpenError(await variant(base.v3, [[H.autoclear, be64(2n)]]), InvalidImageError, /raw external data bit/);
  });
});

describe('refused features', () => {
  it('LUKS encryption', async () => {
    let p = join(dir, 'luks.qcow2');
    try {
      await qemuImg([
        'create', '-q', '--object', 'secret,id=sec0,data=123456', '-f', 'qcow2',
        '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100', p, '4M',
      ]);
    } catch (err) {
      // QEMU's PBKDF timing fails on an overloaded host ("Unable to get
      // accurate CPU usage"): set crypt_method = 2 (LUKS) in a valid image.
      if (!/accurate CPU usage/.test((err as Error).message)) throw err;
      p = await variant(base.v3, [[H.cryptMethod, be32(2)]]);
    }
    await expectOpenError(p, UnsupportedImageError, /encrypted images are not supported \(LUKS/);
  });

  it('AES encryption (crypt_method 1)', async () => {
    await expectOpenError(await variant(base.v3, [[H.cryptMethod, be32(1)]]), UnsupportedImageError, /AES encryption/);
  });

  it('external data file', async () => {
    const p = join(dir, 'datafile.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, 'datafile.raw')}`, p, '4M']);
    await expectOpenError(p, UnsupportedImageError, /external data file/);
  });

  it('unknown backing format', async () => {
    const head = await readFileRange(base.backed, 0, 64 * KiB);
    const at = head.indexOf(Buffer.from('raw'), 112);
    await expectOpenError(await variant(base.backed, [[at, Buffer.from('xyz')]]), UnsupportedImageError, /backing file format "xyz"/);
  });
});

describe('mapping errors at read time (qemu-iotests 060 style)', () => {
  it('L2 table offset unaligned or past the end of the file', async () => {
    const { at, value } = await l1Entry(base.v3);
    await expectReadError(await variant(base.v3, [[at, be64(value + 512n)]]), InvalidImageError, /L2 table offset .* not cluster aligned/, 0, 4096, true);
    await expectReadError(
      await variant(base.v3, [[at, be64((1n << 63n) | (1n << 40n))]]),
      InvalidImageError,
      /L2 table at offset 0x10000000000 \(L1 index 0\) is past the end/,
      0,
      4096,
      true,
    );
  });

  it('data cluster unaligned, past the end of the file, or cut off', async () => {
    const at = await l2EntryAt(base.v3, 0);
    const value = (await readFileRange(base.v3, at, 8)).readBigUInt64BE(0);
    await expectReadError(await variant(base.v3, [[at, be64(value + 512n)]]), InvalidImageError, /guest offset 0x0 .* not cluster aligned/);
    await expectReadError(
      await variant(base.v3, [[at, be64((1n << 63n) | (1n << 44n))]]),
      InvalidImageError,
      /data for guest offset 0x0 .* past the end of the file/,
    );
    // The last data cluster (guest 1 MiB) cut in half.
    const p = await variant(base.v3);
    const last = (await readFileRange(p, await l2EntryAt(p, 16), 8)).readBigUInt64BE(0) & 0x00fffffffffffe00n;
    await truncate(p, Number(last) + 32 * KiB);
    await expectReadError(p, InvalidImageError, /data for guest offset 0x100000 .* past the end of the file/, 1 * MiB, 64 * KiB);
    const img = await openImage(p);
    try {
      expect((await img.read(0, 4)).equals(Buffer.alloc(4, 0x11))).toBe(true);
    } finally {
      await img.close();
    }
  });

  it('zero flag in a version 2 image', async () => {
    const at = await l2EntryAt(base.v2, 0);
    const value = (await readFileRange(base.v2, at, 8)).readBigUInt64BE(0);
    await expectReadError(await variant(base.v2, [[at, be64(value | 1n)]]), InvalidImageError, /zero cluster flag in a version 2 image/);
  });

  it('bad compressed descriptors and data (deflate and zstd)', async () => {
    for (const img of [base.zlib, base.zstd]) {
      const at = await l2EntryAt(img, 0);
      const value = (await readFileRange(img, at, 8)).readBigUInt64BE(0);
      expect(value >> 62n).toBe(1n);
      const x = 62n - (16n - 8n);
      expect((value >> x) & 0xffn).toBeGreaterThan(2n);
      const offsetMask = (1n << x) - 1n;
      const hostOffset = Number(value & offsetMask);
      // Offset past the end of the file.
      await expectReadError(
        await variant(img, [[at, be64((value & ~offsetMask) | (1n << 40n))]]),
        InvalidImageError,
        /bad compressed cluster descriptor for guest offset 0x0: data offset 0x10000000000 is past the end/,
        0,
        4096,
      );
      // Garbage in place of the compressed stream.
      await expectReadError(
        await variant(img, [[hostOffset, Buffer.alloc(64, 0xff)]]),
        InvalidImageError,
        /compressed cluster at guest offset 0x0 .* cannot be decompressed/,
        0,
        4096,
      );
      // Sector count 0: the stream is cut short.
      await expectReadError(
        await variant(img, [[at, be64(value & ~(0xffn << x))]]),
        InvalidImageError,
        /compressed cluster at guest offset 0x0 .* cannot be decompressed/,
        100,
        10,
      );
    }
  });

  it('compressed data cut off at the end of the file: agrees with qemu-img', async () => {
    // QEMU reads the missing tail of the last sector as zeros; if the stream
    // ended before the cut, the cluster still decompresses.
    for (const img of [base.zlib, base.zstd]) {
      for (const cut of [1, 64, 400, 3000]) {
        const p = await variant(img);
        const { size } = await stat(p);
        await truncate(p, size - cut);
        const expected = await convertToRaw(p).catch(() => undefined);
        const opened = await openImage(p);
        try {
          const got = await opened.read(0, opened.virtualSize).catch((e: unknown) => e);
          if (expected) expect(Buffer.isBuffer(got) && got.equals(expected)).toBe(true);
          else check(got, InvalidImageError, /cannot be decompressed|past the end/);
        } finally {
          await opened.close();
        }
      }
    }
  });

  it('crafted deflate streams in a cluster: same outcome as qemu-img', async () => {
    const { deflateRawSync, constants } = await import('node:zlib');
    const at = await l2EntryAt(base.zlib, 0);
    const value = (await readFileRange(base.zlib, at, 8)).readBigUInt64BE(0);
    const x = 54n; // 62 - (cluster_bits - 8) for 64 KiB clusters
    const coffset = Number(value & ((1n << x) - 1n));
    const room = (Number((value >> x) & 0xffn) + 1) * 512 - (coffset % 512);
    const cluster = Buffer.alloc(64 * KiB);
    for (let i = 0; i < cluster.length; i++) cluster[i] = 65 + ((i >> 3) % 7);
    const whole = deflateRawSync(cluster);
    const synced = deflateRawSync(cluster, { finishFlush: constants.Z_SYNC_FLUSH });
    const streams: Record<string, Buffer> = {
      exact: whole,
      longer: deflateRawSync(Buffer.concat([cluster, cluster])),
      finalThenGarbage: Buffer.concat([whole, Buffer.alloc(40, 0xc3)]),
      syncedThenZeros: Buffer.concat([synced, Buffer.alloc(16)]),
      syncedThenOnes: Buffer.concat([synced, Buffer.alloc(16, 0xff)]),
      shorter: deflateRawSync(cluster.subarray(0, 60 * KiB)),
      cut: whole.subarray(0, whole.length >> 1),
      random: Buffer.from(Array.from({ length: 300 }, (_, i) => (i * 89 + 17) & 0xff)),
    };
    for (const [name, stream] of Object.entries(streams)) {
      expect(stream.length).toBeLessThanOrEqual(room);
      const sectors = BigInt(Math.ceil(((coffset % 512) + stream.length) / 512) - 1);
      const p = await variant(base.zlib, [
        [coffset, stream],
        [at, be64((value & ~(0xffn << x)) | (sectors << x))],
      ]);
      const expected = await convertToRaw(p).catch(() => undefined);
      const img = await openImage(p);
      try {
        const got = await img.read(0, 64 * KiB).catch((e: unknown) => e);
        if (expected) {
          expect(Buffer.isBuffer(got) && got.equals(expected.subarray(0, 64 * KiB)), name).toBe(true);
        } else {
          check(got, InvalidImageError, /cannot be decompressed/);
        }
      } finally {
        await img.close();
      }
    }
  });

  it('compressed descriptor with host offset bits above 55 (512-byte clusters)', async () => {
    const at = await l2EntryAt(base.zlib512, 0);
    const value = (await readFileRange(base.zlib512, at, 8)).readBigUInt64BE(0);
    await expectReadError(await variant(base.zlib512, [[at, be64(value | (1n << 58n))]]), InvalidImageError, /host offset .* out of range/, 0, 512);
  });
});

describe('extended L2 bitmaps (qemu-iotests 271 style)', () => {
  const bitmapAt = async (path: string, cluster: number): Promise<number> => (await l2EntryAt(path, cluster, 16)) + 8;

  it('a subcluster both allocated and zero', async () => {
    const at = await bitmapAt(base.extl2, 0);
    const bitmap = (await readFileRange(base.extl2, at, 8)).readBigUInt64BE(0);
    expect(bitmap & 1n).toBe(1n);
    const p = await variant(base.extl2, [[at, be64(bitmap | (1n << 32n))]]);
    await expectReadError(p, InvalidImageError, /both allocated and reading as zeros/, 0, 4096, true);
  });

  it('allocated subclusters in an unallocated cluster', async () => {
    const at = await bitmapAt(base.extl2, 1);
    const p = await variant(base.extl2, [[at, be64(1n << 3n)]]);
    await expectReadError(p, InvalidImageError, /unallocated cluster with allocated subclusters/, 64 * KiB, 4096, true);
  });

  it('a compressed cluster with a non-zero bitmap', async () => {
    const entry = await l2EntryAt(base.extl2, 2, 16);
    expect((await readFileRange(base.extl2, entry, 8)).readBigUInt64BE(0) >> 62n).toBe(1n);
    const p = await variant(base.extl2, [[entry + 8, be64(1n << 33n)]]);
    await expectReadError(p, InvalidImageError, /compressed cluster with a non-zero subcluster bitmap/, 128 * KiB, 4096, true);
  });
});

/** True when qemu-img cannot convert the image (the oracle for "QEMU refuses it too"). */
async function qemuRefuses(path: string): Promise<boolean> {
  return convertToRaw(path).then(
    () => false,
    () => true,
  );
}

/** File offset of the first header extension of `type` (its type field). */
async function extensionAt(path: string, type: number): Promise<number> {
  const head = await readFileRange(path, 0, 64 * KiB);
  const version = head.readUInt32BE(H.version);
  let off = version >= 3 ? head.readUInt32BE(H.headerLength) : 72;
  while (head.readUInt32BE(off) !== type) {
    if (head.readUInt32BE(off) === 0) throw new Error(`no extension ${type.toString(16)} in ${path}`);
    off += 8 + Math.ceil(head.readUInt32BE(off + 4) / 8) * 8;
  }
  return off;
}

describe('reserved bits and alignment for every L1/L2 entry kind (qemu-img check rules)', () => {
  const entry = async (path: string, cluster: number, size = 8): Promise<{ at: number; value: bigint }> => {
    const at = await l2EntryAt(path, cluster, size);
    return { at, value: (await readFileRange(path, at, 8)).readBigUInt64BE(0) };
  };

  it('a zero cluster whose offset is misaligned is refused, as qemu-img refuses it', async () => {
    const { at, value } = await entry(base.v3, 0);
    // 0xffffffff: zero flag, reserved bits 1-8 and an unaligned offset.
    let p = await variant(base.v3, [[at, be64(0xffffffffn)]]);
    expect(await qemuRefuses(p)).toBe(true);
    await expectReadError(p, InvalidImageError, /invalid L2 entry 0x00000000ffffffff for guest offset 0x0 .*reserved bits/, 0, 4096, true);
    // Zero flag on a data cluster moved by one sector: no reserved bit, only misaligned.
    p = await variant(base.v3, [[at, be64((value + 512n) | 1n)]]);
    expect(await qemuRefuses(p)).toBe(true);
    await expectReadError(p, InvalidImageError, /host cluster offset 0x[0-9a-f]+ is not cluster aligned/, 0, 4096, true);
    // The same zero cluster with its offset aligned reads as zeros, as in qemu-img.
    p = await variant(base.v3, [[at, be64(value | 1n)]]);
    const img = await openImage(p);
    try {
      expect((await img.read(0, img.virtualSize)).equals(await convertToRaw(p))).toBe(true);
      expect((await img.read(0, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    } finally {
      await img.close();
    }
  });

  it('reserved bits in data, zero and unallocated entries', async () => {
    const { at: dataAt, value } = await entry(base.v3, 0);
    const { at: freeAt } = await entry(base.v3, 5);
    const cases: Array<[number, bigint, number]> = [
      [dataAt, value | (1n << 57n), 0],
      [dataAt, value | (1n << 4n), 0],
      [freeAt, 1n | (1n << 8n), 5 * 64 * KiB],
      [freeAt, 1n << 60n, 5 * 64 * KiB],
    ];
    for (const [at, v, guest] of cases) {
      await expectReadError(await variant(base.v3, [[at, be64(v)]]), InvalidImageError, /reserved bits are set/, guest, 4096, true);
    }
  });

  it('the copied flag: never on a compressed cluster, never with offset 0', async () => {
    const { at, value } = await entry(base.zlib, 0);
    await expectReadError(await variant(base.zlib, [[at, be64(value | (1n << 63n))]]), InvalidImageError, /compressed cluster with the copied flag/, 0, 4096);
    const { at: freeAt } = await entry(base.v3, 5);
    await expectReadError(await variant(base.v3, [[freeAt, be64(1n << 63n)]]), InvalidImageError, /offset 0 with the copied flag/, 5 * 64 * KiB, 4096);
  });

  it('extended L2 entries: bit 0 is reserved', async () => {
    const { at, value } = await entry(base.extl2, 0, 16);
    await expectReadError(await variant(base.extl2, [[at, be64(value | 1n)]]), InvalidImageError, /reserved bits are set/, 0, 4096, true);
  });

  it('reserved bits in an L1 entry', async () => {
    const { at, value } = await l1Entry(base.v3);
    for (const v of [value | 1n, value | (1n << 60n)]) {
      await expectReadError(await variant(base.v3, [[at, be64(v)]]), InvalidImageError, /invalid L1 entry 0x[0-9a-f]+ \(L1 index 0\): reserved bits are set/, 0, 4096, true);
    }
  });
});

describe('header extension lengths and contents', () => {
  let bitmapped = '';
  beforeAll(async () => {
    bitmapped = join(dir, 'bitmap.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', bitmapped, '1M']);
    await qemuIo(bitmapped, 'qcow2', ['write -P 0x11 0 64k']);
    await qemuImg(['bitmap', '--add', bitmapped, 'bm0']);
  });

  it('a bitmaps extension with a bad length is refused, as qemu-img refuses it', async () => {
    const at = await extensionAt(bitmapped, 0x23852875);
    for (const length of [16, 32]) {
      const p = await variant(bitmapped, [[at + 4, be32(length)]]);
      expect(await qemuRefuses(p)).toBe(true);
      await expectOpenError(p, InvalidImageError, new RegExp(`bitmaps header extension has a bad length \\(${length} bytes, expected 24\\)`));
    }
  });

  it('bitmaps extension fields and directory, checked when the autoclear bit says it is in use', async () => {
    const at = await extensionAt(bitmapped, 0x23852875);
    const dirOffset = Number((await readFileRange(bitmapped, at + 24, 8)).readBigUInt64BE(0));
    const cases: Array<[Array<[number, Buffer | number[]]>, RegExp]> = [
      [[[at + 8, be32(0)]], /nb_bitmaps is 0/],
      [[[at + 12, be32(1)]], /reserved field is not zero/],
      [[[at + 8, be32(2)]], /fewer bitmaps in the directory/],
      [[[at + 24, be64(BigInt(dirOffset + 512))]], /bitmap directory offset .* not cluster aligned/],
      // Directory entry: granularity_bits (byte 17) below 9, then a reserved flag.
      [[[dirOffset + 17, [8]]], /bitmap "bm0" has an invalid directory entry/],
      [[[dirOffset + 12, be32(1 << 5)]], /bitmap "bm0" has an invalid directory entry/],
      // Table offset far past any file (QEMU's read fails with EIO).
      [[[dirOffset, [0xf8]]], /bitmap "bm0" has its table at offset 0xf8[0-9a-f]+, out of range/],
    ];
    for (const [patches, pattern] of cases) {
      const p = await variant(bitmapped, patches);
      expect(await qemuRefuses(p)).toBe(true);
      await expectOpenError(p, InvalidImageError, pattern);
    }
    // The bitmap table: an entry with reserved bits.
    const tableOffset = Number((await readFileRange(bitmapped, dirOffset, 8)).readBigUInt64BE(0));
    const p = await variant(bitmapped, [[tableOffset, be64(1n << 60n)]]);
    expect(await qemuRefuses(p)).toBe(true);
    await expectOpenError(p, InvalidImageError, /bitmap "bm0" has an invalid table entry 0/);
    // Without autoclear bit 0 the extension is stale: QEMU ignores its contents, and so do we.
    const stale = await variant(bitmapped, [[H.autoclear, be64(0n)], [dirOffset + 17, [8]]]);
    expect(await qemuRefuses(stale)).toBe(false);
    const img = await openImage(stale);
    try {
      expect((await img.read(0, img.virtualSize)).equals(await convertToRaw(stale))).toBe(true);
    } finally {
      await img.close();
    }
  });

  it('feature name table, encryption header pointer, duplicates', async () => {
    const table = await extensionAt(base.v3, 0x6803f857);
    await expectOpenError(await variant(base.v3, [[table + 4, be32(47)]]), InvalidImageError, /feature name table header extension has a bad length \(47 bytes, expected a multiple of 48\)/);
    await expectOpenError(await variant(base.v3, [[table, be32(0x0537be77)], [table + 4, be32(8)]]), InvalidImageError, /full disk encryption header extension has a bad length \(8 bytes, expected 16\)/);
    const crypto = await variant(base.v3, [[table, be32(0x0537be77)], [table + 4, be32(16)]]);
    expect(await qemuRefuses(crypto)).toBe(true);
    await expectOpenError(crypto, InvalidImageError, /full disk encryption header extension but is not encrypted/);
    // A second backing format extension after the first.
    const fmt = await extensionAt(base.backed, 0xe2792aca);
    const head = await readFileRange(base.backed, fmt, 16);
    const end = fmt + 16;
    expect((await readFileRange(base.backed, end, 4)).readUInt32BE(0)).not.toBe(0xe2792aca);
    await expectOpenError(await variant(base.backed, [[end, head]]), InvalidImageError, /header extension 0xe2792aca appears more than once/);
  });
});

describe('snapshot table (QEMU refuses these at open)', () => {
  it('too much extra data, and a table that grows too big', async () => {
    const p = join(dir, 'snap.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', p, '1M']);
    await qemuIo(p, 'qcow2', ['write -P 0x11 0 64k']);
    await qemuImg(['snapshot', '-c', 'one', p]);
    const table = Number((await header(p)).readBigUInt64BE(H.snapshotsOffset));
    const extra = await variant(p, [[table + 36, be32(1025)]]);
    expect(await qemuRefuses(extra)).toBe(true);
    await expectOpenError(extra, InvalidImageError, /snapshot table entry 0 has too much extra data \(1025 bytes/);
    // 600 entries with the longest id and name (2 x 65535 bytes each) pass QEMU's 64 MiB limit.
    const big = await variant(p, [[H.nbSnapshots, be32(600)]]);
    const entry = Buffer.alloc(40);
    entry.writeUInt16BE(0xffff, 12);
    entry.writeUInt16BE(0xffff, 14);
    let at = table;
    for (let i = 0; i < 600; i++) {
      await patchFile(big, at, entry);
      at = Math.ceil((at + 40 + 2 * 0xffff) / 8) * 8;
    }
    expect(await qemuRefuses(big)).toBe(true);
    await expectOpenError(big, InvalidImageError, /snapshot table is too big \(more than 67108864 bytes at entry 5\d\d\)/);
    await rm(big);
  });
});

describe('backing names are resolved as the kernel does', () => {
  it('"sub/../name" needs sub to exist, as in qemu-img', async () => {
    const p = await variant(base.backed);
    const h = await header(p);
    const at = Number(h.readBigUInt64BE(H.backingFileOffset));
    const name = Buffer.from('sub/../backing.raw');
    await patchFile(p, at, name);
    await patchFile(p, H.backingFileSize, be32(name.length));
    expect(await qemuRefuses(p)).toBe(true);
    await expectOpenError(p, BackingChainError, /not found/);
    await mkdir(join(dir, 'sub'), { recursive: true });
    const img = await openImage(p);
    try {
      expect((await img.read(0, img.virtualSize)).equals(await convertToRaw(p))).toBe(true);
    } finally {
      await img.close();
      await rm(join(dir, 'sub'), { recursive: true });
    }
  });
});

describe('backing chains', () => {
  it('a cycle of two images, and an image backed by itself', async () => {
    const a = join(dir, 'cycle-a.qcow2');
    const b = join(dir, 'cycle-b.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', a, '1M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'cycle-a.qcow2', '-F', 'qcow2', b, '1M']);
    await qemuImg(['rebase', '-u', '-b', 'cycle-b.qcow2', '-F', 'qcow2', a]);
    await expectOpenError(a, BackingChainError, /cycle/);
    const self = join(dir, 'self.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', self, '1M']);
    await qemuImg(['rebase', '-u', '-b', 'self.qcow2', '-F', 'qcow2', self]);
    await expectOpenError(self, BackingChainError, /cycle/);
  });

  it('a chain deeper than the cap', async () => {
    let prev = join(dir, 'deep-0.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', prev, '1M']);
    for (let i = 1; i <= 17; i++) {
      const next = join(dir, `deep-${i}.qcow2`);
      await qemuImg(['create', '-q', '-f', 'qcow2', '-b', `deep-${i - 1}.qcow2`, '-F', 'qcow2', next, '1M']);
      prev = next;
    }
    await expectOpenError(prev, BackingChainError, /deeper than 16/);
    const img = await openImage(prev, { maxChainDepth: 20 });
    try {
      expect(img.layers()).toHaveLength(18);
    } finally {
      await img.close();
    }
  });

  it('protocol and json: backing names are refused', async () => {
    for (const name of ['nbd://example.com:10809/disk', 'json:{"driver":"file","filename":"/etc/passwd"}']) {
      const p = join(dir, `proto-${++counter}.qcow2`);
      await qemuImg(['create', '-q', '-f', 'qcow2', p, '1M']);
      await qemuImg(['rebase', '-u', '-b', name, '-F', 'raw', p]);
      await expectOpenError(p, BackingChainError, /refused/);
    }
  });

  it('a missing backing file', async () => {
    const p = join(dir, 'orphan.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', p, '1M']);
    await qemuImg(['rebase', '-u', '-b', 'no-such-file.raw', '-F', 'raw', p]);
    await expectOpenError(p, BackingChainError, /not found/);
  });
});

describe('cluster decompression edge cases', () => {
  const CLUSTER = 64 * KiB;
  const data = Buffer.alloc(CLUSTER);
  for (let i = 0; i < CLUSTER; i++) data[i] = (i * 131) & 0xff;

  /** A zstd frame of raw blocks (RFC 8878 3.1.1), optionally with a 4-byte content size. */
  function rawFrame(payload: Buffer, opts: { contentSize?: number | null; windowExp?: number; dict?: boolean } = {}): Buffer {
    const parts: Buffer[] = [be32(0xfd2fb528).reverse()];
    const fcs = opts.contentSize === undefined ? payload.length : opts.contentSize;
    // FHD: FCS flag 2 (4 bytes) or 0; no single segment, so a window descriptor follows.
    parts.push(Buffer.from([(fcs === null ? 0 : 0x80) | (opts.dict ? 1 : 0)]));
    parts.push(Buffer.from([(opts.windowExp ?? 6) << 3]));
    if (opts.dict) parts.push(Buffer.from([1]));
    if (fcs !== null) parts.push(be32(fcs).reverse());
    for (let off = 0; off < payload.length || off === 0; off += 32 * KiB) {
      const chunk = payload.subarray(off, off + 32 * KiB);
      const last = off + 32 * KiB >= payload.length ? 1 : 0;
      const bh = (chunk.length << 3) | last;
      parts.push(Buffer.from([bh & 0xff, (bh >> 8) & 0xff, (bh >> 16) & 0xff]), chunk);
      if (last) break;
    }
    return Buffer.concat(parts);
  }
  const rleFrame = (byte: number, size: number, blocks: number): Buffer => {
    const parts: Buffer[] = [be32(0xfd2fb528).reverse(), Buffer.from([0x00, 6 << 3])];
    for (let b = 0; b < blocks; b++) {
      const bh = (size << 3) | (1 << 1) | (b === blocks - 1 ? 1 : 0);
      parts.push(Buffer.from([bh & 0xff, (bh >> 8) & 0xff, (bh >> 16) & 0xff, byte]));
    }
    return Buffer.concat(parts);
  };

  it('zstd: frames, skippable frames and trailing bytes, as QEMU accepts them', async () => {
    const { decodeZstdCluster } = await import('../../src/image/qcow2/zstd.js');
    const libzstd = await (await import('../../src/image/qcow2/libzstd.js')).loadLibzstd();
    const { DecodePool } = await import('../../src/image/qcow2/decode-pool.js');
    const skippable = Buffer.concat([be32(0x184d2a53).reverse(), be32(5).reverse(), Buffer.from('hello')]);
    const good = [
      rawFrame(data),
      Buffer.concat([rawFrame(data), Buffer.from('trailing garbage up to the sector end')]),
      Buffer.concat([
        rawFrame(data.subarray(0, 32 * KiB)),
        skippable,
        rawFrame(data.subarray(32 * KiB), { contentSize: null }),
        Buffer.alloc(100, 0xee),
      ]),
      rleFrame(0x42, 16 * KiB, 4),
      // A large declared window does not matter when the content size is known.
      rawFrame(data, { windowExp: 20 }),
    ];
    const want = [data, data, data, Buffer.alloc(CLUSTER, 0x42), data];
    good.forEach((src, i) => expect(Buffer.from(decodeZstdCluster(src, CLUSTER, libzstd)).equals(want[i]!)).toBe(true));
    const bad: Array<[Buffer, RegExp]> = [
      [rawFrame(data.subarray(0, 32 * KiB)), /data ended after 32768 of 65536 bytes/],
      [rawFrame(Buffer.concat([data, data.subarray(0, 512)])), /more than one cluster/],
      [rawFrame(Buffer.concat([data, data.subarray(0, 512)]), { contentSize: null }), /more than one cluster/],
      [rleFrame(1, (1 << 21) - 1, 100000), /more than one cluster/],
      [rawFrame(data, { windowExp: 20, contentSize: null }), /window of \d+ bytes is too large/],
      [rawFrame(data, { dict: true }), /dictionary/],
      [rawFrame(data).subarray(0, 40000), /data ended/],
      [Buffer.concat([rawFrame(data).subarray(0, 10), Buffer.from([0x07, 0, 0]), Buffer.alloc(70000)]), /reserved block type/],
      [Buffer.alloc(600, 0xab), /bad frame magic/],
    ];
    for (const [src, pattern] of bad) expect(() => decodeZstdCluster(src, CLUSTER, libzstd)).toThrow(pattern);

    // The same through worker threads and through the inline fallback (a pool of size 0).
    for (const pool of [new DecodePool(2), new DecodePool(0)]) {
      const results = await pool.decodeMany('zstd', [...good, ...bad.map(([src]) => src)], CLUSTER);
      results.forEach((r, i) => {
        if (i < good.length) expect(Buffer.isBuffer(r) && r.equals(want[i]!)).toBe(true);
        else expect((r as Error).message).toMatch(bad[i - good.length]![1]);
      });
    }
  });

  it('deflate: trailing bytes are ignored; short, long and corrupt streams fail', async () => {
    const { deflateRawSync } = await import('node:zlib');
    const { inflateCluster, DecompressError } = await import('../../src/image/qcow2/decompress.js');
    const packed = deflateRawSync(data);
    for (const size of [CLUSTER, 4 * KiB]) {
      const cluster = data.subarray(0, size);
      const stream = deflateRawSync(cluster);
      expect((await inflateCluster(Buffer.concat([stream, Buffer.alloc(300, 0xaa)]), size) as Buffer).equals(cluster)).toBe(true);
    }
    const short = await inflateCluster(deflateRawSync(data.subarray(0, 1000)), CLUSTER);
    expect(short).toBeInstanceOf(DecompressError);
    expect((short as Error).message).toMatch(/produced 1000 bytes, expected 65536/);
    // Like QEMU, a stream that goes on after filling the cluster is cut there.
    const long = await inflateCluster(deflateRawSync(Buffer.concat([data, Buffer.alloc(CLUSTER * 3)])), CLUSTER);
    expect(Buffer.isBuffer(long) && long.equals(data)).toBe(true);
    const corrupt = await inflateCluster(Buffer.alloc(packed.length, 0xff), CLUSTER);
    expect((corrupt as Error).message).toMatch(/deflate data is invalid/);
    const cut = await inflateCluster(packed.subarray(0, packed.length >> 1), CLUSTER);
    expect((cut as Error).message).toMatch(/produced \d+ bytes, expected 65536/);
  });
});
