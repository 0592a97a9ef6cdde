// The agent's segment stream from RGW against curl GETs of the same object
// with the same number of requests in flight (the agent's --prefetch-depth,
// its --prefetch-chunk ranges), both through the delay proxy, alternating.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { run } from '../lib/process.js';
import { pollAgent, exportOf } from '../lib/agent.js';
import { startHost } from './hosts.js';
import { listKeys, presignGet } from './bucket.js';

const MiB = 2 ** 20;
const CHUNK = 8 * MiB; // the agent's default --prefetch-chunk
const DEPTH = 4; // the agent's default --prefetch-depth
const root = join(fileURLToPath(import.meta.url), '../../..');

/** One stream of the segment by a new agent: one idle connection starts the prefetch. */
async function agentStream(c) {
  const { NbdClient } = await import(join(root, 'dist/nbd/client/index.js'));
  const agent = await startHost({ ...c.host, name: 'stream' });
  let idle;
  try {
    idle = await NbdClient.connect(agent.uriFor(c.imageName));
    const { status } = await pollAgent(agent, (s) => ['done', 'failed', 'stopped'].includes(exportOf(s, c.imageName)?.prefetch?.state), 'the prefetch');
    const p = exportOf(status, c.imageName).prefetch;
    if (p.state !== 'done') throw new Error(`prefetch ${p.state}`);
    return { bytes: p.bytesRead, seconds: p.durationMs / 1000, MiBs: p.bytesRead / MiB / (p.durationMs / 1000), storageRequests: status.counters.storage.readRequests };
  } finally {
    await idle?.close().catch(() => undefined);
    await agent.stop();
  }
}

/** curl GETs of the whole object in CHUNK ranges, DEPTH at once, on a presigned URL. */
async function curlStream(url, size, configPath) {
  const lines = [];
  for (let off = 0; off < size; off += CHUNK) {
    if (off) lines.push('next');
    lines.push(`url = "${url}"`, `range = "${off}-${Math.min(size, off + CHUNK) - 1}"`, 'output = "/dev/null"', 'fail', 'silent', 'show-error');
  }
  writeFileSync(configPath, `${lines.join('\n')}\n`, { mode: 0o600 });
  const started = performance.now();
  await run('curl', ['--parallel', '--parallel-max', String(DEPTH), '--config', configPath], { label: 'curl' });
  const seconds = (performance.now() - started) / 1000;
  return { bytes: size, seconds, MiBs: size / MiB / seconds, requests: Math.ceil(size / CHUNK) };
}

export async function throughputPart(ctx, { withProxy, delayMs, rounds, ensureSegment }) {
  return withProxy(ctx, delayMs, async (c) => {
    await ensureSegment(c);
    const segKey = `${ctx.key}.bcseg`;
    const seg = (await listKeys(ctx.client, ctx.bucket)).find((k) => k.key === segKey);
    const url = await presignGet(c.proxy.endpoint, ctx.bucket, segKey);
    const agent = [];
    const curl = [];
    for (let i = 0; i < rounds; i++) {
      const order = i % 2 ? ['curl', 'agent'] : ['agent', 'curl'];
      for (const who of order) {
        if (who === 'agent') agent.push(await agentStream({ ...c, imageName: ctx.imageName }));
        else curl.push(await curlStream(url, seg.size, join(ctx.dir, 'curl.config')));
        const r = who === 'agent' ? agent[agent.length - 1] : curl[curl.length - 1];
        ctx.log(`  throughput round ${i + 1} ${who}: ${(r.bytes / MiB).toFixed(1)} MiB in ${r.seconds.toFixed(2)} s (${r.MiBs.toFixed(1)} MiB/s)`);
      }
    }
    const med = (xs) => xs.map((r) => r.MiBs).sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    return {
      delayMs, rounds, segmentBytes: seg.size, chunkBytes: CHUNK, depth: DEPTH, agent, curl,
      agentMiBs: med(agent), curlMiBs: med(curl), ratio: med(agent) / med(curl),
      commands: {
        agentStream: 'a new agent (as in the storm), one idle NBD connection; prefetch.bytesRead / prefetch.durationMs from agent status',
        curl: `curl --parallel --parallel-max ${DEPTH} --config FILE   # per ${CHUNK / MiB} MiB range: url = a presigned GET URL of KEY.bcseg at the proxy, range, output /dev/null`,
      },
    };
  });
}
