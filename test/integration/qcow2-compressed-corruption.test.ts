/**
 * Single-bit flips inside compressed clusters (zstd and deflate, 4 KiB and
 * 64 KiB clusters), at every position class of a zstd frame: frame header,
 * first block header, literals, sequences, and the frame's last bytes. The
 * oracle is QEMU (qemu-img convert, libzstd and zlib underneath): for every
 * mutant bootcache returns exactly QEMU's bytes, or fails where QEMU fails.
 * A mutant where bootcache returns bytes QEMU does not is a wrong byte, and
 * there must be none.
 */
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage } from '../../src/image/open.js';
import { qemuImg, removeTmpDir, tmpDir } from '../helpers/qemu.js';

let dir: string;
beforeAll(async () => {
  dir = await tmpDir('bootcache-compressed-flip-');
});
afterAll(async () => {
  await removeTmpDir(dir);
});

/** Compressible but varied data: text-like runs and random runs. */
function guestData(size: number): Buffer {
  const out = Buffer.alloc(size);
  const words = ['boot', 'kernel', 'initrd', 'systemd', 'grub', 'block', 'cache ', 'segment\n', 'map'];
  let at = 0;
  let seed = 7;
  const rnd = (): number => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32;
  while (at < size) {
    if (rnd() < 0.15) {
      const n = Math.min(size - at, 64 + Math.floor(rnd() * 512));
      randomBytes(n).copy(out, at);
      at += n;
    } else {
      at += out.write(words[Math.floor(rnd() * words.length)]!, at);
    }
  }
  return out;
}

interface CompressedCluster {
  guest: number;
  host: number;
  /** Bytes from host to the end of its last 512-byte sector (spec: "Compressed Clusters Descriptor"). */
  length: number;
}

/** Compressed clusters from the L1/L2 tables (docs/interop/qcow2.rst, "Cluster mapping"). */
function compressedClusters(file: Buffer): CompressedCluster[] {
  const clusterBits = file.readUInt32BE(20);
  const clusterSize = 2 ** clusterBits;
  const l1Size = file.readUInt32BE(36);
  const l1Offset = Number(file.readBigUInt64BE(40));
  const l2Entries = clusterSize / 8;
  // Compressed descriptor: x = 62 - (cluster_bits - 8); bits 0..x-1 host offset, x..61 extra sectors.
  const x = 62n - BigInt(clusterBits - 8);
  const out: CompressedCluster[] = [];
  for (let i = 0; i < l1Size; i++) {
    // L1 entry bits 9-55: L2 table offset.
    const l2 = Number(file.readBigUInt64BE(l1Offset + 8 * i) & 0x00fffffffffffe00n);
    if (l2 === 0) continue;
    for (let j = 0; j < l2Entries; j++) {
      const e = file.readBigUInt64BE(l2 + 8 * j);
      if (((e >> 62n) & 1n) === 0n) continue; // bit 62: compressed
      const host = Number(e & ((1n << x) - 1n));
      const sectors = Number((e >> x) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
      out.push({ guest: (i * l2Entries + j) * clusterSize, host, length: sectors * 512 - (host % 512) });
    }
  }
  return out;
}

/** zstd frame header length (RFC 8878 3.1.1.1), to aim flips at the header and the first block header. */
function zstdHeaderLength(b: Buffer): number {
  const d = b[4]!;
  const single = (d >> 5) & 1;
  const fcs = [single, 2, 4, 8][d >> 6]!;
  return 5 + (single ? 0 : 1) + [0, 1, 2, 4][d & 3]! + fcs;
}

/** Byte positions to flip in one compressed cluster, by class. */
function flipPositions(type: 'zstd' | 'zlib', c: Buffer): Array<[string, number]> {
  // The data ends before the sector's zero padding: aim the end flips at the last non-zero bytes.
  let end = c.length;
  while (end > 1 && c[end - 1] === 0) end--;
  const at = (f: number): number => Math.min(end - 1, Math.floor(end * f));
  const hl = type === 'zstd' ? zstdHeaderLength(c) : 0;
  return [
    ['frame header', type === 'zstd' ? 4 + (hl > 5 ? 1 : 0) : 0],
    ['block header', type === 'zstd' ? hl : 1],
    ['literals', at(0.2)],
    ['literals', at(0.35)],
    ['sequences', at(0.7)],
    ['sequences', at(0.85)],
    ['end', end - 2],
    ['end', end - 1],
  ];
}

async function bootcacheRead(path: string, size: number): Promise<Buffer | Error> {
  try {
    const img = await openImage(path, { format: 'qcow2' });
    try {
      return await img.read(0, size);
    } finally {
      await img.close();
    }
  } catch (err) {
    return err as Error;
  }
}

async function qemuRead(path: string, out: string): Promise<Buffer | Error> {
  try {
    await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', path, out]);
    return await readFile(out);
  } catch (err) {
    return err as Error;
  }
}

describe('bit flips in compressed clusters', () => {
  for (const [type, clusterSize] of [['zstd', 4096], ['zstd', 65536], ['zlib', 4096], ['zlib', 65536]] as const) {
    it(`${type}, ${clusterSize / 1024} KiB clusters: the same bytes as QEMU or an error where QEMU fails, never wrong bytes`, async () => {
      const size = 1024 * 1024;
      const raw = join(dir, `${type}-${clusterSize}.raw`);
      const img = join(dir, `${type}-${clusterSize}.qcow2`);
      await writeFile(raw, guestData(size));
      await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type},cluster_size=${clusterSize}`, raw, img]);
      const file = await readFile(img);
      const clusters = compressedClusters(file);
      expect(clusters.length).toBeGreaterThan(4);
      // Up to 12 clusters spread over the image, 8 positions each, 2 bits each.
      const step = Math.max(1, Math.floor(clusters.length / 12));
      const counts = { mutants: 0, agree: 0, bothRefuse: 0, stricter: 0, wrong: 0 };
      const mutant = join(dir, `${type}-${clusterSize}.mutant.qcow2`);
      const qemuOut = join(dir, `${type}-${clusterSize}.mutant.raw`);
      for (let k = 0; k < clusters.length; k += step) {
        const c = clusters[k]!;
        const bytes = file.subarray(c.host, c.host + c.length);
        for (const [, pos] of flipPositions(type, bytes)) {
          for (const bit of [0, 5]) {
            const m = Buffer.from(file);
            m[c.host + pos]! ^= 1 << bit;
            await writeFile(mutant, m);
            const [ours, theirs] = [await bootcacheRead(mutant, size), await qemuRead(mutant, qemuOut)];
            counts.mutants++;
            if (ours instanceof Error && theirs instanceof Error) counts.bothRefuse++;
            else if (ours instanceof Error) counts.stricter++;
            else if (theirs instanceof Error || !ours.equals(theirs)) counts.wrong++;
            else counts.agree++;
          }
        }
      }
      console.log(`${type} ${clusterSize}: ${JSON.stringify(counts)}`);
      expect(counts.wrong).toBe(0);
      expect(counts.stricter).toBe(0);
      expect(counts.mutants).toBeGreaterThan(60);
    });
  }
});
