/** Turning export extents into NBD block status descriptors (pure). */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { allocationFlags, toBlockStatus } from '../../src/nbd/server/block-status.js';
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from '../../src/nbd/protocol.js';
import type { Extent, ExtentKind } from '../../src/image/types.js';

const HZ = NBD_STATE_HOLE | NBD_STATE_ZERO;

describe('toBlockStatus', () => {
  it('maps extent kinds to base:allocation flags', () => {
    expect(allocationFlags('data')).toBe(0);
    expect(allocationFlags('zero')).toBe(HZ);
    expect(allocationFlags('unallocated')).toBe(HZ);
  });

  it('merges equal neighbours and clips to the request', () => {
    const extents: Extent[] = [
      { offset: 0, length: 4096, kind: 'data' },
      { offset: 4096, length: 4096, kind: 'unallocated' },
      { offset: 8192, length: 4096, kind: 'zero' },
      { offset: 12288, length: 4096, kind: 'data' },
    ];
    expect(toBlockStatus(extents, 1024, 14336, 512, 100)).toEqual([
      { length: 3072, flags: 0 },
      { length: 8192, flags: HZ },
      { length: 3072, flags: 0 },
    ]);
  });

  it('reports gaps in the extents as status 0 and always returns a descriptor', () => {
    expect(toBlockStatus([], 0, 4096, 512, 10)).toEqual([{ length: 4096, flags: 0 }]);
    expect(toBlockStatus([{ offset: 1024, length: 1024, kind: 'zero' }], 0, 4096, 512, 10)).toEqual([
      { length: 1024, flags: 0 },
      { length: 1024, flags: HZ },
      { length: 2048, flags: 0 },
    ]);
  });

  it('moves unaligned boundaries to block ends with the flags common to the block', () => {
    const extents: Extent[] = [
      { offset: 0, length: 700, kind: 'zero' },
      { offset: 700, length: 1348, kind: 'data' },
      { offset: 2048, length: 2048, kind: 'unallocated' },
    ];
    expect(toBlockStatus(extents, 0, 4096, 512, 10)).toEqual([
      { length: 512, flags: HZ },
      { length: 1536, flags: 0 },
      { length: 2048, flags: HZ },
    ]);
    expect(toBlockStatus(extents, 0, 4096, 1, 10)).toEqual([
      { length: 700, flags: HZ },
      { length: 1348, flags: 0 },
      { length: 2048, flags: HZ },
    ]);
  });

  it('honours the descriptor cap (REQ_ONE uses 1)', () => {
    const extents: Extent[] = [
      { offset: 0, length: 512, kind: 'data' },
      { offset: 512, length: 512, kind: 'zero' },
      { offset: 1024, length: 512, kind: 'data' },
    ];
    expect(toBlockStatus(extents, 0, 1536, 512, 1)).toEqual([{ length: 512, flags: 0 }]);
    expect(toBlockStatus(extents, 0, 1536, 512, 2)).toEqual([
      { length: 512, flags: 0 },
      { length: 512, flags: HZ },
    ]);
  });

  it('holds its invariants for any extents and request', () => {
    const kind = fc.constantFrom<ExtentKind>('data', 'zero', 'unallocated');
    const layout = fc.array(fc.record({ length: fc.integer({ min: 1, max: 3000 }), kind, keep: fc.boolean() }), {
      minLength: 1,
      maxLength: 30,
    });
    fc.assert(
      fc.property(layout, fc.nat(), fc.nat(), fc.constantFrom(1, 512), fc.integer({ min: 1, max: 40 }), (parts, a, b, alignment, cap) => {
        const extents: Extent[] = [];
        let pos = 0;
        for (const p of parts) {
          if (p.keep) extents.push({ offset: pos, length: p.length, kind: p.kind });
          pos += p.length;
        }
        const total = pos;
        const offset = a % total;
        const length = 1 + (b % (total - offset));
        const truth = (x: number): number => {
          const e = extents.find((e) => e.offset <= x && x < e.offset + e.length);
          return e === undefined ? 0 : allocationFlags(e.kind);
        };
        const edges = extents.flatMap((e) => [e.offset, e.offset + e.length]);
        const out = toBlockStatus(extents, offset, length, alignment, cap);
        expect(out.length).toBeGreaterThanOrEqual(1);
        expect(out.length).toBeLessThanOrEqual(cap);
        let at = offset;
        out.forEach((d, i) => {
          expect(d.length).toBeGreaterThan(0);
          if (i > 0) expect(d.flags).not.toBe(out[i - 1]!.flags);
          // Never claims more than is true for any byte it covers (truth changes only at extent edges).
          const probes = [at, ...edges.filter((x) => x > at && x < at + d.length)];
          expect(probes.filter((x) => (d.flags & ~truth(x)) !== 0)).toEqual([]);
          at += d.length;
          // Boundaries inside the request fall on block edges.
          if (at < offset + length && alignment > 1) expect(at % alignment).toBe(0);
        });
        expect(at).toBeLessThanOrEqual(offset + length);
        if (out.length < cap) expect(at).toBe(offset + length);
      }),
      { numRuns: 300 },
    );
  });
});
