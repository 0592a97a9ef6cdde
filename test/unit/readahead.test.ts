import { describe, expect, it } from 'vitest';
import { SequentialReadahead } from '../../src/agent/readahead.js';

const K = 1024;

describe('SequentialReadahead', () => {
  it('reads ahead only for a miss that continues a stream, doubling the window up to the maximum', () => {
    const ra = new SequentialReadahead({ initialBytes: 128 * K, maxBytes: 512 * K });
    expect(ra.onRead(0, 4 * K, true)).toBe(4 * K); // a new stream: no readahead yet
    expect(ra.onRead(4 * K, 8 * K, true)).toBe(8 * K + 128 * K);
    // Reads inside the fetched window are hits: nothing more to fetch.
    expect(ra.onRead(8 * K, 12 * K, false)).toBe(12 * K);
    // The next miss at the window's end doubles it.
    expect(ra.onRead(136 * K, 140 * K, true)).toBe(140 * K + 256 * K);
    expect(ra.onRead(396 * K, 400 * K, true)).toBe(400 * K + 512 * K);
    expect(ra.onRead(912 * K, 916 * K, true)).toBe(916 * K + 512 * K); // capped
  });

  it('does not read ahead for random reads', () => {
    const ra = new SequentialReadahead({ initialBytes: 128 * K, maxBytes: 1024 * K });
    const offsets = [7, 300, 42, 9000, 1234, 77].map((b) => b * 4 * K);
    for (const o of offsets) expect(ra.onRead(o, o + 4 * K, true)).toBe(o + 4 * K);
  });

  it('follows interleaved streams separately', () => {
    const ra = new SequentialReadahead({ initialBytes: 64 * K, maxBytes: 64 * K, streams: 4 });
    ra.onRead(0, 4 * K, true);
    ra.onRead(1000 * K, 1004 * K, true);
    expect(ra.onRead(4 * K, 8 * K, true)).toBe(72 * K);
    expect(ra.onRead(1004 * K, 1008 * K, true)).toBe(1072 * K);
  });

  it('forgets the least recently used stream when full', () => {
    const ra = new SequentialReadahead({ initialBytes: 64 * K, maxBytes: 64 * K, streams: 2 });
    ra.onRead(0, 4 * K, true);
    ra.onRead(100 * K, 104 * K, true);
    ra.onRead(200 * K, 204 * K, true); // evicts the stream at 4K
    expect(ra.onRead(4 * K, 8 * K, true)).toBe(8 * K);
    expect(ra.onRead(204 * K, 208 * K, true)).toBe(272 * K);
  });

  it('is off with a zero window, and rejects a maximum below the initial window', () => {
    const off = new SequentialReadahead({ initialBytes: 0, maxBytes: 0 });
    off.onRead(0, 4 * K, true);
    expect(off.onRead(4 * K, 8 * K, true)).toBe(8 * K);
    expect(() => new SequentialReadahead({ initialBytes: 256 * K, maxBytes: 128 * K })).toThrow(RangeError);
  });
});
