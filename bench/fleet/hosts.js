// Hosts of the fleet: each a separate agent process with its own cache
// directory, reading the one bucket through the delay proxy; and the boot
// storm (H hosts, N simultaneous cold trace replays each).
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { loadavg } from 'node:os';
import { run } from '../lib/process.js';
import { startAgent, pollAgent, exportOf } from '../lib/agent.js';
import { getObject, putObject } from './bucket.js';

/** An agent on s3://BUCKET/PREFIX, its S3 endpoint the delay proxy. */
export function startHost({ bin, dir, name, bucket, prefix, proxy, extra = [] }) {
  const cache = join(dir, `${name}.cache`);
  rmSync(cache, { recursive: true, force: true });
  return startAgent({
    bin, storage: `s3://${bucket}/${prefix}`, cache, delayMs: 0, cacheSize: '2G',
    socket: join(dir, `${name}.sock`), control: join(dir, `${name}.ctl`), logFile: join(dir, `${name}.log`),
    extra: ['--s3-endpoint', proxy.endpoint, '--s3-path-style', ...extra],
  }).then((agent) => ({ ...agent, name, cache, stop: async () => { await agent.stop(); rmSync(cache, { recursive: true, force: true }); } }));
}

/** The counters a host reports, as plain numbers. */
export async function hostCounters(agent) {
  const s = await agent.status();
  return { storage: { ...s.counters.storage }, publish: { ...s.counters.publish }, boots: { ...s.counters.boots } };
}

export function counterDelta(after, before) {
  const out = {};
  for (const [k, v] of Object.entries(after)) out[k] = typeof v === 'number' ? v - (before?.[k] ?? 0) : counterDelta(v, before?.[k]);
  return out;
}

/** Waits until the host's boot of `exportName` has ended and its publish is done. */
export function settled(agent, exportName, what, timeoutMs = 300_000) {
  return pollAgent(agent, (s) => {
    const e = exportOf(s, exportName);
    return e && e.connections === 0 && e.lastBoot && e.lastBoot.state !== 'recording'
      && e.rebuild?.state !== 'running' && e.prefetch?.state !== 'streaming';
  }, what, timeoutMs);
}

/**
 * The first boot of the image on a new host: records the boot (`play` runs
 * it), publishes map and segment. Returns what `play` returned, the host's
 * storage reads over the boot (agentStorage) and its uploads (publish).
 */
export async function firstBoot(ctx, play) {
  const agent = await startHost({ ...ctx.host, name: 'first' });
  try {
    const before = await hostCounters(agent);
    const boot = await play(agent);
    const afterBoot = await hostCounters(agent);
    const { waitedS } = await pollAgent(agent, (s) => {
      const e = exportOf(s, ctx.imageName);
      return e?.lastBoot?.state === 'complete' && e.rebuild?.state === 'idle' && s.counters.publish.segments >= 1;
    }, 'the first boot to be published');
    return { ...boot, agentStorage: counterDelta(afterBoot, before).storage, publish: counterDelta(await hostCounters(agent), before).publish, publishedAfterS: waitedS };
  } finally {
    await agent.stop();
  }
}

/** The map and segment objects as the first boot published them (restored before each storm). */
export async function saveSidecars(client, bucket, key) {
  return { map: await getObject(client, bucket, `${key}.bcmap`), segment: await getObject(client, bucket, `${key}.bcseg`) };
}

export async function restoreSidecars(client, bucket, key, saved) {
  await putObject(client, bucket, `${key}.bcmap`, saved.map);
  await putObject(client, bucket, `${key}.bcseg`, saved.segment);
}

/**
 * H hosts started fresh (empty caches), then N replays of the trace on each,
 * all started at once; then every host's publish is waited for.
 */
export async function stormOnce(ctx, { hosts, perHost }) {
  const agents = [];
  try {
    for (let i = 0; i < hosts; i++) agents.push(await startHost({ ...ctx.host, name: `h${hosts}-${i}` }));
    const before = await Promise.all(agents.map(hostCounters));
    const proxyBefore = await ctx.proxy.counters();
    const load1 = loadavg()[0];
    const started = performance.now();
    const results = await Promise.all(agents.map((a) =>
      run(process.execPath, [ctx.stormClient, ctx.trace, a.uriFor(ctx.imageName), String(perHost)], { label: `storm ${a.name}` })
        .then(({ stdout }) => JSON.parse(stdout))));
    const wallS = (performance.now() - started) / 1000;
    const afterBoots = await Promise.all(agents.map(hostCounters));
    await Promise.all(agents.map((a) => settled(a, ctx.imageName, `${a.name} to publish`)));
    const afterPublish = await Promise.all(agents.map(hostCounters));
    const proxyAfter = await ctx.proxy.counters();
    const perHostRows = agents.map((a, i) => ({
      host: a.name,
      boots: results[i].boots,
      storage: counterDelta(afterBoots[i], before[i]).storage,
      storageWithPublish: counterDelta(afterPublish[i], before[i]).storage,
      publish: counterDelta(afterPublish[i], before[i]).publish,
      bootsCounted: counterDelta(afterPublish[i], before[i]).boots,
    }));
    const sum = (f) => perHostRows.reduce((a, r) => a + f(r), 0);
    return {
      hosts, perHost, load1, loadEnd: loadavg()[0], wallS,
      recordedS: results[0].recordedS,
      rows: perHostRows,
      total: {
        readRequests: sum((r) => r.storage.readRequests),
        readBytes: sum((r) => r.storage.readBytes),
        readRequestsWithPublish: sum((r) => r.storageWithPublish.readRequests),
        readBytesWithPublish: sum((r) => r.storageWithPublish.readBytes),
        segmentUploads: sum((r) => r.publish.segments),
        mapUploads: sum((r) => r.publish.maps),
        conflicts: sum((r) => r.publish.conflicts),
        segmentsKept: sum((r) => r.publish.segmentsKept),
      },
      proxy: counterDelta(proxyAfter, proxyBefore),
    };
  } finally {
    await Promise.all(agents.map((a) => a.stop()));
  }
}

/** The storm at every H, each starting from the first boot's map and segment. */
export async function storm(ctx, { hostCounts, perHost, saved, log }) {
  const runs = [];
  const plan = [{ hosts: 1, perHost: 1 }, ...hostCounts.map((h) => ({ hosts: h, perHost }))];
  for (const p of plan) {
    await restoreSidecars(ctx.client, ctx.bucket, ctx.key, saved);
    const r = await stormOnce(ctx, p);
    runs.push(r);
    const c = r.rows.flatMap((x) => x.boots.map((b) => b.completionS)).sort((a, b) => a - b);
    log(`  storm H=${p.hosts} N=${p.perHost}: boots ${c[0].toFixed(2)}-${c[c.length - 1].toFixed(2)} s, storage ${r.total.readRequests} req / ${(r.total.readBytes / 2 ** 20).toFixed(1)} MiB, segment uploads ${r.total.segmentUploads}, load ${r.load1.toFixed(2)}`);
  }
  return runs;
}
