#!/usr/bin/env node
// bootcache against the peers (npm run bench): the reference guest booted by
// QEMU, and boot traces replayed, through every configuration over the same
// emulated remote storage, in the same run; then boot storms. Method and
// reading guide: docs/benchmarks-peers.md.
//
// Configurations (each at every delay D):
//   local         the image file itself (the physical limit here; no D)
//   direct        the remote storage, no cache (nbdkit delay filter)
//   nbdkit-cache  nbdkit cache (cache-on-read=true) + readahead filters over the remote: cold, warm
//   cor           QEMU, local qcow2 overlay with copy-on-read over the remote: cold, warm
//   bootcache     the agent: first boot (records), cold host (segment on storage), warm
//
// Workloads (BENCH_WORKLOADS, comma-separated, default all):
//   boot      real boots of the reference guest, QEMU start to console marker
//   replay    `bootcache replay` of the real trace (../shared/traces, copy in test/data)
//   validate  `bootcache replay` of the reference guest's own trace (recorded
//             by `bootcache profile` here), to check the replay model against the real boots
//   storm     N simultaneous replays through one agent / one nbdkit cache
//
// Each workload run updates its section of bench/results/peers.json and
// regenerates peers.md and the SVG plots. `node bench/peers.js --report`
// only regenerates them.
//
// Environment: BENCH_DELAYS (default "2,10"), BENCH_RUNS (real boots per
// configuration, default 3), BENCH_REPLAY_RUNS (default 1), BENCH_CONFIGS
// (default all), BENCH_STORM_N (default "1,4,16,32"), BENCH_STORM_DELAY
// (default 10), BENCH_RATE (bandwidth cap in bytes/s for every contender,
// default none), BENCH_ACCEL (default: scripts/detect-accel.sh), BENCH_IMAGE
// (default: the reference guest's debian12.raw), BENCH_WORK (default
// /var/tmp/bootcache-peers), BENCH_DATE (the date the report
// carries, default today).
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { run } from './lib/process.js';
import { listEnv, numbersEnv, usage } from './lib/env.js';
import { machine } from './lib/machine.js';
import { measureBoot, MARKER } from './peers/boot.js';
import { sampleStorage } from './peers/nbdkit-log.js';
import {
  startNbdkit, startLocalNbd, createCorOverlay, startCorExport,
  freshStorageDir, startAgent, pollAgent, agentStorage,
} from './peers/servers.js';
import { writeReport } from './peers/report.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const bin = join(root, 'bin/run.js');
const sharedTraceRel = 'test/data/debian12-minbase-boot-timed.csv';
const sharedTrace = join(root, sharedTraceRel);
const refDir = process.env.BOOTCACHE_REF_DIR ?? '/var/cache/bootcache/reference-guest';
const work = process.env.BENCH_WORK ?? '/var/tmp/bootcache-peers';
const date = process.env.BENCH_DATE ?? new Date().toISOString().slice(0, 10);
const resultsDir = join(root, 'bench/results');
const jsonPath = join(resultsDir, 'peers.json');

const ALL_CONFIGS = ['local', 'direct', 'nbdkit-cache', 'cor', 'bootcache'];
const ALL_WORKLOADS = ['boot', 'replay', 'validate', 'storm'];

const DELAYS = numbersEnv('BENCH_DELAYS', ['2', '10']);
const RUNS = numbersEnv('BENCH_RUNS', ['3'])[0];
const REPLAY_RUNS = numbersEnv('BENCH_REPLAY_RUNS', ['1'])[0];
const CONFIGS = listEnv('BENCH_CONFIGS', ALL_CONFIGS, ALL_CONFIGS);
const WORKLOADS = listEnv('BENCH_WORKLOADS', ALL_WORKLOADS, ALL_WORKLOADS);
const STORM_N = numbersEnv('BENCH_STORM_N', ['1', '4', '16', '32']);
const STORM_DELAY = numbersEnv('BENCH_STORM_DELAY', ['10'])[0];
const RATE = process.env.BENCH_RATE ? Number(process.env.BENCH_RATE) : undefined;
if (RATE !== undefined && !(RATE > 0)) usage(`BENCH_RATE must be a positive number of bytes/s, got ${process.env.BENCH_RATE}`);
// The agent's storage wrapper has a delay but no bandwidth cap yet: a cap on the peers alone would not be a fair race.
if (RATE !== undefined && (CONFIGS.includes('bootcache') || listEnv('BENCH_WORKLOADS', ALL_WORKLOADS).includes('storm'))) {
  usage('BENCH_RATE: the agent has no bandwidth cap yet (--storage-delay only); use it with BENCH_CONFIGS without bootcache and without the storm workload');
}
const image = process.env.BENCH_IMAGE ?? join(refDir, 'debian12.raw');
const IMAGE_NAME = basename(image);

const log = (...a) => console.log(`[${new Date().toISOString().slice(11, 19)}] bench:`, ...a);

// ---------------------------------------------------------------------------
// Measurements: a boot or a replay, with the storage sampled around it.

/** `bootcache replay` as its own process; the replay's own completion time (start-up excluded). */
async function replayOnce(tracePath, uri) {
  const { stdout } = await run(process.execPath, [bin, 'replay', tracePath, '--uri', uri, '--json', '--clamp'], { label: 'bootcache replay' });
  const r = JSON.parse(stdout);
  if (r.error) throw new Error(`replay against ${uri}: ${r.error.message}`);
  return r;
}

function replayMeasurer(tracePath) {
  return async (ctx, target, storage) => {
    let uri = target.uri;
    let server;
    if (target.kind === 'file') server = await startLocalNbd({ dir: ctx.dir, image: target.path });
    else if (target.kind === 'cor') server = await startCorExport({ dir: ctx.dir, overlay: target.overlay, remoteUri: target.remoteUri });
    if (server) uri = server.uri;
    try {
      const sampler = storage ? await sampleStorage(storage) : undefined;
      const r = await replayOnce(tracePath, uri);
      const io = sampler ? await sampler.stop() : undefined;
      const s = r.replay;
      return {
        seconds: s.durationS,
        recordedS: s.recordedDurationS,
        latencyMs: { mean: s.latencyMs.mean, p99: s.latencyMs.p99 },
        storage: io ? { requests: io.requests, bytes: io.bytes } : null,
      };
    } finally {
      await server?.stop();
    }
  };
}

// ---------------------------------------------------------------------------
// Configurations: each yields one or more phases (cold, warm, ...) measured
// with `measure(ctx, target, storage)`.

async function runConfig(ctx, config, delayMs, measure, traceForAgent) {
  const out = [];
  const rec = (phase, m) => {
    out.push({ config, phase, delayMs: config === 'local' ? 0 : delayMs, ...m });
    log(`  ${config}${phase ? ` ${phase}` : ''}${config === 'local' ? '' : ` D=${delayMs}ms`}: ${m.seconds.toFixed(2)} s` +
      (m.storage ? `, storage ${m.storage.requests} req / ${(m.storage.bytes / 2 ** 20).toFixed(1)} MiB` : ''));
  };
  const peer = { dir: ctx.dir, image, delayMs, rateBps: RATE };
  switch (config) {
    case 'local':
      rec('', await measure(ctx, { kind: 'file', path: image }, null));
      break;
    case 'direct': {
      const remote = await startNbdkit({ ...peer, name: 'direct', cached: false });
      ctx.commands.set('direct', remote.command);
      try {
        rec('', await measure(ctx, { kind: 'uri', uri: remote.uri }, remote.storage));
      } finally {
        await remote.stop();
      }
      break;
    }
    case 'nbdkit-cache': {
      const remote = await startNbdkit({ ...peer, name: 'nbdkit-cache', cached: true });
      ctx.commands.set('nbdkit-cache', remote.command);
      try {
        rec('cold', await measure(ctx, { kind: 'uri', uri: remote.uri }, remote.storage));
        rec('warm', await measure(ctx, { kind: 'uri', uri: remote.uri }, remote.storage));
      } finally {
        await remote.stop();
      }
      break;
    }
    case 'cor': {
      const remote = await startNbdkit({ ...peer, name: 'cor-remote', cached: false });
      const overlay = join(ctx.dir, 'cor.qcow2');
      await createCorOverlay(overlay, remote.uri);
      ctx.commands.set('cor', `${remote.command}; qemu-img create -f qcow2 -u -F raw -b REMOTE_URI cor.qcow2 2G; QEMU -blockdev nbd(remote) -> qcow2(cor.qcow2, backing=remote) -> copy-on-read -> qcow2(throwaway top overlay for guest writes)`);
      try {
        const target = { kind: 'cor', overlay, remoteUri: remote.uri };
        rec('cold', await measure(ctx, target, remote.storage));
        rec('warm', await measure(ctx, target, remote.storage));
      } finally {
        await remote.stop();
        rmSync(overlay, { force: true });
      }
      break;
    }
    case 'bootcache': {
      const storageDir = freshStorageDir(join(ctx.dir, 'agent-storage'), image);
      const segPath = join(storageDir, `${IMAGE_NAME}.bcseg`);
      const cache1 = join(ctx.dir, 'agent-cache-first');
      rmSync(cache1, { recursive: true, force: true });
      let agent = await startAgent({ bin, dir: ctx.dir, name: 'agent', storage: storageDir, cache: cache1, delayMs });
      ctx.commands.set('bootcache', agent.command.replace(bin, 'bin/run.js'));
      const target = { kind: 'uri', uri: agent.uriFor(IMAGE_NAME) };
      try {
        const m = await measure(ctx, target, agentStorage(agent));
        // The boot ends when the client disconnects; the agent then publishes map and segment.
        const { waitedS } = await pollAgent(agent, (s) => {
          const e = s.exports.find((x) => x.name === IMAGE_NAME);
          return e?.lastBoot?.state === 'complete' && e.rebuild?.state === 'idle' && existsSync(segPath);
        }, 'the first boot to be published');
        rec('first', { ...m, publishedAfterS: waitedS, segmentBytes: (await stat(segPath)).size });
      } finally {
        await agent.stop();
        rmSync(cache1, { recursive: true, force: true });
      }
      const cache2 = join(ctx.dir, 'agent-cache-cold');
      rmSync(cache2, { recursive: true, force: true });
      agent = await startAgent({ bin, dir: ctx.dir, name: 'agent', storage: storageDir, cache: cache2, delayMs });
      try {
        const settle = () => pollAgent(agent, (s) => {
          const e = s.exports.find((x) => x.name === IMAGE_NAME);
          return e?.rebuild?.state !== 'running' && e?.prefetch?.state !== 'streaming' && e?.connections === 0;
        }, 'the agent to settle');
        rec('cold', await measure(ctx, target, agentStorage(agent)));
        await settle();
        rec('warm', await measure(ctx, target, agentStorage(agent)));
        await settle();
      } finally {
        await agent.stop();
        rmSync(cache2, { recursive: true, force: true });
      }
      break;
    }
    default:
      throw new Error(`unknown configuration ${config}`);
  }
  return out;
}

/** Rounds of every configuration at every delay; local once per round. */
async function runMatrix(ctx, measure, runs) {
  const rows = [];
  for (let round = 1; round <= runs; round++) {
    log(`round ${round}/${runs}`);
    if (CONFIGS.includes('local')) rows.push(...(await runConfig(ctx, 'local', 0, measure)).map((r) => ({ ...r, round })));
    for (const delayMs of DELAYS) {
      // Rotate the order each round so no configuration always runs first.
      const peers = CONFIGS.filter((c) => c !== 'local');
      const order = peers.slice((round - 1) % peers.length).concat(peers.slice(0, (round - 1) % peers.length));
      for (const config of order) rows.push(...(await runConfig(ctx, config, delayMs, measure)).map((r) => ({ ...r, round })));
    }
  }
  return rows;
}

// ---------------------------------------------------------------------------
// The reference guest's own trace, for the model validation.

async function referenceTrace(ctx) {
  // Recorded afresh in every run: its think times are this host's speed now,
  // the same conditions as the real boots it is compared with.
  const out = join(ctx.dir, 'reference-guest.trace.csv');
  log(`recording the reference guest's boot trace with bootcache profile (one boot)`);
  const { stdout } = await run(process.execPath, [bin, 'profile', image, '--format', 'raw', '--accel', ctx.accel, '--until', MARKER, '--idle', '0',
    '--no-segment', '--out-map', join(ctx.dir, 'reference-guest.bcmap'), '--out-trace', out, '--console-log', join(ctx.dir, 'reference-guest.console.log'), '--json'], { label: 'bootcache profile' });
  const profile = JSON.parse(stdout);
  return { path: out, profile };
}

// ---------------------------------------------------------------------------
// Boot storms: N simultaneous replays through one agent (cold host) and one
// nbdkit cache+readahead (cold), at BENCH_STORM_DELAY.

async function storm(ctx) {
  const delayMs = STORM_DELAY;
  const rows = [];
  // The segment: one recorded replay (first boot) published by an agent.
  const storageDir = freshStorageDir(join(ctx.dir, 'storm-storage'), image);
  const segPath = join(storageDir, `${IMAGE_NAME}.bcseg`);
  {
    const cache = join(ctx.dir, 'storm-cache-first');
    rmSync(cache, { recursive: true, force: true });
    const agent = await startAgent({ bin, dir: ctx.dir, name: 'storm-agent', storage: storageDir, cache, delayMs: 0 });
    try {
      await replayOnce(sharedTrace, agent.uriFor(IMAGE_NAME));
      await pollAgent(agent, (s) => {
        const e = s.exports.find((x) => x.name === IMAGE_NAME);
        return e?.lastBoot?.state === 'complete' && e.rebuild?.state === 'idle' && existsSync(segPath);
      }, 'the storm segment to be published');
    } finally {
      await agent.stop();
      rmSync(cache, { recursive: true, force: true });
    }
  }
  const segmentBytes = (await stat(segPath)).size;
  const stormClient = join(root, 'bench/peers/storm-client.js');
  const once = async (uri, n) => JSON.parse((await run(process.execPath, [stormClient, sharedTrace, uri, String(n)], { label: 'storm' })).stdout);
  for (const n of STORM_N) {
    {
      const cache = join(ctx.dir, 'storm-cache');
      rmSync(cache, { recursive: true, force: true });
      const agent = await startAgent({ bin, dir: ctx.dir, name: 'storm-agent', storage: storageDir, cache, delayMs });
      ctx.commands.set('storm bootcache', agent.command.replace(bin, 'bin/run.js'));
      try {
        const storage = agentStorage(agent);
        const before = await storage.totals();
        const r = await once(agent.uriFor(IMAGE_NAME), n);
        const after = await storage.totals();
        rows.push({ server: 'bootcache', n, ...r, storage: { requests: after.requests - before.requests, bytes: after.bytes - before.bytes } });
      } finally {
        await agent.stop();
        rmSync(cache, { recursive: true, force: true });
      }
    }
    {
      const remote = await startNbdkit({ dir: ctx.dir, name: 'storm-nbdkit', image, delayMs, rateBps: RATE, cached: true });
      ctx.commands.set('storm nbdkit', remote.command);
      try {
        const before = await remote.storage.totals();
        const r = await once(remote.uri, n);
        const after = await remote.storage.totals();
        rows.push({ server: 'nbdkit-cache', n, ...r, storage: { requests: after.requests - before.requests, bytes: after.bytes - before.bytes } });
      } finally {
        await remote.stop();
      }
    }
    for (const r of rows.slice(-2)) {
      const c = r.boots.map((b) => b.completionS).sort((a, b) => a - b);
      log(`  storm N=${n} ${r.server}: per boot ${c[0].toFixed(2)}-${c[c.length - 1].toFixed(2)} s, storage ${r.storage.requests} req / ${(r.storage.bytes / 2 ** 20).toFixed(1)} MiB`);
    }
  }
  return { delayMs, segmentBytes, rows };
}

// ---------------------------------------------------------------------------

function loadResults() {
  if (!existsSync(jsonPath)) return { date, sections: {} };
  return JSON.parse(readFileSync(jsonPath, 'utf8'));
}

async function main() {
  if (process.argv.includes('--report')) {
    const saved = loadResults();
    await writeReport(saved, { resultsDir, date: saved.date ?? date });
    return;
  }
  if (!existsSync(image)) {
    throw new Error(`no image at ${image}: build the reference guest first (bash scripts/reference-guest/build.sh) or set BENCH_IMAGE`);
  }
  mkdirSync(work, { recursive: true });
  mkdirSync(resultsDir, { recursive: true });
  const accel = process.env.BENCH_ACCEL ?? (await run('bash', [join(root, 'scripts/detect-accel.sh')])).stdout.trim();
  const dir = join(work, 'run');
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const ctx = { dir, accel, commands: new Map() };
  const results = loadResults();
  results.date = date;
  const common = () => ({
    machine: results.machine,
    delaysMs: DELAYS,
    rateBps: RATE ?? null,
    image: { path: image, bytes: null },
    commands: Object.fromEntries(ctx.commands),
    command: `${Object.entries(process.env).filter(([k]) => k.startsWith('BENCH_')).map(([k, v]) => `${k}=${v}`).join(' ')} npm run bench`.trim(),
  });
  results.machine = await machine(accel);
  log(`image ${image}, accel ${accel}, delays ${DELAYS.join('/')} ms, configs ${CONFIGS.join(',')}, workloads ${WORKLOADS.join(',')}`);

  const save = async (name, section) => {
    // A matrix run keeps the earlier rows of the delays and configurations it did not measure.
    const earlier = results.sections[name];
    if (earlier?.rows && section.rows && name !== 'storm') {
      const remeasured = (r) => CONFIGS.includes(r.config) && (r.config === 'local' || DELAYS.includes(r.delayMs));
      section.rows = [...earlier.rows.filter((r) => !remeasured(r)), ...section.rows];
    }
    results.sections[name] = { ...section, finishedAt: new Date().toISOString() };
    writeFileSync(jsonPath, `${JSON.stringify(results, null, 2)}\n`);
    await writeReport(results, { resultsDir, date });
    log(`wrote ${jsonPath} (${name})`);
  };
  for (const workload of WORKLOADS) {
    const load = loadavg();
    const started = new Date().toISOString();
    if (workload === 'boot') {
      log(`real boots, ${RUNS} run(s) per configuration`);
      const rows = await runMatrix(ctx, measureBoot, RUNS);
      await save('boot', { ...common(), startedAt: started, loadAtStart: load, runs: RUNS, rows });
    } else if (workload === 'replay') {
      log(`replays of ${sharedTraceRel}, ${REPLAY_RUNS} run(s) per configuration`);
      const rows = await runMatrix(ctx, replayMeasurer(sharedTrace), REPLAY_RUNS);
      await save('replay', { ...common(), startedAt: started, loadAtStart: load, trace: sharedTraceRel, runs: REPLAY_RUNS, rows });
    } else if (workload === 'validate') {
      const trace = await referenceTrace(ctx);
      log(`replays of the reference guest's own trace, ${REPLAY_RUNS} run(s) per configuration`);
      const rows = await runMatrix(ctx, replayMeasurer(trace.path), REPLAY_RUNS);
      await save('validate', {
        ...common(), startedAt: started, loadAtStart: load, runs: REPLAY_RUNS, rows,
        trace: 'reference guest, recorded by bootcache profile on this machine in the same run',
        profile: trace.profile,
      });
    } else if (workload === 'storm') {
      log(`boot storms N=${STORM_N.join(',')} at D=${STORM_DELAY} ms`);
      const s = await storm(ctx);
      await save('storm', { ...common(), startedAt: started, loadAtStart: load, trace: sharedTraceRel, ...s });
    }
  }
}

main().catch((err) => {
  console.error(`bench: ${err.stack ?? err.message}`);
  process.exit(1);
});
