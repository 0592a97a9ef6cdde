/**
 * Bounded fuzz test of the qcow2 reader against qemu-img: mutants of small
 * generated images (test/helpers/qcow2-mutants.ts), each read whole by
 * bootcache and converted by `qemu-img convert -O raw`. Outcomes:
 *   same      both succeed with identical bytes
 *   refused   both refuse (bootcache with a coded one-line error)
 *   stricter  qemu-img reads it, bootcache refuses with a coded error
 *   wrong     bootcache's bytes differ, or it returns data where qemu-img fails
 *   bad       bootcache throws an uncoded or multi-line error, or hangs
 * wrong and bad must be 0. FUZZ_COUNT and FUZZ_SEED set the run (`npm run
 * fuzz` passes them); the seed is printed so a failure can be replayed, and
 * FUZZ_ONLY=i,j replays single mutants.
 */
import { execFile } from 'node:child_process';
import { open, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { BootcacheError } from '../../src/errors.js';
import { openImage } from '../../src/image/open.js';
import type { DiskImage } from '../../src/image/types.js';
import { loadBases, makeBaseImages, makeMutant, writeMutant, type Layout, type BaseImage, type Mutant } from '../helpers/qcow2-mutants.js';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';

const COUNT = Number(process.env.FUZZ_COUNT ?? 500);
const SEED = Number(process.env.FUZZ_SEED ?? 0x5eed18);
const ONLY = process.env.FUZZ_ONLY?.split(',').map(Number);
/** Mutants in flight: qemu-img and bootcache each take one core. */
const CONCURRENCY = 2;
/** A bootcache open + read that takes longer than this is counted as a hang. */
const HANG_MS = 60_000;
/** qemu-img gets as long; beyond it the mutant is left out (counted as such). */
const ORACLE_MS = 60_000;
/** Whole-disk comparison up to this size; larger disks compare the ranges either side maps. */
const FULL_COMPARE = 64 * 1024 * 1024;
const CHUNK = 4 * 1024 * 1024;

type Outcome = 'same' | 'refused' | 'stricter' | 'wrong' | 'bad' | 'oracleTimeout';

let dir: string;
let bases: Array<{ base: BaseImage; file: Buffer; layout: Layout }>;

beforeAll(async () => {
  dir = await tmpDir('bootcache-qcow2-fuzz-');
  bases = await loadBases(await makeBaseImages(dir));
}, 300_000);

afterAll(async () => {
  if (dir) await removeTmpDir(dir);
});

/** qemu-img convert -O raw; undefined when qemu-img refuses, 'timeout' past ORACLE_MS. */
function qemuConvert(image: string, out: string): Promise<{ ok: boolean; message: string } | 'timeout'> {
  return new Promise((resolve) => {
    execFile('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, out], { timeout: ORACLE_MS }, (err, _stdout, stderr) => {
      if (err && (err as { killed?: boolean }).killed) resolve('timeout');
      else resolve({ ok: !err, message: stderr.trim().split('\n')[0] ?? '' });
    });
  });
}

/** qemu-img's data ranges of a raw file (holes read as zeros). */
function rawDataRanges(file: string): Promise<Array<[number, number]>> {
  return new Promise((resolve, reject) => {
    execFile('qemu-img', ['map', '-f', 'raw', '--output=json', file], { maxBuffer: 64 << 20 }, (err, stdout) => {
      if (err) return reject(err);
      const entries = JSON.parse(stdout) as Array<{ start: number; length: number; data: boolean }>;
      resolve(entries.filter((e) => e.data).map((e) => [e.start, e.start + e.length]));
    });
  });
}

/** Guest ranges to compare: all of a small disk; what either side maps on a large one. */
async function compareRanges(img: DiskImage, raw: string): Promise<Array<[number, number]>> {
  const size = img.virtualSize;
  if (size <= FULL_COMPARE) return [[0, size]];
  const ranges: Array<[number, number]> = [[0, CHUNK], [Math.max(0, size - CHUNK), size]];
  for (const e of await img.extents(0, size)) if (e.kind !== 'unallocated') ranges.push([e.offset, e.offset + e.length]);
  ranges.push(...(await rawDataRanges(raw)));
  return ranges.map(([a, b]): [number, number] => [a, Math.min(b, size)]);
}

/** First guest offset where bootcache and the raw file differ, or -1. */
async function firstDifference(img: DiskImage, raw: string): Promise<number> {
  const { size } = await stat(raw);
  if (size !== img.virtualSize) return Math.min(size, img.virtualSize);
  const handle = await open(raw, 'r');
  try {
    const expected = Buffer.alloc(CHUNK);
    for (const [a, b] of await compareRanges(img, raw)) {
      for (let at = a; at < b; at += CHUNK) {
        const n = Math.min(CHUNK, b - at);
        const got = await img.read(at, n);
        await handle.read(expected, 0, n, at);
        if (!got.equals(expected.subarray(0, n))) {
          for (let i = 0; i < n; i++) if (got[i] !== expected[i]) return at + i;
        }
      }
    }
    return -1;
  } finally {
    await handle.close();
  }
}

/**
 * Reads every guest byte of a small disk; of a large one, the mapping of the
 * whole disk (extents check every L1 and L2 entry) and the mapped ranges.
 */
async function readWhole(img: DiskImage): Promise<void> {
  const size = img.virtualSize;
  const ranges: Array<[number, number]> = [];
  if (size <= FULL_COMPARE) ranges.push([0, size]);
  else for (const e of await img.extents(0, size)) if (e.kind === 'data') ranges.push([e.offset, e.offset + e.length]);
  for (const [a, b] of ranges) for (let at = a; at < b; at += CHUNK) await img.read(at, Math.min(CHUNK, b - at));
}

interface Result {
  mutant: Mutant;
  outcome: Outcome;
  detail: string;
}

async function runMutant(m: Mutant): Promise<Result> {
  const path = join(dir, `m${m.index}.qcow2`);
  const raw = join(dir, `m${m.index}.raw`);
  await writeMutant(m, path);
  try {
    const qemu = await qemuConvert(path, raw);
    if (qemu === 'timeout') return { mutant: m, outcome: 'oracleTimeout', detail: 'qemu-img convert timed out' };
    let timer: NodeJS.Timeout | undefined;
    const hang = new Promise<'hang'>((resolve) => (timer = setTimeout(() => resolve('hang'), HANG_MS)));
    const ours = (async (): Promise<{ diff: number } | { error: unknown }> => {
      let img: DiskImage | undefined;
      try {
        img = await openImage(path, { format: 'qcow2' });
        if (!qemu.ok) {
          // qemu-img refused: bootcache must refuse too, at open or on some read.
          await readWhole(img);
          return { diff: 0 };
        }
        return { diff: await firstDifference(img, raw) };
      } catch (error) {
        return { error };
      } finally {
        await img?.close().catch(() => undefined);
      }
    })();
    const got = await Promise.race([ours, hang]);
    clearTimeout(timer);
    if (got === 'hang') return { mutant: m, outcome: 'bad', detail: `no answer after ${HANG_MS} ms` };
    if ('error' in got) {
      const e = got.error;
      if (!(e instanceof BootcacheError) || e.message.includes('\n')) {
        return { mutant: m, outcome: 'bad', detail: `uncoded error: ${e instanceof Error ? e.stack : String(e)}` };
      }
      return { mutant: m, outcome: qemu.ok ? 'stricter' : 'refused', detail: `${e.code}: ${e.message}` };
    }
    if (!qemu.ok) return { mutant: m, outcome: 'wrong', detail: `bootcache read the disk, qemu-img failed: ${qemu.message}` };
    if (got.diff >= 0) return { mutant: m, outcome: 'wrong', detail: `bytes differ from qemu-img at guest offset ${got.diff}` };
    return { mutant: m, outcome: 'same', detail: '' };
  } finally {
    await rm(path, { force: true });
    await rm(raw, { force: true });
  }
}

it(
  `qcow2 reader vs qemu-img convert on ${ONLY ? ONLY.length : COUNT} mutants (seed ${SEED})`,
  async () => {
    const indices = ONLY ?? Array.from({ length: COUNT }, (_, i) => i);
    const results: Result[] = [];
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < indices.length) {
        const m = makeMutant(SEED, indices[next++]!, bases);
        results.push(await runMutant(m));
      }
    };
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));

    const counts: Record<Outcome, number> = { same: 0, refused: 0, stricter: 0, wrong: 0, bad: 0, oracleTimeout: 0 };
    for (const r of results) counts[r.outcome]++;
    const lines = [
      `qcow2 fuzz: seed ${SEED}, ${results.length} mutants: ${counts.same + counts.refused} agreements ` +
        `(${counts.same} same bytes, ${counts.refused} both refuse), ${counts.stricter} clean rejections where qemu-img reads, ` +
        `${counts.wrong} wrong bytes, ${counts.bad} crashes/hangs/uncoded errors, ${counts.oracleTimeout} qemu-img timeouts`,
    ];
    results.sort((a, b) => a.mutant.index - b.mutant.index);
    for (const r of results) {
      if (r.outcome === 'wrong' || r.outcome === 'bad' || process.env.FUZZ_VERBOSE) {
        lines.push(`  #${r.mutant.index} ${r.mutant.base.name}: ${r.mutant.description}: ${r.outcome} ${r.detail}`);
      }
    }
    console.log(lines.join('\n'));
    expect(counts.wrong, 'mutants with wrong bytes').toBe(0);
    expect(counts.bad, 'mutants with crashes, hangs or uncoded errors').toBe(0);
    // The mutants must exercise both sides: some read fine, some are refused.
    if (!ONLY) {
      expect(counts.same).toBeGreaterThan(results.length / 10);
      expect(counts.refused + counts.stricter).toBeGreaterThan(results.length / 10);
    }
  },
  Math.max(120_000, COUNT * 2_000),
);
