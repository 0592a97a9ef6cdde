/**
 * Mutant qcow2 images for the fuzz test: small images made by qemu-img
 * (several cluster sizes, v2 and v3, backing files, deflate and zstd compression,
 * extended L2 entries, an internal snapshot, a persistent bitmap), then one
 * metadata mutation each: header fields, header extensions, L1 and L2
 * entries, refcount structures, the backing file name, snapshot table, bit
 * flips in metadata clusters, truncation. The payload of compressed clusters
 * and data clusters is never touched.
 *
 * The layout parser here is independent of src/image/qcow2, so a bug there
 * cannot hide in the generator. Mutant i of seed s is the same on every run.
 */
import { copyFile, readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { prng } from './random.js';
import { patchFile, qemuImg, qemuIo } from './qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;

export interface BaseImage {
  name: string;
  path: string;
  /** True when the image has a backing file (the backing name can be mutated). */
  backed: boolean;
}

/** Backing files the bases use, and names a mutated backing name may take. */
const BACKING_RAW = 'backing.raw';
const BACKING_QCOW2 = 'backing.qcow2';

/** Pseudo-random letters: compressible, several sectors per compressed cluster. */
function text(bytes: number, seed: number): Buffer {
  const out = Buffer.alloc(bytes);
  const rnd = prng(seed);
  for (let i = 0; i < bytes; i++) out[i] = 97 + Math.floor(rnd() * 16);
  return out;
}

/** Makes the base images in `dir` (a few MiB in all). */
export async function makeBaseImages(dir: string): Promise<BaseImage[]> {
  const bases: BaseImage[] = [];
  const add = (name: string, backed = false): string => {
    const path = join(dir, `${name}.qcow2`);
    bases.push({ name, path, backed });
    return path;
  };
  const writes = ['write -P 0x11 0 96k', 'write -P 0x22 300k 8k', 'write -z 512k 64k', 'write -P 0x33 1M 64k', 'discard 1M 32k'];

  let p = add('v3-64k');
  await qemuImg(['create', '-q', '-f', 'qcow2', p, '2M']);
  await qemuIo(p, 'qcow2', writes);

  p = add('v2-64k');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', p, '2M']);
  await qemuIo(p, 'qcow2', ['write -P 0x11 0 96k', 'write -P 0x22 300k 8k', 'write -P 0x33 1M 64k']);

  p = add('v3-4k');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', p, '4M']);
  await qemuIo(p, 'qcow2', [...writes, 'write -P 0x44 2100k 12k']);

  p = add('v3-512');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=1', p, '256k']);
  await qemuIo(p, 'qcow2', ['write -P 0x11 0 5k', 'write -z 8k 2k', 'write -P 0x55 100k 1k']);

  const raw = join(dir, 'text.raw');
  await writeFile(raw, text(1 * MiB, 7));
  p = add('zlib-64k');
  await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', raw, p]);
  p = add('zlib-4k');
  await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, p]);
  p = add('zstd-64k');
  await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', raw, p]);
  // 512-byte clusters: the compressed offset field reaches past bit 55 ("Compressed Clusters Descriptor").
  const small = join(dir, 'text-small.raw');
  await writeFile(small, text(192 * KiB, 8));
  p = add('zlib-512');
  await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', small, p]);

  p = add('extl2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', p, '2M']);
  await qemuIo(p, 'qcow2', ['write -P 0x11 0 4k', 'write -P 0x12 12k 6k', 'write -z 64k 4k', 'write -c -P 0x33 128k 64k', 'write -P 0x44 256k 64k']);

  await writeFile(join(dir, BACKING_RAW), text(1 * MiB, 9));
  p = add('backed-raw', true);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', BACKING_RAW, '-F', 'raw', p, '2M']);
  await qemuIo(p, 'qcow2', ['write -P 0x66 64k 64k', 'write -z 256k 64k']);

  const bq = join(dir, BACKING_QCOW2);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', bq, '1M']);
  await qemuIo(bq, 'qcow2', ['write -P 0x77 0 200k']);
  p = add('backed-qcow2', true);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', BACKING_QCOW2, '-F', 'qcow2', p, '2M']);
  await qemuIo(p, 'qcow2', ['write -P 0x78 8k 4k', 'write -z 40k 8k']);

  p = add('snapshot');
  await qemuImg(['create', '-q', '-f', 'qcow2', p, '1M']);
  await qemuIo(p, 'qcow2', ['write -P 0x11 0 64k']);
  await qemuImg(['snapshot', '-c', 'snap1', p]);
  await qemuIo(p, 'qcow2', ['write -P 0x12 0 4k', 'write -P 0x13 128k 64k']);

  p = add('bitmap');
  await qemuImg(['create', '-q', '-f', 'qcow2', p, '1M']);
  await qemuIo(p, 'qcow2', ['write -P 0x11 0 64k']);
  await qemuImg(['bitmap', '--add', p, 'bm0']);
  return bases;
}

/** Where the metadata of an image is (parsed here, not by the reader under test). */
export interface Layout {
  fileSize: number;
  version: number;
  clusterBits: number;
  clusterSize: number;
  extendedL2: boolean;
  headerLength: number;
  /** Header extensions: offset of the type field, type, length. */
  extensions: Array<{ at: number; type: number; length: number }>;
  /** Where the extension area ends (the backing name, or the end of the first cluster). */
  extensionsEnd: number;
  backingOffset: number;
  backingSize: number;
  l1Offset: number;
  l1Size: number;
  l2Tables: number[];
  l2EntrySize: number;
  /** File offsets of the L2 entries of compressed clusters. */
  compressedEntries: number[];
  refTableOffset: number;
  refTableClusters: number;
  refBlocks: number[];
  snapshotsOffset: number;
  nbSnapshots: number;
  /** The bitmap directory, when the bitmaps extension is there. */
  bitmapDirectory?: { offset: number; size: number };
}

/** Header field offsets and sizes ("Header" in qcow2.rst); v3: version 3 only. */
export const HEADER_FIELDS: ReadonlyArray<{ name: string; at: number; size: 4 | 8; v3?: boolean }> = (
  'magic:0:4 version:4:4 backing_file_offset:8:8 backing_file_size:16:4 cluster_bits:20:4 size:24:8 ' +
  'crypt_method:32:4 l1_size:36:4 l1_table_offset:40:8 refcount_table_offset:48:8 refcount_table_clusters:56:4 ' +
  'nb_snapshots:60:4 snapshots_offset:64:8 incompatible_features:72:8:v3 compatible_features:80:8:v3 ' +
  'autoclear_features:88:8:v3 refcount_order:96:4:v3 header_length:100:4:v3'
)
  .split(' ')
  .map((spec) => {
    const [name, at, size, v3] = spec.split(':');
    return { name: name!, at: Number(at), size: Number(size) as 4 | 8, v3: v3 === 'v3' };
  });

const OFFSET_MASK = 0x00fffffffffffe00n;

export function parseLayout(file: Buffer): Layout {
  const u32 = (at: number): number => file.readUInt32BE(at);
  const u64 = (at: number): number => Number(file.readBigUInt64BE(at));
  const version = u32(4);
  const clusterBits = u32(20);
  const clusterSize = 2 ** clusterBits;
  const incompatible = version >= 3 ? file.readBigUInt64BE(72) : 0n;
  const extendedL2 = ((incompatible >> 4n) & 1n) === 1n;
  const headerLength = version >= 3 ? u32(100) : 72;
  const backingOffset = u64(8);
  const layout: Layout = {
    fileSize: file.length,
    version,
    clusterBits,
    clusterSize,
    extendedL2,
    headerLength,
    extensions: [],
    extensionsEnd: backingOffset !== 0 ? backingOffset : clusterSize,
    backingOffset,
    backingSize: u32(16),
    l1Offset: u64(40),
    l1Size: u32(36),
    l2Tables: [],
    l2EntrySize: extendedL2 ? 16 : 8,
    compressedEntries: [],
    refTableOffset: u64(48),
    refTableClusters: u32(56),
    refBlocks: [],
    snapshotsOffset: u64(64),
    nbSnapshots: u32(60),
  };
  for (let at = headerLength; at + 8 <= layout.extensionsEnd; ) {
    const type = u32(at);
    const length = u32(at + 4);
    layout.extensions.push({ at, type, length });
    if (type === 0) break;
    if (type === 0x23852875 && length === 24) {
      layout.bitmapDirectory = { size: u64(at + 16), offset: u64(at + 24) };
    }
    at += 8 + Math.ceil(length / 8) * 8;
  }
  for (let i = 0; i < layout.l1Size; i++) {
    const l2 = Number(file.readBigUInt64BE(layout.l1Offset + i * 8) & OFFSET_MASK);
    if (l2 === 0) continue;
    layout.l2Tables.push(l2);
    for (let e = 0; e < clusterSize; e += layout.l2EntrySize) {
      if (((file.readBigUInt64BE(l2 + e) >> 62n) & 1n) === 1n) layout.compressedEntries.push(l2 + e);
    }
  }
  for (let i = 0; i < (layout.refTableClusters * clusterSize) / 8; i++) {
    const block = Number(file.readBigUInt64BE(layout.refTableOffset + i * 8) & ~0x1ffn);
    if (block !== 0) layout.refBlocks.push(block);
  }
  return layout;
}

/** One mutant: a copy of a base with byte patches and possibly a truncation. */
export interface Mutant {
  index: number;
  base: BaseImage;
  /** What was changed, for the report (enough to rebuild it by hand). */
  description: string;
  patches: Array<{ at: number; bytes: Buffer }>;
  truncateTo?: number;
}

const be32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
};
const be64 = (n: bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt.asUintN(64, n));
  return b;
};
const hex = (n: number | bigint): string => `0x${n.toString(16)}`;

type Rng = () => number;
const pick = <T>(rnd: Rng, items: readonly T[]): T => items[Math.floor(rnd() * items.length)]!;
const int = (rnd: Rng, n: number): number => Math.floor(rnd() * n);
const random64 = (rnd: Rng): bigint => (BigInt(int(rnd, 2 ** 32)) << 32n) | BigInt(int(rnd, 2 ** 32));

/** Values worth trying for a field that now holds `value` (bits wide). */
function interesting(rnd: Rng, value: bigint, bits: 32 | 64, layout: Layout): bigint {
  const cs = BigInt(layout.clusterSize);
  const choices: Array<() => bigint> = [
    () => 0n,
    () => 1n,
    () => value ^ (1n << BigInt(int(rnd, bits))),
    () => value + 1n,
    () => value - 1n,
    () => value + 512n,
    () => value + cs,
    () => value - cs,
    () => value * 2n,
    () => 1n << BigInt(int(rnd, bits)),
    () => (1n << BigInt(bits)) - 1n,
    () => BigInt(layout.fileSize),
    () => BigInt(layout.fileSize) - cs,
    () => (bits === 64 ? random64(rnd) : BigInt(int(rnd, 2 ** 32))),
    () => BigInt(int(rnd, 64)),
  ];
  return BigInt.asUintN(bits, pick(rnd, choices)());
}

/** Hash of (seed, index) for per-mutant generators. */
function mix(seed: number, index: number): number {
  let h = (seed ^ Math.imul(index + 1, 0x9e3779b1)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b) >>> 0;
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

type Mutation = (rnd: Rng, file: Buffer, layout: Layout, base: BaseImage) => Omit<Mutant, 'index' | 'base'> | undefined;

const headerField: Mutation = (rnd, file, layout) => {
  const fields = HEADER_FIELDS.filter((f) => !f.v3 || layout.version >= 3);
  const extra = layout.version >= 3 && layout.headerLength > 104 ? [{ name: 'compression_type', at: 104, size: 1 as const }] : [];
  const f = pick(rnd, [...fields, ...extra]);
  if (f.size === 1) {
    const v = pick(rnd, [1, 2, 0xff, int(rnd, 256)]);
    return { description: `header ${f.name} = ${v}`, patches: [{ at: f.at, bytes: Buffer.from([v]) }] };
  }
  const old = f.size === 8 ? file.readBigUInt64BE(f.at) : BigInt(file.readUInt32BE(f.at));
  let v = interesting(rnd, old, f.size === 8 ? 64 : 32, layout);
  if (f.name.endsWith('_features') && rnd() < 0.6) v = old ^ (1n << BigInt(int(rnd, 8)));
  return { description: `header ${f.name} ${hex(old)} -> ${hex(v)}`, patches: [{ at: f.at, bytes: f.size === 8 ? be64(v) : be32(Number(v)) }] };
};

const KNOWN_EXTENSIONS = [0xe2792aca, 0x6803f857, 0x23852875, 0x0537be77, 0x44415441];

const headerExtension: Mutation = (rnd, file, layout) => {
  const exts = layout.extensions;
  const last = exts[exts.length - 1];
  const kind = int(rnd, 5);
  if (kind === 0 && exts.length > 0) {
    const e = pick(rnd, exts);
    const type = pick(rnd, [...KNOWN_EXTENSIONS, 0, int(rnd, 2 ** 32)]);
    return { description: `extension at ${e.at}: type ${hex(e.type)} -> ${hex(type)}`, patches: [{ at: e.at, bytes: be32(type) }] };
  }
  if (kind === 1 && exts.length > 0) {
    const e = pick(rnd, exts);
    const length = Number(interesting(rnd, BigInt(e.length), 32, layout) & (rnd() < 0.7 ? 0x3ffn : 0xffffffffn));
    return { description: `extension ${hex(e.type)} at ${e.at}: length ${e.length} -> ${length}`, patches: [{ at: e.at + 4, bytes: be32(length) }] };
  }
  if (kind === 2 && last !== undefined) {
    // A new known extension in place of the end marker, then a new end marker.
    const type = pick(rnd, KNOWN_EXTENSIONS);
    const length = pick(rnd, [0, 8, 15, 16, 23, 24, 25, 48, 96, int(rnd, 200)]);
    const data = Buffer.alloc(Math.ceil(length / 8) * 8);
    const fill = int(rnd, 3);
    for (let i = 0; i < data.length; i++) data[i] = fill === 0 ? 0 : fill === 1 ? int(rnd, 256) : 97 + int(rnd, 26);
    if (type === 0x23852875 && length >= 24 && rnd() < 0.5) {
      // Plausible bitmaps fields: one bitmap, directory at some cluster.
      data.writeUInt32BE(1, 0);
      data.writeUInt32BE(0, 4);
      data.writeBigUInt64BE(BigInt(pick(rnd, [0, 24, 64, 4096])), 8);
      data.writeBigUInt64BE(BigInt(layout.clusterSize * int(rnd, 4)), 16);
    }
    const bytes = Buffer.concat([be32(type), be32(length), data, Buffer.alloc(8)]);
    if (last.at + bytes.length > layout.extensionsEnd) return undefined;
    return { description: `extension ${hex(type)} (length ${length}) added at ${last.at}`, patches: [{ at: last.at, bytes }] };
  }
  if (kind === 3 && exts.length > 1) {
    // A copy of the first extension in place of the end marker: a duplicate.
    const first = exts[0]!;
    const size = 8 + Math.ceil(first.length / 8) * 8;
    const bytes = Buffer.concat([file.subarray(first.at, first.at + size), Buffer.alloc(8)]);
    if (last!.at + bytes.length > layout.extensionsEnd) return undefined;
    return { description: `extension ${hex(first.type)} duplicated at ${last!.at}`, patches: [{ at: last!.at, bytes }] };
  }
  // Bytes inside an extension's data.
  const e = pick(rnd, exts.filter((x) => x.length > 0).concat(exts.length ? [] : []));
  if (e === undefined) return undefined;
  const at = e.at + 8 + int(rnd, e.length);
  const v = int(rnd, 256);
  return { description: `extension ${hex(e.type)} data byte ${at} -> ${hex(v)}`, patches: [{ at, bytes: Buffer.from([v]) }] };
};

const l1Entry: Mutation = (rnd, file, layout) => {
  if (layout.l1Size === 0) return undefined;
  const i = int(rnd, layout.l1Size);
  const at = layout.l1Offset + i * 8;
  const old = file.readBigUInt64BE(at);
  const cs = BigInt(layout.clusterSize);
  const other = layout.l2Tables.length ? BigInt(pick(rnd, layout.l2Tables)) : 0n;
  const v = pick(rnd, [
    () => 0n,
    () => old ^ (1n << BigInt(int(rnd, 64))),
    () => old + 512n,
    () => old + cs,
    () => old | (1n << BigInt(56 + int(rnd, 7))),
    () => old | BigInt(1 + int(rnd, 511)),
    () => (1n << 63n) | other,
    () => (1n << 63n) | BigInt(layout.l1Offset),
    () => (1n << 63n) | BigInt(layout.refTableOffset),
    () => (1n << 63n) | (BigInt(layout.fileSize) & ~(cs - 1n)),
    () => random64(rnd),
  ])();
  return { description: `L1[${i}] ${hex(old)} -> ${hex(BigInt.asUintN(64, v))}`, patches: [{ at, bytes: be64(v) }] };
};

const l2Entry: Mutation = (rnd, file, layout) => {
  if (layout.l2Tables.length === 0) return undefined;
  const table = pick(rnd, layout.l2Tables);
  const entries = layout.clusterSize / layout.l2EntrySize;
  // Prefer entries in use: they are the ones a read reaches.
  let index = int(rnd, entries);
  for (let tries = 0; tries < 8 && file.readBigUInt64BE(table + index * layout.l2EntrySize) === 0n && rnd() < 0.8; tries++) {
    index = int(rnd, Math.min(entries, 64));
  }
  const at = table + index * layout.l2EntrySize;
  const old = file.readBigUInt64BE(at);
  const cs = BigInt(layout.clusterSize);
  if (layout.extendedL2 && rnd() < 0.4) {
    const bitmapAt = at + 8;
    const oldBitmap = file.readBigUInt64BE(bitmapAt);
    const sc = BigInt(int(rnd, 32));
    const v = pick(rnd, [
      () => oldBitmap ^ (1n << BigInt(int(rnd, 64))),
      () => oldBitmap | (1n << sc) | (1n << (sc + 32n)),
      () => 0xffffffffn,
      () => 0xffffffff00000000n,
      () => 0n,
      () => random64(rnd),
      () => oldBitmap << 32n,
    ])();
    return { description: `L2 bitmap ${hex(table)}[${index}] ${hex(oldBitmap)} -> ${hex(BigInt.asUintN(64, v))}`, patches: [{ at: bitmapAt, bytes: be64(v) }] };
  }
  const compressed = ((old >> 62n) & 1n) === 1n;
  const x = BigInt(62 - (layout.clusterBits - 8));
  const v = pick(rnd, [
    () => old ^ (1n << BigInt(int(rnd, 64))),
    () => old | 1n,
    () => 0xffffffffn,
    () => old & ~1n,
    () => 1n,
    () => 1n | (1n << 63n),
    () => old | (1n << 62n),
    () => old ^ (1n << 63n),
    () => old + 512n,
    () => old + cs,
    () => old - cs,
    () => old | BigInt(1 + int(rnd, 511)),
    () => old | (1n << BigInt(56 + int(rnd, 6))),
    () => (1n << 63n) | BigInt(pick(rnd, [layout.l1Offset, layout.refTableOffset, 0, table])),
    () => (1n << 63n) | (BigInt(layout.fileSize) & ~(cs - 1n)),
    // Compressed descriptor: sector count and offset (the data itself is left alone).
    () => (compressed ? old ^ (1n << (x + BigInt(int(rnd, 62 - Number(x))))) : old),
    () => (compressed ? old + BigInt(1 + int(rnd, 64)) : old),
    () => (compressed ? old & ~((1n << 62n) - (1n << x)) : old),
    () => random64(rnd),
  ])();
  return { description: `L2 ${hex(table)}[${index}] ${hex(old)} -> ${hex(BigInt.asUintN(64, v))}`, patches: [{ at, bytes: be64(v) }] };
};

const refcounts: Mutation = (rnd, file, layout) => {
  if (rnd() < 0.5 || layout.refBlocks.length === 0) {
    const n = (layout.refTableClusters * layout.clusterSize) / 8;
    const i = int(rnd, Math.min(n, 8));
    const at = layout.refTableOffset + i * 8;
    const old = file.readBigUInt64BE(at);
    const v = interesting(rnd, old, 64, layout);
    return { description: `refcount table[${i}] ${hex(old)} -> ${hex(v)}`, patches: [{ at, bytes: be64(v) }] };
  }
  const block = pick(rnd, layout.refBlocks);
  const at = block + int(rnd, Math.min(layout.clusterSize, 256));
  const v = int(rnd, 256);
  return { description: `refcount block ${hex(block)} byte ${at} -> ${hex(v)}`, patches: [{ at, bytes: Buffer.from([v]) }] };
};

const backingName: Mutation = (rnd, file, layout, base) => {
  if (!base.backed || layout.backingOffset === 0) return undefined;
  const name = pick(rnd, ['missing.raw', BACKING_RAW, BACKING_QCOW2, 'file:backing.raw', 'json:{}', '', 'backing.raw\0x', 'sub/../backing.raw', 'b'.repeat(300)]);
  const bytes = Buffer.from(name, 'latin1');
  const room = layout.clusterSize - layout.backingOffset;
  if (bytes.length > room) return undefined;
  const patches = [{ at: layout.backingOffset, bytes }, { at: 16, bytes: be32(bytes.length) }];
  return { description: `backing file name -> ${JSON.stringify(name)}`, patches };
};

const snapshotTable: Mutation = (rnd, file, layout) => {
  if (layout.nbSnapshots === 0) return undefined;
  // "Snapshot table entry": offsets of the fixed fields of the first entry.
  const fields: Array<[string, number, 2 | 4 | 8]> = [
    ['l1_table_offset', 0, 8], ['l1_size', 8, 4], ['id_str_size', 12, 2], ['name_size', 14, 2],
    ['vm_state_size', 32, 4], ['extra_data_size', 36, 4], ['vm_state_size_large', 40, 8], ['disk_size', 48, 8],
  ];
  const [name, off, size] = pick(rnd, fields);
  const at = layout.snapshotsOffset + off;
  const old = size === 8 ? file.readBigUInt64BE(at) : BigInt(size === 4 ? file.readUInt32BE(at) : file.readUInt16BE(at));
  const v = interesting(rnd, old, size === 8 ? 64 : 32, layout) & ((1n << BigInt(size * 8)) - 1n);
  const bytes = Buffer.alloc(size);
  if (size === 8) bytes.writeBigUInt64BE(v);
  else if (size === 4) bytes.writeUInt32BE(Number(v));
  else bytes.writeUInt16BE(Number(v));
  return { description: `snapshot[0].${name} ${hex(old)} -> ${hex(v)}`, patches: [{ at, bytes }] };
};

const bitmapDirectory: Mutation = (rnd, _file, layout) => {
  const dir = layout.bitmapDirectory;
  if (dir === undefined) return undefined;
  const at = dir.offset + int(rnd, Math.max(1, dir.size));
  const v = int(rnd, 256);
  return { description: `bitmap directory byte ${at} -> ${hex(v)}`, patches: [{ at, bytes: Buffer.from([v]) }] };
};

/** Metadata clusters: header, L1, L2, refcount table and blocks, snapshot table, bitmap directory. */
function metadataRanges(layout: Layout): Array<[number, number]> {
  const cs = layout.clusterSize;
  const ranges: Array<[number, number]> = [[0, Math.min(cs, layout.fileSize)]];
  ranges.push([layout.l1Offset, layout.l1Offset + layout.l1Size * 8]);
  for (const t of layout.l2Tables) ranges.push([t, t + cs]);
  ranges.push([layout.refTableOffset, layout.refTableOffset + layout.refTableClusters * cs]);
  for (const b of layout.refBlocks) ranges.push([b, b + cs]);
  if (layout.nbSnapshots > 0) ranges.push([layout.snapshotsOffset, layout.snapshotsOffset + 64]);
  if (layout.bitmapDirectory) ranges.push([layout.bitmapDirectory.offset, layout.bitmapDirectory.offset + layout.bitmapDirectory.size]);
  return ranges.filter(([a, b]) => b > a && b <= layout.fileSize);
}

const metadataFlips: Mutation = (rnd, file, layout) => {
  const ranges = metadataRanges(layout);
  const [a, b] = pick(rnd, ranges);
  // Flips land near the start of a table most of the time: that is where the used entries are.
  const span = rnd() < 0.7 ? Math.min(b - a, 512) : b - a;
  const patches: Array<{ at: number; bytes: Buffer }> = [];
  const parts: string[] = [];
  const n = 1 + int(rnd, 4);
  for (let k = 0; k < n; k++) {
    const at = a + int(rnd, span);
    const bit = int(rnd, 8);
    const prev = patches.find((p) => p.at === at)?.bytes[0] ?? file[at]!;
    patches.push({ at, bytes: Buffer.from([prev ^ (1 << bit)]) });
    parts.push(`${at}.${bit}`);
  }
  return { description: `bit flips in ${hex(a)}..${hex(b)} at ${parts.join(' ')}`, patches };
};

const truncation: Mutation = (rnd, _file, layout) => {
  const cs = layout.clusterSize;
  const to = pick(rnd, [
    () => int(rnd, Math.min(layout.fileSize, cs + 1)),
    () => layout.fileSize - 1 - int(rnd, Math.min(layout.fileSize - 1, 4 * cs)),
    () => Math.floor(layout.fileSize / 2),
    () => int(rnd, layout.fileSize),
    () => layout.l1Offset + int(rnd, Math.max(1, layout.l1Size * 8)),
  ])();
  return { description: `truncated to ${to} of ${layout.fileSize} bytes`, patches: [], truncateTo: to };
};

const MUTATIONS: Array<[Mutation, number]> = [
  [headerField, 18],
  [headerExtension, 12],
  [l1Entry, 10],
  [l2Entry, 28],
  [refcounts, 5],
  [backingName, 5],
  [snapshotTable, 4],
  [bitmapDirectory, 3],
  [metadataFlips, 15],
  [truncation, 5],
];
const TOTAL_WEIGHT = MUTATIONS.reduce((s, [, w]) => s + w, 0);

/** Mutant `index` of `seed` over `bases` (whose file contents and layouts are given). */
export function makeMutant(seed: number, index: number, bases: Array<{ base: BaseImage; file: Buffer; layout: Layout }>): Mutant {
  const rnd = prng(mix(seed, index));
  for (;;) {
    const { base, file, layout } = pick(rnd, bases);
    const mutation = pickMutation(rnd);
    const m = mutation(rnd, file, layout, base);
    if (m === undefined) continue;
    // One mutant in five stacks a second mutation on the first (e.g. size and l1_size).
    if (rnd() < 0.2 && m.truncateTo === undefined) {
      const second = pickMutation(rnd)(rnd, file, layout, base);
      if (second !== undefined) {
        return {
          index,
          base,
          description: `${m.description}; ${second.description}`,
          patches: [...m.patches, ...second.patches],
          ...(second.truncateTo !== undefined ? { truncateTo: second.truncateTo } : {}),
        };
      }
    }
    return { index, base, ...m };
  }
}

function pickMutation(rnd: Rng): Mutation {
  let w = rnd() * TOTAL_WEIGHT;
  for (const [m, weight] of MUTATIONS) if ((w -= weight) < 0) return m;
  return MUTATIONS[0]![0];
}

/** Writes mutant `m` to `path`. */
export async function writeMutant(m: Mutant, path: string): Promise<void> {
  await copyFile(m.base.path, path);
  for (const p of m.patches) await patchFile(path, p.at, p.bytes);
  if (m.truncateTo !== undefined) await truncate(path, m.truncateTo);
}

/** Reads the bases back with their layouts, ready for makeMutant. */
export async function loadBases(bases: BaseImage[]): Promise<Array<{ base: BaseImage; file: Buffer; layout: Layout }>> {
  return Promise.all(
    bases.map(async (base) => {
      const file = await readFile(base.path);
      return { base, file, layout: parseLayout(file) };
    }),
  );
}
