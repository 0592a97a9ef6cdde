// What the per-block digests of segment version 2 cost build-segment: the
// same map built as version 1 (CRC-32 only) and version 2 (CRC-32 and
// SHA-256 per block), alternating, in one process, segment on tmpfs.
//
//   npm run build && node bench/segment-digests.js [--rounds N] [--trace CSV]
//
// The image: a sparse raw disk of the trace's guest size with random data
// where the trace reads, made in a temporary directory (removed at the end);
// the map: build-map of the trace (the real boot: about 24k blocks, 94 MiB).
// Writes bench/results/segment-digests.{json,md}.
import { randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';

const dist = new URL('../dist/', import.meta.url);
const { openImage } = await import(new URL('image/open.js', dist).href);
const { buildSegment } = await import(new URL('core/build-segment.js', dist).href);
const { buildMapFromTrace } = await import(new URL('core/build-map.js', dist).href);
const { readTrace } = await import(new URL('format/trace.js', dist).href);

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const i = args.indexOf(name);
  return i === -1 ? fallback : args[i + 1];
};
const rounds = Number(option('--rounds', 7));
const trace = option('--trace', new URL('../../shared/traces/debian12-minbase-boot.csv', import.meta.url).pathname);
const GUEST_SIZE = 2 * 1024 ** 3;

const dir = await mkdtemp(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'bootcache-bench-digests-'));
try {
  const imagePath = join(dir, 'disk.raw');
  const fh = await open(imagePath, 'w');
  await fh.truncate(GUEST_SIZE);
  for (const line of (await readFile(trace, 'utf8')).trim().split('\n').slice(1)) {
    const [, op, offset, length] = line.split(',');
    if (op === 'read') await fh.write(randomBytes(Number(length)), 0, Number(length), Number(offset));
  }
  await fh.close();
  const image = await openImage(imagePath);
  const events = [];
  for await (const e of readTrace(trace)) events.push(e);
  const { map } = await buildMapFromTrace(image, events);
  const runs = { 1: [], 2: [] };
  const sizes = {};
  const out = join(dir, 'out.bcseg');
  // One untimed build of each first (page cache, JIT).
  for (const version of [1, 2]) await buildSegment(image, map, out, { version });
  for (let round = 0; round < rounds; round++) {
    for (const version of round % 2 === 0 ? [1, 2] : [2, 1]) {
      await rm(out, { force: true });
      const started = performance.now();
      const result = await buildSegment(image, map, out, { version });
      runs[version].push(performance.now() - started);
      sizes[version] = result.fileBytes;
    }
  }
  await image.close();
  const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const ms = { 1: median(runs[1]), 2: median(runs[2]) };
  const result = {
    command: `node bench/segment-digests.js --rounds ${rounds}`,
    commit: execFileSync('git', ['rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim(),
    date: new Date().toISOString(),
    host: { cpus: cpus().length, model: cpus()[0]?.model, node: process.version },
    blocks: map.blocksSet,
    dataBytes: map.blocksSet * map.blockSize,
    fileBytes: sizes,
    buildMs: { v1: runs[1], v2: runs[2] },
    medianMs: ms,
    timeRatio: ms[2] / ms[1],
    sizeRatio: sizes[2] / sizes[1],
  };
  const f = (x, d = 1) => x.toFixed(d);
  const md = [
    '# Segment digests: build-segment cost',
    '',
    `Command: \`${result.command}\` (after \`npm run build\`), commit ${result.commit}, ${result.date}, ` +
      `${result.host.cpus} CPUs (${result.host.model}), Node ${result.host.node}. Segment and image on tmpfs.`,
    '',
    `Map: the real boot trace, ${result.blocks} blocks of 4 KiB (${f(result.dataBytes / 1024 ** 2)} MiB).`,
    '',
    '| segment | build median (ms) | runs (ms) | file bytes |',
    '|---|---|---|---|',
    `| version 1 (CRC-32) | ${f(ms[1])} | ${runs[1].map((x) => f(x, 0)).join(', ')} | ${sizes[1]} |`,
    `| version 2 (CRC-32 + SHA-256 digest) | ${f(ms[2])} | ${runs[2].map((x) => f(x, 0)).join(', ')} | ${sizes[2]} |`,
    '',
    `Version 2 / version 1: time ${f(result.timeRatio, 2)}x (+${f(ms[2] - ms[1])} ms), size +${sizes[2] - sizes[1]} bytes (+${f((result.sizeRatio - 1) * 100, 2)} %).`,
    '',
  ].join('\n');
  const results = new URL('results/', import.meta.url);
  await writeFile(new URL('segment-digests.json', results), `${JSON.stringify(result, null, 2)}\n`);
  await writeFile(new URL('segment-digests.md', results), md);
  process.stdout.write(md);
} finally {
  await rm(dir, { recursive: true, force: true });
}
