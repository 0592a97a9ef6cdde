#!/usr/bin/env node
// Content-addressed blocks, measured (issue 23 §4; npm run bench:content):
// sibling guests booted for real through one agent on one host.
//
//   A   the reference guest (scripts/reference-guest/build.sh, the cached one)
//   B   A's recipe with services added (build.sh --extra-packages nginx,...)
//   A'  A's recipe run again into another directory: a rebuild, whose files
//       sit at other offsets
//
// A and B are published with `bootcache profile` (map + version 2 segment),
// A' with `bootcache index A' --previous ./ref.raw` only. One agent, a fresh
// cache, storage behind --storage-delay D; each round boots, with QEMU to the
// guest's console marker (bench/peers/boot.js), A (cold host, its segment),
// then B (its segment; blocks whose content A brought are skipped), then A'
// (no segment: its boot predicted from A's segment digests), settling the
// agent (stream done, boot recorded, rebuild idle) between boots. A local
// boot of A (the image file, no agent) in the same round is the yardstick
// for comparing with bench/results/peers.md. Offline, the overlap of the
// boots' blocks by content and offset, from the maps, segments and index.
//
// Environment: BENCH_RUNS (rounds, default 1), BENCH_DELAY (ms, default 10),
// BENCH_ACCEL (default scripts/detect-accel.sh), BENCH_WORK (default
// /var/tmp/bootcache-content), BENCH_NO_LOCAL=1 (skip the local boot),
// BOOTCACHE_REF_DIR / BENCH_SERVICES_DIR / BENCH_REBUILD_DIR (the guests'
// build directories). Method: docs/benchmarks-content.md. Writes
// bench/results/content.{json,md}; `node bench/content.js --report` only
// regenerates the Markdown.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, release, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startAgent, pollAgent, exportOf } from './lib/agent.js';
import { run } from './lib/process.js';
import { bootToMarker } from './peers/boot.js';
import { guestPlan, ensureGuests, publishGuests } from './content/guests.js';
import { bootBlocks, indexBlocks, overlap, distinctContents, fileBlockDigests, unmatchedByFile } from './content/overlap.js';
import { writeContentReport } from './content/report.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const bin = join(root, 'bin/run.js');
const resultsDir = join(root, 'bench/results');
const jsonPath = join(resultsDir, 'content.json');
const work = process.env.BENCH_WORK ?? '/var/tmp/bootcache-content';
const RUNS = Number(process.env.BENCH_RUNS ?? 1);
const DELAY = Number(process.env.BENCH_DELAY ?? 10);
const log = (...a) => console.log(`[${new Date().toISOString().slice(11, 19)}] bench:content:`, ...a);
if (!(Number.isInteger(RUNS) && RUNS >= 1)) throw new Error(`BENCH_RUNS must be a positive integer, got ${process.env.BENCH_RUNS}`);
if (!(DELAY >= 0)) throw new Error(`BENCH_DELAY must be a number of ms, got ${process.env.BENCH_DELAY}`);

const BLOCK = 4096;
const load = () => loadavg().map((x) => Math.round(x * 100) / 100);

async function machine(accel) {
  const version = async (cmd, args) => (await run(cmd, args, { allowFail: true })).stdout.split('\n')[0].trim();
  return {
    cpus: cpus().length, cpuModel: cpus()[0]?.model ?? '', memGiB: Math.round((totalmem() / 2 ** 30) * 10) / 10,
    kernel: release(), node: process.version, qemu: await version('qemu-system-x86_64', ['--version']), accel,
  };
}

/** Counters of the agent's storage, cache and the export, at one moment. */
async function snapshot(agent, name) {
  const s = await agent.status();
  const e = name ? exportOf(s, name) : undefined;
  return {
    storage: { requests: s.counters.storage.readRequests, bytes: s.counters.storage.readBytes },
    guestReads: { ...s.counters.guestReads },
    cache: s.cache,
    export: e ? { prefetch: e.prefetch ?? null, prediction: e.prediction ?? null, lastBoot: e.lastBoot ?? null, rebuild: e.rebuild ?? null } : null,
  };
}
const delta = (a, b) => ({ requests: b.requests - a.requests, bytes: b.bytes - a.bytes });

/** Until the export's stream and prediction are done, its boot recorded and its rebuild idle. */
function settle(agent, name) {
  return pollAgent(agent, (s) => {
    const e = exportOf(s, name);
    return e !== undefined && e.connections === 0 && e.prefetch?.state !== 'streaming' && e.prediction?.state !== 'loading' &&
      e.lastBoot?.state !== 'recording' && (e.rebuild?.state ?? 'idle') === 'idle';
  }, `${name} to settle`, 600_000);
}

async function bootThroughAgent(ctx, agent, guest) {
  const before = await snapshot(agent, guest.name);
  const boot = await bootToMarker({
    accel: ctx.accel, serial: join(ctx.dir, `serial-${guest.name}.log`),
    diskArgs: ['-drive', `file=${agent.uriFor(guest.name)},format=raw,if=virtio,snapshot=on`],
  });
  if (!boot.ok) throw new Error(`${guest.id} boot failed: ${boot.error}`);
  const atMarker = await snapshot(agent, guest.name);
  const { waitedS } = await settle(agent, guest.name);
  const settled = await snapshot(agent, guest.name);
  ctx.commands.set(`boot ${guest.id}`, boot.command.replace(ctx.dir, 'RUN'));
  const row = {
    guest: guest.id, name: guest.name, seconds: boot.markerS, qemuCpuS: boot.cpuS, load1: boot.load1,
    storage: delta(before.storage, atMarker.storage),
    storageUntilSettled: delta(before.storage, settled.storage),
    settledAfterS: waitedS,
    guestReads: Object.fromEntries(Object.keys(atMarker.guestReads).map((k) => [k, atMarker.guestReads[k] - before.guestReads[k]])),
    prefetch: atMarker.export?.prefetch ?? null,
    prediction: settled.export?.prediction ?? null,
    cacheAfter: settled.cache,
  };
  log(`  ${guest.id}: ${row.seconds.toFixed(2)} s, storage ${row.storage.requests} req / ${(row.storage.bytes / 2 ** 20).toFixed(1)} MiB` +
    ` (until settled ${(row.storageUntilSettled.bytes / 2 ** 20).toFixed(1)} MiB), load ${load().join(' ')}`);
  return row;
}

async function round(ctx, guests, n) {
  const rows = [];
  const [A] = guests;
  if (process.env.BENCH_NO_LOCAL !== '1') {
    const boot = await bootToMarker({
      accel: ctx.accel, serial: join(ctx.dir, 'serial-local.log'),
      diskArgs: ['-drive', `file=${A.image},format=raw,if=virtio,snapshot=on`],
    });
    if (!boot.ok) throw new Error(`local boot of A failed: ${boot.error}`);
    ctx.commands.set('boot A local', boot.command.replace(A.image, 'A/debian12.raw'));
    rows.push({ round: n, guest: 'A', name: 'local', seconds: boot.markerS, qemuCpuS: boot.cpuS, load1: boot.load1 });
    log(`  A local: ${boot.markerS.toFixed(2)} s, load ${load().join(' ')}`);
  }
  // A fresh storage directory (the agent republishes maps and segments into it) and a fresh cache.
  const storage = join(ctx.dir, 'storage');
  await publishGuests({ bin, guests, published: join(work, 'published'), storage, accel: ctx.accel, log });
  const cache = join(ctx.dir, 'cache');
  rmSync(cache, { recursive: true, force: true });
  const agent = await startAgent({
    bin, storage, cache, delayMs: DELAY, cacheSize: '4G',
    socket: join(ctx.dir, 'agent.sock'), control: join(ctx.dir, 'agent.ctl'), logFile: join(ctx.dir, 'agent.log'),
  });
  ctx.commands.set('agent', agent.command.replace(bin, 'bin/run.js').replaceAll(ctx.dir, 'RUN'));
  try {
    for (const g of guests) rows.push({ round: n, ...(await bootThroughAgent(ctx, agent, g)) });
  } finally {
    await agent.stop();
  }
  // What A' recorded in its own first boot (published by the agent at its end): the boot the prediction aimed at.
  const a2 = guests[2];
  const a2Map = join(storage, `${a2.name}.bcmap`);
  const a2Seg = join(storage, `${a2.name}.bcseg`);
  const recorded = existsSync(a2Map) && existsSync(a2Seg) ? { map: a2Map, segment: a2Seg } : null;
  rmSync(cache, { recursive: true, force: true });
  return { rows, recorded };
}

async function offlineOverlap(guests, recorded) {
  const [A, B, A2] = guests;
  const a = await bootBlocks(A.files.bcmap.path, A.files.bcseg.path);
  const b = await bootBlocks(B.files.bcmap.path, B.files.bcseg.path);
  const a2Index = await indexBlocks(A2.files.bcidx.path);
  const out = {
    bootBlocks: { A: a.blocks.size, B: b.blocks.size },
    bOverA: overlap(b, a),
    aOverB: overlap(a, b),
    abDistinct: distinctContents([a, b]),
    // A's boot blocks the rebuilt image holds: by content anywhere (what the prediction finds), at the same block.
    aOverA2Image: overlap(a, a2Index),
  };
  // Which of the blocks without a match are the guest's own initramfs or kernel (build dir copies of /boot's files).
  const files = async (g) => ({
    initramfs: await fileBlockDigests(join(g.dir, 'initrd.img')),
    kernel: await fileBlockDigests(join(g.dir, 'vmlinuz')),
  });
  const filesA = await files(A);
  out.unmatched = {
    bOverA: unmatchedByFile(b, a, await files(B)),
    aOverA2Image: unmatchedByFile(a, a2Index, filesA),
  };
  if (recorded) {
    const a2 = await bootBlocks(recorded.map, recorded.segment);
    out.bootBlocks["A'"] = a2.blocks.size;
    out.a2OverA = overlap(a2, a);
    out.unmatched.a2OverA = unmatchedByFile(a2, a, await files(A2));
    out.allDistinct = distinctContents([a, b, a2]);
  }
  return out;
}

function summarize(rows, guests, o) {
  const med = (xs) => {
    const s = [...xs].sort((x, y) => x - y);
    return s.length === 0 ? null : s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  };
  const of = (name) => rows.filter((r) => r.name === name);
  const [A, B, A2] = guests;
  const segB = B.files.bcseg.bytes;
  const segMax = Math.max(A.files.bcseg.bytes, B.files.bcseg.bytes);
  const a = of(A.name), b = of(B.name), a2 = of(A2.name), local = of('local');
  const afterB = b.map((r) => r.cacheAfter);
  const afterAll = a2.map((r) => r.cacheAfter);
  const bootBytes = (r) => (r.storage.bytes);
  return {
    aColdS: med(a.map((r) => r.seconds)),
    bColdS: med(b.map((r) => r.seconds)),
    a2FirstS: med(a2.map((r) => r.seconds)),
    localS: med(local.map((r) => r.seconds)),
    aColdOverLocal: local.length ? med(a.map((r, i) => r.seconds / (local[i]?.seconds ?? NaN))) : null,
    a2OverACold: med(a2.map((r, i) => r.seconds / a[i].seconds)),
    bStorageBytes: med(b.map(bootBytes)),
    bStorageOverSegment: med(b.map((r) => bootBytes(r) / segB)),
    segmentBytes: { A: A.files.bcseg.bytes, B: segB },
    physicalAfterB: med(afterB.map((c) => c.content?.physicalBytes ?? c.usedBytes)),
    logicalAfterB: med(afterB.map((c) => c.content?.logicalBytes)),
    physicalAfterBOverMaxSegment: med(afterB.map((c) => (c.content?.physicalBytes ?? c.usedBytes) / segMax)),
    ratioAfterB: med(afterB.map((c) => c.content?.ratio)),
    ratioAfterAll: med(afterAll.map((c) => c.content?.ratio)),
    physicalAfterAll: med(afterAll.map((c) => c.content?.physicalBytes ?? c.usedBytes)),
    logicalAfterAll: med(afterAll.map((c) => c.content?.logicalBytes)),
    a2StorageBytes: med(a2.map(bootBytes)),
    a2StorageRequests: med(a2.map((r) => r.storage.requests)),
    aColdStorageBytes: med(a.map(bootBytes)),
    // What no cache can avoid given the guests' contents (offline overlap): the blocks whose content the earlier boots do not hold.
    floors: {
      bStorageOverSegment: ((o.bOverA.blocks - o.bOverA.sameContent) * BLOCK) / segB,
      physicalAfterBOverMaxSegment: (o.abDistinct.distinct * BLOCK) / segMax,
      a2StorageOverBoot: o.a2OverA ? (o.a2OverA.blocks - o.a2OverA.sameContent) / o.a2OverA.blocks : null,
    },
  };
}

async function main() {
  if (process.argv.includes('--report')) {
    await writeContentReport(JSON.parse(readFileSync(jsonPath, 'utf8')), resultsDir);
    return;
  }
  const accel = process.env.BENCH_ACCEL || (await run(join(root, 'scripts/detect-accel.sh'), [], { allowFail: true })).stdout.trim() || 'tcg';
  const dir = join(work, 'run');
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const ctx = { dir, accel, commands: new Map() };
  const startedAt = new Date().toISOString();
  const loadAtStart = load();
  const guests = guestPlan();
  log(`accel ${accel}, D=${DELAY} ms, ${RUNS} round(s), load ${loadAtStart.join(' ')}`);
  await ensureGuests({ root, guests, log });
  const rows = [];
  let recorded = null;
  for (let n = 1; n <= RUNS; n++) {
    log(`round ${n}/${RUNS}`);
    const r = await round(ctx, guests, n);
    rows.push(...r.rows);
    recorded = r.recorded ?? recorded;
  }
  // The round's storage dir holds what A' recorded; keep it for the overlap before the next run removes it.
  const overlapFacts = await offlineOverlap(guests, recorded);
  const commit = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: root }).toString().trim();
  const results = {
    command: `${Object.entries(process.env).filter(([k]) => k.startsWith('BENCH_')).map(([k, v]) => `${k}=${v}`).join(' ')} npm run bench:content`.trim(),
    commit, startedAt, finishedAt: new Date().toISOString(), loadAtStart, loadAtEnd: load(),
    machine: await machine(accel), delayMs: DELAY, runs: RUNS,
    guests: guests.map((g) => ({
      id: g.id, name: g.name, what: g.what, dir: g.dir, extraPackages: g.extra ?? null,
      manifest: { builtAt: g.manifest.builtAt, buildSeconds: g.manifest.buildSeconds, recipe: g.manifest.recipe, packages: g.manifest.packages,
        installedPackages: g.manifest.installedPackages, installedBytes: g.manifest.installedBytes, fsUuid: g.manifest.rootPartition?.fsUuid,
        rawSha256: g.manifest.files?.['debian12.raw']?.sha256, rawAllocatedBytes: g.manifest.files?.['debian12.raw']?.allocatedBytes },
      buildCommand: g.buildCommand ?? null, publicationCommand: g.publicationCommand, publicationSeconds: g.publication?.seconds ?? null,
      files: Object.fromEntries(Object.entries(g.files).map(([k, v]) => [k, v.bytes])),
    })),
    commands: Object.fromEntries(ctx.commands),
    rows, summary: summarize(rows, guests, overlapFacts), overlap: overlapFacts,
  };
  mkdirSync(resultsDir, { recursive: true });
  writeFileSync(jsonPath, `${JSON.stringify(results, null, 2)}\n`);
  await writeContentReport(results, resultsDir);
  log(`wrote ${jsonPath} and content.md`);
}

main().catch((err) => {
  console.error(`bench:content: ${err.stack ?? err.message}`);
  process.exit(1);
});
