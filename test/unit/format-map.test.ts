import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FileNotFoundError, InvalidMapError, MismatchError, UsageError } from '../../src/errors.js';
import { Bitmap } from '../../src/format/bitmap.js';
import {
  BootMap,
  HISTORY_ENTRY_LENGTH,
  MAP_HEADER_LENGTH,
  loadMap,
  mergeBoots,
  parseMap,
  saveMap,
  serializeMap,
  type MergePolicy,
} from '../../src/format/map.js';
import { materialChange } from '../../src/agent/sidecars.js';

const ID_A = 'a'.repeat(64);
const ID_B = 'b'.repeat(64);

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bootcache-map-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const blockSizeArb = fc.integer({ min: 9, max: 21 }).map((s) => 2 ** s);
const identityArb = fc.uint8Array({ minLength: 32, maxLength: 32 }).map((b) => Buffer.from(b).toString('hex'));

/** Geometry plus a random set of blocks. */
const mapArb = fc
  .record({ blockSize: blockSizeArb, blocks: fc.integer({ min: 0, max: 3000 }), tail: fc.nat(), identity: identityArb })
  .chain(({ blockSize, blocks, tail, identity }) => {
    const virtualSize = blocks === 0 ? 0 : (blocks - 1) * blockSize + 1 + (tail % blockSize);
    return fc.record({
      blockSize: fc.constant(blockSize),
      virtualSize: fc.constant(virtualSize),
      identity: fc.constant(identity),
      boots: fc.nat(1000),
      set: fc.uniqueArray(fc.nat(Math.max(0, blocks - 1)), { maxLength: blocks }),
    });
  })
  .map(({ blockSize, virtualSize, identity, boots, set }) => {
    const bitmap = new Bitmap(Math.ceil(virtualSize / blockSize));
    for (const i of set) if (i < bitmap.length) bitmap.set(i);
    return new BootMap({ blockSize, virtualSize, identity, boots, bitmap });
  });

function expectSameMap(a: BootMap, b: BootMap): void {
  expect(b.blockSize).toBe(a.blockSize);
  expect(b.virtualSize).toBe(a.virtualSize);
  expect(b.blockCount).toBe(a.blockCount);
  expect(b.identity).toBe(a.identity);
  expect(b.boots).toBe(a.boots);
  expect(b.bitmap.equals(a.bitmap)).toBe(true);
  expect(b.mapDigest()).toBe(a.mapDigest());
  if (a.history) {
    expect(b.history).toBeDefined();
    expect(b.history!.window).toBe(a.history.window);
    expect(b.history!.minSeen).toBe(a.history.minSeen);
    expect(b.history!.recorded).toBe(a.history.recorded);
    expect([...b.history!.blocks]).toEqual([...a.history.blocks]);
    expect([...b.history!.seen]).toEqual([...a.history.seen]);
  } else {
    expect(b.history).toBeUndefined();
  }
}

/** Rewrites the checksum after a deliberate edit, so deeper checks are reached. */
function reseal(buf: Buffer): Buffer {
  buf.fill(0, 96, 128);
  createHash('sha256').update(buf).digest().copy(buf, 96);
  return buf;
}

function sampleMap(): BootMap {
  const bitmap = Bitmap.fromIndices(100, [0, 1, 2, 50, 99]);
  return new BootMap({ blockSize: 4096, virtualSize: 100 * 4096 - 100, identity: ID_A, boots: 1, bitmap });
}

describe('map format', () => {
  it('round-trips through serialize/parse (property)', () => {
    fc.assert(
      fc.property(mapArb, (map) => {
        const buf = serializeMap(map);
        expect(buf.length).toBe(MAP_HEADER_LENGTH + Math.ceil(map.blockCount / 8));
        expectSameMap(map, parseMap(buf));
      }),
      { numRuns: 200 },
    );
  });

  it('round-trips merged maps with history (property)', () => {
    fc.assert(
      fc.property(
        mapArb,
        fc.array(fc.array(fc.nat(), { maxLength: 40 }), { minLength: 1, maxLength: 6 }),
        fc.integer({ min: 1, max: 16 }).chain((window) => fc.tuple(fc.integer({ min: 1, max: window }), fc.constant(window))),
        (base, boots, [minSeen, window]) => {
          let map: BootMap | undefined;
          for (const picks of boots) {
            const bitmap = new Bitmap(base.blockCount);
            if (base.blockCount > 0) for (const p of picks) bitmap.set(p % base.blockCount);
            map = mergeBoots(map, { ...base, bitmap }, { minSeen, window });
          }
          expectSameMap(map!, parseMap(serializeMap(map!)));
        },
      ),
      { numRuns: 100 },
    );
  });

  it('lays out the header as documented', () => {
    const map = sampleMap();
    const buf = serializeMap(map);
    expect(buf.subarray(0, 8).toString('latin1')).toBe('BCMAP\0\r\n');
    expect(buf.readUInt32LE(8)).toBe(1);
    expect(buf.readUInt32LE(12)).toBe(128);
    expect(buf.readUInt32LE(16)).toBe(4096);
    expect(buf.readBigUInt64LE(24)).toBe(BigInt(100 * 4096 - 100));
    expect(buf.readBigUInt64LE(32)).toBe(100n);
    expect(buf.subarray(40, 72).toString('hex')).toBe(ID_A);
    expect(buf.readUInt32LE(72)).toBe(1);
    // bitmap: blocks 0,1,2 -> byte 0 = 0b111
    expect(buf[128]).toBe(0x07);
    const zeroed = Buffer.from(buf);
    zeroed.fill(0, 96, 128);
    expect(buf.subarray(96, 128).toString('hex')).toBe(createHash('sha256').update(zeroed).digest('hex'));
  });

  it('mapDigest depends on block size, virtual size and bitmap only', () => {
    const a = sampleMap();
    const sameLayout = new BootMap({ ...a, identity: ID_B, boots: 7, bitmap: a.bitmap.clone() });
    expect(sameLayout.mapDigest()).toBe(a.mapDigest());
    const otherBits = a.bitmap.clone();
    otherBits.set(3);
    expect(new BootMap({ ...a, bitmap: otherBits }).mapDigest()).not.toBe(a.mapDigest());
    expect(new BootMap({ ...a, virtualSize: a.virtualSize + 1, bitmap: a.bitmap.clone() }).mapDigest()).not.toBe(a.mapDigest());
    const prefix = Buffer.alloc(12);
    prefix.writeUInt32LE(4096, 0);
    prefix.writeBigUInt64LE(BigInt(a.virtualSize), 4);
    expect(a.mapDigest()).toBe(createHash('sha256').update(prefix).update(a.bitmap.bytes).digest('hex'));
  });

  it('rejects inconsistent fields at construction', () => {
    const bitmap = new Bitmap(10);
    expect(() => new BootMap({ blockSize: 1000, virtualSize: 10_000, identity: ID_A, boots: 1, bitmap })).toThrow(/power of two/);
    expect(() => new BootMap({ blockSize: 4096, virtualSize: 4096 * 11, identity: ID_A, boots: 1, bitmap })).toThrow(/expected 11/);
    expect(() => new BootMap({ blockSize: 4096, virtualSize: 4096 * 10, identity: 'xyz', boots: 1, bitmap })).toThrow(/identity/);
  });
});

describe('parseMap / loadMap reject damaged files', () => {
  const good = (): Buffer => serializeMap(sampleMap());
  const cases: Array<[string, (b: Buffer) => Buffer, RegExp]> = [
    ['wrong magic', (b) => (b.write('XXMAP', 0, 'latin1'), b), /bad magic/],
    ['wrong version', (b) => (b.writeUInt32LE(2, 8), b), /unsupported map version 2/],
    ['flipped header byte', (b) => ((b[72] ^= 0x01), b), /checksum mismatch/],
    ['flipped bitmap byte', (b) => ((b[130] ^= 0x40), b), /checksum mismatch/],
    ['flipped checksum byte', (b) => ((b[100] ^= 0x01), b), /checksum mismatch/],
    ['truncated body', (b) => b.subarray(0, b.length - 1), /truncated/],
    ['truncated header', (b) => b.subarray(0, 60), /truncated header/],
    ['trailing garbage', (b) => Buffer.concat([b, Buffer.alloc(3)]), /describes/],
    ['empty file', () => Buffer.alloc(0), /bad magic/],
    ['bad block size', (b) => reseal((b.writeUInt32LE(3000, 16), b)), /block size 3000/],
    ['block count mismatch', (b) => reseal((b.writeBigUInt64LE(101n, 32), b)), /block count 101/],
    ['unknown flag', (b) => reseal((b.writeUInt32LE(0x80, 20), b)), /unknown flags/],
    ['bits past the last block', (b) => reseal(((b[128 + 12] |= 0x10), b)), /past the last block/],
    ['history fields without the flag', (b) => reseal((b.writeUInt8(4, 76), b)), /history flag/],
  ];
  for (const [name, damage, message] of cases) {
    it(name, () => {
      expect(() => parseMap(damage(good()), 'x.bcmap')).toThrow(InvalidMapError);
      expect(() => parseMap(damage(good()), 'x.bcmap')).toThrow(message);
    });
  }

  it('absurd sizes are rejected from the header alone, before allocating', async () => {
    const buf = good();
    // A 2^52-byte disk with 512-byte blocks would need a 1 PiB bitmap.
    buf.writeUInt32LE(512, 16);
    buf.writeBigUInt64LE(2n ** 52n, 24);
    buf.writeBigUInt64LE(2n ** 43n, 32);
    const path = join(dir, 'absurd.bcmap');
    await writeFile(path, reseal(buf));
    await expect(loadMap(path)).rejects.toThrow(InvalidMapError);
    await expect(loadMap(path)).rejects.toThrow(/more than a map can hold/);
    // A plausible count that the file is far too small for.
    buf.writeBigUInt64LE(2n ** 40n, 24);
    buf.writeBigUInt64LE(2n ** 31n, 32);
    await writeFile(path, reseal(buf));
    await expect(loadMap(path)).rejects.toThrow(/truncated/);
    // A history count larger than the block count.
    const h = good();
    h.writeUInt32LE(1, 20);
    h.writeUInt8(4, 76);
    h.writeUInt8(2, 77);
    h.writeUInt8(1, 78);
    h.writeBigUInt64LE(2n ** 50n, 80);
    await writeFile(path, reseal(h));
    await expect(loadMap(path)).rejects.toThrow(/history has/);
  });

  it('checks history entries: order, range, masks, agreement with the bitmap', () => {
    const base = sampleMap();
    const merged = mergeBoots(mergeBoots(undefined, base, { minSeen: 1, window: 4 }), base, { minSeen: 1, window: 4 });
    const buf = serializeMap(merged);
    const historyStart = MAP_HEADER_LENGTH + Math.ceil(merged.blockCount / 8);
    expect(() => parseMap(Buffer.from(buf))).not.toThrow();
    const swap = Buffer.from(buf);
    swap.writeBigUInt64LE(0n, historyStart + HISTORY_ENTRY_LENGTH); // entry 1: block 1 -> 0, same as entry 0
    expect(() => parseMap(reseal(swap))).toThrow(/ascending/);
    const far = Buffer.from(buf);
    far.writeBigUInt64LE(100n, historyStart + 4 * HISTORY_ENTRY_LENGTH);
    expect(() => parseMap(reseal(far))).toThrow(/past the last block/);
    const zero = Buffer.from(buf);
    zero.writeUInt16LE(0, historyStart + 8);
    expect(() => parseMap(reseal(zero))).toThrow(/mask 0x0/);
    const tooOld = Buffer.from(buf);
    tooOld.writeUInt16LE(0b100, historyStart + 8); // only 2 boots recorded
    expect(() => parseMap(reseal(tooOld))).toThrow(/mask 0x4/);
    const stray = Buffer.from(buf);
    stray[MAP_HEADER_LENGTH + 1] |= 0x01; // block 8 set, no history entry
    expect(() => parseMap(reseal(stray))).toThrow(/block 8 is set but has no history entry/);
  });

  it('loadMap names the file and maps missing files to FileNotFoundError', async () => {
    const path = join(dir, 'bad.bcmap');
    const buf = good();
    buf[130] ^= 1;
    await writeFile(path, buf);
    await expect(loadMap(path)).rejects.toThrow(`${path}: checksum mismatch`);
    await expect(loadMap(join(dir, 'missing.bcmap'))).rejects.toThrow(FileNotFoundError);
    await expect(loadMap(dir)).rejects.toThrow(/not a regular file/);
  });

  it('saveMap + loadMap round-trip on disk', async () => {
    const path = join(dir, 'ok.bcmap');
    const map = sampleMap();
    await saveMap(path, map);
    expectSameMap(map, await loadMap(path));
    expect((await readFile(path)).equals(serializeMap(map))).toBe(true);
  });
});

/** The M-of-K policy, stated directly over the list of boots (latest last). */
function naivePolicy(boots: Set<number>[], blockCount: number, policy: MergePolicy): number[] {
  const recent = boots.slice(-policy.window);
  const threshold = Math.min(policy.minSeen, recent.length);
  const out: number[] = [];
  for (let b = 0; b < blockCount; b++) {
    if (recent.filter((s) => s.has(b)).length >= threshold) out.push(b);
  }
  return out;
}

describe('mergeBoots', () => {
  const geometry = { blockSize: 4096, virtualSize: 64 * 4096, identity: ID_A };
  const boot = (...blocks: number[]) => ({ ...geometry, bitmap: Bitmap.fromIndices(64, blocks) });

  it('matches "seen in at least min(M, recorded) of the last K boots" (property)', () => {
    fc.assert(
      fc.property(
        fc.array(fc.uniqueArray(fc.nat(63), { maxLength: 30 }), { minLength: 1, maxLength: 12 }),
        fc.integer({ min: 1, max: 6 }).chain((window) => fc.tuple(fc.integer({ min: 1, max: window }), fc.constant(window))),
        (bootBlocks, [minSeen, window]) => {
          const policy = { minSeen, window };
          let map: BootMap | undefined;
          const sets: Set<number>[] = [];
          for (const blocks of bootBlocks) {
            map = mergeBoots(map, boot(...blocks), policy);
            sets.push(new Set(blocks));
            expect([...map.bitmap.indices()]).toEqual(naivePolicy(sets, 64, policy));
          }
          expect(map!.boots).toBe(bootBlocks.length);
          expect(map!.history!.recorded).toBe(Math.min(bootBlocks.length, window));
          // History lists exactly the blocks seen in the last K boots.
          const seenRecently = new Set(sets.slice(-window).flatMap((s) => [...s]));
          expect([...map!.history!.blocks]).toEqual([...seenRecently].sort((a, b) => a - b));
        },
      ),
      { numRuns: 200 },
    );
  });

  it('the first boot gives a full map; one-off reads do not bloat it', () => {
    const policy = { minSeen: 2, window: 4 };
    const m1 = mergeBoots(undefined, boot(1, 2, 3), policy);
    expect([...m1.bitmap.indices()]).toEqual([1, 2, 3]);
    expect(m1.boots).toBe(1);
    const m2 = mergeBoots(m1, boot(1, 2, 3, 40), policy); // 40 read once
    expect([...m2.bitmap.indices()]).toEqual([1, 2, 3]);
    const m3 = mergeBoots(m2, boot(1, 2, 3, 41), policy); // 41 read once
    expect([...m3.bitmap.indices()]).toEqual([1, 2, 3]);
    const m4 = mergeBoots(m3, boot(1, 2, 3, 40), policy); // 40 now read twice
    expect([...m4.bitmap.indices()]).toEqual([1, 2, 3, 40]);
    expect(m4.boots).toBe(4);
  });

  it('blocks no longer read drop out of the map and, after K boots, out of the history', () => {
    const policy = { minSeen: 2, window: 3 };
    let map = mergeBoots(undefined, boot(7, 8), policy);
    map = mergeBoots(map, boot(7, 8), policy);
    map = mergeBoots(map, boot(7, 8), policy);
    expect([...map.bitmap.indices()]).toEqual([7, 8]);
    map = mergeBoots(map, boot(7), policy); // 8: seen in 2 of the last 3
    expect([...map.bitmap.indices()]).toEqual([7, 8]);
    map = mergeBoots(map, boot(7), policy); // 8: seen in 1 of the last 3
    expect([...map.bitmap.indices()]).toEqual([7]);
    expect([...map.history!.blocks]).toEqual([7, 8]);
    map = mergeBoots(map, boot(7), policy); // 8: not seen in the last 3
    expect([...map.history!.blocks]).toEqual([7]);
    expect(map.boots).toBe(6);
  });

  it('treats a map without history as one recorded boot', () => {
    const single = new BootMap({ ...geometry, boots: 1, bitmap: Bitmap.fromIndices(64, [1, 2]) });
    const merged = mergeBoots(single, boot(2, 3), { minSeen: 2, window: 4 });
    expect(merged.history!.recorded).toBe(2);
    expect([...merged.bitmap.indices()]).toEqual([2]);
    expect(merged.boots).toBe(2);
  });

  it('refuses bad policies and maps of another image', () => {
    expect(() => mergeBoots(undefined, boot(1), { minSeen: 3, window: 2 })).toThrow(UsageError);
    expect(() => mergeBoots(undefined, boot(1), { minSeen: 1, window: 17 })).toThrow(UsageError);
    const other = mergeBoots(undefined, { ...boot(1), identity: ID_B }, { minSeen: 1, window: 2 });
    expect(() => mergeBoots(other, boot(1), { minSeen: 1, window: 2 })).toThrow(MismatchError);
    const resized = mergeBoots(undefined, { ...geometry, virtualSize: 65 * 4096, bitmap: new Bitmap(65) }, { minSeen: 1, window: 2 });
    expect(() => mergeBoots(resized, boot(1), { minSeen: 1, window: 2 })).toThrow(MismatchError);
  });
});

describe('held block sets (flags bit 1)', () => {
  const geometry = { blockSize: 4096, virtualSize: 64 * 4096, identity: 'ab'.repeat(32) };
  const boot = (blocks: number[]): Bitmap => {
    const b = new Bitmap(64);
    for (const x of blocks) b.set(x);
    return b;
  };
  const policy = { minSeen: 2, window: 4 };

  it('round-trips a map whose bitmap is the published set, not the history policy set', () => {
    const first = mergeBoots(undefined, { ...geometry, bitmap: boot([1, 2, 3, 4]) }, policy);
    const second = mergeBoots(first, { ...geometry, bitmap: boot([1, 2, 3, 5]) }, policy);
    // The policy set is now {1, 2, 3}; the held set stays the published {1, 2, 3, 4}.
    const held = new BootMap({ ...geometry, boots: second.boots, bitmap: first.bitmap, history: second.history, heldSet: true });
    const parsed = parseMap(serializeMap(held));
    expect(parsed.heldSet).toBe(true);
    expect(parsed.mapDigest()).toBe(first.mapDigest());
    expect(parsed.history?.recorded).toBe(2);
    // The next merge computes from the history, and drops the held flag.
    const third = mergeBoots(parsed, { ...geometry, bitmap: boot([1, 2, 3]) }, policy);
    expect(third.heldSet).toBe(false);
    expect([...third.bitmap.runs()]).toEqual([{ start: 1, length: 3 }]);
    // Without the flag, the same fields are refused: the bitmap disagrees with the history.
    expect(() => new BootMap({ ...geometry, boots: second.boots, bitmap: first.bitmap, history: second.history })).toThrow(/history says/);
  });

  it('refuses the held flag without a history', () => {
    const plain = serializeMap(new BootMap({ ...geometry, boots: 1, bitmap: boot([1]) }));
    const flagged = Buffer.from(plain);
    flagged.writeUInt32LE(2, 20);
    // Recompute the checksum so that only the flag is wrong.
    flagged.fill(0, 96, 128);
    const sum = createHash('sha256').update(flagged).digest();
    sum.copy(flagged, 96);
    expect(() => parseMap(flagged)).toThrow(InvalidMapError);
    expect(() => parseMap(flagged)).toThrow(/held-set flag/);
  });
});

describe('materialChange', () => {
  const set = (n: number, from = 0): Bitmap => {
    const b = new Bitmap(100_000);
    for (let i = from; i < from + n; i++) b.set(i);
    return b;
  };
  it('keeps a segment through a drift of a few dozen blocks, republishes for a real change', () => {
    const published = set(27_000);
    expect(materialChange(published, set(27_000, 40))).toBe(false); // 40 missing, 40 wasted
    expect(materialChange(published, set(27_000, 200))).toBe(true); // 200 missing > 0.5%
    expect(materialChange(published, set(25_000))).toBe(true); // 2,000 wasted > 5%
    expect(materialChange(set(100), set(110))).toBe(false); // 10 missing: under the floor of 16
  });
});
