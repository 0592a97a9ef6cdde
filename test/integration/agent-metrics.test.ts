/**
 * The agent's Prometheus metrics, checked with the real tools: a scrape
 * taken while the agent serves a boot passes `promtool check metrics`, and a
 * real Prometheus server started by the test scrapes the agent and answers
 * a query for the storage counter through its HTTP API.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../src/agent/agent.js';
import type { AgentConfig } from '../../src/agent/config.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { exportUri, freePort, startTestAgent, waitUntil } from '../helpers/agent.js';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const onPath = (tool: string): Promise<boolean> => new Promise((resolve) => execFile('sh', ['-c', `command -v ${tool}`], (err) => resolve(!err)));
const required = (process.env.CI !== undefined && !['', '0', 'false'].includes(process.env.CI)) || process.env.BOOTCACHE_E2E === '1';
const haveTools = (await onPath('promtool')) && (await onPath('prometheus'));
if (!haveTools && required) throw new Error('promtool and prometheus are required (CI or BOOTCACHE_E2E=1): run scripts/install-deps.sh');

async function scrape(port: number): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
  return res.text();
}

function promtool(text: string): Promise<{ status: number; output: string }> {
  return new Promise((resolve) => {
    const child = execFile('promtool', ['check', 'metrics'], (err, stdout, stderr) => {
      resolve({ status: err ? (typeof err.code === 'number' ? err.code : 1) : 0, output: `${stdout}${stderr}` });
    });
    child.stdin!.end(text);
  });
}

/** The value of a sample line `name{labels} value` in a scrape. */
function sample(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

let dir: string;
let agent: Agent;
let config: AgentConfig;
let metricsPort: number;
let image: Buffer;
let prometheus: ChildProcess | undefined;

describe.skipIf(!haveTools)('agent metrics (promtool, Prometheus)', () => {
  beforeAll(async () => {
    dir = await tmpDir('bc-metrics-');
    image = randomBytes(16 * MiB);
    await import('node:fs/promises').then((fs) => fs.mkdir(join(dir, 'storage'), { recursive: true }));
    await writeFile(join(dir, 'storage', 'disk.raw'), image);
    metricsPort = await freePort();
    ({ agent, config } = await startTestAgent(join(dir, 'storage'), join(dir, 'agent'), {
      metrics: `127.0.0.1:${metricsPort}`,
      boot: { idleMs: 60_000, windowMs: 600_000, minReads: 1 },
    }));
  });

  afterAll(async () => {
    prometheus?.kill('SIGKILL');
    await agent?.stop();
    await removeTmpDir(dir);
  });

  it('a scrape during a boot passes promtool check metrics, and counts what the boot did', async () => {
    const nbd = await NbdClient.connect(exportUri(config, 'disk.raw'));
    for (let i = 0; i < 200; i++) {
      const at = ((i * 7919) % 4000) * 4096;
      expect((await nbd.read(at, 4096)).equals(image.subarray(at, at + 4096))).toBe(true);
    }
    const during = await scrape(metricsPort);
    const checked = await promtool(during);
    expect(checked.output).toBe('');
    expect(checked.status).toBe(0);
    expect(sample(during, 'bootcache_storage_read_requests_total{kind="image"}')).toBeGreaterThan(0);
    expect(sample(during, 'bootcache_guest_read_duration_seconds_count{source="storage"}')).toBeGreaterThan(0);
    expect(sample(during, 'bootcache_nbd_connections')).toBe(1);
    expect(sample(during, 'bootcache_cache_capacity_bytes')).toBe(256 * MiB);
    // The same blocks again: served by the cache.
    for (let i = 0; i < 50; i++) await nbd.read(((i * 7919) % 4000) * 4096, 4096);
    await nbd.close();
    await waitUntil(() => agent.status().counters.boots.recorded === 1, 'the boot to be published', 60_000);
    const after = await scrape(metricsPort);
    expect((await promtool(after)).status).toBe(0);
    expect(sample(after, 'bootcache_guest_read_duration_seconds_count{source="cache"}')).toBeGreaterThanOrEqual(50);
    expect(sample(after, 'bootcache_boots_total{outcome="recorded"}')).toBe(1);
    expect(sample(after, 'bootcache_boot_duration_seconds_count')).toBe(1);
    expect(sample(after, 'bootcache_segment_uploads_total')).toBe(1);
    expect(sample(after, 'bootcache_map_uploads_total')).toBe(1);
    expect(sample(after, 'bootcache_nbd_connections')).toBe(0);
    // No segment was streamed: nothing is shared by content, every cached byte counts once.
    expect(sample(after, 'bootcache_cache_logical_bytes')).toBe(sample(after, 'bootcache_cache_used_bytes'));
    expect(sample(after, 'bootcache_cache_used_bytes')).toBeGreaterThan(0);
    expect(sample(after, 'bootcache_cache_logical_physical_ratio')).toBe(1);
  });

  it('a real Prometheus scrapes the agent and answers a query for the storage counter', async () => {
    const webPort = await freePort();
    const configPath = join(dir, 'prometheus.yml');
    await writeFile(
      configPath,
      `global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: bootcache\n    static_configs:\n      - targets: ['127.0.0.1:${metricsPort}']\n`,
    );
    prometheus = spawn('prometheus', [
      `--config.file=${configPath}`,
      `--storage.tsdb.path=${join(dir, 'tsdb')}`,
      `--web.listen-address=127.0.0.1:${webPort}`,
    ], { stdio: 'ignore' });
    const query = `http://127.0.0.1:${webPort}/api/v1/query?query=${encodeURIComponent('sum(bootcache_storage_read_requests_total{job="bootcache"})')}`;
    let value: number | undefined;
    const deadline = Date.now() + 60_000;
    while (value === undefined && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 500));
      const body = await fetch(query).then((r) => r.json() as Promise<{ data?: { result?: Array<{ value: [number, string] }> } }>).catch(() => undefined);
      const result = body?.data?.result?.[0];
      if (result) value = Number(result.value[1]);
    }
    expect(value).toBe(agent.status().counters.storage.readRequests);
    expect(value).toBeGreaterThan(0);
  }, 90_000);
});
