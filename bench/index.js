// Size and build time of the image index (bootcache index): the 2 GiB raw
// image with the reference boot trace's data (bench/lib/boot-image.js, cached
// under /var/tmp/bootcache-bench) and, if present, the reference guest qcow2.
// buildImageIndex in this process, index on tmpfs, median of the rounds after
// one untimed build (page cache warm: the image's read cost is the page
// cache's, so the time is reading, the zero test and SHA-256).
//
//   npm run build && node bench/index.js [--rounds N]
//
// Writes bench/results/index.{json,md}.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { ensureBootImage, TRACE, TRACE_REL } from './lib/boot-image.js';

const dist = new URL('../dist/', import.meta.url);
const { openImage } = await import(new URL('image/open.js', dist).href);
const { buildImageIndex } = await import(new URL('core/image-index.js', dist).href);

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const i = args.indexOf(name);
  return i === -1 ? fallback : args[i + 1];
};
const rounds = Number(option('--rounds', 5));
const work = '/var/tmp/bootcache-bench';
const REFERENCE = '/var/cache/bootcache/reference-guest/debian12.qcow2';

await mkdir(work, { recursive: true });
const boot = await ensureBootImage({ work, trace: TRACE, traceRel: TRACE_REL });
const images = [{ name: 'boot-trace raw (2 GiB, trace data)', path: boot.path }];
if (existsSync(REFERENCE)) images.push({ name: 'reference guest qcow2 (debian12, 2 GiB)', path: REFERENCE });

const outDir = await mkdtemp(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'bootcache-bench-index-'));
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const rows = [];
try {
  for (const { name, path } of images) {
    const image = await openImage(path);
    const out = join(outDir, 'out.bcidx');
    try {
      let built;
      const ms = [];
      const cpuMs = [];
      for (let round = 0; round <= rounds; round++) {
        await rm(out, { force: true });
        const cpu = process.cpuUsage();
        const started = performance.now();
        built = await buildImageIndex(image, out);
        const elapsed = performance.now() - started;
        const used = process.cpuUsage(cpu);
        if (round > 0) {
          ms.push(elapsed);
          cpuMs.push((used.user + used.system) / 1000);
        }
      }
      rows.push({
        image: name,
        path,
        format: image.format,
        virtualSize: image.virtualSize,
        blockCount: built.blockCount,
        dataBlocks: built.dataBlocks,
        blocksRead: built.blocksRead,
        fileBytes: built.fileBytes,
        tableBytes: built.tableBytes,
        buildMs: ms,
        medianMs: median(ms),
        medianCpuMs: median(cpuMs),
      });
    } finally {
      await image.close();
    }
  }
} finally {
  await rm(outDir, { recursive: true, force: true });
}

const result = {
  command: `node bench/index.js --rounds ${rounds}`,
  commit: execFileSync('git', ['rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim(),
  date: new Date().toISOString(),
  host: { cpus: cpus().length, model: cpus()[0]?.model, node: process.version },
  images: rows,
};
const MiB = 1024 ** 2;
const f = (x, d = 1) => x.toFixed(d);
const md = [
  '# Image index: size and build time',
  '',
  `Command: \`${result.command}\` (after \`npm run build\`), commit ${result.commit}, ${result.date}, ` +
    `${result.host.cpus} CPUs (${result.host.model}), Node ${result.host.node}. Image in the page cache, index on tmpfs; ` +
    'a shared, loaded host: times are indicative.',
  '',
  '| image | blocks (4 KiB) | read | data blocks | index file | build median (ms) | CPU median (ms) | runs (ms) |',
  '|---|---|---|---|---|---|---|---|',
  ...rows.map(
    (r) =>
      `| ${r.image} | ${r.blockCount} | ${f((r.blocksRead * 4096) / MiB, 0)} MiB | ${r.dataBlocks} (${f((r.dataBlocks * 4096) / MiB)} MiB) | ` +
      `${r.fileBytes} B (${f(r.fileBytes / MiB, 2)} MiB) | ${f(r.medianMs, 0)} | ${f(r.medianCpuMs, 0)} | ${r.buildMs.map((x) => f(x, 0)).join(', ')} |`,
  ),
  '',
  'The file is 208 B of header (plus the previous-version key), 1 bit per block, 32 B per data block: a 2 GiB image of 4 KiB blocks is at most 64 KiB + 16 MiB.',
  '',
].join('\n');
const results = new URL('results/', import.meta.url);
await writeFile(new URL('index.json', results), `${JSON.stringify(result, null, 2)}\n`);
await writeFile(new URL('index.md', results), md);
process.stdout.write(md);
