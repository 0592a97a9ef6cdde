#!/usr/bin/env node
// bootcache demo on a built-in default: a 2 GiB qcow2 image holding data
// wherever the real Debian 12 boot trace (test/data/) reads, then the offline
// pipeline: build-map -> build-segment -> verify -> inspect.
import { execFileSync, spawnSync } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { mkdir, open, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const trace = join(root, 'test/data/debian12-minbase-boot-timed.csv');
const work = process.env.BOOTCACHE_DEMO_DIR ?? '/tmp/bootcache-demo';
const bin = join(root, 'bin/run.js');
const GiB = 1024 ** 3;

function step(title) {
  console.log(`\n\x1b[1m== ${title}\x1b[0m`);
}

function bootcache(...args) {
  console.log(`$ bootcache ${args.join(' ')}`);
  const r = spawnSync(process.execPath, [bin, ...args], { stdio: 'inherit' });
  if (r.status !== 0) {
    console.error(`demo: bootcache ${args[0]} exited with ${r.status}`);
    process.exit(r.status ?? 1);
  }
}

/** Deterministic pseudo-random bytes for one 4 KiB block (xorshift). */
function blockData(block) {
  const buf = Buffer.alloc(4096);
  let x = (block * 2654435761) >>> 0 || 1;
  for (let i = 0; i < 4096; i += 4) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    buf.writeUInt32LE(x, i);
  }
  return buf;
}

await rm(work, { recursive: true, force: true });
await mkdir(work, { recursive: true });
const raw = join(work, 'guest.raw');
const image = join(work, 'debian12.qcow2');

step('1. Make a 2 GiB guest disk with data where the real boot reads');
const fh = await open(raw, 'w');
await fh.truncate(2 * GiB);
const written = new Set();
const lines = createInterface({ input: createReadStream(trace) });
let header = true;
for await (const line of lines) {
  if (header) { header = false; continue; }
  const [, op, offset, length] = line.split(',');
  if (op !== 'read') continue;
  for (let b = Math.floor(Number(offset) / 4096); b * 4096 < Number(offset) + Number(length); b++) {
    if (written.has(b)) continue;
    written.add(b);
    await fh.write(blockData(b), 0, 4096, b * 4096);
  }
}
await fh.close();
execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zlib', '-c', raw, image]);
await rm(raw);
console.log(`${image}: 2 GiB virtual, ${written.size} blocks of data (zlib-compressed qcow2)`);

step('2. Build the boot workload map from the recorded boot trace');
bootcache('build-map', image, '--trace', trace, '--out', `${image}.bcmap`);

step('3. Build the boot segment: the boot blocks back to back');
bootcache('build-segment', image, '--map', `${image}.bcmap`, '--out', `${image}.bcseg`);

step('4. Verify every block of the segment against the image');
bootcache('verify', image, '--map', `${image}.bcmap`, '--segment', `${image}.bcseg`);

step('5. Inspect image, map and segment');
bootcache('inspect', image);
bootcache('inspect', `${image}.bcmap`);
bootcache('inspect', `${image}.bcseg`);

console.log(`\nDone. Files are in ${work}.`);
