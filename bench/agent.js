#!/usr/bin/env node
// Benchmark of the bootcache agent (npm run bench:agent): the real agent as a
// child process, the real boot trace replayed against it with `bootcache
// replay`, and peers measured in the same run:
//   - direct:     nbdkit's delay filter over the image (the storage, no cache);
//   - first boot: agent, empty cache, no map/segment (it records, then publishes);
//   - cold host:  a fresh agent with an empty cache, segment on storage (prefetch);
//   - warm:       the cold-host agent again (cache warm);
//   - local:      qemu-nbd over the image, no delay (the boot's own speed here);
//   - hit path:   fio 4 KiB random reads, everything cached, agent vs qemu-nbd.
// Writes bench/results/agent.json and .md (each run replaces the last). See docs/benchmarks-agent.md.
//
// Environment: BENCH_ROUNDS (default 2), BENCH_DELAYS (default "2,10"),
// BENCH_HIT_SECONDS (default 5), BENCH_HIT_ROUNDS (default 3),
// BENCH_SKIP_HIT=1, BENCH_WORK (default /var/tmp/bootcache-bench).
import { existsSync, mkdirSync, writeFileSync, linkSync } from 'node:fs';
import { open, rm, stat, mkdir, readFile } from 'node:fs/promises';
import { loadavg, cpus, totalmem, freemem, hostname, release } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { stopChild, run, startServer, killAllSync } from './lib/process.js';
import { agentArgs, startAgent, pollAgent, exportOf } from './lib/agent.js';
import { IMAGE_NAME, blockData, ensureBootImage } from './lib/boot-image.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const bin = join(root, 'bin/run.js');
const traceRel = 'test/data/debian12-minbase-boot-timed.csv';
const trace = join(root, traceRel);
const work = process.env.BENCH_WORK ?? '/var/tmp/bootcache-bench';
const ROUNDS = intEnv('BENCH_ROUNDS', 2);
const DELAYS = (process.env.BENCH_DELAYS ?? '2,10').split(',').map(Number);
const HIT_SECONDS = intEnv('BENCH_HIT_SECONDS', 5);
const HIT_ROUNDS = intEnv('BENCH_HIT_ROUNDS', 3);
const SKIP_HIT = process.env.BENCH_SKIP_HIT === '1';
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const HIT_NAME = 'hit-64m.raw';
const HIT_BYTES = 64 * MiB;

function intEnv(name, fallback) {
  const v = process.env[name];
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new Error(`${name} must be a positive integer, got ${v}`);
  return n;
}

// ---------------------------------------------------------------------------
// Fixtures, cached under $BENCH_WORK.

/** A 64 MiB raw image of pseudo-random data for the hit-path test. */
async function ensureHitImage() {
  const path = join(work, HIT_NAME);
  if (existsSync(path) && (await stat(path)).size === HIT_BYTES) return path;
  const fh = await open(path, 'w');
  for (let off = 0; off < HIT_BYTES; off += MiB) {
    const chunk = Buffer.concat(Array.from({ length: 256 }, (_, k) => blockData(off / 4096 + k + 1_000_000)));
    await fh.write(chunk, 0, chunk.length, off);
  }
  await fh.close();
  return path;
}

// ---------------------------------------------------------------------------
// The pieces of one measurement.

const commands = new Map();
function noteCommand(key, text) {
  if (!commands.has(key)) commands.set(key, text);
}

async function bootcache(args, opts = {}) {
  return run(process.execPath, [bin, ...args], { label: `bootcache ${args[0]}`, ...opts });
}

async function replay(uri, log, extra = []) {
  const started = performance.now();
  const { stdout } = await bootcache(['replay', trace, '--uri', uri, '--json', ...extra], { log });
  const result = JSON.parse(stdout);
  if (result.error) throw new Error(`replay against ${uri}: ${result.error.message}`);
  return { result, wallS: (performance.now() - started) / 1000 };
}

function pickCounters(status) {
  // The cache device's own lookups are status.cache.lookups, beside the counters.
  return { ...JSON.parse(JSON.stringify(status.counters)), cache: { hits: status.cache.lookups.hit, misses: status.cache.lookups.miss } };
}

function diffCounters(after, before) {
  return {
    storage: {
      readRequests: after.storage.readRequests - before.storage.readRequests,
      readBytes: after.storage.readBytes - before.storage.readBytes,
    },
    cache: { hits: after.cache.hits - before.cache.hits, misses: after.cache.misses - before.cache.misses },
    prefetch: { bytes: after.prefetch.bytes - before.prefetch.bytes },
  };
}

function summarizeReplay(r) {
  const { replay: s } = r.result;
  return {
    completionS: s.durationS,
    recordedS: s.recordedDurationS,
    ratioToRecorded: s.ratio,
    lagFreeS: s.lagFreeDurationS,
    ioBusyS: s.ioBusyS,
    latencyMs: { p50: s.latencyMs.p50, p90: s.latencyMs.p90, p99: s.latencyMs.p99, max: s.latencyMs.max, mean: s.latencyMs.mean },
    schedulingLagMs: { mean: s.schedulingLagMs.mean, p99: s.schedulingLagMs.p99 },
    phases: r.result.phases.map((p) => ({ phase: p.phase, reads: p.reads, recordedS: p.recordedS, replayS: p.replayS, ratio: p.ratio, meanLatMs: p.latencyMs?.mean ?? null })),
    wallS: r.wallS,
    warmupMs: r.result.warmup?.ms ?? null,
    warmupError: r.result.warmup?.error ?? null,
  };
}

// ---------------------------------------------------------------------------
// Configurations.

async function measureDirect(ctx, image, delay) {
  const sock = join(ctx.dir, `direct-${delay}.sock`);
  const log = join(ctx.dir, `nbdkit-${delay}.log`);
  const args = ['-f', '-r', '--exit-with-parent', '-U', sock, '--filter=delay', 'file', image, `rdelay=${delay}ms`];
  noteCommand(`direct`, `nbdkit ${args.join(' ').replace(sock, 'SOCK').replace(image, 'IMG').replace(`${delay}ms`, 'Dms')}`);
  const server = await startServer('nbdkit', args, sock, 'nbdkit', log);
  try {
    const uri = `nbd+unix:///?socket=${sock}`;
    noteCommand('replay', `node bin/run.js replay ${traceRel} --uri URI --json`);
    return summarizeReplay(await replay(uri, join(ctx.dir, 'replay.log')));
  } finally {
    await stopChild(server);
  }
}

async function measureLocal(ctx, image) {
  const sock = join(ctx.dir, 'local.sock');
  const args = ['-r', '-f', 'raw', '-t', '--socket', sock, '-x', 'disk', image];
  noteCommand('local', `qemu-nbd ${args.join(' ').replace(sock, 'SOCK').replace(image, 'IMG')}`);
  const server = await startServer('qemu-nbd', args, sock, 'qemu-nbd', join(ctx.dir, 'qemu-nbd.log'));
  try {
    const uri = `nbd+unix:///disk?socket=${sock}`;
    const result = summarizeReplay(await replay(uri, join(ctx.dir, 'replay.log')));
    // Diagnostic: the same boot bound by read latency alone (no think time).
    result.noThinkTime = summarizeReplay(await replay(uri, join(ctx.dir, 'replay.log'), ['--no-think-time']));
    return result;
  } finally {
    await stopChild(server);
  }
}

/**
 * First boot, then cold host and warm on a second agent, for one delay.
 * A fresh storage directory per round (the image hard-linked: same inode,
 * same identity) so every first boot starts with no map or segment.
 */
async function measureAgentSeries(ctx, image, delay, round) {
  const storage = join(ctx.dir, `storage-${delay}-r${round}`);
  await mkdir(storage, { recursive: true });
  linkSync(image, join(storage, IMAGE_NAME));
  const socket = join(ctx.dir, `agent-${delay}.sock`);
  const control = join(ctx.dir, `agent-${delay}.ctl`);
  const uri = `nbd+unix:///${IMAGE_NAME}?socket=${socket}`;
  const segPath = join(storage, `${IMAGE_NAME}.bcseg`);
  const mapPath = join(storage, `${IMAGE_NAME}.bcmap`);
  const log = join(ctx.dir, `agent-${delay}-r${round}.log`);
  noteCommand('agent', `node ${agentArgs({ bin, storage: 'STORAGE', cache: 'CACHE', socket: 'SOCK', control: 'CTL', delayMs: 'D' }).join(' ').replace(bin, 'bin/run.js')}`);
  noteCommand('mark-booted', `node bin/run.js agent mark-booted ${IMAGE_NAME} --control CTL --json`);
  noteCommand('status', 'node bin/run.js agent status --control CTL --json   # polled until lastBoot complete, rebuild idle, IMG.bcseg exists');
  const out = {};

  // --- first boot: empty cache, no sidecars.
  const cache1 = join(ctx.dir, `cache-${delay}-r${round}-first`);
  let agent = await startAgent({ bin, storage, cache: cache1, socket, control, delayMs: delay, logFile: log });
  try {
    const before = pickCounters(await agent.status());
    const r = await replay(uri, join(ctx.dir, 'replay.log'));
    const afterReplay = await agent.status();
    const tEnd = performance.now();
    await bootcache(['agent', 'mark-booted', IMAGE_NAME, '--control', control, '--json']);
    const { status: published } = await pollAgent(agent, (s) => {
      const e = exportOf(s, IMAGE_NAME);
      return e?.lastBoot?.state === 'complete' && e.rebuild?.state === 'idle' && s.counters.boots.recorded >= 1 && existsSync(segPath) && existsSync(mapPath);
    }, 'the first boot to be published');
    const e = exportOf(published, IMAGE_NAME);
    if (e.rebuild.state !== 'idle') throw new Error(`segment rebuild ${e.rebuild.state}: ${e.rebuild.lastError}`);
    out.first = {
      ...summarizeReplay(r),
      counters: diffCounters(pickCounters(afterReplay), before),
      countersAfterPublish: diffCounters(pickCounters(published), before),
      publishedAfterS: (performance.now() - tEnd) / 1000,
      lastBoot: e.lastBoot,
      segmentBytes: (await stat(segPath)).size,
    };
  } finally {
    await agent.stop();
  }

  // --- cold host: a fresh agent, empty cache, segment on storage.
  const cache2 = join(ctx.dir, `cache-${delay}-r${round}-cold`);
  agent = await startAgent({ bin, storage, cache: cache2, socket, control, delayMs: delay, logFile: log });
  try {
    const before = pickCounters(await agent.status());
    const r = await replay(uri, join(ctx.dir, 'replay.log'));
    const afterReplay = await agent.status();
    const e = exportOf(afterReplay, IMAGE_NAME);
    out.cold = {
      ...summarizeReplay(r),
      counters: diffCounters(pickCounters(afterReplay), before),
      prefetch: e?.prefetch ?? null,
    };
    // The replay's close ended a boot: let its rebuild finish before the warm run.
    const { status: settled, waitedS } = await pollAgent(agent, (s) => {
      const x = exportOf(s, IMAGE_NAME);
      return x?.rebuild?.state !== 'running' && x?.prefetch?.state !== 'streaming' && x?.connections === 0;
    }, 'the cold boot rebuild to finish');
    out.cold.settleS = waitedS;

    // --- warm: same agent again.
    const beforeWarm = pickCounters(settled);
    const w = await replay(uri, join(ctx.dir, 'replay.log'));
    const afterWarm = await agent.status();
    out.warm = {
      ...summarizeReplay(w),
      counters: diffCounters(pickCounters(afterWarm), beforeWarm),
      prefetch: exportOf(afterWarm, IMAGE_NAME)?.prefetch ?? null,
    };
    await pollAgent(agent, (s) => {
      const x = exportOf(s, IMAGE_NAME);
      return x?.rebuild?.state !== 'running' && x?.prefetch?.state !== 'streaming' && x?.connections === 0;
    }, 'the warm boot rebuild to finish');
    // Diagnostic: warm, no think time (the agent's read latency alone, against local qemu-nbd's).
    const b = pickCounters(await agent.status());
    const n = await replay(uri, join(ctx.dir, 'replay.log'), ['--no-think-time']);
    out.warm.noThinkTime = { ...summarizeReplay(n), counters: diffCounters(pickCounters(await agent.status()), b) };
    noteCommand('no-think-time', `node bin/run.js replay ${traceRel} --uri URI --json --no-think-time   # diagnostic, warm agent and local qemu-nbd`);
    await pollAgent(agent, (s) => exportOf(s, IMAGE_NAME)?.rebuild?.state !== 'running', 'the last rebuild to finish');
  } finally {
    await agent.stop();
  }
  await rm(cache1, { recursive: true, force: true });
  await rm(cache2, { recursive: true, force: true });

  // --- diagnostic: the prefetch alone (fresh agent, empty cache, one idle connection).
  const cache3 = join(ctx.dir, `cache-${delay}-r${round}-prefetch`);
  agent = await startAgent({ bin, storage, cache: cache3, socket, control, delayMs: delay, logFile: log });
  const { NbdClient } = await import(join(root, 'dist/nbd/client/index.js'));
  let idle;
  try {
    idle = await NbdClient.connect(uri);
    const { status } = await pollAgent(agent, (s) => ['done', 'failed', 'stopped'].includes(exportOf(s, IMAGE_NAME)?.prefetch?.state), 'the prefetch');
    const p = exportOf(status, IMAGE_NAME).prefetch;
    out.prefetchAlone = { state: p.state, bytes: p.bytesRead, durationS: p.durationMs / 1000, MiBs: p.bytesRead / MiB / (p.durationMs / 1000), storageRequests: status.counters.storage.readRequests };
  } finally {
    await idle?.close().catch(() => undefined);
    await agent.stop();
    await rm(cache3, { recursive: true, force: true });
  }
  return out;
}

/** fio 4 KiB random reads; returns IOPS and latency. */
async function fio(uri, seconds, name) {
  const args = [
    `--name=${name}`, '--ioengine=nbd', `--uri=${uri}`, '--rw=randread', '--bs=4k', '--iodepth=32',
    `--runtime=${seconds}`, '--time_based', '--output-format=json',
  ];
  noteCommand('fio', `fio ${args.join(' ').replace(uri, 'URI')}`);
  const { stdout } = await run('fio', args, { label: 'fio' });
  const job = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0];
  return {
    iops: job.read.iops,
    MiBs: job.read.bw_bytes / MiB,
    latUs: { mean: job.read.clat_ns.mean / 1000, p99: (job.read.clat_ns.percentile?.['99.000000'] ?? 0) / 1000 },
  };
}

/**
 * Hit path: the 64 MiB image read once through the agent (all blocks cached,
 * on a connection the bench keeps open so the boot recording neither ends
 * nor triggers a rebuild or prefetch during the measurement), then fio
 * against the agent and against qemu-nbd (page cache), alternating.
 */
async function measureHitPath(ctx, image) {
  const storage = join(ctx.dir, 'storage-hit');
  await mkdir(storage, { recursive: true });
  linkSync(image, join(storage, HIT_NAME));
  const socket = join(ctx.dir, 'agent-hit.sock');
  const control = join(ctx.dir, 'agent-hit.ctl');
  const qsock = join(ctx.dir, 'qemu-hit.sock');
  const cache = join(ctx.dir, 'cache-hit');
  const agentUri = `nbd+unix:///${HIT_NAME}?socket=${socket}`;
  const qemuUri = `nbd+unix:///?socket=${qsock}`;
  const agent = await startAgent({ bin, storage, cache, socket, control, delayMs: 0, extra: ['--boot-idle', '3600', '--boot-window', '3600'], logFile: join(ctx.dir, 'agent-hit.log') });
  const qargs = ['-r', '-f', 'raw', '-t', '--socket', qsock, image];
  noteCommand('hit-qemu', `qemu-nbd ${qargs.join(' ').replace(qsock, 'SOCK').replace(image, 'IMG')}`);
  const qemu = await startServer('qemu-nbd', qargs, qsock, 'qemu-nbd', join(ctx.dir, 'qemu-hit.log'));
  const { NbdClient } = await import(join(root, 'dist/nbd/client/index.js'));
  let holder;
  try {
    holder = await NbdClient.connect(agentUri);
    for (let off = 0; off < HIT_BYTES; off += MiB) await holder.read(off, MiB);
    await readFile(image); // qemu-nbd's copy into the page cache
    // Misses and readahead blocks are written to the cache in batches: wait for all of them.
    const blocks = HIT_BYTES / 4096;
    const { status: filled } = await pollAgent(agent, (s) => s.cache.blocks >= blocks, 'the hit image to be cached', 30_000);
    const agentRuns = [];
    const qemuRuns = [];
    for (let i = 0; i < HIT_ROUNDS; i++) {
      const before = await agent.status();
      const a = await fio(agentUri, HIT_SECONDS, 'agent');
      const after = await agent.status();
      a.counters = diffCounters(pickCounters(after), pickCounters(before));
      agentRuns.push(a);
      qemuRuns.push(await fio(qemuUri, HIT_SECONDS, 'qemu-nbd'));
      console.log(`bench: hit path ${i + 1}/${HIT_ROUNDS}: agent ${a.iops.toFixed(0)} IOPS, qemu-nbd ${qemuRuns.at(-1).iops.toFixed(0)} IOPS (agent storage reads during run: ${a.counters.storage.readRequests})`);
    }
    return { imageBytes: HIT_BYTES, seconds: HIT_SECONDS, agent: agentRuns, qemu: qemuRuns };
  } finally {
    await holder?.close().catch(() => undefined);
    await stopChild(qemu);
    await agent.stop();
  }
}

// ---------------------------------------------------------------------------
// Report.

function median(values) {
  const v = values.filter((x) => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return null;
  const m = Math.floor(v.length / 2);
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

const fmt = (x, d = 2) => (x === null || x === undefined ? '-' : x.toFixed(d));
const fmtList = (xs, d = 2) => xs.map((x) => fmt(x, d)).join(', ');
const mib = (b) => (b / MiB).toFixed(1);

function machineInfo() {
  return {
    hostname: hostname(),
    kernel: release(),
    nproc: cpus().length,
    cpu: cpus()[0]?.model ?? 'unknown',
    memGiB: +(totalmem() / GiB).toFixed(1),
    freeMemGiB: +(freemem() / GiB).toFixed(1),
    node: process.version,
  };
}

function summarize(results) {
  const local = median(results.local.map((r) => r.completionS));
  const perDelay = {};
  for (const d of DELAYS) {
    const direct = results.direct[d];
    const series = results.series[d];
    const pick = (k) => series.map((s) => s[k]);
    const med = (xs, f) => median(xs.map(f));
    const first = pick('first');
    const cold = pick('cold');
    const warm = pick('warm');
    const directS = med(direct, (r) => r.completionS);
    const firstS = med(first, (r) => r.completionS);
    const coldS = med(cold, (r) => r.completionS);
    const warmS = med(warm, (r) => r.completionS);
    const firstReq = med(first, (r) => r.counters.storage.readRequests);
    const coldReq = med(cold, (r) => r.counters.storage.readRequests);
    const recorded = direct[0]?.recordedS ?? 25.41;
    perDelay[d] = {
      directS, firstS, coldS, warmS,
      warmNoThinkS: med(warm, (r) => r.noThinkTime?.completionS),
      firstOverDirect: firstS / directS,
      coldOverRecorded: coldS / recorded,
      coldOverLocal: coldS / local,
      warmOverLocal: warmS / local,
      firstStorageRequests: firstReq,
      coldStorageRequests: coldReq,
      coldRequestShare: coldReq / firstReq,
      targets: {
        firstBoot: { target: '<= 1.1x direct', value: firstS / directS, met: firstS / directS <= 1.1 },
        coldVsRecorded: { target: '<= 1.05x recorded duration', value: coldS / recorded, met: coldS / recorded <= 1.05 },
        coldVsLocal: { target: '<= 1.05x local qemu-nbd (same run)', value: coldS / local, met: coldS / local <= 1.05 },
        coldRequests: { target: '<= 2% of first boot storage requests', value: coldReq / firstReq, met: coldReq / firstReq <= 0.02 },
      },
    };
  }
  let hit = null;
  if (results.hit) {
    const a = median(results.hit.agent.map((r) => r.iops));
    const q = median(results.hit.qemu.map((r) => r.iops));
    hit = { agentIops: a, qemuIops: q, ratio: a / q, target: { target: '>= 0.5x qemu-nbd', met: a / q >= 0.5 } };
  }
  const localNoThinkS = median(results.local.map((r) => r.noThinkTime?.completionS));
  return { recordedS: results.local[0]?.recordedS ?? null, localS: local, localNoThinkS, perDelay, hit };
}

function phaseTable(label, phases) {
  const lines = [`${label}:`, '', '| phase | reads | recorded (s) | replay (s) | ratio | mean lat (ms) |', '|---|---|---|---|---|---|'];
  for (const p of phases) lines.push(`| ${p.phase} | ${p.reads} | ${fmt(p.recordedS)} | ${fmt(p.replayS)} | ${fmt(p.ratio)} | ${fmt(p.meanLatMs)} |`);
  return lines.join('\n');
}

function markdown(report, hitRounds) {
  const { machine, summary: s, results, config } = report;
  const L = [];
  L.push(`# Agent benchmark, ${report.date}`, '');
  L.push(`Generated by \`npm run bench:agent\` (bench/agent.js); methodology in docs/benchmarks-agent.md.`, '');
  L.push('## Machine', '');
  L.push(`${machine.nproc} CPUs (${machine.cpu}), ${machine.memGiB} GiB RAM, Linux ${machine.kernel}, Node ${machine.node}.`);
  L.push(`Load average at start ${report.loadStart.map((x) => x.toFixed(2)).join(' / ')}, at end ${report.loadEnd.map((x) => x.toFixed(2)).join(' / ')} (1/5/15 min). The machine is shared with other jobs.`, '');
  L.push('## Setup', '');
  L.push(`Trace \`${traceRel}\` (4,060 reads, ~97 MiB, recorded ${fmt(s.recordedS)} s), 2 GiB **raw** image with data wherever the trace reads (every configuration serves the same raw file; ${report.tools.nbdkit} has no qcow2 decoder filter). ${config.rounds} rounds, configurations interleaved within each round; medians reported, every run in the JSON. Storage delay D per request: nbdkit's delay filter (\`rdelay\`) for direct, the agent's \`--storage-delay\` (every storage read request, including the prefetch's 8 MiB segment reads) for the agent. Every replay runs \`bootcache replay\` with its default untimed warm-up against a zero export inside the replay process, before it connects (docs/replay.md, "Warm-up").`, '');
  L.push('## Boot replay', '');
  L.push(`Local reference (qemu-nbd, no delay): median **${fmt(s.localS)} s** (runs ${fmtList(results.local.map((r) => r.completionS))}; lag-free ${fmt(median(results.local.map((r) => r.lagFreeS)))} s; read latency mean / p99 ${fmt(median(results.local.map((r) => r.latencyMs.mean)))} / ${fmt(median(results.local.map((r) => r.latencyMs.p99)))} ms); recorded duration ${fmt(s.recordedS)} s.`, '');
  L.push('| D | config | completion (s, median) | runs (s) | lag-free (s) | latency mean / p99 / max (ms) | target | ratio | met | storage requests | storage MiB |');
  L.push('|---|---|---|---|---|---|---|---|---|---|---|');
  for (const d of config.delays) {
    const p = s.perDelay[d];
    const series = results.series[d];
    const req = (k) => fmt(median(series.map((x) => x[k].counters.storage.readRequests)), 0);
    const bytes = (k) => mib(median(series.map((x) => x[k].counters.storage.readBytes)));
    const lat = (runs) => `${fmt(median(runs.map((r) => r.latencyMs.mean)))} / ${fmt(median(runs.map((r) => r.latencyMs.p99)))} / ${fmt(median(runs.map((r) => r.latencyMs.max)), 0)}`;
    const lagFree = (runs) => fmt(median(runs.map((r) => r.lagFreeS)));
    const cfg = (k) => series.map((x) => x[k]);
    L.push(`| ${d} ms | direct (nbdkit delay) | ${fmt(p.directS)} | ${fmtList(results.direct[d].map((r) => r.completionS))} | ${lagFree(results.direct[d])} | ${lat(results.direct[d])} | reference | - | - | ~4060 (1 per read) | ~97 |`);
    L.push(`| ${d} ms | first boot | ${fmt(p.firstS)} | ${fmtList(series.map((x) => x.first.completionS))} | ${lagFree(cfg('first'))} | ${lat(cfg('first'))} | <= 1.1x direct | ${fmt(p.firstOverDirect, 3)} | ${p.targets.firstBoot.met ? 'yes' : '**no**'} | ${req('first')} | ${bytes('first')} |`);
    L.push(`| ${d} ms | cold host | ${fmt(p.coldS)} | ${fmtList(series.map((x) => x.cold.completionS))} | ${lagFree(cfg('cold'))} | ${lat(cfg('cold'))} | <= 1.05x recorded / local | ${fmt(p.coldOverRecorded, 3)} / ${fmt(p.coldOverLocal, 3)} | ${p.targets.coldVsRecorded.met ? 'yes' : '**no**'} / ${p.targets.coldVsLocal.met ? 'yes' : '**no**'} | ${req('cold')} (${fmt(100 * p.coldRequestShare, 2)}% of first; target <= 2%: ${p.targets.coldRequests.met ? 'yes' : '**no**'}) | ${bytes('cold')} |`);
    L.push(`| ${d} ms | warm | ${fmt(p.warmS)} | ${fmtList(series.map((x) => x.warm.completionS))} | ${lagFree(cfg('warm'))} | ${lat(cfg('warm'))} | (none) / local | ${fmt(p.warmOverLocal, 3)} | - | ${req('warm')} | ${bytes('warm')} |`);
  }
  L.push('');
  L.push('Storage requests and MiB are the agent\'s `counters.storage` over the replay (first boot: up to the end of the replay, before mark-booted; the rebuild that follows reads through the cache). Direct: nbdkit sees one request per traced read.', '');
  L.push('First boot, publication: time from the end of the replay until `agent status` showed the boot complete, rebuild idle and IMG.bcseg on storage (includes `mark-booted` and the status polls):', '');
  for (const d of config.delays) {
    L.push(`- D = ${d} ms: ${fmtList(results.series[d].map((x) => x.first.publishedAfterS))} s; segment ${mib(results.series[d][0].first.segmentBytes)} MiB.`);
  }
  L.push('');
  L.push('Cold host prefetch (per run: state, MiB streamed, stream duration):', '');
  for (const d of config.delays) {
    L.push(`- D = ${d} ms: ${results.series[d].map((x) => x.cold.prefetch ? `${x.cold.prefetch.state} ${mib(x.cold.prefetch.bytesRead)} MiB in ${fmt(x.cold.prefetch.durationMs / 1000)} s` : 'none').join('; ')}; cache hits/misses ${results.series[d].map((x) => `${x.cold.counters.cache.hits}/${x.cold.counters.cache.misses}`).join(', ')}.`);
  }
  L.push('');
  L.push('Diagnostic, the prefetch alone (fresh agent, empty cache, one idle connection, no reads; the storage serves the segment from the page cache):', '');
  for (const d of config.delays) {
    L.push(`- D = ${d} ms: ${results.series[d].map((x) => x.prefetchAlone ? `${mib(x.prefetchAlone.bytes)} MiB in ${fmt(x.prefetchAlone.durationS)} s (${fmt(x.prefetchAlone.MiBs, 1)} MiB/s)` : '-').join('; ')}`);
  }
  L.push('');
  L.push('Diagnostic, no think time (`--no-think-time`: the boot bound by read latency alone, one run per round):', '');
  L.push(`- local qemu-nbd: ${fmtList(results.local.map((r) => r.noThinkTime.completionS))} s (mean latency ${fmtList(results.local.map((r) => r.noThinkTime.latencyMs.mean), 3)} ms)`);
  for (const d of config.delays) {
    L.push(`- warm agent, D = ${d} ms: ${fmtList(results.series[d].map((x) => x.warm.noThinkTime.completionS))} s (mean latency ${fmtList(results.series[d].map((x) => x.warm.noThinkTime.latencyMs.mean), 3)} ms; storage requests ${results.series[d].map((x) => x.warm.noThinkTime.counters.storage.readRequests).join(', ')})`);
  }
  L.push('');
  if (s.hit) {
    const h = results.hit;
    L.push('## Hit path', '');
    L.push(`fio 4 KiB random reads, iodepth 32, ${h.seconds} s per run, ${hitRounds} runs each (alternating), over the unix socket, on a ${h.imageBytes / MiB} MiB raw image fully cached by the agent (read once beforehand) and in the page cache for qemu-nbd.`, '');
    L.push('| server | IOPS (median) | runs | mean / p99 latency (µs, median run) |', '|---|---|---|---|');
    const row = (label, runs) => {
      const m = median(runs.map((r) => r.iops));
      const mid = runs.slice().sort((a, b) => a.iops - b.iops)[Math.floor(runs.length / 2)];
      return `| ${label} | ${fmt(m, 0)} | ${fmtList(runs.map((r) => r.iops), 0)} | ${fmt(mid.latUs.mean, 0)} / ${fmt(mid.latUs.p99, 0)} |`;
    };
    L.push(row('agent (cache hits)', h.agent));
    L.push(row('qemu-nbd -r -f raw -t', h.qemu));
    L.push('');
    L.push(`Ratio agent / qemu-nbd: **${fmt(s.hit.ratio, 3)}** (target >= 0.5: ${s.hit.target.met ? 'met' : '**not met**'}). Agent storage reads during the fio runs: ${fmtList(h.agent.map((r) => r.counters.storage.readRequests), 0)}.`, '');
  }
  L.push('## Targets', '');
  for (const d of config.delays) {
    for (const [k, t] of Object.entries(s.perDelay[d].targets)) L.push(`- D = ${d} ms, ${k}: ${t.target}: ${fmt(t.value, 3)} -> ${t.met ? 'met' : '**missed**'}`);
  }
  if (s.hit) L.push(`- hit path: ${s.hit.target.target}: ${fmt(s.hit.ratio, 3)} -> ${s.hit.target.met ? 'met' : '**missed**'}`);
  L.push('');
  if (report.notes.length) {
    L.push('## Notes', '', ...report.notes.map((n) => `- ${n}`), '');
  }
  L.push('## Timelines (median-ish: first round)', '');
  for (const d of config.delays) {
    const x = results.series[d][0];
    L.push(phaseTable(`D = ${d} ms, direct`, results.direct[d][0].phases), '');
    L.push(phaseTable(`D = ${d} ms, first boot`, x.first.phases), '');
    L.push(phaseTable(`D = ${d} ms, cold host`, x.cold.phases), '');
  }
  L.push(phaseTable('local qemu-nbd', results.local[0].phases), '');
  L.push('## Commands', '', '```');
  for (const [k, v] of Object.entries(report.commands)) L.push(`# ${k}`, v);
  L.push('```', '');
  return L.join('\n');
}

// ---------------------------------------------------------------------------

async function toolVersion(cmd, args) {
  const r = await run(cmd, args, { allowFail: true });
  return (r.stdout || r.stderr).split('\n')[0].trim();
}

async function main() {
  if (!existsSync(join(root, 'dist/commands/replay.js'))) throw new Error('dist/ is missing: run npm run build first');
  mkdirSync(work, { recursive: true });
  const loadStart = loadavg();
  const started = new Date();
  const tools = {
    nbdkit: await toolVersion('nbdkit', ['--version']),
    qemuNbd: await toolVersion('qemu-nbd', ['--version']),
    fio: await toolVersion('fio', ['--version']),
  };
  const { path: image, blocks } = await ensureBootImage({ work, trace, traceRel });
  const hitImage = SKIP_HIT ? null : await ensureHitImage();
  // Sockets and per-run state; on the image's filesystem so the image can be hard-linked.
  const dir = join(work, `run-${process.pid}`);
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  const ctx = { dir };
  const results = { local: [], direct: {}, series: {}, hit: null };
  for (const d of DELAYS) { results.direct[d] = []; results.series[d] = []; }
  const notes = [];
  try {
    // Warm the page cache for the image's data so the first run is not penalised.
    await readFile(image).catch(() => undefined);
    const doLocal = async (round) => {
      const l = await measureLocal(ctx, image);
      results.local.push(l);
      console.log(`bench: round ${round} local qemu-nbd ${l.completionS.toFixed(2)} s (no think time ${l.noThinkTime.completionS.toFixed(2)} s)`);
    };
    for (let round = 1; round <= ROUNDS; round++) {
      if (round % 2 === 0) await doLocal(round);
      // Alternate the order of delays and of direct/agent between rounds.
      const delays = round % 2 ? DELAYS : [...DELAYS].reverse();
      for (const d of delays) {
        const agentFirst = round % 2 === 0;
        const doDirect = async () => {
          const r = await measureDirect(ctx, image, d);
          results.direct[d].push(r);
          console.log(`bench: round ${round} D=${d}ms direct ${r.completionS.toFixed(2)} s`);
        };
        const doAgent = async () => {
          const s = await measureAgentSeries(ctx, image, d, round);
          results.series[d].push(s);
          console.log(`bench: round ${round} D=${d}ms first ${s.first.completionS.toFixed(2)} s (${s.first.counters.storage.readRequests} req), ` +
            `cold ${s.cold.completionS.toFixed(2)} s (${s.cold.counters.storage.readRequests} req), warm ${s.warm.completionS.toFixed(2)} s (${s.warm.counters.storage.readRequests} req)`);
        };
        if (agentFirst) { await doAgent(); await doDirect(); } else { await doDirect(); await doAgent(); }
      }
      if (round % 2 === 1) await doLocal(round);
    }
    if (!SKIP_HIT) results.hit = await measureHitPath(ctx, hitImage);
  } finally {
    killAllSync();
  }
  const summary = summarize(results);
  const date = started.toISOString().slice(0, 10);
  const report = {
    date,
    startedAt: started.toISOString(),
    finishedAt: new Date().toISOString(),
    machine: machineInfo(),
    loadStart,
    loadEnd: loadavg(),
    tools,
    config: { rounds: ROUNDS, delays: DELAYS, trace: traceRel, image: { path: image, format: 'raw', virtualSize: 2 * GiB, dataBlocks: blocks }, hitSeconds: HIT_SECONDS, hitRounds: HIT_ROUNDS },
    commands: Object.fromEntries(commands),
    summary,
    notes,
    results,
  };
  for (const d of DELAYS) {
    for (const [k, t] of Object.entries(summary.perDelay[d].targets)) {
      if (!t.met) notes.push(`Target missed at D = ${d} ms: ${k} (${t.target}), measured ${fmt(t.value, 3)}. See the diagnosis in docs/benchmarks-agent.md.`);
    }
  }
  if (summary.hit && !summary.hit.target.met) notes.push(`Hit-path target missed: ${fmt(summary.hit.ratio, 3)} of qemu-nbd.`);
  const outDir = join(root, 'bench/results');
  await mkdir(outDir, { recursive: true });
  writeFileSync(join(outDir, 'agent.json'), JSON.stringify(report, null, 2) + '\n');
  writeFileSync(join(outDir, 'agent.md'), markdown(report, report.config.hitRounds));
  console.log(`bench: wrote bench/results/agent.json and .md (${((Date.now() - started.getTime()) / 60000).toFixed(1)} min)`);
  await rm(dir, { recursive: true, force: true });
}

/** `node bench/agent.js --report FILE.json`: rewrites FILE.md from a saved result. */
async function reportOnly(jsonPath) {
  const report = JSON.parse(await readFile(jsonPath, 'utf8'));
  const mdPath = jsonPath.replace(/\.json$/, '.md');
  writeFileSync(mdPath, markdown(report, report.config.hitRounds));
  console.log(`bench: wrote ${mdPath}`);
}

const reportArg = process.argv.indexOf('--report');
(reportArg > 0 ? reportOnly(process.argv[reportArg + 1]) : main()).catch((err) => {
  console.error(`bench: ${err.stack ?? err.message}`);
  killAllSync();
  process.exit(1);
});
