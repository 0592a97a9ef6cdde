/**
 * Content-addressed blocks through the real agent: two images whose boots
 * read mostly the same bytes (B is A with a fifth of its boot blocks changed
 * and some moved) store those bytes once, B's stream reads from storage only
 * what A's did not bring, both read back byte-identical over NBD; a wrong
 * entry under a content key is never served; a rewritten image never gets
 * the bytes of the version its segment was built for.
 */
import { randomBytes } from 'node:crypto';
import { copyFile, mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../src/agent/agent.js';
import { CacheDevice } from '../../src/agent/cache/cache-device.js';
import { CONTENT_SPACE, contentKey } from '../../src/agent/content-blocks.js';
import type { AgentConfig } from '../../src/agent/config.js';
import { buildMapFromTrace } from '../../src/core/build-map.js';
import { buildSegment } from '../../src/core/build-segment.js';
import { loadMap, saveMap } from '../../src/format/map.js';
import { SegmentReader } from '../../src/format/segment.js';
import { openImage } from '../../src/image/open.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { exportUri, startTestAgent, waitUntil } from '../helpers/agent.js';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';
import { writeRebuiltPair } from '../helpers/rebuilt-images.js';

const MiB = 1024 * 1024;
const BS = 4096;
const SIZE = 64 * MiB;
/** Boot runs of RUN blocks each; A's run i starts at block runStart(i). */
const RUNS = 250;
const RUN = 20;
const CHANGED = 50; // runs 0..49 of B: new bytes (a fifth)
const MOVED = 25; // runs 50..74 of B: A's bytes, at other offsets
let root: string;
let storage: string;
const agents: Agent[] = [];

const runStart = (i: number): number => 64 + i * 48;
/** Where B keeps moved run i (past A's boot area, which ends at block 64 + 250 × 48). */
const movedStart = (i: number): number => 13_000 + (i - CHANGED) * 40;

beforeAll(async () => {
  root = await tmpDir('bc-content-');
  storage = join(root, 'storage');
  await mkdir(storage);
  const { aRuns, bRuns } = await writeRebuiltPair(join(storage, 'a.raw'), join(storage, 'b.raw'), {
    size: SIZE, blockSize: BS, runs: RUNS, run: RUN, changed: CHANGED, moved: MOVED, runStart, movedStart,
  });
  await publish('a.raw', aRuns);
  await publish('b.raw', bRuns);
});

afterEach(async () => {
  while (agents.length) await agents.pop()!.stop();
});

afterAll(async () => {
  await removeTmpDir(root);
});

/** Map and version 2 segment of `name` for a boot reading each run once. */
async function publish(name: string, runs: number[]): Promise<void> {
  const path = join(storage, name);
  const image = await openImage(path);
  try {
    const events = runs.map((block, i) => ({ line: i + 2, tUs: i, op: 'read', offset: block * BS, length: RUN * BS }));
    const { map } = await buildMapFromTrace(image, events, { blockSize: BS });
    await saveMap(`${path}.bcmap`, map);
    expect((await buildSegment(image, map, `${path}.bcseg`)).version).toBe(2);
  } finally {
    await image.close();
  }
}

async function start(dir: string): Promise<{ agent: Agent; config: AgentConfig }> {
  const started = await startTestAgent(storage, join(root, dir), { readahead: 0, boot: { idleMs: 60_000, windowMs: 600_000, minReads: 1e9 } });
  agents.push(started.agent);
  return started;
}

/** Every byte of `name` read through the agent equals the file. */
async function expectIdentical(agent: Agent, config: AgentConfig, name: string): Promise<void> {
  const file = await readFile(join(storage, name));
  const client = await NbdClient.connect(exportUri(config, name));
  try {
    for (let at = 0; at < file.length; at += 4 * MiB) {
      const data = await client.read(at, 4 * MiB);
      if (!data.equals(file.subarray(at, at + 4 * MiB))) throw new Error(`${name}: bytes at ${at} differ from the image`);
    }
  } finally {
    await client.close();
  }
  await waitUntil(() => agent.status().exports.filter((e) => e.name === name).every((e) => e.connections === 0), `${name} closed`);
}

describe('content-addressed blocks', () => {
  it("streams of B read from storage only what A's stream did not bring; A and B read back byte-identical", async () => {
    const { agent, config } = await start('share');
    const a = await agent.warm('a.raw');
    expect(a).toMatchObject({ state: 'done', blocks: RUNS * RUN, blocksLoaded: RUNS * RUN, blocksCached: 0 });
    const b = await agent.warm('b.raw');
    const segmentBytes = RUNS * RUN * BS;
    // The changed fifth (and the segment's head read) from storage; A's bytes, moved or not, from the cache.
    expect(b.state).toBe('done');
    expect(b.storageBytes).toBeLessThanOrEqual(0.3 * segmentBytes);
    expect(b.blocksCached).toBe((RUNS - CHANGED) * RUN);
    expect(b.blocksLoaded).toBe(CHANGED * RUN);
    const prefetchB = agent.status().exports.find((e) => e.name === 'b.raw')!.prefetch!;
    expect(prefetchB.bytesRead).toBe(CHANGED * RUN * BS);
    // A's blocks and B's, each as if stored apart, in A's blocks plus B's changed fifth.
    expect(agent.status().cache.content).toMatchObject({
      logicalBytes: 2 * RUNS * RUN * BS,
      physicalBytes: (RUNS + CHANGED) * RUN * BS,
      ratio: (2 * RUNS) / (RUNS + CHANGED),
    });
    console.log(`B warm: ${b.storageBytes} storage bytes, segment ${segmentBytes} bytes (${((100 * b.storageBytes) / segmentBytes).toFixed(1)} %), stream ${prefetchB.bytesRead} bytes`);

    await expectIdentical(agent, config, 'b.raw');
    await expectIdentical(agent, config, 'a.raw');
    // The boot blocks of both, served through the content space (checked against their digests), none wrong.
    const content = agent.status().cache.content;
    expect(content.mismatches).toBe(0);
    expect(content.hits).toBeGreaterThanOrEqual((RUNS + RUNS - CHANGED) * RUN);
  });

  it('never serves a content entry whose bytes are wrong: the read returns the image bytes, and the entry is put right', async () => {
    const dir = 'wrong';
    const first = await start(dir);
    await first.agent.stop();
    agents.pop();
    // A wrong block under the content key of A's first boot block, through the cache device itself.
    const block = runStart(0);
    const reader = await SegmentReader.open(join(storage, 'a.raw.bcseg'));
    const key = contentKey(reader.blockDigest(0));
    await reader.close();
    const cache = await CacheDevice.open(join(root, dir, 'cache'), { capacityBytes: 256 * MiB });
    await cache.put(CONTENT_SPACE, key, randomBytes(BS), 'boot');
    await cache.close();

    const { agent, config } = await start(dir);
    // Its stream takes the entry for cached (no read for it); the guest read finds it wrong.
    expect(await agent.warm('a.raw')).toMatchObject({ state: 'done', blocksCached: 1, blocksLoaded: RUNS * RUN - 1 });
    const image = await readFile(join(storage, 'a.raw'));
    const client = await NbdClient.connect(exportUri(config, 'a.raw'));
    try {
      const want = image.subarray(block * BS, (block + 1) * BS);
      expect((await client.read(block * BS, BS)).equals(want)).toBe(true);
      expect(agent.status().cache.content.mismatches).toBe(1);
      // The bytes read hash to the digest: they replaced the wrong entry, which now serves.
      await agent.cacheListing(); // the miss writer's batch is in the cache
      const storageBefore = agent.status().counters.storage.readBytes;
      expect((await client.read(block * BS, BS)).equals(want)).toBe(true);
      expect(agent.status().cache.content.mismatches).toBe(1);
      expect(agent.status().counters.storage.readBytes).toBe(storageBefore);
    } finally {
      await client.close();
    }
  });

  it("a rewritten image gets its own bytes, not the content of the version its segment describes", async () => {
    await copyFile(join(storage, 'a.raw'), join(storage, 'c.raw'));
    await publish('c.raw', Array.from({ length: RUNS }, (_, i) => runStart(i)));
    const { agent, config } = await start('rewrite');
    await agent.warm('a.raw');
    expect((await agent.warm('c.raw')).blocksLoaded).toBe(0); // A's content, the same bytes: nothing to read
    // C rewritten in place: new bytes in its boot blocks; its segment still describes the old ones.
    const path = join(storage, 'c.raw');
    const image = await readFile(path);
    randomBytes(RUNS * 48 * BS).copy(image, runStart(0) * BS);
    await writeFile(path, image);
    const map = await loadMap(`${path}.bcmap`);
    expect(map.blocksSet).toBe(RUNS * RUN);
    await expectIdentical(agent, config, 'c.raw');
    expect(agent.status().cache.content.mismatches).toBe(0);
  });
});
