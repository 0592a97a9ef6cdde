import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CacheDevice } from '../../src/agent/cache/cache-device.js';
import { evictSpaces, listCache, reclaimGone, type CatalogContext } from '../../src/agent/cache-catalog.js';
import { REGISTRY_FILE, SpaceRegistry, type LayerRef } from '../../src/agent/space-registry.js';
import { chainSpaceLayers, chainSpaces, type ChainImage } from '../../src/agent/cache/spaces.js';
import { computeIdentity } from '../../src/image/identity.js';
import type { ObjectStat } from '../../src/storage/types.js';

const BS = 4096;
const dirs: string[] = [];
const MiB = 1024 * 1024;

afterAll(async () => {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'bc-registry-'));
  dirs.push(dir);
  return dir;
}

const warnings: string[] = [];
const log = { warn: (_fields: object, message: string) => warnings.push(message) };

/** A chain of raw-ish layers named by key, each with the stamp given (top first). */
function chain(layers: Array<{ key: string; stamp: string }>): { image: ChainImage; refs: LayerRef[] } {
  const infos = layers.map((l) => ({
    name: l.key, format: 'qcow2' as const, virtualSize: 4 * MiB, fileSize: MiB, allocatedBytes: MiB, stamp: l.stamp, metadata: `meta-${l.key}`,
  }));
  const image: ChainImage = { identity: computeIdentity('qcow2', 4 * MiB, infos), layers: () => infos };
  return { image, refs: layers.map((l) => ({ key: l.key, stamp: l.stamp, version: `v-${l.stamp}` })) };
}

/** Storage as a map of key -> stamp; `failing` keys throw. */
function fakeStat(objects: Map<string, string>, failing = new Set<string>()): (key: string) => Promise<ObjectStat | undefined> {
  return async (key) => {
    if (failing.has(key)) throw new Error('storage timed out');
    const stamp = objects.get(key);
    return stamp === undefined ? undefined : { key, size: MiB, stamp, version: `v-${stamp}` };
  };
}

async function fill(cache: CacheDevice, space: string, blocks: number): Promise<void> {
  await cache.putMany(space, Array.from({ length: blocks }, (_, b) => ({ block: b, data: Buffer.alloc(BS, b) })), 'other');
}

describe('chainSpaceLayers', () => {
  it('names, per space, the layers its bytes depend on, in the order of chainSpaces', () => {
    const { image } = chain([{ key: 'a.qcow2', stamp: 's1' }, { key: 'base.qcow2', stamp: 's2' }]);
    const spaces = chainSpaceLayers(image);
    expect(spaces.map((s) => s.space)).toEqual(chainSpaces(image));
    // identity (both), A's own clusters, base alone (its owner and sub-chain are one space).
    expect(spaces.map((s) => [s.first, s.last])).toEqual([[0, 1], [0, 0], [1, 1]]);
  });
});

describe('SpaceRegistry', () => {
  it('survives a reload, merges exports of a shared layer, and treats a damaged file as empty', async () => {
    const dir = await tempDir();
    const reg = await SpaceRegistry.load(dir, log);
    const a = chain([{ key: 'a.qcow2', stamp: 'a1' }, { key: 'base.raw', stamp: 'b1' }]);
    const b = chain([{ key: 'b.qcow2', stamp: 'x1' }, { key: 'base.raw', stamp: 'b1' }]);
    reg.record('a.qcow2', a.image, a.refs);
    reg.record('b.qcow2', b.image, b.refs);
    await reg.flush();
    const baseSpace = chainSpaces(a.image)[2]!;
    expect(reg.exportsOf(baseSpace)).toEqual(['a.qcow2', 'b.qcow2']);
    expect(reg.size).toBe(5);
    const again = await SpaceRegistry.load(dir, log);
    expect(again.exportsOf(baseSpace)).toEqual(['a.qcow2', 'b.qcow2']);
    expect(again.get(chainSpaces(a.image)[0]!)!.origins[0]!.layers.map((l) => l.key)).toEqual(['a.qcow2', 'base.raw']);
    expect(again.spacesOf('b.qcow2').sort()).toEqual(chainSpaces(b.image).sort());
    // Written atomically: no temp file left behind.
    expect((await readdir(dir)).sort()).toEqual([REGISTRY_FILE]);

    await writeFile(join(dir, REGISTRY_FILE), '{"version":1,"spaces":');
    warnings.length = 0;
    const damaged = await SpaceRegistry.load(dir, log);
    expect(damaged.size).toBe(0);
    expect(warnings).toEqual([expect.stringMatching(/damaged; starting without it/)]);
  });

  it('stays bounded: the least recently opened spaces go first, and an overflow of origins marks a space incomplete', async () => {
    const dir = await tempDir();
    const reg = await SpaceRegistry.load(dir, log, { maxSpaces: 3 });
    for (let i = 0; i < 5; i++) {
      const c = chain([{ key: `img${i}.raw`, stamp: `s${i}` }]);
      reg.record(`img${i}.raw`, c.image, c.refs);
    }
    expect(reg.size).toBe(3);
    expect([...reg.entries()].map(([, r]) => r.origins[0]!.exports[0])).toEqual(['img2.raw', 'img3.raw', 'img4.raw']);
    // One identity reached under five keys (copies that kept the stamp): more than MAX_ORIGINS.
    const big = await SpaceRegistry.load(await tempDir(), log);
    for (let i = 0; i < 5; i++) {
      const c = chain([{ key: `copy${i}.raw`, stamp: 'same' }]);
      // The identity hashes format, size, stamp and metadata, not the key: force one space.
      const image: ChainImage = { identity: 'f'.repeat(64), layers: () => c.image.layers().map((l) => ({ ...l, stamp: 'same', metadata: 'm' })) };
      big.record(`copy${i}.raw`, image, c.refs, new Date(Date.UTC(2024, 0, 1 + i)));
    }
    const record = big.get('f'.repeat(64))!;
    expect(record.origins).toHaveLength(4);
    expect(record.incomplete).toBe(true);
    await big.flush();
    await reg.flush();
  });
});

describe('cache catalog', () => {
  async function setup(): Promise<{ ctx: CatalogContext; cache: CacheDevice; reg: SpaceRegistry; open: Map<string, string[]> }> {
    const dir = await tempDir();
    const cache = await CacheDevice.open(join(dir, 'cache'), { capacityBytes: 256 * BS, blockSize: BS, logger: { warn: () => undefined } });
    const reg = await SpaceRegistry.load(join(dir, 'cache'), log);
    const open = new Map<string, string[]>();
    return { ctx: { cache, registry: reg, openSpaces: () => open }, cache, reg, open };
  }

  it('lists bytes, last boot and names; evicts a chain and says which exports shared a layer', async () => {
    const { ctx, cache, reg } = await setup();
    const a = chain([{ key: 'a.qcow2', stamp: 'a1' }, { key: 'base.raw', stamp: 'b1' }]);
    const b = chain([{ key: 'b.qcow2', stamp: 'x1' }, { key: 'base.raw', stamp: 'b1' }]);
    reg.record('a.qcow2', a.image, a.refs);
    reg.record('b.qcow2', b.image, b.refs);
    const [, aOwn, base] = chainSpaces(a.image);
    await fill(cache, aOwn!, 3);
    await fill(cache, base!, 10);
    await cache.putMany(base!, [{ block: 20, data: Buffer.alloc(BS) }], 'boot');
    cache.markBooted(base!);
    await fill(cache, 'c'.repeat(64), 2); // of unknown origin

    const listing = listCache(ctx);
    expect(listing.blockSize).toBe(BS);
    expect(listing.spaces[0]).toMatchObject({ space: base, blocks: 11, bootBlocks: 1, bytes: 11 * BS, bootBytes: BS, layers: ['base.raw'], images: ['a.qcow2', 'b.qcow2'], openBy: [] });
    expect(listing.spaces[0]!.lastBootedAt).toMatch(/^\d{4}-\d\d-\d\dT.*Z$/);
    expect(listing.spaces.find((s) => s.space === 'c'.repeat(64))).toMatchObject({ blocks: 2, images: [] });
    expect(listing.spaces.find((s) => s.space === 'c'.repeat(64))!.layers).toBeUndefined();

    const evicted = await evictSpaces(ctx, 'a.qcow2', reg.spacesOf('a.qcow2'));
    expect(evicted).toMatchObject({ export: 'a.qcow2', blocks: 14, bytes: 14 * BS });
    expect(evicted.spaces.find((s) => s.space === base)).toMatchObject({ blocks: 11, sharedWith: ['b.qcow2'] });
    expect(evicted.spaces.find((s) => s.space === aOwn)).toMatchObject({ blocks: 3, sharedWith: [] });
    // Still known, with nothing cached.
    expect(listCache(ctx).spaces.find((s) => s.space === base)).toMatchObject({ blocks: 0, images: ['a.qcow2', 'b.qcow2'] });
    expect(cache.has(base!, 0)).toBe(false);
    await reg.flush();
    await cache.close();
  });

  it('reclaims spaces whose layers are gone or replaced, and keeps live, open, undecided and unknown ones', async () => {
    const { ctx, cache, reg, open } = await setup();
    const images = {
      gone: chain([{ key: 'gone.raw', stamp: 'g1' }]),
      replaced: chain([{ key: 'replaced.raw', stamp: 'r1' }]),
      live: chain([{ key: 'live.raw', stamp: 'l1' }]),
      open: chain([{ key: 'open.raw', stamp: 'o1' }]),
      flaky: chain([{ key: 'flaky.raw', stamp: 'f1' }]),
      // An overlay on a base that stays: the overlay's spaces go, the base's stays.
      overlay: chain([{ key: 'ov.qcow2', stamp: 'v1' }, { key: 'base.raw', stamp: 'b1' }]),
      sibling: chain([{ key: 'sib.qcow2', stamp: 's1' }, { key: 'base.raw', stamp: 'b1' }]),
    };
    for (const [name, c] of Object.entries(images)) {
      reg.record(name, c.image, c.refs);
      for (const space of chainSpaces(c.image)) await fill(cache, space, 4);
    }
    await fill(cache, 'c'.repeat(64), 2);
    open.set(images.open.image.identity, ['open.raw']);
    const storage = new Map([
      ['replaced.raw', 'r2'], ['live.raw', 'l1'], ['flaky.raw', 'f1'], ['base.raw', 'b1'], ['sib.qcow2', 's1'],
    ]);
    const report = await reclaimGone(ctx, fakeStat(storage, new Set(['flaky.raw'])));
    const reclaimed = new Map(report.reclaimed.map((r) => [r.space, r]));
    const [ovChain, ovOwn, base] = chainSpaces(images.overlay.image);
    expect([...reclaimed.keys()].sort()).toEqual([images.gone.image.identity, images.replaced.image.identity, ovChain!, ovOwn!].sort());
    expect(reclaimed.get(images.gone.image.identity)).toMatchObject({ blocks: 4, bytes: 4 * BS, layers: ['gone.raw'], reason: 'gone.raw is gone from storage' });
    expect(reclaimed.get(images.replaced.image.identity)!.reason).toMatch(/replaced.raw was replaced/);
    expect(report.reclaimedBytes).toBe(16 * BS);
    // live, base, sibling's 2: kept; open: in use; flaky: undecided; c...: unknown.
    expect(report).toMatchObject({ kept: 4, inUse: 1, undecided: 1, unknown: 1, unknownBytes: 2 * BS });
    expect(cache.has(images.gone.image.identity, 0)).toBe(false);
    expect(cache.has(base!, 0)).toBe(true);
    expect(cache.has(images.open.image.identity, 0)).toBe(true);
    expect(reg.get(images.gone.image.identity)).toBeUndefined();
    expect(reg.get(base!)).toBeDefined();
    // Once closed, the open image's space goes too (its key is not on storage).
    open.clear();
    const second = await reclaimGone(ctx, fakeStat(storage));
    // flaky.raw answers now: it is live.
    expect(second.reclaimed.map((r) => r.space)).toEqual([images.open.image.identity]);
    expect(second).toMatchObject({ kept: 5, inUse: 0, undecided: 0 });
    await reg.flush();
    const onDisk = JSON.parse(await readFile(reg.path, 'utf8')) as { spaces: Record<string, unknown> };
    expect(Object.keys(onDisk.spaces)).not.toContain(images.gone.image.identity);
    await cache.close();
  });
});
