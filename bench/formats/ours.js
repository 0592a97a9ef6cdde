// Our side of bench/formats.js, run as a child process so each measurement
// starts clean. Imports the built library from dist/. Prints one JSON line:
// { ms, bytes, maxRssKiB, ... }; ms covers opening the image to closing it.
//
//   node bench/formats/ours.js read IMAGE [--inflight N] [--chunk BYTES] [--sha256]
//   node bench/formats/ours.js build-segment IMAGE MAP OUT [--checksum-worker]
import { createHash } from 'node:crypto';
import { rm } from 'node:fs/promises';
import { performance } from 'node:perf_hooks';

const dist = new URL('../../dist/', import.meta.url);
const { openImage } = await import(new URL('image/open.js', dist).href);

const [mode, ...rest] = process.argv.slice(2);
const flag = (name) => rest.includes(name);
const option = (name, fallback) => {
  const i = rest.indexOf(name);
  return i === -1 ? fallback : Number(rest[i + 1]);
};

/** Reads the whole guest disk with readInto, `inflight` chunks at a time, into a ring of reused buffers. */
async function readWhole(path) {
  const inflight = option('--inflight', 4);
  const chunk = option('--chunk', 4 * 1024 * 1024);
  const hash = flag('--sha256') ? createHash('sha256') : undefined;
  const started = performance.now();
  const image = await openImage(path);
  if (typeof image.readInto !== 'function') throw new Error(`${path}: image has no readInto`);
  const size = image.virtualSize;
  const ring = Array.from({ length: inflight }, () => Buffer.allocUnsafeSlow(chunk));
  const pending = new Array(inflight);
  let next = 0; // next chunk to start
  let done = 0; // next chunk to finish, in order
  const chunks = Math.ceil(size / chunk);
  const start = (i) => {
    const offset = i * chunk;
    const length = Math.min(chunk, size - offset);
    const target = ring[i % inflight];
    pending[i % inflight] = image.readInto(offset, length, target, 0).then(() => target.subarray(0, length));
  };
  while (next < Math.min(inflight, chunks)) start(next++);
  while (done < chunks) {
    const data = await pending[done % inflight];
    if (hash) hash.update(data);
    done++;
    if (next < chunks) start(next++);
  }
  await image.close();
  const ms = performance.now() - started;
  return { ms, bytes: size, inflight, chunk, sha256: hash?.digest('hex') };
}

async function buildSegmentRun(imagePath, mapPath, out) {
  const { loadMap } = await import(new URL('format/map.js', dist).href);
  const { buildSegment } = await import(new URL('core/build-segment.js', dist).href);
  const started = performance.now();
  const map = await loadMap(mapPath);
  const image = await openImage(imagePath);
  const result = await buildSegment(image, map, out, { checksumWorker: flag('--checksum-worker') });
  await image.close();
  const ms = performance.now() - started;
  await rm(out, { force: true });
  return { ms, bytes: result.bytes, blocks: result.blocks, dataSha256: result.dataSha256 };
}

let result;
if (mode === 'read') result = await readWhole(rest[0]);
else if (mode === 'build-segment') result = await buildSegmentRun(rest[0], rest[1], rest[2]);
else throw new Error(`unknown mode ${mode}`);
result.maxRssKiB = process.resourceUsage().maxRSS;
process.stdout.write(`${JSON.stringify(result)}\n`);
