import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FileNotFoundError, InvalidTraceError } from '../../src/errors.js';
import { parseTraceText, readTraceFile } from '../../src/replay/trace.js';

const TIMED = 'test/data/debian12-minbase-boot-timed.csv';
const UNTIMED = 'test/data/debian12-minbase-boot.csv';
const dir = mkdtempSync(path.join(tmpdir(), 'bc-replay-trace-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Naive independent reading of a trace file, to check against. */
function naive(file: string): { reads: number[][]; others: number } {
  const rows = readFileSync(file, 'utf8').trim().split('\n').slice(1).map((line) => line.split(','));
  return {
    reads: rows.filter((f) => f[1] === 'read').map((f) => [f[0], f[2], f[3], f[4]].filter((x) => x !== undefined).map(Number)),
    others: rows.filter((f) => f[1] !== 'read').length,
  };
}

async function parseError(text: string): Promise<InvalidTraceError> {
  const err = await parseTraceText(text, 'bad.csv').then(() => undefined, (e: unknown) => e);
  expect(err).toBeInstanceOf(InvalidTraceError);
  expect((err as Error).message).not.toContain('\n');
  return err as InvalidTraceError;
}

describe('replay trace loading on the reference boot traces', () => {
  it('reads the timed trace with completion times', async () => {
    const trace = await readTraceFile(TIMED);
    const expected = naive(TIMED);
    expect(trace.reads).toHaveLength(4060);
    expect(trace.hasCompletionTimes).toBe(true);
    expect(trace.ignoredRows).toBe(expected.others);
    expect(trace.reads.map((r) => [r.tUs, r.offset, r.length, r.doneUs])).toEqual(expected.reads);
    expect(trace.reads[0]).toEqual({ tUs: 0, offset: 0, length: 512, doneUs: 32, line: 2 });
    expect(trace.reads.reduce((sum, r) => sum + r.length, 0)).toBe(101_674_496);
    expect(trace.reads[trace.reads.length - 1]!.tUs).toBe(25_410_902);
  });

  it('reads the trace without done_us and ignores its other ops', async () => {
    const trace = await readTraceFile(UNTIMED);
    const timed = await readTraceFile(TIMED);
    expect(trace.hasCompletionTimes).toBe(false);
    expect(trace.reads).toHaveLength(4060);
    expect(trace.ignoredRows).toBe(naive(UNTIMED).others);
    expect(trace.reads.every((r) => r.doneUs === undefined)).toBe(true);
    expect(trace.reads.map((r) => [r.tUs, r.offset, r.length])).toEqual(timed.reads.map((r) => [r.tUs, r.offset, r.length]));
  });

  it('streams large files across chunk boundaries', async () => {
    const lines = ['t_us,op,offset,length,done_us'];
    for (let i = 0; i < 20_000; i++) lines.push(`${i * 10},${i % 7 === 0 ? 'extents' : 'read'},${i * 4096},4096,${i * 10 + 3}`);
    const file = path.join(dir, 'big.csv');
    writeFileSync(file, `${lines.join('\r\n')}\r\n`);
    const streamed = await readTraceFile(file);
    const inMemory = await parseTraceText(lines.join('\n'), file);
    expect(streamed.reads).toEqual(inMemory.reads);
    expect(streamed.reads).toHaveLength(20_000 - Math.ceil(20_000 / 7));
    expect(streamed.ignoredRows).toBe(Math.ceil(20_000 / 7));
  });
});

describe('replay trace checks', () => {
  it('treats a trace whose done_us is missing on some rows as one without completion times', async () => {
    const trace = await parseTraceText('t_us,op,offset,length,done_us\n0,read,0,512,5\n12,read,0,512,\n');
    expect(trace.reads).toHaveLength(2);
    expect(trace.hasCompletionTimes).toBe(false);
  });

  it('sorts reads into issue order', async () => {
    const trace = await parseTraceText('t_us,op,offset,length\n10,read,0,1\n5,read,1,1\n10,read,2,1\n');
    expect(trace.reads.map((r) => r.offset)).toEqual([1, 0, 2]);
  });

  it('names the line of malformed input', async () => {
    const header = 't_us,op,offset,length,done_us\n';
    expect((await parseError(`${header}0,read,0,512,9\n5,read,abc,512,9\n`)).message).toMatch(/^bad\.csv: line 3: offset "abc" is not a non-negative integer$/);
    expect((await parseError(`${header}0,read,0\n`)).message).toMatch(/line 2: expected 5 fields, got 3/);
    expect((await parseError(`${header}\n\n10,read,0,512,9\n`)).message).toMatch(/line 4: done_us 9 is before t_us 10/);
    expect((await parseError(`${header}-5,read,0,512,9\n`)).message).toMatch(/line 2: t_us "-5"/);
    expect((await parseError(`${header}5,read,0,0,9\n`)).message).toMatch(/line 2: read of length 0/);
    expect((await parseError(`${header}5,read,9007199254740000,4096,9\n`)).message).toMatch(/line 2: read end .* is too large/);
    expect((await parseError('time,op,offset,length\n')).message).toMatch(/line 1: expected the header/);
    expect((await parseError('')).message).toMatch(/empty trace/);
  });

  it('reports file problems in one line', async () => {
    await expect(readTraceFile(path.join(dir, 'missing.csv'))).rejects.toBeInstanceOf(FileNotFoundError);
    const binary = path.join(dir, 'binary.csv');
    writeFileSync(binary, Buffer.alloc(10_000, 0x41));
    await expect(readTraceFile(binary)).rejects.toThrow(/line 1: longer than 4096 characters/);
    await expect(readTraceFile(dir)).rejects.toThrow(/is a directory|EISDIR/);
  });
});
