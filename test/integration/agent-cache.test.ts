/**
 * `agent cache` and `agent evict` against a real agent (in process) through
 * the CLI, the space registry across a restart, and maintenance reclaiming
 * the cache of images deleted or replaced on storage.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, rm, unlink, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../src/agent/agent.js';
import type { CacheListing, CachedSpace, EvictResult } from '../../src/agent/cache-catalog.js';
import type { AgentConfig } from '../../src/agent/config.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { startTestAgent, exportUri, waitUntil } from '../helpers/agent.js';
import { cli } from '../helpers/cli.js';
import { qemuImg, qemuIo, removeTmpDir, tmpDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
let root: string;
let storage: string;
const agents: Agent[] = [];

beforeAll(async () => {
  root = await tmpDir('bc-agent-cache-');
  storage = join(root, 'storage');
  await mkdir(storage);
  for (const name of ['disk.raw', 'keep.raw', 'gone.raw', 'replaced.raw', 'held.raw', 'base.raw']) await writeFile(join(storage, name), randomBytes(SIZE));
  for (const overlay of ['a.qcow2', 'b.qcow2']) {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(storage, overlay), String(SIZE)]);
  }
  await qemuIo(join(storage, 'a.qcow2'), 'qcow2', ['write -P 0xaa 0 64k']);
});

afterEach(async () => {
  while (agents.length) await agents.pop()!.stop();
});

afterAll(async () => {
  await removeTmpDir(root);
});

/** An agent with its log lines kept; no boots recorded (no rebuilds next to the reads). */
async function start(name: string): Promise<{ agent: Agent; config: AgentConfig; logs: Array<Record<string, unknown>> }> {
  const logs: Array<Record<string, unknown>> = [];
  const log = pino({ level: 'info' }, { write: (line: string) => void logs.push(JSON.parse(line) as Record<string, unknown>) });
  const { agent, config } = await startTestAgent(storage, join(root, name), { readahead: 0, boot: { idleMs: 60_000, windowMs: 600_000, minReads: 1e9 } }, log);
  agents.push(agent);
  return { agent, config, logs };
}

/** Reads all of an export through the agent and compares it with the image, as QEMU sees both. */
async function compareThroughAgent(agent: Agent, config: AgentConfig, name: string): Promise<void> {
  const fmt = name.endsWith('.qcow2') ? 'qcow2' : 'raw';
  // Throws when they differ (exit 1).
  await qemuImg(['compare', '-q', '-f', fmt, '-F', 'raw', join(storage, name), exportUri(config, name)]);
  await closed(agent, name);
}

async function closed(agent: Agent, name: string): Promise<void> {
  await waitUntil(() => agent.status().exports.filter((e) => e.name === name).every((e) => e.connections === 0), `${name} closed`);
}

async function listing(config: AgentConfig): Promise<CacheListing> {
  const r = await cli('agent', 'cache', '--control', config.control, '--json');
  expect(r.status, r.stderr).toBe(0);
  return r.json as CacheListing;
}

function spaceOf(l: CacheListing, image: string): CachedSpace | undefined {
  return l.spaces.find((s) => s.layers?.length === 1 && s.layers[0] === image);
}

describe('agent cache and agent evict', () => {
  it('lists a space after a read, evicts it (0 blocks, re-read byte-identical), also while a client is connected', async () => {
    const { agent, config } = await start('evict');
    await compareThroughAgent(agent, config, 'disk.raw');
    const before = await listing(config);
    const space = spaceOf(before, 'disk.raw')!;
    expect(space).toMatchObject({ blocks: SIZE / 4096, bytes: SIZE, images: ['disk.raw'], layers: ['disk.raw'], openBy: [] });
    expect(space.space).toBe(agent.status().exports.find((e) => e.name === 'disk.raw')!.identity);
    expect(before).toMatchObject({ blockSize: 4096, usedBytes: expect.any(Number) });

    const text = await cli('agent', 'cache', '--control', config.control);
    expect(text.status, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/^SPACE\s+BYTES\s+BOOT\s+LAST BOOT\s+LAYERS\s+IMAGES$/m);
    expect(text.stdout).toContain(`${space.space.slice(0, 12)}  4.0 MiB`);
    expect(text.stdout).toMatch(/disk\.raw\s+disk\.raw$/m);

    const evicted = await cli('agent', 'evict', 'disk.raw', '--control', config.control, '--json');
    expect(evicted.status, evicted.stderr).toBe(0);
    expect(evicted.json).toMatchObject({ export: 'disk.raw', blocks: SIZE / 4096, bytes: SIZE, spaces: [{ space: space.space, blocks: SIZE / 4096, sharedWith: [] }] });
    expect(spaceOf(await listing(config), 'disk.raw')).toMatchObject({ blocks: 0, bytes: 0, images: ['disk.raw'] });
    const missesBefore = agent.status().counters.guestReads.storage;
    await compareThroughAgent(agent, config, 'disk.raw');
    expect(agent.status().counters.guestReads.storage - missesBefore).toBe(SIZE / 4096);

    // With a client connected: it keeps reading the right bytes, from storage.
    const client = await NbdClient.connect(exportUri(config, 'disk.raw'));
    try {
      const image = await readFile(join(storage, 'disk.raw'));
      expect((await client.read(0, MiB)).equals(image.subarray(0, MiB))).toBe(true);
      const inUse = spaceOf(await listing(config), 'disk.raw')!;
      expect(inUse.openBy).toEqual(['disk.raw']);
      const human = await cli('agent', 'evict', 'disk.raw', '--control', config.control);
      expect(human.status, human.stderr).toBe(0);
      expect(human.stdout).toMatch(/^disk\.raw: dropped 1024 blocks \(4\.0 MiB\) in 1 space$/m);
      for (let at = 0; at < SIZE; at += MiB) expect((await client.read(at, MiB)).equals(image.subarray(at, at + MiB))).toBe(true);
    } finally {
      await client.close();
    }
  });

  it('drops a backing layer shared with a sibling overlay, and names the sibling', async () => {
    const { agent, config } = await start('shared');
    await compareThroughAgent(agent, config, 'a.qcow2');
    await compareThroughAgent(agent, config, 'b.qcow2');
    const base = spaceOf(await listing(config), 'base.raw')!;
    expect(base.images).toEqual(['a.qcow2', 'b.qcow2']);
    const r = await cli('agent', 'evict', 'a.qcow2', '--control', config.control, '--json');
    expect(r.status, r.stderr).toBe(0);
    const result = r.json as EvictResult;
    expect(result.spaces.find((s) => s.space === base.space)).toMatchObject({ blocks: base.blocks, layers: ['base.raw'], sharedWith: ['b.qcow2'] });
    expect(result.blocks).toBeGreaterThan(base.blocks); // A's own clusters too
    const after = await listing(config);
    expect(spaceOf(after, 'base.raw')!.blocks).toBe(0);
    expect(spaceOf(after, 'a.qcow2')!.blocks).toBe(0);
    // The sibling reads the base from storage again, byte-identical.
    await compareThroughAgent(agent, config, 'b.qcow2');
    expect(spaceOf(await listing(config), 'base.raw')!.blocks).toBeGreaterThan(0);
  });

  it('refuses an unknown export (exit 3) and a missing control socket (exit 7) with one line', async () => {
    const { config } = await start('bad');
    const unknown = await cli('agent', 'evict', 'nosuch.raw', '--control', config.control);
    expect(unknown.status).toBe(3);
    expect(unknown.stderr).toMatch(/^bootcache agent evict: error: no export named "nosuch\.raw".*the cache knows no image of that name \[BC_EXPORT_NOT_FOUND\]\n$/);
    const json = await cli('agent', 'evict', 'nosuch.raw', '--control', config.control, '--json');
    expect(json.json).toMatchObject({ error: { code: 'BC_EXPORT_NOT_FOUND', exitCode: 3 } });
    for (const args of [['cache'], ['evict', 'disk.raw']]) {
      const r = await cli('agent', ...args, '--control', join(root, 'no-such.sock'));
      expect(r.status).toBe(7);
      expect(r.stderr).toMatch(/cannot reach the agent's control socket \(ENOENT: is the agent running\?\) \[BC_AGENT\]\n$/);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
  });
});

describe('space registry and maintenance', () => {
  it('reclaims the cache of deleted and replaced images, keeps the rest, and a restarted agent still knows the names', async () => {
    const { agent, config, logs } = await start('reclaim');
    for (const name of ['keep.raw', 'gone.raw', 'replaced.raw', 'held.raw']) await compareThroughAgent(agent, config, name);
    const before = await listing(config);
    const spaces = Object.fromEntries(['keep.raw', 'gone.raw', 'replaced.raw', 'held.raw'].map((n) => [n, spaceOf(before, n)!]));
    for (const s of Object.values(spaces)) expect(s.blocks).toBe(SIZE / 4096);

    await unlink(join(storage, 'gone.raw'));
    // A new version: new bytes and a new mtime (the identity hashes the mtime).
    await writeFile(join(storage, 'replaced.raw'), randomBytes(SIZE));
    await utimes(join(storage, 'replaced.raw'), new Date(), new Date(Date.now() + 5000));
    // Deleted while a client still reads it: in use, left alone.
    const client = await NbdClient.connect(exportUri(config, 'held.raw'));
    await unlink(join(storage, 'held.raw'));
    // An image deleted from storage can still be evicted by name while the cache knows it...
    // (checked below, after maintenance, on one the registry no longer knows).

    const report = (await agent.runMaintenance())!;
    expect(report.reclaimed.map((r) => r.space).sort()).toEqual([spaces['gone.raw']!.space, spaces['replaced.raw']!.space].sort());
    expect(report.reclaimedBytes).toBe(2 * SIZE);
    expect(report.inUse).toBe(1);
    const line = logs.find((l) => l.msg === 'maintenance: cached blocks of images gone from storage reclaimed')!;
    expect(line).toMatchObject({ reclaimedSpaces: 2, reclaimedBytes: 2 * SIZE, inUseSpaces: 1, unknownSpaces: 0 });
    expect(line.keptSpaces).toBeGreaterThanOrEqual(1);
    expect(JSON.stringify(line.reclaimed)).toMatch(/gone\.raw is gone from storage/);
    expect(JSON.stringify(line.reclaimed)).toMatch(/replaced\.raw was replaced/);
    expect(logs.some((l) => l.msg === 'maintenance: cache index compacted')).toBe(true);

    const after = await listing(config);
    const bySpace = new Map(after.spaces.map((s) => [s.space, s]));
    expect(bySpace.get(spaces['keep.raw']!.space)).toMatchObject({ blocks: SIZE / 4096, images: ['keep.raw'] });
    expect(bySpace.has(spaces['gone.raw']!.space)).toBe(false);
    expect(bySpace.has(spaces['replaced.raw']!.space)).toBe(false);
    expect(bySpace.get(spaces['held.raw']!.space)).toMatchObject({ blocks: SIZE / 4096, openBy: ['held.raw'] });
    // Forgotten and gone from storage: evict knows no such image.
    const gone = await cli('agent', 'evict', 'gone.raw', '--control', config.control);
    expect(gone.status).toBe(3);
    // Deleted but still known (held open): evict drops it by name.
    const held = await cli('agent', 'evict', 'held.raw', '--control', config.control, '--json');
    expect(held.status, held.stderr).toBe(0);
    expect(held.json).toMatchObject({ blocks: SIZE / 4096 });
    await client.close();
    await closed(agent, 'held.raw');

    // The new version of replaced.raw is served and cached under a new space.
    await compareThroughAgent(agent, config, 'replaced.raw');
    const newSpace = spaceOf(await listing(config), 'replaced.raw')!;
    expect(newSpace.space).not.toBe(spaces['replaced.raw']!.space);

    // Restarted on the same cache: the names come from DIR/spaces.json, before any read.
    await agents.pop()!.stop();
    const second = await start('reclaim');
    const restarted = await listing(second.config);
    expect(restarted.spaces.find((s) => s.space === spaces['keep.raw']!.space)).toMatchObject({ blocks: SIZE / 4096, images: ['keep.raw'], layers: ['keep.raw'] });
    expect(restarted.spaces.find((s) => s.space === newSpace.space)).toMatchObject({ images: ['replaced.raw'] });
    // Closed now and still deleted: the next maintenance reclaims held.raw's (empty) space, keeps the others.
    const next = (await second.agent.runMaintenance())!;
    expect(next.reclaimed.map((r) => r.space)).toEqual([spaces['held.raw']!.space]);
    expect(next.reclaimedBytes).toBe(0);
  });

  it('leaves spaces of unknown origin alone (the registry lost), and starts on a damaged registry with a warning', async () => {
    const { agent, config } = await start('unknown');
    await compareThroughAgent(agent, config, 'keep.raw');
    await agents.pop()!.stop();
    await writeFile(join(config.cache, 'spaces.json'), 'not json');
    const second = await start('unknown');
    expect(second.logs.some((l) => l.level === 40 && /space registry is damaged/.test(String(l.msg)))).toBe(true);
    const l = await listing(second.config);
    expect(l.spaces).toHaveLength(1);
    expect(l.spaces[0]).toMatchObject({ blocks: SIZE / 4096, images: [] });
    expect(l.spaces[0]!.layers).toBeUndefined();
    const text = await cli('agent', 'cache', '--control', second.config.control);
    expect(text.stdout).toMatch(/\(unknown origin\)\s+-$/m);
    const report = (await second.agent.runMaintenance())!;
    expect(report).toMatchObject({ reclaimed: [], unknown: 1, unknownBytes: SIZE });
    expect((await listing(second.config)).spaces[0]!.blocks).toBe(SIZE / 4096);
    // Opening the image names its space again.
    await compareThroughAgent(second.agent, second.config, 'keep.raw');
    expect((await listing(second.config)).spaces[0]).toMatchObject({ images: ['keep.raw'] });
    await rm(join(second.config.cache, 'spaces.json'), { force: true });
  });
});
