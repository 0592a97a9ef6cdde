import { describe, expect, it } from 'vitest';
import { coalesceViews } from '../../src/agent/cache/file-io.js';

describe('coalesceViews', () => {
  const chunk = Buffer.from(Array.from({ length: 64 }, (_, i) => i));
  const block = (i: number): Buffer => chunk.subarray(i * 8, (i + 1) * 8);

  it('merges views that follow each other in one buffer into one view of the same memory', () => {
    const merged = coalesceViews([block(0), block(1), block(2)]);
    expect(merged).toHaveLength(1);
    expect(merged[0]!.equals(chunk.subarray(0, 24))).toBe(true);
    merged[0]![0] = 0xff; // a view, not a copy
    expect(chunk[0]).toBe(0xff);
    chunk[0] = 0;
  });

  it('keeps gaps, reversed order and other buffers apart, in order', () => {
    const other = Buffer.alloc(8, 7);
    const out = coalesceViews([block(0), block(2), block(3), block(1), other, block(4)]);
    expect(out.map((b) => [b.byteOffset - chunk.byteOffset, b.length])).toEqual([
      [0, 8],
      [16, 16],
      [8, 8],
      [other.byteOffset - chunk.byteOffset, 8],
      [32, 8],
    ]);
    expect(out[3]).toBe(other);
    expect(Buffer.concat(out).equals(Buffer.concat([block(0), block(2), block(3), block(1), other, block(4)]))).toBe(true);
  });

  it('returns nothing for nothing', () => {
    expect(coalesceViews([])).toEqual([]);
  });
});
