/**
 * The agent end to end, in-process, with real clients: boots are recorded,
 * maps and segments published, segments prefetched on a cold host, stale
 * segments and corrupt segment blocks skipped, export names confined to the
 * storage root.
 */
import { execFile, execFileSync } from 'node:child_process';
import { promisify } from 'node:util';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino, type Logger } from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { Agent, type AgentStatus } from '../../src/agent/agent.js';
import { resolveConfig, type AgentConfig } from '../../src/agent/config.js';
import { ControlServer, controlRequest } from '../../src/agent/control.js';
import { NbdServer } from '../../src/nbd/server/server.js';
import { buildMapFromTrace } from '../../src/core/build-map.js';
import { buildSegment } from '../../src/core/build-segment.js';
import { verifySegment } from '../../src/core/verify.js';
import { loadMap, saveMap, type BootMap } from '../../src/format/map.js';
import { SegmentReader } from '../../src/format/segment.js';
import { openImage } from '../../src/image/open.js';
import { NbdClient } from '../../src/nbd/client/index.js';

const MiB = 1024 * 1024;
// Async: the NBD server runs in this process, so a sync child would deadlock it.
const run = promisify(execFile);
let root: string;
let template: string;
let storageDir: string;
let rawBytes: Buffer;
const agents: Agent[] = [];

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'bc-agent-'));
  template = join(root, 'template');
  await mkdir(join(template, 'pool'), { recursive: true });
  rawBytes = randomBytes(64 * MiB);
  await writeFile(join(template, 'disk.raw'), rawBytes);
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', join(template, 'disk.raw'), join(template, 'pool', 'disk.qcow2')]);
  const outside = join(root, 'outside.raw');
  await writeFile(outside, Buffer.alloc(MiB, 1));
  await symlink(outside, join(template, 'escape.raw'));
});

/** A fresh storage root per test (copies keep their mtimes, so identities match across copies). */
function freshStorage(name: string): string {
  storageDir = join(root, `storage-${name}`);
  execFileSync('cp', ['-a', template, storageDir]);
  return storageDir;
}

afterEach(async () => {
  while (agents.length) await agents.pop()!.stop();
});

// Each run's images and caches take about 1.5 GiB.
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/** A config with the default (large) prefetch buffers: the prefault takes a while, as in production. */
async function overtakenConfig(name: string): Promise<AgentConfig> {
  freshStorage(name);
  const dir = join(root, name);
  await mkdir(dir, { recursive: true });
  return resolveConfig(
    {},
    { storage: storageDir, cache: join(dir, 'cache'), socket: join(dir, 'nbd.sock'), control: join(dir, 'control.sock'), maintenance: 'off', logLevel: 'silent', warmup: false },
  );
}

async function startAgent(
  name: string,
  overrides: Record<string, unknown> = {},
  log: Logger = pino({ level: 'silent' }),
): Promise<{ agent: Agent; config: AgentConfig }> {
  const dir = join(root, name);
  await mkdir(dir, { recursive: true });
  const config = resolveConfig(
    {},
    {
      storage: storageDir,
      cache: join(dir, 'cache'),
      socket: join(dir, 'nbd.sock'),
      control: join(dir, 'control.sock'),
      cacheSize: '256M',
      boot: { idleMs: 60_000, windowMs: 600_000, minReads: 1 },
      merge: { minSeen: 1, window: 4 },
      prefetchChunk: '1M',
      maintenance: 'off',
      logLevel: 'silent',
      warmup: false,
      ...overrides,
    },
  );
  const agent = new Agent(config, log);
  await agent.start();
  agents.push(agent);
  return { agent, config };
}

/** Polls until `check` holds (the server closes exports asynchronously after a client leaves). */
async function waitFor(check: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const start = Date.now();
  while (!check()) {
    if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const bootComplete = (agent: Agent, name: string) => () =>
  agent.status().exports.find((e) => e.name === name)?.lastBoot?.state === 'complete';

const uri = (config: AgentConfig, name: string): string => `nbd+unix:///${name}?socket=${config.socket}`;

/** A "boot": 200 scattered 4 KiB..64 KiB reads, checked against the image bytes. */
async function boot(config: AgentConfig, name: string, seed: number): Promise<void> {
  const client = await NbdClient.connect(uri(config, name));
  try {
    let x = seed;
    const reads: Array<Promise<void>> = [];
    for (let i = 0; i < 200; i++) {
      x = (x * 1103515245 + 12345) >>> 0;
      const offset = (x % (60 * 2048)) * 512;
      const length = 4096 * (1 + (i % 16));
      reads.push(client.read(offset, length).then((data) => {
        expect(data.equals(rawBytes.subarray(offset, offset + length))).toBe(true);
      }));
    }
    await Promise.all(reads);
  } finally {
    await client.close();
  }
}

/** A fresh storage root in which an agent (stopped again) recorded a boot of disk.raw and published its map and segment. */
async function publishFirstBoot(name: string, seed: number): Promise<void> {
  freshStorage(name);
  const first = await startAgent(`${name}-1`);
  await boot(first.config, 'disk.raw', seed);
  await waitFor(bootComplete(first.agent, 'disk.raw'), 'the end of the boot');
  await first.agent.stop();
  agents.splice(agents.indexOf(first.agent), 1);
}

/** The published IMAGE.bcseg next to `imagePath` verifies against the image and `map`. */
async function expectSegmentVerifies(imagePath: string, map: BootMap): Promise<void> {
  const image = await openImage(imagePath);
  try {
    const report = await verifySegment(image, map, `${imagePath}.bcseg`);
    expect(report.ok, report.problems.join('; ')).toBe(true);
  } finally {
    await image.close();
  }
}

describe('bootcache agent', () => {
  it('serves raw and qcow2 exports byte-exact (qemu-img compare)', async () => {
    freshStorage('compare');
    const { config } = await startAgent('compare');
    for (const name of ['disk.raw', 'pool/disk.qcow2']) {
      await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri(config, name), join(storageDir, 'disk.raw')]);
    }
    const { stdout: list } = await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${config.socket}`], { encoding: 'utf8' });
    const names = (JSON.parse(list) as { exports: Array<{ 'export-name': string }> }).exports.map((e) => e['export-name']);
    expect(names.sort()).toEqual(['disk.raw', 'pool/disk.qcow2']);
  });

  it('records a boot, publishes map and segment that verify, and prefetches them on a cold host', async () => {
    freshStorage('boot');
    const first = await startAgent('first');
    await boot(first.config, 'pool/disk.qcow2', 1);
    // Closing the last connection ended the boot; wait for the rebuild.
    await waitFor(bootComplete(first.agent, 'pool/disk.qcow2'), 'the end of the boot');
    await first.agent.settled();
    const status1 = first.agent.status();
    expect(status1.counters.boots.recorded).toBe(1);
    expect(status1.exports.find((e) => e.name === 'pool/disk.qcow2')?.lastBoot).toMatchObject({ state: 'complete', endReason: 'closed' });
    const imagePath = join(storageDir, 'pool', 'disk.qcow2');
    const map = await loadMap(`${imagePath}.bcmap`);
    expect(map.blocksSet).toBeGreaterThan(200);
    await expectSegmentVerifies(imagePath, map);
    const firstRequests = status1.counters.storage.readRequests;

    // A cold host: empty cache, segment on storage. The same boot is served from the prefetched segment.
    const cold = await startAgent('cold');
    const client = await NbdClient.connect(uri(cold.config, 'pool/disk.qcow2'));
    await new Promise((r) => setTimeout(r, 500)); // let the prefetch stream run
    await client.close();
    await boot(cold.config, 'pool/disk.qcow2', 1);
    // On a loaded host the stream may outlast the boot: let it end.
    await waitFor(() => cold.agent.status().exports.find((x) => x.name === 'pool/disk.qcow2')?.prefetch?.state !== 'streaming', 'the cold prefetch');
    const status2 = cold.agent.status();
    const e = status2.exports.find((x) => x.name === 'pool/disk.qcow2')!;
    expect(e.prefetch?.state).toBe('done');
    // The boot's open streams nothing more when the first open's stream already cached every block.
    expect((e.prefetch?.blocksLoaded ?? 0) + (e.prefetch?.blocksCached ?? 0)).toBeGreaterThan(200);
    expect(status2.counters.prefetch.bytes).toBeGreaterThan(0);
    expect(status2.counters.guestReads.cache + status2.counters.guestReads.prefetch).toBeGreaterThan(0);
    expect(status2.counters.guestReads.storage).toBe(0);
    expect(status2.counters.storage.readRequests).toBeLessThan(firstRequests);
    // The chunk buffers went back to the agent's pool (2 x depth of 1 MiB).
    expect(status2.prefetchBuffers).toMatchObject({ bufferBytes: 1024 * 1024, idle: 8 });

    // The same blocks again: the rebuild republishes the map (one more boot) but keeps the segment.
    const segmentBefore = await stat(`${imagePath}.bcseg`);
    await waitFor(bootComplete(cold.agent, 'pool/disk.qcow2'), 'the end of the cold boot');
    await cold.agent.settled();
    const segmentAfter = await stat(`${imagePath}.bcseg`);
    expect([segmentAfter.ino, segmentAfter.mtimeMs]).toEqual([segmentBefore.ino, segmentBefore.mtimeMs]);
    const map2 = await loadMap(`${imagePath}.bcmap`);
    expect(map2.boots).toBeGreaterThan(1);
    await expectSegmentVerifies(imagePath, map2);

    // A probe after the boot (one read, as qemu-img info does): the stream's unused bytes were
    // counted at the boot's end, once, and the probe does not add the segment again.
    const unusedAfterBoot = cold.agent.status().counters.prefetch.unusedBytes;
    const probe = await NbdClient.connect(uri(cold.config, 'pool/disk.qcow2'));
    await probe.read(0, 512);
    await probe.close();
    await waitFor(() => cold.agent.status().counters.boots.skipped > 0, 'the probe to end');
    expect(cold.agent.status().counters.prefetch.unusedBytes).toBe(unusedAfterBoot);

    // A restart with the warm cache: the prefetch reads nothing from storage.
    await cold.agent.stop();
    agents.splice(agents.indexOf(cold.agent), 1);
    const warm = await startAgent('cold');
    const warmClient = await NbdClient.connect(uri(warm.config, 'pool/disk.qcow2'));
    const warmPrefetch = () => warm.agent.status().exports.find((x) => x.name === 'pool/disk.qcow2')?.prefetch;
    await waitFor(() => warmPrefetch()?.state === 'done', 'the warm prefetch');
    await warmClient.close();
    expect(warmPrefetch()).toMatchObject({ bytesRead: 0, blocksLoaded: 0 });
    expect(warmPrefetch()?.blocksCached).toBe(map2.blocksSet);
  });

  it('gives up a start that stop() overtakes: nothing listens, the cache is released', async () => {
    const config = await overtakenConfig('overtaken');
    const agent = new Agent(config, pino({ level: 'silent' }));
    const starting = agent.start();
    await agent.stop();
    await expect(starting).rejects.toThrow(/^the agent was stopped while it was starting$/);
    await expect(stat(config.socket)).rejects.toThrow(/ENOENT/);
    // The cache lock went with it: another agent opens the same cache.
    const again = new Agent(config, pino({ level: 'silent' }));
    await again.start();
    agents.push(again);
  });

  it.each(['NBD', 'control'] as const)('gives up a start that stop() overtakes while it listens on the %s socket', async (which) => {
    const config = await overtakenConfig(`overtaken-${which}`);
    const agent = new Agent(config, pino({ level: 'silent' }));
    // stop() comes while start() awaits the listen: past the prefault and its check.
    let stopping: Promise<void> | undefined;
    const listenUnix = NbdServer.prototype.listenUnix;
    const startControl = ControlServer.start;
    const spy = which === 'NBD'
      ? vi.spyOn(NbdServer.prototype, 'listenUnix').mockImplementation(function (this: NbdServer, path: string) {
        const listening = listenUnix.call(this, path);
        stopping = agent.stop();
        return listening;
      })
      : vi.spyOn(ControlServer, 'start').mockImplementation((...args) => {
        const listening = startControl.apply(ControlServer, args);
        stopping = agent.stop();
        return listening;
      });
    try {
      await expect(agent.start()).rejects.toThrow(/^the agent was stopped while it was starting$/);
    } finally {
      spy.mockRestore();
    }
    await stopping;
    await expect(stat(config.socket)).rejects.toThrow(/ENOENT/);
    await expect(stat(config.control)).rejects.toThrow(/ENOENT/);
    // Sockets and cache lock are free again: another agent starts on them.
    const again = new Agent(config, pino({ level: 'silent' }));
    await again.start();
    agents.push(again);
  });

  it('warms up through a private agent before it listens: nothing of it stays in its cache, storage, counters or TMPDIR', async () => {
    const tmp = join(root, 'warmup-tmp');
    await mkdir(tmp, { recursive: true });
    const saved = process.env.TMPDIR;
    process.env.TMPDIR = tmp;
    try {
      freshStorage('warmup');
      const before = (await readdir(storageDir)).sort();
      const { agent, config } = await startAgent('warmup', { warmup: true });
      const status = agent.status();
      expect(status.warmup).toMatchObject({ boots: 3, reads: 7500, ms: expect.any(Number) });
      // The cold-host boot streamed the first boot's segment: the prefetch path was warmed too.
      expect(status.warmup!.prefetchedBlocks).toBeGreaterThan(1000);
      expect(status.exports).toEqual([]);
      expect(status.cache.blocks).toBe(0);
      expect(status.counters.storage.readRequests).toBe(0);
      expect(status.nbd.totalConnections).toBe(0);
      expect(await readdir(tmp)).toEqual([]);
      expect((await readdir(storageDir)).sort()).toEqual(before);
      await boot(config, 'disk.raw', 11);
    } finally {
      if (saved === undefined) delete process.env.TMPDIR;
      else process.env.TMPDIR = saved;
    }
  });

  it('keeps 2 x prefetch-depth chunk buffers, within 128 MiB or one chunk', async () => {
    freshStorage('pool');
    const small = await startAgent('pool-small', { prefetchChunk: '1M', prefetchDepth: 3 });
    expect(small.agent.status().prefetchBuffers).toMatchObject({ bufferBytes: 1024 * 1024, maxIdle: 6 });
    await waitFor(() => small.agent.status().prefetchBuffers.idle === 6, 'the prefault of 6 buffers');
    const large = await startAgent('pool-large', { prefetchChunk: '48M', prefetchDepth: 4 });
    await waitFor(() => large.agent.status().prefetchBuffers.idle === 2, 'the prefault of 2 buffers');
    expect(large.agent.status().prefetchBuffers).toEqual({ bufferBytes: 48 * 1024 * 1024, maxIdle: 2, idle: 2, allocated: 2 });
    // One 256 MiB chunk is over the limit: one buffer all the same (the stream needs it).
    const huge = await startAgent('pool-huge', { prefetchChunk: '256M', prefetchDepth: 2 });
    expect(huge.agent.status().prefetchBuffers).toMatchObject({ bufferBytes: 256 * 1024 * 1024, maxIdle: 1 });
  });

  it('status and mark-booted over the control socket', async () => {
    freshStorage('control');
    const { config } = await startAgent('control');
    const client = await NbdClient.connect(uri(config, 'disk.raw'));
    await client.read(0, 4096);
    const status = await controlRequest<{ exports: Array<{ name: string; lastBoot: { state: string; reads: number } }>; counters: unknown }>(
      config.control, 'GET', '/status');
    expect(status.exports[0]).toMatchObject({ name: 'disk.raw', lastBoot: { state: 'recording', reads: 1 } });
    // Times are ISO 8601, not monotonic milliseconds.
    const startedAt = (status.exports[0]!.lastBoot as unknown as { startedAt: string }).startedAt;
    expect(startedAt).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    expect(Math.abs(Date.parse(startedAt) - Date.now())).toBeLessThan(60_000);
    expect(status.counters).toMatchObject({
      storage: { readRequests: expect.any(Number), readBytes: expect.any(Number) },
      guestReads: { cache: 0, prefetch: 0, storage: 1 },
      prefetch: { bytes: expect.any(Number), unusedBytes: expect.any(Number) },
      boots: { recorded: expect.any(Number) },
    });
    const ended = await controlRequest<{ state: string; endReason: string }>(config.control, 'POST', '/mark-booted?export=disk.raw');
    expect(ended).toMatchObject({ state: 'complete', endReason: 'mark-booted' });
    await client.close();
    await expect(controlRequest(config.control, 'POST', '/mark-booted?export=nope.raw')).rejects.toThrow(/not open/);
  });

  it('closes connections past maxConnections on accept, and serves again when one leaves', async () => {
    freshStorage('limit');
    const { agent, config } = await startAgent('limit', { maxConnections: 2, maxConnectionsPerClient: 2 });
    const first = await NbdClient.connect(uri(config, 'disk.raw'));
    const second = await NbdClient.connect(uri(config, 'disk.raw'));
    await expect(NbdClient.connect(uri(config, 'disk.raw'))).rejects.toThrow();
    expect(agent.status().nbd).toMatchObject({ activeConnections: 2, rejectedConnections: 1, droppedConnections: 0, handshakes: 2 });
    await first.close();
    await waitFor(() => agent.status().exports.find((e) => e.name === 'disk.raw')?.connections === 1, 'the close');
    const third = await NbdClient.connect(uri(config, 'disk.raw'));
    expect((await third.read(0, 4096)).equals(rawBytes.subarray(0, 4096))).toBe(true);
    await Promise.all([second.close(), third.close()]);
  });

  it('does not merge a probe with fewer than boot.minReads reads, unless marked booted', async () => {
    freshStorage('probe');
    const { agent, config } = await startAgent('probe', { boot: { idleMs: 60_000, windowMs: 600_000, minReads: 16 } });
    const path = join(storageDir, 'disk.raw');
    // A probe (qemu-img info, a health check): 3 reads, then it leaves.
    const probe = await NbdClient.connect(uri(config, 'disk.raw'));
    for (const offset of [0, 8 * MiB, 40 * MiB]) await probe.read(offset, 4096);
    await probe.close();
    await waitFor(bootComplete(agent, 'disk.raw'), 'the end of the probe');
    await agent.settled();
    expect(agent.status().counters.boots).toMatchObject({ recorded: 0, skipped: 1 });
    await expect(stat(`${path}.bcmap`)).rejects.toThrow(/ENOENT/);
    // A real boot (200 reads) is merged.
    await boot(config, 'disk.raw', 5);
    await waitFor(() => agent.status().counters.boots.recorded + agent.status().counters.boots.skipped === 2, 'the boot');
    await agent.settled();
    expect(agent.status().counters.boots).toMatchObject({ recorded: 1, skipped: 1 });
    const blocksAfterBoot = (await loadMap(`${path}.bcmap`)).blocksSet;
    expect(blocksAfterBoot).toBeGreaterThan(200);
    // Three reads ended by mark-booted: the operator says it is a boot, so it counts.
    const short = await NbdClient.connect(uri(config, 'disk.raw'));
    for (const offset of [4 * MiB, 12 * MiB]) await short.read(offset, 4096);
    await controlRequest(config.control, 'POST', '/mark-booted?export=disk.raw');
    await short.close();
    await waitFor(() => agent.status().counters.boots.recorded === 2, 'the marked boot');
    await agent.settled();
    expect(agent.status().counters.boots).toMatchObject({ recorded: 2, skipped: 1 });
  });

  it('discards a whole-disk read (a copy through the export): map and segment unchanged, status says why; a boot after it publishes', async () => {
    await publishFirstBoot('copy', 7);
    const path = join(storageDir, 'disk.raw');
    const [mapBefore, segmentBefore] = await Promise.all([readFile(`${path}.bcmap`), readFile(`${path}.bcseg`)]);
    const lines: Array<{ level: number; msg: string; export?: string }> = [];
    const log = pino({ level: 'info' }, new Writable({
      write(chunk: Buffer, _encoding, done) {
        lines.push(JSON.parse(chunk.toString()) as (typeof lines)[number]);
        done();
      },
    }));
    // The 64 MiB image is all data: a recording ends as a copy past 32 MiB (the floor is 8 MiB here, 256 MiB by default).
    const { agent, config } = await startAgent('copy-2', { boot: { idleMs: 60_000, windowMs: 600_000, minReads: 1, maxShare: 0.5, maxShareFloor: '8M' } }, log);
    const exportOf = (name: string) => agent.status().exports.find((x) => x.name === name);
    // A copy tool: the whole export front to back, 1 MiB reads, 4 in flight, every byte checked.
    const client = await NbdClient.connect(uri(config, 'disk.raw'));
    for (let offset = 0; offset < rawBytes.length; offset += 4 * MiB) {
      await Promise.all([0, 1, 2, 3].map(async (k) => {
        const at = offset + k * MiB;
        expect((await client.read(at, MiB)).equals(rawBytes.subarray(at, at + MiB))).toBe(true);
      }));
    }
    // Ended half way, while the copy still had the export open.
    expect(exportOf('disk.raw')?.lastBoot).toMatchObject({ state: 'discarded', endReason: 'max-share' });
    await client.close();
    await waitFor(() => exportOf('disk.raw')?.connections === 0, 'the close');
    await agent.settled();
    const status = await controlRequest<AgentStatus>(config.control, 'GET', '/status');
    const lastBoot = status.exports.find((x) => x.name === 'disk.raw')?.lastBoot;
    expect(lastBoot).toMatchObject({ state: 'discarded', endReason: 'max-share' });
    expect(lastBoot?.discardReason).toMatch(/^read 33\.0 MiB of distinct blocks, more than 0\.5 of the image's 64\.0 MiB of data .*not a boot$/);
    expect(lastBoot!.blocks * 4096).toBeLessThanOrEqual(33 * MiB);
    expect(status.counters.boots).toMatchObject({ recorded: 0, skipped: 0, discarded: 1 });
    const warnings = lines.filter((l) => l.level === 40);
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatchObject({ export: 'disk.raw' });
    expect(warnings[0]!.msg).toMatch(/^export disk\.raw: recording discarded, no new map or segment: read 33\.0 MiB .* not a boot$/);
    expect((await readFile(`${path}.bcmap`)).equals(mapBefore)).toBe(true);
    expect((await readFile(`${path}.bcseg`)).equals(segmentBefore)).toBe(true);

    // qemu-img convert from a qcow2 export (its data size comes from its L2 tables): discarded too, nothing published.
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri(config, 'pool/disk.qcow2'), join(root, 'copy-out.raw')]);
    expect((await readFile(join(root, 'copy-out.raw'))).equals(rawBytes)).toBe(true);
    await rm(join(root, 'copy-out.raw'));
    await waitFor(() => agent.status().counters.boots.discarded === 2, 'the discarded qemu-img convert');
    expect(exportOf('pool/disk.qcow2')?.lastBoot).toMatchObject({ state: 'discarded' });
    await expect(stat(join(storageDir, 'pool', 'disk.qcow2.bcmap'))).rejects.toThrow(/ENOENT/);

    // A normal boot afterwards is recorded, merged and published.
    await boot(config, 'disk.raw', 11);
    await waitFor(() => agent.status().counters.boots.recorded === 1, 'the boot after the copy');
    await agent.settled();
    expect(exportOf('disk.raw')?.lastBoot).toMatchObject({ state: 'complete', endReason: 'closed' });
    const map = await loadMap(`${path}.bcmap`);
    expect(map.boots).toBe(2);
    expect(map.blocksSet * 4096).toBeLessThan(16 * MiB);
    await expectSegmentVerifies(path, map);
    expect(agent.status().counters.boots).toMatchObject({ recorded: 1, discarded: 2 });
  });

  it('skips a stale segment after the image is rewritten, and still serves correct data', async () => {
    await publishFirstBoot('stale', 3);
    const path = join(storageDir, 'disk.raw');
    expect((await readFile(`${path}.bcseg`)).length).toBeGreaterThan(4096);
    const later = new Date(Date.now() + 5_000);
    await utimes(path, later, later); // a rewrite: new mtime, so a new identity
    const { agent, config } = await startAgent('stale-2');
    await boot(config, 'disk.raw', 3);
    const e = agent.status().exports.find((x) => x.name === 'disk.raw');
    expect(e?.prefetch).toBeUndefined();
    await waitFor(bootComplete(agent, 'disk.raw'), 'the end of the boot');
    await agent.settled();
    // The boot was recorded afresh, for the new identity.
    const image = await openImage(path);
    try {
      expect((await loadMap(`${path}.bcmap`)).identity).toBe(image.identity);
    } finally {
      await image.close();
    }
  });

  it('skips segment blocks that fail their checksum and serves those blocks from the image', async () => {
    await publishFirstBoot('badblock', 5);
    // One byte of the segment's block of rank 5 flipped; header, table and mtime unchanged.
    const segPath = join(storageDir, 'disk.raw.bcseg');
    const reader = await SegmentReader.open(segPath);
    const at = reader.blockOffset(5) + 100;
    const blocks = reader.blockCount;
    await reader.close();
    const segment = await readFile(segPath);
    segment[at]! ^= 0x01;
    const before = await stat(segPath);
    await writeFile(segPath, segment);
    await utimes(segPath, before.atime, before.mtime);
    const { agent, config } = await startAgent('badblock-2');
    const client = await NbdClient.connect(uri(config, 'disk.raw'));
    const prefetch = () => agent.status().exports.find((x) => x.name === 'disk.raw')?.prefetch;
    await waitFor(() => prefetch()?.state === 'done', 'the prefetch');
    await client.close();
    expect(prefetch()).toMatchObject({ badBlocks: 1, blocksLoaded: blocks - 1 });
    // The same boot again: every read equals the image (boot() compares each one).
    await boot(config, 'disk.raw', 5);
  });

  it('prefetches a version 1 segment (no digests, written by older builds) as before', async () => {
    await publishFirstBoot('v1segment', 7);
    const path = join(storageDir, 'disk.raw');
    const map = await loadMap(`${path}.bcmap`);
    // The published segment replaced by the previous version's, built from the same map.
    const image = await openImage(path);
    try {
      expect((await buildSegment(image, map, `${path}.bcseg`, { version: 1 })).version).toBe(1);
    } finally {
      await image.close();
    }
    const old = await SegmentReader.open(`${path}.bcseg`);
    expect([old.header.version, old.hasDigests]).toEqual([1, false]);
    await old.close();
    await expectSegmentVerifies(path, map);
    const { agent, config } = await startAgent('v1segment-2');
    const client = await NbdClient.connect(uri(config, 'disk.raw'));
    const prefetch = () => agent.status().exports.find((x) => x.name === 'disk.raw')?.prefetch;
    await waitFor(() => prefetch()?.state === 'done', 'the prefetch');
    await client.close();
    expect(prefetch()).toMatchObject({ badBlocks: 0, blocksLoaded: map.blocksSet });
    // The same boot again, all from the prefetched blocks; boot() compares every read with the image.
    await boot(config, 'disk.raw', 7);
    expect(agent.status().counters.guestReads.storage).toBe(0);
  });

  it('does not prefetch a segment of another block size than its own, and serves the image bytes', async () => {
    freshStorage('blocksize');
    // A map and segment of 64 KiB blocks (build-map --block-size 65536) for map blocks 1..200; the agent uses 4 KiB.
    const path = join(storageDir, 'disk.raw');
    const image = await openImage(path);
    try {
      const events = Array.from({ length: 200 }, (_, i) => ({ line: i + 2, tUs: i, op: 'read', offset: (i + 1) * 65536, length: 4096 }));
      const { map } = await buildMapFromTrace(image, events, { blockSize: 65536 });
      await saveMap(`${path}.bcmap`, map);
      await buildSegment(image, map, `${path}.bcseg`);
    } finally {
      await image.close();
    }
    const warnings: Array<{ msg: string; segmentBlockSize?: number }> = [];
    const log = pino({ level: 'warn' }, new Writable({
      write(chunk: Buffer, _encoding, done) {
        warnings.push(JSON.parse(chunk.toString()) as (typeof warnings)[number]);
        done();
      },
    }));
    const { agent, config } = await startAgent('blocksize-1', {}, log);
    const client = await NbdClient.connect(uri(config, 'disk.raw'));
    try {
      const prefetch = () => agent.status().exports.find((x) => x.name === 'disk.raw')?.prefetch;
      await waitFor(() => warnings.length > 0 || prefetch()?.state === 'done', 'the prefetch or its refusal');
      // What the segment holds, read through the agent: the image's bytes (with the segment placed by 4 KiB blocks, other bytes).
      const data = await client.read(65536, 2 * MiB);
      expect(data.equals(rawBytes.subarray(65536, 65536 + 2 * MiB))).toBe(true);
      expect(prefetch()).toBeUndefined();
      expect(warnings).toMatchObject([{ segmentBlockSize: 65536 }]);
      expect(warnings[0]!.msg).toMatch(/has 65536-byte blocks, the agent uses 4096-byte blocks \(--block-size\); not prefetching$/);
    } finally {
      await client.close();
    }
  });

  it('refuses export names outside the storage root and the sidecars', async () => {
    freshStorage('names');
    const { config } = await startAgent('names');
    for (const name of ['../outside.raw', '/etc/passwd', 'escape.raw', 'pool/disk.qcow2.bcmap', 'pool/disk.qcow2.bcseg', 'pool/../../x', 'missing.raw']) {
      await expect(NbdClient.connect(uri(config, encodeURIComponent(name).replaceAll('%2F', '/'))), name).rejects.toThrow();
    }
  });
});
