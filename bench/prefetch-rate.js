#!/usr/bin/env node
// What pacing the segment stream costs a cold host's boot (npm run
// bench:prefetch-rate). The real agent as a child process, the real boot trace
// replayed against it with `bootcache replay`, for each storage delay D: a
// fresh agent with an empty cache and the segment on storage (the "cold host"
// of bench/agent.js), unpaced and with --prefetch-rate RATE, interleaved in the
// same run. Reports the paced/unpaced ratio of the replay's completion time.
// Writes bench/results/prefetch-rate.json and .md. See docs/benchmarks-agent.md.
//
// Environment: BENCH_RATE (default 25M), BENCH_ROUNDS (default 2),
// BENCH_DELAYS (ms, default "2,10"), BENCH_WORK (default /var/tmp/bootcache-prefetch-rate).
import { copyFileSync, linkSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { rm, stat } from 'node:fs/promises';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { run, killAllSync } from './lib/process.js';
import { agentArgs, startAgent, exportOf } from './lib/agent.js';
import { BIN as bin, IMAGE_NAME, ROOT as root, TRACE as trace, TRACE_REL as traceRel, ensureBootImage } from './lib/boot-image.js';

const work = process.env.BENCH_WORK ?? '/var/tmp/bootcache-prefetch-rate';
const RATE = process.env.BENCH_RATE ?? '25M';
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 2);
const DELAYS = (process.env.BENCH_DELAYS ?? '2,10').split(',').map(Number);
const MiB = 1024 ** 2;
const CONFIGS = [
  { name: 'unpaced', extra: [] },
  { name: `paced ${RATE}/s`, extra: ['--prefetch-rate', RATE] },
];

const bootcache = (args, opts = {}) => run(process.execPath, [bin, ...args], { label: `bootcache ${args[0]}`, ...opts });

/** The map and segment of the trace's own blocks, built once per run (the cold host's sidecars). */
async function buildSidecars(image, dir) {
  const pristine = join(dir, 'pristine');
  mkdirSync(pristine, { recursive: true });
  linkSync(image, join(pristine, IMAGE_NAME));
  const img = join(pristine, IMAGE_NAME);
  await bootcache(['build-map', img, '--trace', trace]);
  await bootcache(['build-segment', img]);
  return { pristine, segmentBytes: (await stat(`${img}.bcseg`)).size };
}

/** One cold-host boot: fresh storage copy (same image inode), empty cache, one replay. */
async function coldBoot(dir, pristine, delay, config, tag) {
  const storage = join(dir, `storage-${tag}`);
  mkdirSync(storage);
  linkSync(join(pristine, IMAGE_NAME), join(storage, IMAGE_NAME));
  // Copies, not links: the agent publishes a new map and segment after the boot.
  for (const ext of ['.bcmap', '.bcseg']) copyFileSync(join(pristine, IMAGE_NAME + ext), join(storage, IMAGE_NAME + ext));
  const cache = join(dir, `cache-${tag}`);
  const agent = await startAgent({
    bin, storage, cache, socket: join(dir, 'agent.sock'), control: join(dir, 'agent.ctl'), delayMs: delay, extra: config.extra, logFile: join(dir, 'agent.log'),
  });
  try {
    const before = (await agent.status()).counters;
    let stdout;
    try {
      ({ stdout } = await bootcache(['replay', trace, '--uri', agent.uriFor(IMAGE_NAME), '--json'], { log: join(dir, 'replay.log') }));
    } catch (err) {
      // The machine is shared: an agent gone under the replay (another job's signal, see the log) is run again once, and said so.
      const alive = await agent.status().then(() => true, () => false);
      if (!alive) throw Object.assign(new Error(`agent gone during the replay (${err.message.slice(0, 200)}); log: ${readFileSync(join(dir, 'agent.log'), 'utf8').trim().split('\n').slice(-2).join(' | ').slice(0, 400)}`), { agentGone: true });
      throw err;
    }
    const result = JSON.parse(stdout);
    if (result.error) throw new Error(`replay: ${result.error.message}`);
    const status = await agent.status();
    const c = status.counters;
    const p = exportOf(status, IMAGE_NAME)?.prefetch ?? null;
    const s = result.replay;
    return {
      completionS: s.durationS,
      lagFreeS: s.lagFreeDurationS,
      latencyMs: { mean: s.latencyMs.mean, p99: s.latencyMs.p99, max: s.latencyMs.max },
      firstPhase: result.phases[0] ? { reads: result.phases[0].reads, replayS: result.phases[0].replayS, meanLatMs: result.phases[0].latencyMs?.mean ?? null } : null,
      storage: { readRequests: c.storage.readRequests - before.storage.readRequests, readBytes: c.storage.readBytes - before.storage.readBytes },
      guestReads: {
        cache: c.guestReads.cache - before.guestReads.cache,
        prefetch: c.guestReads.prefetch - before.guestReads.prefetch,
        storage: c.guestReads.storage - before.guestReads.storage,
      },
      prefetch: p && { state: p.state, bytesRead: p.bytesRead, durationS: p.durationMs / 1000, chunksDemanded: p.chunksDemanded, pacedS: p.pacedMs === undefined ? null : p.pacedMs / 1000 },
      command: `node ${agentArgs({ bin: 'bin/run.js', storage: 'STORAGE', cache: 'CACHE', socket: 'SOCK', control: 'CTL', delayMs: 'D', extra: config.extra }).join(' ')}`,
    };
  } finally {
    await agent.stop();
    await rm(cache, { recursive: true, force: true });
    await rm(storage, { recursive: true, force: true });
  }
}

function median(values) {
  const v = [...values].sort((a, b) => a - b);
  const m = Math.floor(v.length / 2);
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

async function main() {
  const started = Date.now();
  const loadStart = loadavg();
  mkdirSync(work, { recursive: true });
  const { path: image } = await ensureBootImage({ work, trace, traceRel });
  const dir = join(work, `run-${process.pid}`);
  await rm(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const { pristine, segmentBytes } = await buildSidecars(image, dir);
  const runs = [];
  /** Runs made again because their agent went away under the replay (see coldBoot). */
  const reruns = [];
  for (let round = 0; round < ROUNDS; round++) {
    // Interleaved: the order of the delays and of the two configurations flips each round.
    const delays = round % 2 ? [...DELAYS].reverse() : DELAYS;
    for (const delay of delays) {
      const configs = (round + DELAYS.indexOf(delay)) % 2 ? [...CONFIGS].reverse() : CONFIGS;
      for (const config of configs) {
        const tag = `${delay}-${round}-${config.extra.length ? 'paced' : 'unpaced'}`;
        let r;
        try {
          r = await coldBoot(dir, pristine, delay, config, tag);
        } catch (err) {
          if (!err.agentGone) throw err;
          console.error(`bench: D=${delay} ms round ${round + 1} ${config.name}: ${err.message}; running it again`);
          reruns.push({ delay, round, config: config.name, reason: err.message });
          r = await coldBoot(dir, pristine, delay, config, `${tag}-again`);
        }
        runs.push({ delay, round, config: config.name, ...r });
        console.error(`bench: D=${delay} ms round ${round + 1}/${ROUNDS} ${config.name}: ${r.completionS.toFixed(2)} s, stream ${r.prefetch?.durationS.toFixed(2)} s, ${r.prefetch?.chunksDemanded} demand chunks, ${r.storage.readRequests} storage requests`);
      }
    }
  }
  const summary = DELAYS.map((delay) => {
    const of = (name) => runs.filter((r) => r.delay === delay && r.config === name);
    const [u, p] = CONFIGS.map((c) => of(c.name));
    const uS = median(u.map((r) => r.completionS));
    const pS = median(p.map((r) => r.completionS));
    return {
      delay, unpacedS: uS, pacedS: pS, ratio: pS / uS,
      // The same configuration's runs differ by this much: the noise the ratio sits in.
      spreadS: { unpaced: Math.max(...u.map((r) => r.completionS)) - Math.min(...u.map((r) => r.completionS)), paced: Math.max(...p.map((r) => r.completionS)) - Math.min(...p.map((r) => r.completionS)) },
      streamS: { unpaced: median(u.map((r) => r.prefetch?.durationS ?? NaN)), paced: median(p.map((r) => r.prefetch?.durationS ?? NaN)) },
    };
  });
  const report = {
    date: new Date().toISOString(),
    command: `npm run bench:prefetch-rate${process.env.BENCH_ROUNDS || process.env.BENCH_DELAYS || process.env.BENCH_RATE ? ' (env: ' + ['BENCH_RATE', 'BENCH_ROUNDS', 'BENCH_DELAYS'].filter((k) => process.env[k]).map((k) => `${k}=${process.env[k]}`).join(' ') + ')' : ''}`,
    trace: traceRel,
    rate: RATE,
    rounds: ROUNDS,
    segmentBytes,
    host: { cpus: cpus().length, model: cpus()[0]?.model, loadStart: loadStart.map((l) => +l.toFixed(2)), loadEnd: loadavg().map((l) => +l.toFixed(2)) },
    minutes: +((Date.now() - started) / 60000).toFixed(1),
    summary,
    runs,
    reruns,
  };
  const out = join(root, 'bench/results/prefetch-rate');
  writeFileSync(`${out}.json`, JSON.stringify(report, null, 2) + '\n');
  writeFileSync(`${out}.md`, markdown(report));
  console.log(markdown(report));
  await rm(dir, { recursive: true, force: true });
}

function markdown(r) {
  const f = (x, d = 2) => (x === null || x === undefined || Number.isNaN(x) ? '-' : x.toFixed(d));
  const L = [
    `# Paced prefetch stream on a cold host, ${r.date.slice(0, 10)}`,
    '',
    `Generated by \`${r.command}\` (bench/prefetch-rate.js); method in docs/benchmarks-agent.md, "Paced prefetch stream".`,
    '',
    `Trace \`${r.trace}\` replayed against a fresh agent with an empty cache and the segment (${f(r.segmentBytes / MiB, 1)} MiB, built from the trace's blocks) on storage, unpaced and with \`--prefetch-rate ${r.rate}\`, ${r.rounds} rounds interleaved; medians. Storage: the agent's \`--storage-delay D\` on every request, no bandwidth limit. Host: ${r.host.cpus} CPUs (${r.host.model}), shared; load average ${r.host.loadStart.join(' / ')} at the start, ${r.host.loadEnd.join(' / ')} at the end; ${r.minutes} min.`,
    '',
    '| D | unpaced (s) | paced (s) | paced / unpaced | spread between runs, unpaced / paced (s) | stream, unpaced / paced (s) |',
    '|---|---|---|---|---|---|',
    ...r.summary.map((s) => `| ${s.delay} ms | ${f(s.unpacedS)} | ${f(s.pacedS)} | **${f(s.ratio, 3)}** | ${f(s.spreadS.unpaced)} / ${f(s.spreadS.paced)} | ${f(s.streamS.unpaced)} / ${f(s.streamS.paced)} |`),
    '',
    ...(r.reruns.length ? [`Runs made again because their agent went away during the replay (the machine is shared): ${r.reruns.map((x) => `D = ${x.delay} ms, round ${x.round + 1}, ${x.config}`).join('; ')}. The reasons are in the .json.`, ''] : []),
    'Every run:',
    '',
    '| D | round | config | completion (s) | latency mean / p99 / max (ms) | phase 1 replay (s) / mean lat (ms) | stream (s) | waited for the pace (s) | demand chunks | storage requests / MiB | guest blocks from cache / prefetch / storage |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
    ...r.runs.map((x) => `| ${x.delay} ms | ${x.round + 1} | ${x.config} | ${f(x.completionS)} | ${f(x.latencyMs.mean)} / ${f(x.latencyMs.p99)} / ${f(x.latencyMs.max, 0)} | ${f(x.firstPhase?.replayS)} / ${f(x.firstPhase?.meanLatMs)} | ${f(x.prefetch?.durationS)} | ${f(x.prefetch?.pacedS)} | ${x.prefetch?.chunksDemanded ?? '-'} | ${x.storage.readRequests} / ${f(x.storage.readBytes / MiB, 1)} | ${x.guestReads.cache} / ${x.guestReads.prefetch} / ${x.guestReads.storage} |`),
    '',
    'Commands:',
    '',
    '```',
    `node bin/run.js build-map IMG --trace ${r.trace} && node bin/run.js build-segment IMG`,
    ...new Set(r.runs.map((x) => x.command)),
    `node bin/run.js replay ${r.trace} --uri URI --json`,
    '```',
    '',
  ];
  return L.join('\n');
}

main().catch((err) => {
  console.error(`bench: ${err.stack ?? err.message}`);
  killAllSync();
  process.exit(1);
});
