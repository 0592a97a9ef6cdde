// The benchmarks' boot image: a 2 GiB raw image with data wherever the boot
// trace reads, made once and cached under the bench's work directory.
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { open, rm, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

/** The repository, its CLI, and the timed boot trace the agent benchmarks replay. */
export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '../..');
export const BIN = join(ROOT, 'bin/run.js');
export const TRACE_REL = 'test/data/debian12-minbase-boot-timed.csv';
export const TRACE = join(ROOT, TRACE_REL);
export const IMAGE_NAME = 'debian12-boot.raw';
const GiB = 1024 ** 3;
/** Bumped whenever the generated image content changes. */
const IMAGE_VERSION = 2;

/** Deterministic non-zero bytes for one 4 KiB block: its SHA-256, repeated. */
export function blockData(block) {
  return Buffer.alloc(4096, createHash('sha256').update(`bootcache-bench ${block}`).digest());
}

/** The trace's read blocks (4 KiB), sorted. */
async function traceBlocks(trace) {
  const blocks = new Set();
  let header = true;
  for await (const line of createInterface({ input: createReadStream(trace) })) {
    if (header) { header = false; continue; }
    const [, op, offset, length] = line.split(',');
    if (op !== 'read') continue;
    const start = Number(offset);
    const end = start + Number(length);
    for (let b = Math.floor(start / 4096); b * 4096 < end; b++) blocks.add(b);
  }
  return [...blocks].sort((a, b) => a - b);
}

/**
 * A 2 GiB raw image with data in every block the trace reads (sparse
 * elsewhere), at work/IMAGE_NAME. Raw for every configuration: nbdkit 1.32 has
 * no qcow2 decoder filter, and raw keeps the comparison about caching, not
 * image formats. `traceRel` (the trace's path in the repository) is part of
 * the stamp that says whether a cached image is still the right one.
 */
export async function ensureBootImage({ work, trace, traceRel }) {
  const path = join(work, IMAGE_NAME);
  const stampPath = `${path}.json`;
  const blocks = await traceBlocks(trace);
  const want = { version: IMAGE_VERSION, size: 2 * GiB, blocks: blocks.length, trace: traceRel };
  if (existsSync(path) && existsSync(stampPath)) {
    const have = JSON.parse(readFileSync(stampPath, 'utf8'));
    const st = await stat(path);
    if (JSON.stringify(have.want) === JSON.stringify(want) && have.mtimeMs === st.mtimeMs && st.size === want.size) {
      return { path, blocks: blocks.length };
    }
  }
  console.log(`bench: making ${path} (2 GiB raw, ${blocks.length} blocks of data where the trace reads)`);
  await rm(path, { force: true });
  const fh = await open(path, 'w');
  await fh.truncate(2 * GiB);
  let i = 0;
  while (i < blocks.length) {
    let j = i + 1;
    while (j < blocks.length && blocks[j] === blocks[j - 1] + 1 && j - i < 256) j++;
    const data = Buffer.concat(blocks.slice(i, j).map(blockData));
    await fh.write(data, 0, data.length, blocks[i] * 4096);
    i = j;
  }
  await fh.sync();
  await fh.close();
  const st = await stat(path);
  writeFileSync(stampPath, JSON.stringify({ want, mtimeMs: st.mtimeMs }, null, 2));
  return { path, blocks: blocks.length };
}
