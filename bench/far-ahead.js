#!/usr/bin/env node
// Far-ahead reads (issue 3): a boot reads a segment block that the prefetch
// stream has not reached yet. Compares, per block, over emulated remote
// storage (FaultyStorage: every request waits D ms):
//   (a) image:   read the block from the image (raw; qcow2 with a cold L2
//                cache, i.e. the image opened just before; qcow2 warm; and a
//                compressed qcow2, warm);
//   (b) segment: one ranged read of the segment at dataOffset + rank*blockSize
//                plus its checksum check (the header and checksum table are
//                already loaded, as they are for the prefetcher).
// Reports per-read latency and storage requests/bytes per read.
//
// Run after `npm run build`:  node bench/far-ahead.js
// Environment: BENCH_DELAYS (default "2,10"), BENCH_SAMPLES (default 200),
// BENCH_WORK (default /var/tmp/bootcache-far-ahead).
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, openSync, closeSync, writeSync, ftruncateSync, readFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const dist = (p) => join(root, 'dist', p);
const { LocalDirStorage } = await import(dist('storage/local.js'));
const { CountingStorage, FaultyStorage } = await import(dist('storage/filters.js'));
const { openImageFromSource } = await import(dist('image/open.js'));
const { loadMap } = await import(dist('format/map.js'));
const { SegmentReader } = await import(dist('format/segment.js'));

const DELAYS = (process.env.BENCH_DELAYS ?? '2,10').split(',').map(Number);
const SAMPLES = Number(process.env.BENCH_SAMPLES ?? 200);
const work = process.env.BENCH_WORK ?? '/var/tmp/bootcache-far-ahead';
const trace = join(root, 'test/data/debian12-minbase-boot.csv');
const bin = join(root, 'bin/run.js');
const SIZE = 2 * 1024 ** 3;

/** Fixtures: a 2 GiB raw image with random data wherever the reference boot reads, its qcow2 and compressed qcow2 conversions, map and segment. */
function fixtures() {
  mkdirSync(work, { recursive: true });
  const raw = join(work, 'disk.raw');
  if (!existsSync(join(work, 'disk.raw.bcseg'))) {
    const fd = openSync(raw, 'w');
    ftruncateSync(fd, SIZE);
    for (const line of readFileSync(trace, 'utf8').split('\n').slice(1)) {
      const [, op, offset, length] = line.split(',');
      if (op === 'read') writeSync(fd, randomBytes(Number(length)), 0, Number(length), Number(offset));
    }
    closeSync(fd);
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, join(work, 'disk.qcow2')]);
    execFileSync('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, join(work, 'disk-z.qcow2')]);
    execFileSync('node', [bin, 'build-map', raw, '--trace', trace, '--out', `${raw}.bcmap`]);
    execFileSync('node', [bin, 'build-segment', raw]);
  }
  return { raw };
}

function stats(ms) {
  const s = [...ms].sort((x, y) => x - y);
  const q = (p) => s[Math.min(s.length - 1, Math.floor(p * s.length))];
  return { mean: s.reduce((a, b) => a + b, 0) / s.length, p50: q(0.5), p95: q(0.95) };
}

async function openImage(storage, key) {
  const opener = {
    async openRelative(from, name) {
      const k = storage.resolveRelative(from.name, name);
      return { source: await storage.openSource(k), key: k };
    },
  };
  return openImageFromSource(await storage.openSource(key), opener, {}, [key]);
}

async function main() {
  fixtures();
  const map = await loadMap(join(work, 'disk.raw.bcmap'));
  const index = map.index;
  const bs = map.blockSize;
  // A fixed sample of segment blocks spread over the segment (rank order shuffled).
  let x = 12345;
  const ranks = [];
  for (let i = 0; i < SAMPLES; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    ranks.push(x % map.blocksSet);
  }
  const rows = [];
  for (const delayMs of DELAYS) {
    const counting = new CountingStorage(new FaultyStorage(await LocalDirStorage.open(work), { delayMs }));
    const measure = async (label, perRead, setup) => {
      const ms = [];
      let requests = 0;
      let bytes = 0;
      let failures = 0;
      const ctx = setup ? await setup() : undefined;
      for (const rank of ranks) {
        const block = index.select(rank);
        const pre = ctx?.before ? await ctx.before() : undefined;
        const r0 = counting.counters.readRequests;
        const b0 = counting.counters.readBytes;
        const t0 = performance.now();
        const ok = await perRead(block, rank, pre ?? ctx);
        ms.push(performance.now() - t0);
        requests += counting.counters.readRequests - r0;
        bytes += counting.counters.readBytes - b0;
        if (!ok) failures++;
        if (ctx?.after) await ctx.after(pre);
      }
      if (ctx?.close) await ctx.close();
      const row = { delayMs, method: label, ...stats(ms), requestsPerRead: requests / ranks.length, bytesPerRead: bytes / ranks.length, failures };
      rows.push(row);
      console.error(`D=${delayMs} ${label}: mean ${row.mean.toFixed(2)} ms, p95 ${row.p95.toFixed(2)} ms, ${row.requestsPerRead.toFixed(2)} req/read`);
    };
    const expectedBlock = async (block) => (await imageRaw.read(block * bs, bs));
    const imageRaw = await openImage(await LocalDirStorage.open(work), 'disk.raw'); // no delay: reference bytes
    const readImage = async (block, _rank, image) => (await image.read(block * bs, bs)).equals(await expectedBlock(block));

    await measure('(a) image, raw', readImage, () => openImage(counting, 'disk.raw'));
    // Cold L2: the image is opened (header, L1) before each read, outside the timing.
    await measure('(a) image, qcow2, cold L2 cache', readImage, async () => ({
      before: () => openImage(counting, 'disk.qcow2'),
      after: (image) => image.close(),
    }));
    await measure('(a) image, qcow2, warm L2 cache', readImage, async () => {
      const image = await openImage(counting, 'disk.qcow2');
      for (const rank of ranks) await image.read(index.select(rank) * bs, 1); // loads every L2 table the sample needs
      return image;
    });
    await measure('(a) image, compressed qcow2, warm L2 cache', readImage, async () => {
      const image = await openImage(counting, 'disk-z.qcow2');
      for (const rank of ranks) await image.extents(index.select(rank) * bs, 1);
      await image.read(index.select(ranks[0]) * bs, bs); // starts the decode workers
      return image;
    });
    await measure(
      '(b) segment ranged read + checksum',
      async (block, rank, reader) => {
        const data = await counting.read('disk.raw.bcseg', reader.dataOffset + rank * bs, bs);
        return reader.verifyBlock(rank, data) && data.equals(await expectedBlock(block));
      },
      async () => {
        const source = await counting.openSource('disk.raw.bcseg');
        const reader = await SegmentReader.fromSource(source);
        await source.close();
        return reader;
      },
    );
    await imageRaw.close();
  }
  const result = {
    date: new Date().toISOString(),
    command: 'npm run build && node bench/far-ahead.js',
    samples: SAMPLES,
    blockSize: map.blockSize,
    segmentBlocks: map.blocksSet,
    image: '2 GiB, random data where the reference Debian 12 boot reads (test/data), qcow2 64 KiB clusters',
    host: { cpus: cpus().length, loadavg: loadavg().map((l) => l.toFixed(2)) },
    rows,
  };
  console.log(JSON.stringify(result, null, 2));
}

await main();
// The qcow2 decode workers keep the event loop alive.
process.exit(0);
