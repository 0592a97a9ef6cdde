/**
 * The agent's cache is shared by overlays on one backing file: blocks read
 * from the backing file through one overlay are hits through the other, an
 * overlay's own clusters are never served from its backing file's space,
 * and a rewritten backing file is never served from stale cache blocks.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Agent } from '../../src/agent/agent.js';
import { resolveConfig, type AgentConfig } from '../../src/agent/config.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { convertToRaw, qemuImg, qemuIo, removeTmpDir, tmpDir } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 4 * MiB;
const BLOCK = 4096;
let root: string;
let storage: string;
const agents: Agent[] = [];

beforeAll(async () => {
  root = await tmpDir('bc-shared-');
  storage = join(root, 'storage');
  await mkdir(storage);
  await writeFile(join(storage, 'base.raw'), randomBytes(SIZE));
  await qemuImg(['convert', '-q', '-f', 'raw', '-O', 'qcow2', join(storage, 'base.raw'), join(storage, 'base.qcow2')]);
  for (const [base, fmt] of [['base.qcow2', 'qcow2'], ['base.raw', 'raw']] as const) {
    const stem = fmt === 'raw' ? 'r' : 'q';
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', fmt, join(storage, `${stem}a.qcow2`), String(SIZE)]);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', fmt, join(storage, `${stem}b.qcow2`), String(SIZE)]);
    // Different clusters in each overlay; A shadows [0, 64k) and [1M, 1M+64k) of the base.
    await qemuIo(join(storage, `${stem}a.qcow2`), 'qcow2', ['write -P 0xaa 0 64k', 'write -P 0xa1 1M 64k']);
    await qemuIo(join(storage, `${stem}b.qcow2`), 'qcow2', ['write -P 0xbb 64k 64k']);
  }
});

afterEach(async () => {
  while (agents.length) await agents.pop()!.stop();
});

afterAll(async () => {
  await removeTmpDir(root);
});

async function startAgent(name: string): Promise<{ agent: Agent; config: AgentConfig }> {
  const dir = join(root, name);
  await mkdir(dir, { recursive: true });
  const config = resolveConfig(
    {},
    {
      storage,
      cache: join(dir, 'cache'),
      socket: join(dir, 'nbd.sock'),
      control: join(dir, 'control.sock'),
      cacheSize: '64M',
      // Exact miss accounting per block: no sequential readahead.
      readahead: 0,
      boot: { idleMs: 60_000, windowMs: 600_000, minReads: 1e9 },
      maintenance: 'off',
      logLevel: 'silent',
      warmup: false,
    },
  );
  const agent = new Agent(config, pino({ level: 'silent' }));
  await agent.start();
  agents.push(agent);
  return { agent, config };
}

/** The guest bytes of `image` as qemu-img converts them (converted outside the storage root). */
async function expected(image: string): Promise<Buffer> {
  return convertToRaw(join(storage, image), { out: join(root, `${image.replace(/\//g, '_')}.raw`) });
}

/** Reads [offset, offset+length) of export `name` in 256 KiB reads, and waits until the agent sees the disconnect. */
async function readExport(agent: Agent, config: AgentConfig, name: string, offset = 0, length = SIZE): Promise<Buffer> {
  const client = await NbdClient.connect(`nbd+unix:///${name}?socket=${config.socket}`);
  const parts: Buffer[] = [];
  try {
    for (let at = offset; at < offset + length; at += 256 * KiB) {
      parts.push(await client.read(at, Math.min(256 * KiB, offset + length - at)));
    }
  } finally {
    await client.close();
  }
  const start = Date.now();
  while ((agent.status().exports.find((e) => e.name === name)?.connections ?? 0) > 0) {
    if (Date.now() - start > 10_000) throw new Error(`export ${name} still has connections`);
    await new Promise((r) => setTimeout(r, 10));
  }
  return Buffer.concat(parts);
}

function snapshot(agent: Agent): { hits: number; misses: number; readBytes: number } {
  const { counters } = agent.status();
  return { hits: counters.guestReads.cache + counters.guestReads.prefetch, misses: counters.guestReads.storage, readBytes: counters.storage.readBytes };
}

describe('cache shared by overlays on one backing file', () => {
  for (const stem of ['q', 'r']) {
    const kind = stem === 'q' ? 'qcow2' : 'raw';
    it(`serves overlays on a ${kind} base byte-exact and reads the base's blocks from storage once`, async () => {
      const { agent, config } = await startAgent(`share-${stem}`);
      const blocks = SIZE / BLOCK;

      const before = snapshot(agent);
      expect((await readExport(agent, config, `${stem}a.qcow2`)).equals(await expected(`${stem}a.qcow2`))).toBe(true);
      const afterA = snapshot(agent);
      expect(afterA.misses - before.misses).toBe(blocks);

      // B: its own 64k and the base's blocks that A shadowed are misses; every other block is a hit.
      expect((await readExport(agent, config, `${stem}b.qcow2`)).equals(await expected(`${stem}b.qcow2`))).toBe(true);
      const afterB = snapshot(agent);
      const ownOrShadowed = (64 * KiB + 2 * 64 * KiB) / BLOCK;
      expect(afterB.misses - afterA.misses).toBe(ownOrShadowed);
      // (Segment rebuilds after each boot read through the cache too: hits only.)
      expect(afterB.hits - afterA.hits).toBeGreaterThanOrEqual(blocks - ownOrShadowed);
      // Storage: B's data reads plus metadata (headers, L1/L2 tables), far less than the image.
      expect(afterB.readBytes - afterA.readBytes).toBeLessThan(afterA.readBytes - before.readBytes - 2 * MiB);

      // A's own clusters shadow base blocks that are now cached (read through B): A still reads its own.
      const own = await readExport(agent, config, `${stem}a.qcow2`, 0, 64 * KiB);
      expect(own.equals(Buffer.alloc(64 * KiB, 0xaa))).toBe(true);
      const shadow = await readExport(agent, config, `${stem}a.qcow2`, MiB, 64 * KiB);
      expect(shadow.equals(Buffer.alloc(64 * KiB, 0xa1))).toBe(true);

      // The exports report the spaces they share.
      const exports = agent.status().exports;
      const spacesA = exports.find((e) => e.name === `${stem}a.qcow2`)!.spaces;
      const spacesB = exports.find((e) => e.name === `${stem}b.qcow2`)!.spaces;
      const shared = spacesA.filter((s) => spacesB.includes(s));
      expect(shared.length).toBeGreaterThan(0);
      // The base's space holds the shared blocks and was marked booted when the boots ended.
      const base = agent.status().cache.spaces.filter((s) => shared.includes(s.space));
      expect(base.some((s) => s.blocks >= SIZE / BLOCK - ownOrShadowed && s.lastBootedAt !== undefined)).toBe(true);
    });
  }

  it('serves two overlays reading the same base blocks at once byte-exact', async () => {
    const { agent, config } = await startAgent('concurrent');
    const [a, b] = await Promise.all([readExport(agent, config, 'qa.qcow2'), readExport(agent, config, 'qb.qcow2')]);
    expect(a.equals(await expected('qa.qcow2'))).toBe(true);
    expect(b.equals(await expected('qb.qcow2'))).toBe(true);
    // At most one storage read per (space, block) key, whatever the interleaving: a reader finding
    // the other's read in flight joins it. Keys: every block of A, plus B's own 64k and the base
    // blocks A shadows (2 x 64k); without sharing the base, B would read nearly every block again
    // (~2x). Metadata (headers, L1/L2 tables) is well under 1 MiB.
    const ownOrShadowed = (64 * KiB + 2 * 64 * KiB) / BLOCK;
    expect(agent.status().counters.storage.readBytes).toBeLessThanOrEqual((SIZE / BLOCK + ownOrShadowed) * BLOCK + MiB);
  });

  it('does not serve stale blocks after the base file is rewritten', async () => {
    const { agent, config } = await startAgent('stale');
    expect((await readExport(agent, config, 'qa.qcow2')).equals(await expected('qa.qcow2'))).toBe(true);
    expect((await readExport(agent, config, 'qb.qcow2')).equals(await expected('qb.qcow2'))).toBe(true);
    // Rewrite a base cluster that no overlay shadows; a new mtime makes a new stamp.
    await qemuIo(join(storage, 'base.qcow2'), 'qcow2', ['write -P 0x55 2M 64k']);
    const later = new Date(Date.now() + 5000);
    await utimes(join(storage, 'base.qcow2'), later, later);
    for (const name of ['qa.qcow2', 'qb.qcow2', 'base.qcow2']) {
      const data = await readExport(agent, config, name);
      expect(data.subarray(2 * MiB, 2 * MiB + 64 * KiB).equals(Buffer.alloc(64 * KiB, 0x55))).toBe(true);
      expect(data.equals(await expected(name))).toBe(true);
    }
  });
});
