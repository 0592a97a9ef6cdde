import type { BlockCache, CacheEntry } from '../../src/agent/block-cache.js';

/** An in-memory BlockCache for read-path tests; `batches` records each putMany. */
export function memoryCache(blockSize: number) {
  const cached = new Map<string, Buffer>();
  const batches: Array<{ space: string; blocks: number[] }> = [];
  const key = (space: string, block: number): string => `${space}/${block}`;
  const cache: BlockCache = {
    blockSize,
    has: (space, block) => cached.has(key(space, block)),
    get: async (space, block, into) => {
      const data = cached.get(key(space, block));
      if (data === undefined || into === undefined) return data;
      data.copy(into);
      return into;
    },
    getRun: async (space, first, count, into) =>
      Array.from({ length: count }, (_, k) => {
        const data = cached.get(key(space, first + k));
        return data !== undefined && data.copy(into, k * blockSize) === blockSize;
      }),
    put: async (space, block, data) => void cached.set(key(space, block), Buffer.from(data)),
    putMany: async (space: string, entries: readonly CacheEntry[]) => {
      batches.push({ space, blocks: entries.map((e) => e.block) });
      for (const { block, data } of entries) cached.set(key(space, block), Buffer.from(data));
    },
    markBooted: () => undefined,
  };
  return { cache, cached, batches };
}
