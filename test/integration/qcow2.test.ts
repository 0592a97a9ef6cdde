/**
 * qcow2 reader correctness: every byte read() returns must equal
 * `qemu-img convert -O raw` of the same image, and extents() must agree
 * with `qemu-img map`. Fixtures are generated here with qemu-img/qemu-io.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage } from '../../src/image/open.js';
import { Qcow2Image } from '../../src/image/qcow2/image.js';
import type { DiskImage, Extent } from '../../src/image/types.js';
import { InvalidImageError } from '../../src/errors.js';
import {
  be32,
  convertToRaw,
  patchFile,
  qemuImg,
  qemuImgMap,
  qemuIo,
  readFileRange,
  removeTmpDir,
  tmpDir,
} from '../helpers/qemu.js';
import { prng } from '../helpers/random.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let root: string;


/**
 * A raw file mixing incompressible random data, compressible text, zeros
 * and byte patterns, so that conversion yields data, compressed and
 * unallocated clusters.
 */
async function writeMixedRaw(path: string, size: number): Promise<void> {
  const buf = Buffer.alloc(size);
  const text = Buffer.from('bootcache qcow2 reader fixture text, fairly compressible. ');
  for (let off = 0, i = 0; off < size; off += MiB, i++) {
    const n = Math.min(MiB, size - off);
    switch (i % 4) {
      case 0:
        randomBytes(n).copy(buf, off);
        break;
      case 1:
        for (let p = off; p < off + n; p += text.length) text.copy(buf, p, 0, Math.min(text.length, off + n - p));
        break;
      case 2:
        break; // zeros
      case 3:
        buf.fill(i & 0xff, off, off + n / 2);
        randomBytes(n / 4).copy(buf, off + n / 2);
        break;
    }
  }
  await writeFile(path, buf);
}

function firstMismatch(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

function expectSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  if (actual.equals(expected)) return;
  const at = firstMismatch(actual, expected);
  expect.fail(`${what}: differs at byte ${at} (got ${actual[at]}, want ${expected[at]}; lengths ${actual.length}/${expected.length})`);
}

/** Reads the image in chunks of `chunk` bytes from `start`, comparing with `expected`. */
async function compareChunks(img: DiskImage, expected: Buffer, start: number, chunk: number): Promise<void> {
  for (let off = start; off < expected.length; off += chunk) {
    const n = Math.min(chunk, expected.length - off);
    expectSameBytes(await img.read(off, n), expected.subarray(off, off + n), `read(${off}, ${n})`);
  }
}

/** The full byte comparison against qemu-img convert. */
async function checkBytes(path: string): Promise<void> {
  const expected = await convertToRaw(path);
  const img = await openImage(path);
  try {
    expect(img.virtualSize).toBe(expected.length);
    expectSameBytes(await img.read(0, expected.length), expected, 'whole-image read');
    await compareChunks(img, expected, 0, 4 * MiB);
    await compareChunks(img, expected, 0, 7919);
    await compareChunks(img, expected, 12345, 1 * MiB + 3);
    await compareChunks(img, expected, 511, 65537 * 3);
    const rand = prng(expected.length);
    for (let i = 0; i < 150; i++) {
      const off = Math.floor(rand() * expected.length);
      const n = Math.min(expected.length - off, 1 + Math.floor(rand() * 300 * KiB));
      expectSameBytes(await img.read(off, n), expected.subarray(off, off + n), `random read(${off}, ${n})`);
    }
    // Concurrent reads share caches and pending loads.
    const parallel = await Promise.all(
      Array.from({ length: 16 }, (_, k) => {
        const off = Math.floor((expected.length / 16) * k) + 333;
        const n = Math.min(expected.length - off, 200 * KiB);
        return img.read(off, n).then((b) => ({ off, b }));
      }),
    );
    for (const { off, b } of parallel) expectSameBytes(b, expected.subarray(off, off + b.length), `parallel read(${off})`);
  } finally {
    await img.close();
  }
}

type Kind = Extent['kind'];

/**
 * extents() against `qemu-img map`: data:true -> 'data'; present but not
 * data -> 'zero'; not present -> 'unallocated'; the same depth (the layer
 * that decides the range). Also checks coverage and merging.
 */
async function checkExtents(path: string): Promise<void> {
  const map = await qemuImgMap(path);
  const img = await openImage(path);
  try {
    const extents = await img.extents(0, img.virtualSize);
    let pos = 0;
    for (let i = 0; i < extents.length; i++) {
      const e = extents[i]!;
      expect(e.offset).toBe(pos);
      expect(e.length).toBeGreaterThan(0);
      if (i > 0) expect([e.kind, e.depth]).not.toEqual([extents[i - 1]!.kind, extents[i - 1]!.depth]);
      pos += e.length;
    }
    expect(pos).toBe(img.virtualSize);

    // Holes in a raw layer are 'data' for bootcache's raw reader (it does not probe holes).
    const layers = img.layers();
    const want = (m: (typeof map)[number]): Kind =>
      m.data || (m.present !== false && layers[m.depth]?.format === 'raw')
        ? 'data'
        : m.present === false
          ? 'unallocated'
          : 'zero';
    let k = 0;
    for (const m of map) {
      const mEnd = m.start + m.length;
      while (k < extents.length && extents[k]!.offset + extents[k]!.length <= m.start) k++;
      for (let j = k; j < extents.length && extents[j]!.offset < mEnd; j++) {
        const e = extents[j]!;
        if (e.kind !== want(m) || e.depth !== m.depth) {
          expect.fail(
            `extent ${e.kind} at depth ${e.depth}, [${e.offset}, ${e.offset + e.length}) overlaps qemu-img map ${JSON.stringify(m)} (want ${want(m)} at depth ${m.depth})`,
          );
        }
      }
    }
    // Sub-ranges agree with the whole-disk answer.
    const rand = prng(7);
    for (let i = 0; i < 20; i++) {
      const off = Math.floor(rand() * img.virtualSize);
      const len = Math.min(img.virtualSize - off, 1 + Math.floor(rand() * 3 * MiB));
      const part = await img.extents(off, len);
      expect(part[0]!.offset).toBe(off);
      const last = part[part.length - 1]!;
      expect(last.offset + last.length).toBe(off + len);
      for (const e of part) {
        const whole = extents.find((x) => x.offset <= e.offset && e.offset < x.offset + x.length)!;
        expect([e.kind, e.depth]).toEqual([whole.kind, whole.depth]);
      }
    }
  } finally {
    await img.close();
  }
}

/** Changes the type of the header extension `from` to `to` (v3 header, first cluster). */
async function retypeExtension(path: string, from: number, to: number): Promise<void> {
  const head = await readFileRange(path, 0, 64 * KiB);
  let off = head.readUInt32BE(100); // header_length
  for (;;) {
    const type = head.readUInt32BE(off);
    const len = head.readUInt32BE(off + 4);
    if (type === 0) throw new Error(`extension ${from.toString(16)} not found in ${path}`);
    if (type === from) {
      await patchFile(path, off, be32(to));
      return;
    }
    off += 8 + Math.ceil(len / 8) * 8;
  }
}

interface Fixture {
  name: string;
  path: string;
}

const fixtures: Fixture[] = [];

async function fixture(name: string, build: (path: string) => Promise<void>, at?: string): Promise<string> {
  const path = at ?? join(root, `${name}.qcow2`);
  await build(path);
  fixtures.push({ name, path });
  return path;
}

/** Common pattern writes: partial clusters, zeros, discards, unaligned ranges. */
function patternCmds(size: number): string[] {
  return [
    'write -P 0xaa 100k 3k',
    `write -P 0x5a ${size - 1 * MiB} 512k`,
    'write -P 0x33 1048064 1536',
    'write -z 1M 128k',
    'write -z -u 2M 64k',
    'discard 3M 192k',
    'write -P 0x77 5M 4k',
    'write -z 5M 2k',
  ];
}

const CHAIN = { base: '', mid: '', top: '', topZstd: '' };

beforeAll(async () => {
  root = await tmpDir('bootcache-qcow2-');
  const mixed32 = join(root, 'mixed32.raw');
  await writeMixedRaw(mixed32, 32 * MiB);
  const mixed16 = join(root, 'mixed16.raw');
  await writeMixedRaw(mixed16, 16 * MiB);

  await fixture('v3-64k', async (p) => {
    await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=64k', mixed32, p]);
    await qemuIo(p, 'qcow2', patternCmds(32 * MiB));
  });
  await fixture('v2-64k', async (p) => {
    await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'compat=0.10,cluster_size=64k', mixed32, p]);
    await qemuIo(p, 'qcow2', ['write -P 0xaa 100k 3k', 'write -z 1M 128k', 'discard 3M 192k', 'write -P 0x11 20M 1M']);
  });
  await fixture('v3-512', async (p) => {
    await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', mixed16, p]);
    await qemuIo(p, 'qcow2', patternCmds(16 * MiB));
  });
  await fixture('v3-2m', async (p) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', p, '64M']);
    await qemuIo(p, 'qcow2', [
      'write -P 0x01 0 1M',
      'write -P 0x02 3M 5M',
      'write -z 4M 2M',
      'write -z -u 6M 2M',
      'write -P 0x03 63M 1M',
      'discard 40M 4M',
      'write -P 0x04 41M 4k',
    ]);
  });
  await fixture('v3-odd-size', async (p) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', p, `${9 * MiB + 5 * 512}`]);
    await qemuIo(p, 'qcow2', ['write -P 0x21 0 64k', `write -P 0x22 ${9 * MiB} 2560`]);
  });
  for (const [name, opts, src] of [
    ['zlib-64k', 'cluster_size=64k', mixed32],
    ['zlib-2m', 'cluster_size=2M', mixed32],
    ['zlib-512', 'cluster_size=512', mixed16],
    ['zstd-64k', 'cluster_size=64k,compression_type=zstd', mixed32],
    ['zstd-2m', 'cluster_size=2M,compression_type=zstd', mixed32],
    ['zstd-512', 'cluster_size=512,compression_type=zstd', mixed16],
  ] as const) {
    await fixture(name, (p) => qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', opts, src, p]).then(() => undefined));
  }
  await fixture('zstd-rewritten', async (p) => {
    await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', mixed32, p]);
    // Partial writes into compressed clusters, compressed writes, zeros.
    await qemuIo(p, 'qcow2', [
      'write -P 0x61 1040k 8k',
      'write -c -P 0x62 2M 128k',
      'write -c 6M 64k',
      'write -z 1M 64k',
      'write -P 0x63 4100k 1k',
    ]);
  });
  await fixture('zlib-v2-qemu-io', async (p) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', p, '16M']);
    await qemuIo(p, 'qcow2', ['write -c -P 0x41 0 64k', 'write -c -P 0x42 128k 256k', 'write -P 0x43 200k 1k', 'write -c 1M 64k']);
  });

  // Extended L2 entries over a raw backing file: unallocated subclusters show the backing data.
  const extBase = join(root, 'extl2-base.raw');
  await writeFile(extBase, randomBytes(16 * MiB));
  await fixture('extl2-backed', async (p) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'extl2-base.raw', '-F', 'raw', p, '20M']);
    await qemuIo(p, 'qcow2', [
      'write -P 0x11 0 4k',
      'write -P 0x22 6k 2k',
      'write -z 8k 4k',
      'write -z -u 64k 64k',
      'write -z 130k 2k',
      'write -z -u 140k 6k',
      'discard 192k 64k',
      'write -P 0x44 256k 128k',
      'write -c -P 0x55 1M 64k',
      'write -P 0x66 2050k 2k',
      'write -P 0x67 17M 10k',
      'write -z 18M 4k',
    ]);
  });
  await fixture('extl2-2m', async (p) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=2M', p, '32M']);
    await qemuIo(p, 'qcow2', [
      'write -P 0x11 0 64k',
      'write -P 0x12 192k 128k',
      'write -z 1M 64k',
      'write -P 0x13 2M 2M',
      'write -z 2560k 64k',
      'write -z -u 3M 128k',
      'write -c -P 0x14 8M 2M',
      'write -P 0x15 31M 100k',
    ]);
  });

  // A three-layer chain in sibling directories: base.raw <- mid.qcow2 (v2) <- top.qcow2,
  // with relative backing names, growing sizes (the top is larger than its backing).
  for (const d of ['base', 'mid', 'top']) await mkdir(join(root, 'chain', d), { recursive: true });
  CHAIN.base = join(root, 'chain', 'base', 'base.raw');
  CHAIN.mid = join(root, 'chain', 'mid', 'mid.qcow2');
  CHAIN.top = join(root, 'chain', 'top', 'top.qcow2');
  CHAIN.topZstd = join(root, 'chain', 'top', 'top-zstd.qcow2');
  await writeMixedRaw(CHAIN.base, 8 * MiB);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', '-b', '../base/base.raw', '-F', 'raw', CHAIN.mid, '16M']);
  await qemuIo(CHAIN.mid, 'qcow2', ['write -P 0x11 1M 64k', 'write -P 0x12 7M 2M', 'write -P 0x13 12M 100k', 'write -z 3M 64k']);
  await fixture('chain-top', async (p) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', '../mid/mid.qcow2', '-F', 'qcow2', p, '24M']);
    await qemuIo(p, 'qcow2', [
      'write -z 2M 64k',
      'discard 4M 64k',
      'write -P 0x22 20M 64k',
      'write -z 10M 64k',
      'write -P 0x23 1030k 4k',
      'write -z 7200k 8k',
      'write -P 0x24 8190k 8k',
    ]);
  }, CHAIN.top);
  await fixture('chain-top-zstd', async (p) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', '-b', '../mid/mid.qcow2', '-F', 'qcow2', p, '16M']);
    await qemuIo(p, 'qcow2', ['write -c -P 0x31 0 256k', 'write -c 9M 1M', 'write -P 0x32 15M 64k']);
  }, CHAIN.topZstd);
  fixtures.push({ name: 'chain-mid', path: CHAIN.mid });

  // -F raw on a backing file that is itself qcow2: it must be read as raw bytes, not probed.
  const inner = join(root, 'raw-trick-inner.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', inner, '4M']);
  await qemuIo(inner, 'qcow2', ['write -P 0x99 0 1M']);
  await fixture('raw-trick', async (p) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'raw-trick-inner.qcow2', '-F', 'raw', p]);
    await qemuIo(p, 'qcow2', ['write -P 0x98 64k 64k']);
  });
  // No backing format extension: the backing file is probed.
  await fixture('no-backing-format', async (p) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'raw-trick-inner.qcow2', '-F', 'qcow2', p, '8M']);
    // Turn the backing format extension into an unknown one (which must be skipped).
    await retypeExtension(p, 0xe2792aca, 0x7a7a7a7a);
    await qemuIo(p, 'qcow2', ['write -P 0x97 2M 64k']);
  });
}, 600_000);

afterAll(async () => {
  if (root) await removeTmpDir(root);
});

describe('qcow2 reader: bytes equal qemu-img convert', () => {
  const names = [
    'v3-64k', 'v2-64k', 'v3-512', 'v3-2m', 'v3-odd-size',
    'zlib-64k', 'zlib-2m', 'zlib-512', 'zstd-64k', 'zstd-2m', 'zstd-512', 'zstd-rewritten', 'zlib-v2-qemu-io',
    'extl2-backed', 'extl2-2m', 'chain-top', 'chain-top-zstd', 'chain-mid', 'raw-trick', 'no-backing-format',
  ];
  it('has built every fixture', () => {
    expect(fixtures.map((f) => f.name).sort()).toEqual([...names].sort());
  });
  for (const name of names) {
    it(`${name}: read() matches byte for byte`, async () => {
      await checkBytes(fixtures.find((f) => f.name === name)!.path);
    });
    it(`${name}: extents() agree with qemu-img map`, async () => {
      await checkExtents(fixtures.find((f) => f.name === name)!.path);
    });
  }
});

describe('qcow2 reader: layers, identity, chain', () => {
  it('reports the chain, top first, with header details', async () => {
    const img = await openImage(CHAIN.top);
    try {
      expect(img.format).toBe('qcow2');
      expect(img.virtualSize).toBe(24 * MiB);
      const layers = img.layers();
      expect(layers.map((l) => l.format)).toEqual(['qcow2', 'qcow2', 'raw']);
      expect(layers.map((l) => l.virtualSize)).toEqual([24 * MiB, 16 * MiB, 8 * MiB]);
      expect(layers[0]).toMatchObject({
        name: CHAIN.top,
        version: 3,
        clusterSize: 64 * KiB,
        compressionType: 'zlib',
        extendedL2: true,
        backingFile: '../mid/mid.qcow2',
        backingFormat: 'qcow2',
      });
      expect(layers[1]).toMatchObject({ version: 2, extendedL2: false, backingFile: '../base/base.raw', backingFormat: 'raw' });
      expect(layers[2]!.name.endsWith('base.raw')).toBe(true);
      // top wrote ~150 KiB of data; mid ~2.2 MiB.
      expect(layers[0]!.allocatedBytes).toBeGreaterThan(0);
      expect(layers[0]!.allocatedBytes).toBeLessThan(1 * MiB);
      expect(layers[1]!.allocatedBytes).toBeGreaterThanOrEqual(2 * MiB);
      expect(layers[1]!.allocatedBytes).toBeLessThan(3 * MiB);
      for (const layer of layers) {
        expect(layer.stamp).toMatch(/^\d+:/);
        expect(layer.metadata).toMatch(/^[0-9a-f]{64}$/);
      }
      expect(img.identity).toMatch(/^[0-9a-f]{64}$/);
    } finally {
      await img.close();
    }
  });

  it('reports compression type and compressed allocation', async () => {
    const img = await openImage(fixtures.find((f) => f.name === 'zstd-64k')!.path);
    try {
      const [layer] = img.layers();
      expect(layer).toMatchObject({ compressionType: 'zstd', version: 3, extendedL2: false });
      expect(layer!.backingFile).toBeUndefined();
      // 32 MiB of which a quarter is zeros and much is compressible.
      expect(layer!.allocatedBytes).toBeGreaterThan(8 * MiB);
      expect(layer!.allocatedBytes).toBeLessThan(24 * MiB);
    } finally {
      await img.close();
    }
  });

  it('identity is stable across opens and changes when any layer changes', async () => {
    const dir = join(root, 'ident');
    await mkdir(dir);
    const base = join(dir, 'base.raw');
    const top = join(dir, 'top.qcow2');
    await writeFile(base, randomBytes(1 * MiB));
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', top]);
    const identityOf = async (): Promise<string> => {
      const img = await openImage(top);
      const id = img.identity;
      await img.close();
      return id;
    };
    const first = await identityOf();
    expect(await identityOf()).toBe(first);
    await new Promise((r) => setTimeout(r, 20));
    await qemuIo(base, 'raw', ['write -P 0x01 0 512']);
    const second = await identityOf();
    expect(second).not.toBe(first);
    await qemuIo(top, 'qcow2', ['write -P 0x02 0 512']);
    expect(await identityOf()).not.toBe(second);
  });

  it('Qcow2Image.open hands the backing format to openBacking (raw is never probed)', async () => {
    const calls: Array<[string, string | undefined]> = [];
    const { FileByteSource } = await import('../../src/image/file-source.js');
    const { RawImage } = await import('../../src/image/raw.js');
    const source = await FileByteSource.open(fixtures.find((f) => f.name === 'raw-trick')!.path);
    const img = await Qcow2Image.open(source, {
      force: false,
      openBacking: async (name, format) => {
        calls.push([name, format]);
        return RawImage.open(await FileByteSource.open(join(root, name)));
      },
    });
    try {
      expect(calls).toEqual([['raw-trick-inner.qcow2', 'raw']]);
      expect(img.layers().map((l) => l.format)).toEqual(['qcow2', 'raw']);
    } finally {
      await img.close();
    }
  });

  it('the buffer LRU keeps its byte budget, its minimum entries and recency order', async () => {
    const { BufferLru } = await import('../../src/image/qcow2/lru.js');
    const lru = new BufferLru<number>(3000, 2);
    for (let k = 0; k < 5; k++) lru.set(k, Buffer.alloc(1000, k));
    expect(lru.size).toBe(3);
    expect(lru.get(0)).toBeUndefined();
    expect(lru.get(2)![0]).toBe(2); // 2 becomes the most recent
    lru.set(5, Buffer.alloc(1000));
    expect(lru.get(3)).toBeUndefined();
    expect(lru.get(2)).toBeDefined();
    const big = new BufferLru<number>(100, 2);
    big.set(1, Buffer.alloc(1000));
    big.set(2, Buffer.alloc(1000));
    big.set(3, Buffer.alloc(1000));
    expect(big.size).toBe(2);
    expect(big.get(1)).toBeUndefined();
  });

  it('opens an empty (0-byte) disk', async () => {
    const p = join(root, 'empty.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', p, '0']);
    const img = await openImage(p);
    try {
      expect(img.virtualSize).toBe(0);
      expect((await img.read(0, 0)).length).toBe(0);
      expect(await img.extents(0, 0)).toEqual([]);
    } finally {
      await img.close();
    }
  });

  it('rejects reads outside the virtual disk and reads after close', async () => {
    const img = await openImage(CHAIN.top);
    await expect(img.read(img.virtualSize - 10, 11)).rejects.toBeInstanceOf(InvalidImageError);
    await expect(img.read(-1, 1)).rejects.toBeInstanceOf(InvalidImageError);
    await expect(img.extents(0, img.virtualSize + 1)).rejects.toBeInstanceOf(InvalidImageError);
    expect((await img.read(5, 0)).length).toBe(0);
    expect(await img.extents(5, 0)).toEqual([]);
    await img.close();
    await img.close();
    await expect(img.read(0, 1)).rejects.toBeInstanceOf(InvalidImageError);
  });
});
