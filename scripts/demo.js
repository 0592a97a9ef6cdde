#!/usr/bin/env node
// bootcache demo on a built-in default: a 2 GiB qcow2 image holding data
// wherever the real Debian 12 boot trace (test/data/) reads, the offline
// pipeline (build-map -> build-segment -> verify -> inspect), then the boot
// replayed through the agent over slow storage. `--help` says what it does.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { mkdir, open, readdir, rename, rm, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const trace = join(root, 'test/data/debian12-minbase-boot-timed.csv');
const work = process.env.BOOTCACHE_DEMO_DIR ?? '/tmp/bootcache-demo';
const bin = join(root, 'bin/run.js');
const GiB = 1024 ** 3;
const DELAY_MS = 2;

const HELP = `Usage: node scripts/demo.js [--keep] [--help]   (bash scripts/demo.sh [--keep] installs and builds first)

The bootcache demo, on the real boot trace of a Debian 12 guest in test/data/
(4,060 reads, 97 MiB):
  1. makes a 2 GiB qcow2 image with data wherever that boot reads;
  2. builds the boot workload map from the trace;
  3. builds the boot segment;
  4. verifies every block of the segment against the image;
  5. inspects image, map and segment;
  6. replays the boot through the agent over storage delayed by ${DELAY_MS} ms per
     request, twice: first with no map or segment (the agent records the boot
     and publishes them), then on a cold cache with the segment prefetched;
     prints both times and storage reads, and verifies the published segment.

It writes about 490 MiB (image, maps, segments, two agent caches) under
${work}
(BOOTCACHE_DEMO_DIR sets another directory) and removes it at the end, also
when a step fails.

  --keep   keep the files
  --help   show this text`;

const args = process.argv.slice(2);
if (args.includes('--help') || args.includes('-h')) {
  console.log(HELP);
  process.exit(0);
}
const unknown = args.filter((a) => a !== '--keep');
if (unknown.length > 0) {
  console.error(`demo: unknown argument ${unknown[0]}\n\n${HELP}`);
  process.exit(2);
}
const keep = args.includes('--keep');
const ci = process.env.CI !== undefined && !['', '0', 'false'].includes(process.env.CI);
const bold = process.stdout.isTTY && !ci && process.env.NO_COLOR === undefined;

function step(title) {
  console.log(bold ? `\n\x1b[1m== ${title}\x1b[0m` : `\n== ${title}`);
}

/** Bytes the files under `dir` take on disk (allocated blocks: the image is sparse). */
async function diskUsage(dir) {
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) total += (await stat(join(entry.parentPath ?? entry.path, entry.name))).blocks * 512;
  }
  return total;
}

/** Removes the demo's files unless --keep, saying how much they took. */
async function finish(failed) {
  const used = await diskUsage(work).catch(() => 0);
  const size = `${Math.round(used / 2 ** 20)} MiB`;
  if (keep) {
    console.log(`\n${failed ? 'Failed' : 'Done'}. Files (${size}) are in ${work}.`);
    return;
  }
  await rm(work, { recursive: true, force: true });
  console.log(`\n${failed ? 'Failed' : 'Done'}. Removed ${work} (${size}); --keep keeps it.`);
}

class StepFailed extends Error {}

function bootcache(...args) {
  console.log(`$ bootcache ${args.join(' ')}`);
  const r = spawnSync(process.execPath, [bin, ...args], { stdio: 'inherit' });
  if (r.status !== 0) throw new StepFailed(`bootcache ${args[0]} exited with ${r.status}`);
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
try {
  await demo();
  await finish(false);
} catch (err) {
  console.error(`demo: ${err instanceof StepFailed ? err.message : err?.stack ?? err}`);
  await finish(true);
  process.exit(1);
}

async function demo() {
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

step(`6. Replay the boot through the agent over slow storage (${DELAY_MS} ms per request), without and with the segment`);
function runJson(...args) {
  const r = spawnSync(process.execPath, [bin, ...args, '--json'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`bootcache ${args[0]} failed: ${r.stderr || r.stdout}`);
  return JSON.parse(r.stdout);
}
async function withAgent(name, fn) {
  const socket = join(work, `${name}.sock`);
  const control = join(work, `${name}.ctl`);
  const args = ['agent', '--storage', work, '--cache', join(work, `cache-${name}`), '--socket', socket, '--control', control,
    '--cache-size', '512M', '--storage-delay', String(DELAY_MS), '--log-level', 'warn', '--maintenance', 'off'];
  const child = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'ignore', 'inherit'] });
  // The agent's start includes its warm-up (about 2 s here).
  for (let i = 0; i < 600; i++) {
    if (await stat(control).then(() => true, () => false)) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  try {
    return await fn({ socket, control });
  } finally {
    child.kill('SIGTERM');
    await new Promise((r) => child.on('exit', r));
  }
}
const exportName = 'debian12.qcow2';
async function bootOnce(name) {
  return withAgent(name, async ({ socket, control }) => {
    const uri = `nbd+unix:///${exportName}?socket=${socket}`;
    console.log(`$ bootcache replay ${trace.replace(root + '/', '')} --uri '${uri}' --no-think-time`);
    const replay = runJson('replay', trace, '--uri', uri, '--no-think-time');
    runJson('agent', 'mark-booted', exportName, '--control', control);
    // Wait for the agent to publish the new map and segment.
    for (let i = 0; i < 600; i++) {
      const e = runJson('agent', 'status', '--control', control).exports.find((x) => x.name === exportName);
      if (e?.lastBoot?.state === 'complete' && e.rebuild?.state !== 'running') break;
      await new Promise((r) => setTimeout(r, 100));
    }
    const status = runJson('agent', 'status', '--control', control);
    return { seconds: replay.replay.durationS, replay, counters: status.counters };
  });
}
// First boot: no map or segment on storage yet; the agent records one.
await rename(`${image}.bcmap`, `${image}.offline.bcmap`);
await rename(`${image}.bcseg`, `${image}.offline.bcseg`);
const first = await bootOnce('first');
// Cold host: an empty cache, the segment the first boot published is on storage.
const cold = await bootOnce('cold');
const row = (label, r) =>
  `${label.padEnd(34)} ${String(r.seconds?.toFixed?.(2) ?? r.seconds).padStart(8)} s ${String(r.counters.storage.readRequests).padStart(8)} storage reads`;
console.log('');
console.log(row('first boot (records, no segment)', first));
console.log(row('cold host (segment prefetched)', cold));
bootcache('verify', image);
}
