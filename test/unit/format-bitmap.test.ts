import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { Bitmap, RankSelectIndex, SUPERBLOCK_BITS, hasBitsPastLength, popcount32 } from '../../src/format/bitmap.js';

/** A bitmap and the naive model it should match: a boolean per bit. */
const bitmapArb = fc
  .integer({ min: 0, max: 3 * SUPERBLOCK_BITS + 77 })
  .chain((length) =>
    fc.tuple(
      fc.constant(length),
      fc.oneof(
        // sparse, dense and clustered patterns
        fc.array(fc.boolean(), { minLength: length, maxLength: length }),
        fc.array(fc.integer({ min: 0, max: 19 }).map((x) => x !== 0), { minLength: length, maxLength: length }),
        fc.array(fc.integer({ min: 0, max: 19 }).map((x) => x === 0), { minLength: length, maxLength: length }),
        fc
          .array(fc.tuple(fc.nat(length), fc.nat(300)), { maxLength: 6 })
          .map((ranges) => {
            const bits = new Array<boolean>(length).fill(false);
            for (const [s, n] of ranges) for (let i = s; i < Math.min(length, s + n); i++) bits[i] = true;
            return bits;
          }),
      ),
    ),
  );

function fromModel(length: number, bits: boolean[]): Bitmap {
  const b = new Bitmap(length);
  bits.forEach((v, i) => v && b.set(i));
  return b;
}

function naiveRuns(bits: boolean[]): Array<{ start: number; length: number }> {
  const runs: Array<{ start: number; length: number }> = [];
  for (let i = 0; i < bits.length; i++) {
    if (bits[i] && (i === 0 || !bits[i - 1])) runs.push({ start: i, length: 0 });
    if (bits[i]) runs[runs.length - 1].length++;
  }
  return runs;
}

describe('Bitmap', () => {
  it('stores bit i LSB-first in byte i >> 3', () => {
    const b = new Bitmap(20);
    b.set(0);
    b.set(9);
    b.set(19);
    expect([...b.bytes]).toEqual([0x01, 0x02, 0x08]);
    expect(b.bytes.length).toBe(3);
    expect(Bitmap.fromBytes(Buffer.from([0x01, 0x02, 0x08]), 20).equals(b)).toBe(true);
  });

  it('rejects bytes with bits past the length', () => {
    // 0x10 in byte 1 is bit 12
    expect(hasBitsPastLength(Buffer.from([0xff, 0x10]), 16)).toBe(false);
    expect(hasBitsPastLength(Buffer.from([0xff, 0x10]), 13)).toBe(false);
    expect(hasBitsPastLength(Buffer.from([0xff, 0x10]), 12)).toBe(true);
    expect(hasBitsPastLength(Buffer.from([0xff, 0x10, 0x00]), 10)).toBe(true);
    expect(hasBitsPastLength(Buffer.from([0xff, 0x00, 0x01]), 16)).toBe(true);
    expect(() => Bitmap.fromBytes(Buffer.from([0xff, 0x10]), 10)).toThrow(RangeError);
    expect(() => Bitmap.fromBytes(Buffer.from([0xff]), 10)).toThrow(RangeError);
  });

  it('popcount32 counts bits', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), (x) => {
        expect(popcount32(x)).toBe(x.toString(2).split('').filter((c) => c === '1').length);
      }),
    );
  });

  it('matches the naive model: get, popcount, runs, countRuns, next set/clear bit', () => {
    fc.assert(
      fc.property(bitmapArb, ([length, bits]) => {
        const b = fromModel(length, bits);
        expect(bits.map((_, i) => b.get(i))).toEqual(bits);
        expect(b.popcount()).toBe(bits.filter(Boolean).length);
        const runs = naiveRuns(bits);
        expect([...b.runs()]).toEqual(runs);
        expect(b.countRuns()).toBe(runs.length);
        expect([...b.indices()]).toEqual(bits.flatMap((v, i) => (v ? [i] : [])));
        const probes = Array.from({ length: Math.ceil((length + 1) / 7) }, (_, k) => k * 7);
        expect(probes.map((i) => b.nextSetBit(i))).toEqual(probes.map((i) => bits.indexOf(true, i)));
        expect(probes.map((i) => b.nextClearBit(i))).toEqual(
          probes.map((i) => (bits.indexOf(false, i) < 0 ? length : bits.indexOf(false, i))),
        );
        // Byte layout round-trips.
        expect(Bitmap.fromBytes(b.bytes, length).equals(b)).toBe(true);
      }),
      { numRuns: 300 },
    );
  });

  it('setRange matches setting bits one by one', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 400 }).chain((n) => fc.tuple(fc.constant(n), fc.nat(n), fc.nat(n))),
        ([length, a, c]) => {
          const [start, end] = a <= c ? [a, c] : [c, a];
          const fast = new Bitmap(length);
          fast.setRange(start, end);
          const slow = new Bitmap(length);
          for (let i = start; i < end; i++) slow.set(i);
          expect(fast.equals(slow)).toBe(true);
          expect(fast.popcount()).toBe(end - start);
        },
      ),
    );
    expect(() => new Bitmap(10).setRange(5, 11)).toThrow(RangeError);
  });

  it('clear and orWith', () => {
    const a = Bitmap.fromIndices(70, [1, 33, 69]);
    const b = Bitmap.fromIndices(70, [2, 33]);
    a.orWith(b);
    expect([...a.indices()]).toEqual([1, 2, 33, 69]);
    a.clear(33);
    expect([...a.indices()]).toEqual([1, 2, 69]);
    expect(() => a.orWith(new Bitmap(71))).toThrow(RangeError);
  });

  it('rejects out-of-range indices and lengths', () => {
    const b = new Bitmap(8);
    expect(() => b.set(8)).toThrow(RangeError);
    expect(() => b.get(-1)).toThrow(RangeError);
    expect(() => new Bitmap(-1)).toThrow(RangeError);
    expect(() => new Bitmap(2 ** 32)).toThrow(RangeError);
  });

  it('handles an empty bitmap', () => {
    const b = new Bitmap(0);
    expect(b.bytes.length).toBe(0);
    expect([...b.runs()]).toEqual([]);
    expect(b.countRuns()).toBe(0);
    const index = new RankSelectIndex(b);
    expect(index.total).toBe(0);
    expect(index.rank(0)).toBe(0);
    expect(() => index.select(0)).toThrow(RangeError);
  });
});

describe('RankSelectIndex', () => {
  it('rank and select match the naive model', () => {
    fc.assert(
      fc.property(bitmapArb, ([length, bits]) => {
        const index = new RankSelectIndex(fromModel(length, bits));
        const setPositions = bits.flatMap((v, i) => (v ? [i] : []));
        expect(index.total).toBe(setPositions.length);
        const naiveRanks: number[] = [];
        let rank = 0;
        for (let i = 0; i <= length; i++) {
          naiveRanks.push(rank);
          if (i < length && bits[i]) rank++;
        }
        expect(naiveRanks.map((_, i) => index.rank(i))).toEqual(naiveRanks);
        expect(setPositions.map((_, r) => index.select(r))).toEqual(setPositions);
        expect(setPositions.map((_, r) => index.rank(index.select(r)))).toEqual(setPositions.map((_, r) => r));
        expect(() => index.select(setPositions.length)).toThrow(RangeError);
        expect(() => index.rank(length + 1)).toThrow(RangeError);
      }),
      { numRuns: 300 },
    );
  });

  it('works on a large sparse bitmap (select crosses many superblocks)', () => {
    const length = 10_000_000;
    const positions = [0, 511, 512, 513, 4_000_000, 9_999_999];
    const b = Bitmap.fromIndices(length, positions);
    const index = new RankSelectIndex(b);
    positions.forEach((p, r) => {
      expect(index.select(r)).toBe(p);
      expect(index.rank(p)).toBe(r);
    });
    expect(index.rank(length)).toBe(positions.length);
    expect(b.countRuns()).toBe(4); // 511..513 is one run
    expect([...b.runs()].map((r) => r.start)).toEqual([0, 511, 4_000_000, 9_999_999]);
  });

  it('refuses to answer once its bitmap changes', () => {
    const b = Bitmap.fromIndices(100, [5]);
    const index = new RankSelectIndex(b);
    b.set(6);
    expect(() => index.rank(10)).toThrow(/stale/);
  });
});
