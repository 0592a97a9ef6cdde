/**
 * Property tests of the cache device against simple models: random
 * sequences of put / get / markBooted / invalidateSpace (evicting all the
 * time: the cache is small), sequential and concurrent (with putMany
 * batches), with restarts.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { CacheDevice } from '../../src/agent/cache/cache-device.js';

const BS = 512;
const SLOTS = 16;
const SPACES = ['a1', 'b2', 'c3'] as const;
const BLOCKS = 12;
const dirs: string[] = [];

afterAll(async () => {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});

async function freshCache(verifyReads = false): Promise<{ dir: string; cache: CacheDevice }> {
  const dir = await mkdtemp(join(tmpdir(), 'bc-cache-prop-'));
  dirs.push(dir);
  return { dir, cache: await reopen(dir, verifyReads) };
}

function reopen(dir: string, verifyReads = false): Promise<CacheDevice> {
  return CacheDevice.open(dir, { capacityBytes: SLOTS * BS, blockSize: BS, verifyReads, logger: { warn: () => undefined } });
}

function data(space: string, block: number, version: number): Buffer {
  const buf = Buffer.alloc(BS);
  const tag = `${space}:${block}:${version}|`;
  for (let at = 0; at < BS; at += tag.length) buf.write(tag, at, 'latin1');
  return buf;
}

type Op =
  | { op: 'put'; space: string; block: number; version: number; boot: boolean }
  | { op: 'get'; space: string; block: number }
  | { op: 'booted'; space: string }
  | { op: 'invalidate'; space: string }
  | { op: 'compactReopen' };

const spaceArb = fc.constantFrom(...SPACES);
const blockArb = fc.integer({ min: 0, max: BLOCKS - 1 });
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 10, arbitrary: fc.record({ op: fc.constant('put' as const), space: spaceArb, block: blockArb, version: fc.integer({ min: 0, max: 3 }), boot: fc.boolean() }) },
  { weight: 6, arbitrary: fc.record({ op: fc.constant('get' as const), space: spaceArb, block: blockArb }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('booted' as const), space: spaceArb }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('invalidate' as const), space: spaceArb }) },
  { weight: 1, arbitrary: fc.constant({ op: 'compactReopen' as const }) },
);

/**
 * The eviction policy, written plainly: 'other' blocks in LRU order first,
 * then boot blocks (LRU within a space) of the least recently booted space.
 */
class PolicyModel {
  readonly entries = new Map<string, { version: number; boot: boolean; space: string }>();
  private other: string[] = [];
  private bootLists = new Map<string, string[]>();
  private order: string[] = [];

  put(space: string, block: number, version: number, boot: boolean): void {
    const key = `${space}/${block}`;
    const existing = this.entries.get(key);
    if (existing && existing.version === version) {
      if (boot && !existing.boot) {
        this.unlink(key);
        existing.boot = true;
        this.link(key);
      } else this.touch(key);
      return;
    }
    if (this.entries.size === SLOTS) this.evict(); // a slot for the new bytes first...
    const old = this.entries.get(key);
    if (old) this.remove(key); // ...then the old copy goes
    this.entries.set(key, { version, boot: boot || (old?.boot ?? false), space });
    this.link(key);
  }

  get(space: string, block: number): number | undefined {
    const key = `${space}/${block}`;
    const e = this.entries.get(key);
    if (e) this.touch(key);
    return e?.version;
  }

  booted(space: string): void {
    const at = this.order.indexOf(space);
    if (at >= 0) this.order.push(...this.order.splice(at, 1));
  }

  invalidate(space: string): void {
    for (const [key, e] of [...this.entries]) if (e.space === space) this.remove(key);
  }

  private evict(): void {
    const victim = this.other[0] ?? this.bootLists.get(this.order[0]!)![0]!;
    this.remove(victim);
  }

  private remove(key: string): void {
    this.unlink(key);
    this.entries.delete(key);
  }

  /** Most recently used within its list; the space keeps its place in the boot order (a read is not a boot). */
  private touch(key: string): void {
    const e = this.entries.get(key)!;
    const list = e.boot ? this.bootLists.get(e.space)! : this.other;
    list.splice(list.indexOf(key), 1);
    list.push(key);
  }

  private link(key: string): void {
    const e = this.entries.get(key)!;
    if (!e.boot) return void this.other.push(key);
    const list = this.bootLists.get(e.space) ?? [];
    if (list.length === 0 && !this.order.includes(e.space)) this.order.push(e.space);
    list.push(key);
    this.bootLists.set(e.space, list);
  }

  private unlink(key: string): void {
    const e = this.entries.get(key)!;
    if (!e.boot) return void this.other.splice(this.other.indexOf(key), 1);
    const list = this.bootLists.get(e.space)!;
    list.splice(list.indexOf(key), 1);
    if (list.length === 0) this.order.splice(this.order.indexOf(e.space), 1);
  }
}

function cachedKeys(cache: CacheDevice): string[] {
  const keys: string[] = [];
  for (const space of SPACES) for (let b = 0; b < BLOCKS; b++) if (cache.has(space, b)) keys.push(`${space}/${b}`);
  return keys;
}

describe('CacheDevice against models', () => {
  it('follows the eviction policy exactly and returns exactly the bytes put', async () => {
    let runsThatEvicted = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 30, maxLength: 150, size: 'max' }), async (ops) => {
        const { dir, cache: first } = await freshCache();
        let cache = first;
        const model = new PolicyModel();
        let evictions = 0;
        try {
          for (const o of ops) {
            switch (o.op) {
              case 'put':
                await cache.put(o.space, o.block, data(o.space, o.block, o.version), o.boot ? 'boot' : 'other');
                model.put(o.space, o.block, o.version, o.boot);
                break;
              case 'get': {
                const got = await cache.get(o.space, o.block);
                const version = model.get(o.space, o.block);
                expect(got === undefined ? undefined : got.toString('latin1', 0, 20)).toBe(
                  version === undefined ? undefined : data(o.space, o.block, version).toString('latin1', 0, 20),
                );
                if (got) expect(got.equals(data(o.space, o.block, version!))).toBe(true);
                break;
              }
              case 'booted':
                cache.markBooted(o.space);
                model.booted(o.space);
                break;
              case 'invalidate':
                await cache.invalidateSpace(o.space);
                model.invalidate(o.space);
                break;
              case 'compactReopen':
                await cache.compact();
                await cache.close();
                cache = await reopen(dir);
                break;
            }
            expect(cachedKeys(cache)).toEqual([...model.entries.keys()].sort(compareKeys));
            evictions = Math.max(evictions, cache.stats().evictions);
            const s = cache.stats();
            expect(s.blocks).toBe(model.entries.size);
            expect(s.bootBlocks).toBe([...model.entries.values()].filter((e) => e.boot).length);
          }
        } finally {
          await cache.close();
          runsThatEvicted += evictions > 0 ? 1 : 0;
        }
      }),
      { numRuns: 60 },
    );
    expect(runsThatEvicted).toBeGreaterThan(10); // the property is about eviction: make sure it happens
  }, 600_000); // each run opens, fills and reopens a cache: slow on a loaded 2-core host

  it('concurrent operations and restarts: every hit is a version put for that key', async () => {
    type PutMany = { op: 'putMany'; space: string; blocks: number[]; version: number; boot: boolean };
    const putManyArb: fc.Arbitrary<PutMany> = fc.record({
      op: fc.constant('putMany' as const),
      space: spaceArb,
      blocks: fc.array(blockArb, { minLength: 1, maxLength: 10 }),
      version: fc.integer({ min: 0, max: 3 }),
      boot: fc.boolean(),
    });
    const concurrentOpArb = fc.oneof(
      { weight: 8, arbitrary: opArb.filter((o): o is Exclude<Op, { op: 'compactReopen' }> => o.op !== 'compactReopen') },
      { weight: 2, arbitrary: putManyArb },
    );
    const batchArb = fc.array(concurrentOpArb, { minLength: 1, maxLength: 40, size: 'max' });
    const stepArb = fc.oneof(
      { weight: 8, arbitrary: batchArb },
      { weight: 1, arbitrary: fc.constantFrom('reopen' as const, 'compact' as const, 'crashlessFlush' as const) },
    );
    await fc.assert(
      fc.asyncProperty(fc.array(stepArb, { minLength: 3, maxLength: 15, size: 'max' }), fc.boolean(), async (steps, verifyReads) => {
        const { dir, cache: first } = await freshCache(verifyReads);
        let cache = first;
        const everPut = new Map<string, Set<number>>();
        const check = (space: string, block: number, got: Buffer | undefined): void => {
          if (!got) return;
          const versions = everPut.get(`${space}/${block}`) ?? new Set<number>();
          expect([...versions].some((v) => data(space, block, v).equals(got)), `${space}/${block}`).toBe(true);
        };
        try {
          for (const step of steps) {
            if (step === 'reopen') {
              const before = cachedKeys(cache);
              await cache.close();
              cache = await reopen(dir, verifyReads);
              expect(cachedKeys(cache)).toEqual(before); // close made everything durable
              continue;
            }
            if (step === 'compact') {
              await cache.compact();
              continue;
            }
            if (step === 'crashlessFlush') {
              await cache.flush();
              continue;
            }
            await Promise.all(
              step.map(async (o) => {
                switch (o.op) {
                  case 'put': {
                    const key = `${o.space}/${o.block}`;
                    everPut.set(key, (everPut.get(key) ?? new Set()).add(o.version));
                    await cache.put(o.space, o.block, data(o.space, o.block, o.version), o.boot ? 'boot' : 'other');
                    break;
                  }
                  case 'putMany': {
                    for (const b of o.blocks) {
                      const key = `${o.space}/${b}`;
                      everPut.set(key, (everPut.get(key) ?? new Set()).add(o.version));
                    }
                    const entries = o.blocks.map((b) => ({ block: b, data: data(o.space, b, o.version) }));
                    await cache.putMany(o.space, entries, o.boot ? 'boot' : 'other');
                    break;
                  }
                  case 'get':
                    check(o.space, o.block, await cache.get(o.space, o.block));
                    break;
                  case 'booted':
                    cache.markBooted(o.space);
                    break;
                  case 'invalidate':
                    await cache.invalidateSpace(o.space);
                    break;
                }
              }),
            );
            const s = cache.stats();
            expect(s.usedBytes).toBeLessThanOrEqual(s.capacityBytes);
            expect(cachedKeys(cache).length).toBe(s.blocks);
            for (const space of SPACES) for (let b = 0; b < BLOCKS; b++) check(space, b, await cache.get(space, b));
          }
        } finally {
          await cache.close();
        }
      }),
      { numRuns: 40 },
    );
  });
});

function compareKeys(a: string, b: string): number {
  const [sa, ba] = a.split('/') as [string, string];
  const [sb, bb] = b.split('/') as [string, string];
  return sa === sb ? Number(ba) - Number(bb) : sa < sb ? -1 : 1;
}
