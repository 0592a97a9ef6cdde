#!/usr/bin/env node
// A fleet on one bucket (npm run bench:fleet): agents reading the reference
// guest's image from the test Ceph RGW through a delay proxy (a round trip of
// D per request, bench/fleet/delay-proxy.js), against the peers that can read
// an S3 object on the same RGW through the same proxy. Method and reading
// guide: docs/benchmarks-fleet.md.
//
// Parts (BENCH_FLEET_PARTS, comma-separated, default all):
//   storm       H = 1, 2, 4, 8 hosts (agent processes, own caches), N = 4
//               simultaneous cold trace replays each, after one first boot
//   throughput  the agent's segment stream against curl GETs of the segment
//               object with the same requests in flight
//   boot        real boots of the reference guest: local image, the peers
//               cold (and warm), bootcache first boot, cold host, warm
//
// Each part run replaces its section of bench/results/fleet.json and
// regenerates fleet.md; `node bench/fleet.js --report` only regenerates it.
//
// Environment: BENCH_FLEET_STORM_DELAY (ms, default 10), BENCH_FLEET_HOSTS
// (default "1,2,4,8"), BENCH_FLEET_PER_HOST (default 4),
// BENCH_FLEET_THROUGHPUT_ROUNDS (default 3), BENCH_FLEET_DELAYS (real boots,
// default "10,50"), BENCH_FLEET_CONFIGS (default all), BENCH_ACCEL (default:
// scripts/detect-accel.sh), BENCH_IMAGE (default the reference guest's
// debian12.raw), BENCH_WORK (default /var/tmp/bootcache-fleet).
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { run, killAllSync } from './lib/process.js';
import { listEnv, numbersEnv } from './lib/env.js';
import { machine } from './lib/machine.js';
import { startDelayProxy } from './fleet/delay-proxy.js';
import { ensureRgw, s3Client, createBucket, uploadFile, deleteBucket } from './fleet/bucket.js';
import { firstBoot, saveSidecars, restoreSidecars, storm } from './fleet/hosts.js';
import { writeReport } from './fleet/report.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const bin = join(root, 'bin/run.js');
const traceRel = 'test/data/debian12-minbase-boot-timed.csv';
const trace = join(root, traceRel);
const stormClient = join(root, 'bench/peers/storm-client.js');
const refDir = process.env.BOOTCACHE_REF_DIR ?? '/var/cache/bootcache/reference-guest';
const work = process.env.BENCH_WORK ?? '/var/tmp/bootcache-fleet';
const resultsDir = join(root, 'bench/results');
const jsonPath = join(resultsDir, 'fleet.json');

export const ALL_PARTS = ['storm', 'throughput', 'boot'];
export const ALL_BOOT_CONFIGS = ['local', 'nbdkit-s3', 'nbdkit-curl', 'qemu-curl', 'bootcache'];
const PARTS = listEnv('BENCH_FLEET_PARTS', ALL_PARTS, ALL_PARTS);
const STORM_DELAY = numbersEnv('BENCH_FLEET_STORM_DELAY', ['10'])[0];
const HOSTS = numbersEnv('BENCH_FLEET_HOSTS', ['1', '2', '4', '8']);
const PER_HOST = numbersEnv('BENCH_FLEET_PER_HOST', ['4'])[0];
const THROUGHPUT_ROUNDS = numbersEnv('BENCH_FLEET_THROUGHPUT_ROUNDS', ['3'])[0];
const BOOT_DELAYS = numbersEnv('BENCH_FLEET_DELAYS', ['10', '50']);
const BOOT_CONFIGS = listEnv('BENCH_FLEET_CONFIGS', ALL_BOOT_CONFIGS, ALL_BOOT_CONFIGS);
const image = process.env.BENCH_IMAGE ?? join(refDir, 'debian12.raw');
const IMAGE_NAME = basename(image);
const PREFIX = 'v1';
const KEY = `${PREFIX}/${IMAGE_NAME}`;

const log = (...a) => console.log(`[${new Date().toISOString().slice(11, 19)}] bench:`, ...a);

function loadResults() {
  if (!existsSync(jsonPath)) return { sections: {} };
  return JSON.parse(readFileSync(jsonPath, 'utf8'));
}

/** A proxy at `delayMs` in front of RGW and the host settings that use it. */
async function withProxy(ctx, delayMs, body) {
  const proxy = await startDelayProxy({ target: new URL(ctx.rgw.endpoint).host, delayMs });
  try {
    return await body({ ...ctx, proxy, host: { bin, dir: ctx.dir, bucket: ctx.bucket, prefix: PREFIX, proxy } });
  } finally {
    await proxy.stop();
  }
}

/**
 * The image's map and segment as a first boot publishes them: a replay on a
 * new host with no map (once per run, through the proxy in use), then put
 * back before every measurement that needs them.
 */
async function ensureSegment(c) {
  if (c.state.saved) {
    await restoreSidecars(c.client, c.bucket, KEY, c.state.saved);
    return c.state;
  }
  log(`first boot at D=${c.proxy.delayMs} ms (a replay that records and publishes)`);
  c.state.first = await firstBoot({ ...c, imageName: IMAGE_NAME }, async (agent) => {
    const { stdout } = await run(process.execPath, [stormClient, trace, agent.uriFor(IMAGE_NAME), '1'], { label: 'first boot replay' });
    return JSON.parse(stdout);
  });
  c.state.first.delayMs = c.proxy.delayMs;
  c.state.saved = await saveSidecars(c.client, c.bucket, KEY);
  const { first, saved } = c.state;
  log(`  first boot ${first.boots[0].completionS.toFixed(2)} s, storage ${first.agentStorage.readRequests} req / ${(first.agentStorage.readBytes / 2 ** 20).toFixed(1)} MiB, segment ${(saved.segment.length / 2 ** 20).toFixed(1)} MiB`);
  return c.state;
}

async function stormPart(ctx) {
  return withProxy(ctx, STORM_DELAY, async (c) => {
    const stormCtx = { ...c, stormClient, trace, imageName: IMAGE_NAME, key: KEY };
    const { first, saved } = await ensureSegment(c);
    const runs = await storm(stormCtx, { hostCounts: HOSTS, perHost: PER_HOST, saved, log });
    return {
      delayMs: STORM_DELAY, perHost: PER_HOST, trace: traceRel,
      segmentBytes: saved.segment.length, mapBytes: saved.map.length,
      first, runs,
      commands: {
        proxy: c.proxy.command,
        agent: `node bin/run.js agent --storage s3://BUCKET/${PREFIX} --s3-endpoint PROXY --s3-path-style --cache CACHE --socket SOCK --control CTL --storage-delay 0 --cache-size 2G --maintenance off --log-level warn`,
        replays: `node bench/peers/storm-client.js ${traceRel} nbd+unix:///${IMAGE_NAME}?socket=SOCK N   # per host, all hosts at once`,
      },
    };
  });
}

async function main() {
  if (process.argv.includes('--report')) {
    writeReport(loadResults(), resultsDir);
    return;
  }
  if (!existsSync(image)) throw new Error(`no image at ${image}: build the reference guest first (bash scripts/reference-guest/build.sh) or set BENCH_IMAGE`);
  if (!existsSync(join(root, 'dist/replay/replay.js'))) throw new Error('dist/ is missing: run npm run build first');
  mkdirSync(resultsDir, { recursive: true });
  const dir = join(work, 'run');
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const accel = process.env.BENCH_ACCEL ?? (await run('bash', [join(root, 'scripts/detect-accel.sh')])).stdout.trim();
  const rgw = await ensureRgw(root);
  const client = s3Client(rgw.endpoint);
  const bucket = await createBucket(client);
  const results = loadResults();
  results.machine = await machine(accel);
  const ctx = { dir, accel, rgw, client, bucket, image, imageName: IMAGE_NAME, key: KEY, log, state: {} };
  try {
    log(`RGW ${rgw.endpoint}${rgw.startedByUs ? ' (started by the bench)' : ''}, bucket ${bucket}; uploading ${image} as ${KEY}`);
    const t0 = performance.now();
    const imageBytes = await uploadFile(client, bucket, KEY, image);
    log(`  uploaded ${(imageBytes / 2 ** 30).toFixed(2)} GiB in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    for (const part of PARTS) {
      const startedAt = new Date().toISOString();
      const loadAtStart = loadavg();
      let section;
      if (part === 'storm') section = await stormPart(ctx);
      else if (part === 'throughput') section = await (await import('./fleet/throughput.js')).throughputPart(ctx, { withProxy, delayMs: STORM_DELAY, rounds: THROUGHPUT_ROUNDS, ensureSegment });
      else if (part === 'boot') section = await (await import('./fleet/boots.js')).bootPart(ctx, { withProxy, delays: BOOT_DELAYS, configs: BOOT_CONFIGS });
      results.sections[part] = {
        ...section, startedAt, finishedAt: new Date().toISOString(), loadAtStart, loadAtEnd: loadavg(),
        image: { path: image, bytes: imageBytes, key: KEY },
        command: `${Object.entries(process.env).filter(([k]) => k.startsWith('BENCH_')).map(([k, v]) => `${k}=${v}`).join(' ')} node bench/fleet.js`.trim(),
      };
      writeFileSync(jsonPath, `${JSON.stringify(results, null, 2)}\n`);
      writeReport(results, resultsDir);
      log(`wrote ${jsonPath} (${part})`);
    }
  } finally {
    await deleteBucket(client, bucket).catch((err) => log(`could not delete bucket ${bucket}: ${err.message}`));
    client.destroy();
    await rgw.release();
  }
}

main().catch((err) => {
  console.error(`bench: ${err.stack ?? err.message}`);
  killAllSync();
  process.exit(1);
});
