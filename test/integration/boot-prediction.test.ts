/**
 * A new version of an image, published with an index (IMAGE.bcidx) naming
 * its previous version and no segment of its own: the agent predicts its
 * boot from the previous version's segment. B is A rebuilt: a fifth of A's
 * boot runs changed, some moved to other offsets. The blocks predicted are
 * found by content in the cache, or read from B where the rebuild put them;
 * B's boot then reads from storage about the changed fifth only, and every
 * byte of B reads back as the file.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../src/agent/agent.js';
import type { AgentConfig } from '../../src/agent/config.js';
import { buildMapFromTrace } from '../../src/core/build-map.js';
import { buildSegment } from '../../src/core/build-segment.js';
import { buildImageIndex } from '../../src/core/image-index.js';
import { saveMap } from '../../src/format/map.js';
import { openImage } from '../../src/image/open.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { exportUri, startTestAgent, waitUntil } from '../helpers/agent.js';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';
import { writeRebuiltPair } from '../helpers/rebuilt-images.js';

const MiB = 1024 * 1024;
const BS = 4096;
const SIZE = 64 * MiB;
const RUNS = 200;
const RUN = 16;
const CHANGED = 40; // B's runs 0..39: new bytes
const MOVED = 40; // B's runs 40..79: A's bytes, at other offsets
const runStart = (i: number): number => 64 + i * 40;
const movedStart = (i: number): number => 12_000 + (i - CHANGED) * 32;

let root: string;
let storage: string;
let bRuns: number[] = [];
const agents: Agent[] = [];

beforeAll(async () => {
  root = await tmpDir('bc-predict-');
  storage = join(root, 'storage');
  await mkdir(storage);
  const written = await writeRebuiltPair(join(storage, 'a.raw'), join(storage, 'b.raw'), {
    size: SIZE, blockSize: BS, runs: RUNS, run: RUN, changed: CHANGED, moved: MOVED, runStart, movedStart,
  });
  const aRuns = written.aRuns;
  bRuns = written.bRuns;
  // A: map and segment of its boot. B: only an index that names A as its previous version.
  const imageA = await openImage(join(storage, 'a.raw'));
  try {
    const events = aRuns.map((block, i) => ({ line: i + 2, tUs: i, op: 'read', offset: block * BS, length: RUN * BS }));
    const { map } = await buildMapFromTrace(imageA, events, { blockSize: BS });
    await saveMap(join(storage, 'a.raw.bcmap'), map);
    await buildSegment(imageA, map, join(storage, 'a.raw.bcseg'));
  } finally {
    await imageA.close();
  }
  const imageB = await openImage(join(storage, 'b.raw'));
  try {
    await buildImageIndex(imageB, join(storage, 'b.raw.bcidx'), { previous: 'a.raw' });
  } finally {
    await imageB.close();
  }
});

afterEach(async () => {
  while (agents.length) await agents.pop()!.stop();
});

afterAll(async () => {
  await removeTmpDir(root);
});

async function start(dir: string): Promise<{ agent: Agent; config: AgentConfig }> {
  const started = await startTestAgent(storage, join(root, dir), { readahead: 0, missWindow: 0, boot: { idleMs: 60_000, windowMs: 600_000, minReads: 1e9 } });
  agents.push(started.agent);
  return started;
}

/** B's boot (its runs, in order) through the agent, checked against the file; storage bytes it took. */
async function bootB(agent: Agent, config: AgentConfig): Promise<number> {
  const file = await readFile(join(storage, 'b.raw'));
  const before = agent.status().counters.storage.readBytes;
  const client = await NbdClient.connect(exportUri(config, 'b.raw'));
  try {
    for (const block of bRuns) {
      const data = await client.read(block * BS, RUN * BS);
      if (!data.equals(file.subarray(block * BS, (block + RUN) * BS))) throw new Error(`b.raw: bytes at block ${block} differ from the image`);
    }
  } finally {
    await client.close();
  }
  await waitUntil(() => agent.status().exports.filter((e) => e.name === 'b.raw').every((e) => e.connections === 0), 'b.raw closed');
  return agent.status().counters.storage.readBytes - before;
}

describe('boot prediction for a new version of an image', () => {
  const bootBytes = RUNS * RUN * BS;
  const predicted = (RUNS - CHANGED) * RUN;

  it('a host that booted the previous version: the prediction is all in the cache, the boot reads about the changed fifth', async () => {
    const { agent, config } = await start('warm-host');
    await agent.warm('a.raw');
    const w = await agent.warm('b.raw');
    expect(w).toMatchObject({ state: 'done', blocks: predicted, blocksCached: predicted, blocksLoaded: 0 });
    const prediction = agent.status().exports.find((e) => e.name === 'b.raw')!.prediction!;
    expect(prediction).toMatchObject({ previous: 'a.raw', state: 'done', predicted, cached: predicted, fetched: 0, unmatched: CHANGED * RUN });
    const bytes = await bootB(agent, config);
    console.log(`boot of B after A: ${bytes} storage bytes of a ${bootBytes}-byte boot (${((100 * bytes) / bootBytes).toFixed(1)} %)`);
    expect(bytes).toBeGreaterThanOrEqual(CHANGED * RUN * BS);
    expect(bytes).toBeLessThanOrEqual(0.3 * bootBytes);
    expect(agent.status().cache.content.mismatches).toBe(0);
  });

  it('a cold host: the predicted blocks are read from the new version where it put them, ahead of its boot', async () => {
    const { agent, config } = await start('cold-host');
    const w = await agent.warm('b.raw');
    expect(w).toMatchObject({ state: 'done', blocks: predicted, blocksCached: 0, blocksLoaded: predicted });
    const bytes = await bootB(agent, config);
    expect(bytes).toBeLessThanOrEqual(0.3 * bootBytes);
    // Every byte of the new version, predicted or not, reads back as the file.
    const file = await readFile(join(storage, 'b.raw'));
    const client = await NbdClient.connect(exportUri(config, 'b.raw'));
    try {
      for (let at = 0; at < file.length; at += 4 * MiB) {
        expect((await client.read(at, 4 * MiB)).equals(file.subarray(at, at + 4 * MiB))).toBe(true);
      }
    } finally {
      await client.close();
    }
  });

  it('an index that names a previous version without a segment predicts nothing and breaks nothing', async () => {
    const { agent, config } = await start('no-previous-segment');
    await writeFile(join(storage, 'c.raw'), await readFile(join(storage, 'b.raw')));
    const imageC = await openImage(join(storage, 'c.raw'));
    try {
      await buildImageIndex(imageC, join(storage, 'c.raw.bcidx'), { previous: 'b.raw' });
    } finally {
      await imageC.close();
    }
    await expect(agent.warm('c.raw')).rejects.toThrow(/no map and segment/);
    expect(agent.status().exports.find((e) => e.name === 'c.raw')!.prediction).toBeUndefined();
    const client = await NbdClient.connect(exportUri(config, 'c.raw'));
    const file = await readFile(join(storage, 'c.raw'));
    expect((await client.read(bRuns[0]! * BS, RUN * BS)).equals(file.subarray(bRuns[0]! * BS, (bRuns[0]! + RUN) * BS))).toBe(true);
    await client.close();
  });

  it("an index of another version of the image is not used: it cannot name this version's content", async () => {
    const { agent, config } = await start('stale-index');
    await agent.warm('a.raw');
    // d.raw is b.raw with its first predicted run changed, under b's index (made for b's bytes).
    const d = await readFile(join(storage, 'b.raw'));
    const target = bRuns[CHANGED]!;
    randomBytes(RUN * BS).copy(d, target * BS);
    await writeFile(join(storage, 'd.raw'), d);
    await writeFile(join(storage, 'd.raw.bcidx'), await readFile(join(storage, 'b.raw.bcidx')));
    await expect(agent.warm('d.raw')).rejects.toThrow(/no map and segment/);
    const client = await NbdClient.connect(exportUri(config, 'd.raw'));
    try {
      expect((await client.read(target * BS, RUN * BS)).equals(d.subarray(target * BS, (target + RUN) * BS))).toBe(true);
    } finally {
      await client.close();
    }
  });
});
