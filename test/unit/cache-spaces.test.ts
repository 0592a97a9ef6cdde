/**
 * ImageSpaces: the cache space of a range from an image's extents (kind and
 * depth) and layers (identity inputs). qcow2-owner.test.ts checks the same on
 * real chains against the answers DiskImage.owner() gave before.
 */
import { describe, expect, it } from 'vitest';
import { chainSpaces, ImageSpaces, type SpaceSource } from '../../src/agent/cache/spaces.js';
import { InvalidImageError } from '../../src/errors.js';
import { computeIdentity } from '../../src/image/identity.js';
import type { ImageExtent, LayerInfo } from '../../src/image/types.js';

const MiB = 1024 * 1024;

function layer(name: string, format: LayerInfo['format'], virtualSize: number): LayerInfo {
  return { name, format, virtualSize, fileSize: virtualSize, allocatedBytes: virtualSize, stamp: `${virtualSize}:1`, metadata: name.repeat(64).slice(0, 64) };
}

/** A fake image over `layers` whose extents() answers `extents` and counts its calls. */
function image(layers: LayerInfo[], extents: ImageExtent[] = []): SpaceSource & { lookups: number } {
  const top = layers[0]!;
  const fake = {
    name: top.name,
    virtualSize: top.virtualSize,
    identity: computeIdentity(top.format, top.virtualSize, layers),
    layers: () => layers.map((l) => ({ ...l })),
    lookups: 0,
    extents: async (): Promise<ImageExtent[]> => {
      fake.lookups++;
      return extents;
    },
  };
  return fake;
}

// top (6M) over mid (5M) over base (4M, raw): every layer longer than its backing file.
const CHAIN = [layer('a', 'qcow2', 6 * MiB), layer('b', 'qcow2', 5 * MiB), layer('c', 'raw', 4 * MiB)];
const own = (i: number): string => computeIdentity(CHAIN[i]!.format, CHAIN[i]!.virtualSize, [CHAIN[i]!]);
const chain = (i: number): string => computeIdentity(CHAIN[i]!.format, CHAIN[i]!.virtualSize, CHAIN.slice(i));
const ext = (kind: ImageExtent['kind'], depth: number, offset = 0, length = 4096): ImageExtent => ({ offset, length, kind, depth });

describe('ImageSpaces', () => {
  it('answers a single-layer image with its identity, without a lookup, and still checks the range', async () => {
    const raw = image([layer('r', 'raw', MiB)], [ext('data', 0)]);
    const spaces = new ImageSpaces(raw);
    expect(spaces.layered).toBe(false);
    expect(await spaces.owner(0, 4096)).toBe(raw.identity);
    expect(raw.lookups).toBe(0);
    await expect(spaces.owner(MiB - 1, 2)).rejects.toBeInstanceOf(InvalidImageError);
    expect(spaces.all()).toEqual([raw.identity]);
  });

  it('answers an empty range of a layered image with its identity, without a lookup', async () => {
    const top = image(CHAIN, [ext('data', 1)]);
    expect(await new ImageSpaces(top).owner(MiB, 0)).toBe(top.identity);
    expect(top.lookups).toBe(0);
  });

  it('names the layer that holds data and zeros, and the sub-chain that reads zeros past its backing file', () => {
    const spaces = new ImageSpaces(image(CHAIN));
    expect(spaces.ownerOf([ext('data', 0)])).toBe(own(0));
    expect(spaces.ownerOf([ext('zero', 1)])).toBe(own(1));
    expect(spaces.ownerOf([ext('data', 2)])).toBe(own(2));
    expect(spaces.ownerOf([ext('unallocated', 0)])).toBe(chain(0));
    expect(spaces.ownerOf([ext('unallocated', 1)])).toBe(chain(1));
    // The bottom layer alone is its own sub-chain.
    expect(spaces.ownerOf([ext('unallocated', 2)])).toBe(own(2));
    expect(chain(0)).toBe(image(CHAIN).identity);
  });

  it('has one owner only when every extent has it', async () => {
    const spaces = new ImageSpaces(image(CHAIN));
    expect(spaces.ownerOf([ext('data', 0, 0), ext('zero', 0, 4096)])).toBe(own(0));
    expect(spaces.ownerOf([ext('data', 2, 0), ext('unallocated', 2, 4096)])).toBe(own(2));
    expect(spaces.ownerOf([ext('data', 0, 0), ext('data', 1, 4096)])).toBeUndefined();
    expect(spaces.ownerOf([ext('zero', 1, 0), ext('unallocated', 1, 4096)])).toBeUndefined();
    expect(spaces.ownerOf([ext('data', 3)])).toBeUndefined();
    expect(spaces.ownerOf([])).toBeUndefined();
    const top = image(CHAIN, [ext('unallocated', 1, 0), ext('data', 0, 4096)]);
    expect(await new ImageSpaces(top).owner(0, 8192)).toBeUndefined();
    expect(top.lookups).toBe(1);
  });

  it('lists every space once: the identity, then per layer its owner and its sub-chain', () => {
    const top = image(CHAIN);
    expect(chainSpaces(top)).toEqual([chain(0), own(0), own(1), chain(1), own(2)]);
  });
});
