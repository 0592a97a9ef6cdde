import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { buildMapFromTrace, buildMapFromTraceFile } from '../../src/core/build-map.js';
import { InvalidTraceError, UsageError } from '../../src/errors.js';
import { parseMap, serializeMap } from '../../src/format/map.js';
import type { TraceEvent } from '../../src/format/trace.js';

const TRACES = fileURLToPath(new URL('../data/', import.meta.url));
const PLAIN = join(TRACES, 'debian12-minbase-boot.csv');
const TIMED = join(TRACES, 'debian12-minbase-boot-timed.csv');
const ID = 'c'.repeat(64);
/** The traced disk is 2 GiB. */
const TRACED_DISK = { virtualSize: 2 ** 31, identity: ID };

const read = (line: number, offset: number, length: number): TraceEvent => ({ line, tUs: line, op: 'read', offset, length });

describe('buildMapFromTrace', () => {
  it('maps the real boot trace', async () => {
    const { map, reads, otherOps, readBytes } = await buildMapFromTraceFile(TRACED_DISK, PLAIN);
    expect(reads).toBe(4060);
    expect(otherOps).toBe(39);
    expect(readBytes).toBe(101_674_496);
    expect(map.blockSize).toBe(4096);
    expect(map.blockCount).toBe(2 ** 31 / 4096);
    expect(map.boots).toBe(1);
    expect(map.identity).toBe(ID);
    // Blocks touched, computed independently with awk over the CSV.
    expect(map.blocksSet).toBe(24_039);
    expect(map.bitmap.countRuns()).toBe(305);
    expect(map.bitmap.get(0)).toBe(true);
    expect(parseMap(serializeMap(map)).mapDigest()).toBe(map.mapDigest());

    const timed = await buildMapFromTraceFile(TRACED_DISK, TIMED);
    expect(timed.map.blocksSet).toBe(24_039);
    expect(timed.map.bitmap.equals(map.bitmap)).toBe(true);

    expect((await buildMapFromTraceFile(TRACED_DISK, PLAIN, { blockSize: 512 })).map.blocksSet).toBe(192_312);
    expect((await buildMapFromTraceFile(TRACED_DISK, PLAIN, { blockSize: 65536 })).map.blocksSet).toBe(1_674);
  });

  it('sets every block a read touches, and only those', async () => {
    const target = { virtualSize: 10 * 4096 + 100, identity: ID };
    const events: TraceEvent[] = [
      read(2, 0, 1), // block 0
      read(3, 4095, 2), // blocks 0 and 1
      read(4, 3 * 4096, 4096), // block 3 exactly
      { line: 5, tUs: 5, op: 'write', offset: 6 * 4096, length: 4096 }, // ignored
      read(6, 8 * 4096, 0), // empty read: nothing
      read(7, 10 * 4096, 100), // the partial last block
    ];
    const { map, reads, otherOps } = await buildMapFromTrace(target, events);
    expect([...map.bitmap.indices()]).toEqual([0, 1, 3, 10]);
    expect(map.blockCount).toBe(11);
    expect(reads).toBe(5);
    expect(otherOps).toBe(1);
  });

  it('rejects reads past the end of the image, naming the line', async () => {
    const target = { virtualSize: 8192, identity: ID };
    const err = await buildMapFromTrace(target, [read(2, 0, 10), read(3, 8000, 193)], { traceName: 't.csv' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InvalidTraceError);
    expect((err as Error).message).toBe('t.csv: line 3: read of 193 bytes at offset 8000 goes past the end of the image (8192 bytes)');
    await expect(buildMapFromTraceFile({ virtualSize: 2 ** 30, identity: ID }, PLAIN)).rejects.toThrow(
      new RegExp(`^${PLAIN}: line \\d+: read of \\d+ bytes at offset \\d+ goes past the end`),
    );
  });

  it('rejects bad block sizes', async () => {
    await expect(buildMapFromTrace(TRACED_DISK, [], { blockSize: 1000 })).rejects.toThrow(UsageError);
    await expect(buildMapFromTrace(TRACED_DISK, [], { blockSize: 256 })).rejects.toThrow(UsageError);
  });
});
