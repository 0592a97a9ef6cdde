/**
 * The cache device seen by image: what `agent cache` lists, what `agent
 * evict` drops, and what maintenance reclaims once an image is gone from
 * storage. Spaces are named through the space registry (space-registry.ts).
 *
 * Dropping a space is always safe for the bytes served: the cache device
 * discards puts in flight for it (CacheDevice.invalidateSpace), and readers
 * then get the blocks from storage again. What these functions decide is
 * only which spaces are worth keeping.
 */
import type { ObjectStat } from '../storage/types.js';
import type { CacheDevice } from './cache/cache-device.js';
import type { SpaceRecord, SpaceRegistry } from './space-registry.js';

export interface CatalogContext {
  cache: Pick<CacheDevice, 'stats' | 'invalidateSpace' | 'blockSize'>;
  registry: SpaceRegistry;
  /** Exports open now (retired versions too), by the spaces their images use. */
  openSpaces(): Map<string, string[]>;
}

/** One space in `agent cache`. */
export interface CachedSpace {
  space: string;
  blocks: number;
  bootBlocks: number;
  /** blocks × block size (boot blocks included). */
  bytes: number;
  bootBytes: number;
  /** When an image of this space last booted, ISO 8601. */
  lastBootedAt?: string;
  /** Storage keys of the layers its bytes depend on, top first; absent when its origin is unknown. */
  layers?: string[];
  /** Exports known to use it (opened through these layers). */
  images: string[];
  /** Exports open now that use it. */
  openBy: string[];
}

export interface CacheListing {
  blockSize: number;
  capacityBytes: number;
  usedBytes: number;
  /** Largest first: every space holding blocks, and every space the registry knows (0 blocks once evicted). */
  spaces: CachedSpace[];
}

export interface EvictedSpace {
  space: string;
  blocks: number;
  bytes: number;
  layers?: string[];
  /** Other exports known to use this space (a shared backing layer): they read these blocks from storage again. */
  sharedWith: string[];
}

export interface EvictResult {
  export: string;
  blocks: number;
  bytes: number;
  spaces: EvictedSpace[];
}

export interface ReclaimedSpace {
  space: string;
  blocks: number;
  bytes: number;
  layers: string[];
  /** Why it can never be asked for again: the first layer found gone or replaced. */
  reason: string;
}

/** What maintenance did to the spaces (logged, and returned for tests). */
export interface ReclaimReport {
  reclaimed: ReclaimedSpace[];
  reclaimedBytes: number;
  /** Known spaces left: an image of theirs is still on storage at the version recorded. */
  kept: number;
  /** Known spaces an open export uses: never reclaimed. */
  inUse: number;
  /** Known spaces whose storage could not be asked (an error), or whose origins overflowed the registry: left alone. */
  undecided: number;
  /** Spaces holding blocks that the registry does not know: left alone (the cache's own eviction ages them out). */
  unknown: number;
  unknownBytes: number;
}

export function listCache(ctx: CatalogContext): CacheListing {
  const stats = ctx.cache.stats();
  const bs = stats.blockSize;
  const open = ctx.openSpaces();
  const bySpace = new Map(stats.spaces.map((s) => [s.space, s]));
  const spaces: CachedSpace[] = [];
  for (const space of new Set([...bySpace.keys(), ...[...ctx.registry.entries()].map(([s]) => s)])) {
    const s = bySpace.get(space);
    const record = ctx.registry.get(space);
    const blocks = s?.blocks ?? 0;
    // A space the registry has forgotten that holds nothing is no image any more.
    if (blocks === 0 && !record) continue;
    const entry: CachedSpace = {
      space,
      blocks,
      bootBlocks: s?.bootBlocks ?? 0,
      bytes: blocks * bs,
      bootBytes: (s?.bootBlocks ?? 0) * bs,
      images: ctx.registry.exportsOf(space),
      openBy: open.get(space) ?? [],
    };
    if (s?.lastBootedAt !== undefined) entry.lastBootedAt = new Date(s.lastBootedAt).toISOString();
    if (record) entry.layers = layerKeys(record);
    spaces.push(entry);
  }
  spaces.sort((a, b) => b.bytes - a.bytes || a.space.localeCompare(b.space));
  return { blockSize: bs, capacityBytes: stats.capacityBytes, usedBytes: stats.usedBytes, spaces };
}

/**
 * Drops every block of `spaces` (the chain of export `name`), shared backing
 * layers included. The blocks are counted and dropped in one synchronous
 * step per space, so the count is what was dropped.
 */
export async function evictSpaces(ctx: CatalogContext, name: string, spaces: readonly string[]): Promise<EvictResult> {
  const bs = ctx.cache.blockSize;
  const blocksOf = new Map(ctx.cache.stats().spaces.map((s) => [s.space, s.blocks]));
  const open = ctx.openSpaces();
  const evicted: EvictedSpace[] = [];
  const drops: Promise<void>[] = [];
  for (const space of new Set(spaces)) {
    const blocks = blocksOf.get(space) ?? 0;
    // invalidateSpace retires the blocks before its first await: none can be added in between.
    drops.push(ctx.cache.invalidateSpace(space));
    const others = new Set([...ctx.registry.exportsOf(space), ...(open.get(space) ?? [])]);
    others.delete(name);
    const entry: EvictedSpace = { space, blocks, bytes: blocks * bs, sharedWith: [...others].sort() };
    const record = ctx.registry.get(space);
    if (record) entry.layers = layerKeys(record);
    evicted.push(entry);
  }
  await Promise.all(drops);
  const blocks = evicted.reduce((n, e) => n + e.blocks, 0);
  return { export: name, blocks, bytes: blocks * bs, spaces: evicted };
}

type Liveness = { state: 'live' } | { state: 'gone'; reason: string } | { state: 'undecided'; reason: string };

/**
 * Maintenance: drops the spaces that can never be asked for again (every
 * origin has a layer gone from storage or replaced by another stamp), and
 * forgets them. Spaces in use by an open export, spaces whose storage did
 * not answer and spaces of unknown origin are left alone.
 */
export async function reclaimGone(ctx: CatalogContext, stat: (key: string) => Promise<ObjectStat | undefined>): Promise<ReclaimReport> {
  const stats = ctx.cache.stats();
  const bs = stats.blockSize;
  const blocksOf = new Map(stats.spaces.map((s) => [s.space, s.blocks]));
  const report: ReclaimReport = { reclaimed: [], reclaimedBytes: 0, kept: 0, inUse: 0, undecided: 0, unknown: 0, unknownBytes: 0 };
  for (const s of stats.spaces) {
    if (s.blocks > 0 && !ctx.registry.get(s.space)) {
      report.unknown++;
      report.unknownBytes += s.blocks * bs;
    }
  }
  // Each key asked once per run, a few at a time.
  const asked = new Map<string, Promise<ObjectStat | undefined | Error>>();
  const statOnce = (key: string): Promise<ObjectStat | undefined | Error> => {
    let p = asked.get(key);
    if (!p) {
      p = stat(key).catch((err: unknown) => (err instanceof Error ? err : new Error(String(err))));
      asked.set(key, p);
    }
    return p;
  };
  const candidates: Array<[string, SpaceRecord]> = [];
  const openBefore = ctx.openSpaces();
  for (const [space, record] of ctx.registry.entries()) {
    if (openBefore.has(space)) report.inUse++;
    else if (record.incomplete) report.undecided++;
    else candidates.push([space, record]);
  }
  const gone: Array<{ space: string; record: SpaceRecord; reason: string }> = [];
  for (let i = 0; i < candidates.length; i += 16) {
    const batch = candidates.slice(i, i + 16);
    const verdicts = await Promise.all(batch.map(([, record]) => liveness(record, statOnce)));
    batch.forEach(([space, record], k) => {
      const v = verdicts[k]!;
      if (v.state === 'live') report.kept++;
      else if (v.state === 'undecided') report.undecided++;
      else gone.push({ space, record, reason: v.reason });
    });
  }
  // Asked again now: an export may have opened one of these spaces while storage answered.
  const openNow = ctx.openSpaces();
  const blocksNow = new Map(ctx.cache.stats().spaces.map((s) => [s.space, s.blocks]));
  const drops: Promise<void>[] = [];
  const forgotten: string[] = [];
  for (const { space, record, reason } of gone) {
    if (openNow.has(space)) {
      report.inUse++;
      continue;
    }
    const blocks = blocksNow.get(space) ?? blocksOf.get(space) ?? 0;
    if (blocks > 0) drops.push(ctx.cache.invalidateSpace(space));
    forgotten.push(space);
    report.reclaimed.push({ space, blocks, bytes: blocks * bs, layers: layerKeys(record), reason });
    report.reclaimedBytes += blocks * bs;
  }
  await Promise.all(drops);
  ctx.registry.forget(forgotten);
  return report;
}

async function liveness(record: SpaceRecord, stat: (key: string) => Promise<ObjectStat | undefined | Error>): Promise<Liveness> {
  let undecided: string | undefined;
  let goneReason: string | undefined;
  for (const origin of record.origins) {
    let state: Liveness = { state: 'live' };
    for (const layer of origin.layers) {
      const st = await stat(layer.key);
      if (st instanceof Error) state = { state: 'undecided', reason: `${layer.key}: ${st.message}` };
      else if (st === undefined) state = { state: 'gone', reason: `${layer.key} is gone from storage` };
      else if (st.stamp !== layer.stamp) state = { state: 'gone', reason: `${layer.key} was replaced (stamp ${st.stamp}, recorded ${layer.stamp})` };
      if (state.state === 'gone') break;
    }
    if (state.state === 'live') return state;
    if (state.state === 'undecided') undecided ??= state.reason;
    else goneReason ??= state.reason;
  }
  if (undecided !== undefined) return { state: 'undecided', reason: undecided };
  return { state: 'gone', reason: goneReason ?? 'no origin' };
}

/** The layers of the most recently opened origin. */
function layerKeys(record: SpaceRecord): string[] {
  const latest = record.origins.reduce((a, b) => (b.openedAt > a.openedAt ? b : a));
  return latest.layers.map((l) => l.key);
}
