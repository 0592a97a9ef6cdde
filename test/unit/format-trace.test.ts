import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FileNotFoundError, InvalidTraceError } from '../../src/errors.js';
import { MAX_TRACE_LINE, parseTrace, readTrace, type TraceEvent } from '../../src/format/trace.js';

const TRACES = fileURLToPath(new URL('../data/', import.meta.url));
const PLAIN = join(TRACES, 'debian12-minbase-boot.csv');
const TIMED = join(TRACES, 'debian12-minbase-boot-timed.csv');

async function collect(it: AsyncIterable<TraceEvent>): Promise<TraceEvent[]> {
  const out: TraceEvent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

const parse = (text: string, chunk = text.length || 1) => {
  const chunks: string[] = [];
  for (let i = 0; i < text.length; i += chunk) chunks.push(text.slice(i, i + chunk));
  return collect(parseTrace(chunks, 't.csv'));
};

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bootcache-trace-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('trace parsing', () => {
  it('reads the real boot traces', async () => {
    const plain = await collect(readTrace(PLAIN));
    const reads = plain.filter((e) => e.op === 'read');
    expect(reads.length).toBe(4060);
    expect(reads.reduce((s, e) => s + e.length, 0)).toBe(101_674_496);
    expect(plain.filter((e) => e.op === 'extents').length).toBe(39);
    expect(plain[0]).toEqual({ line: 2, tUs: 0, op: 'read', offset: 0, length: 512 });

    const timed = await collect(readTrace(TIMED));
    expect(timed.length).toBe(4060);
    expect(timed[0]).toEqual({ line: 2, tUs: 0, op: 'read', offset: 0, length: 512, doneUs: 32 });
    expect(timed.every((e) => e.doneUs !== undefined)).toBe(true);
  });

  it('gives the same events whatever the chunking', async () => {
    const text = 't_us,op,offset,length\r\n1,read,0,512\r\n2,write,512,4096\r\n\r\n3,read,4096,8';
    const whole = await parse(text);
    expect(whole).toEqual([
      { line: 2, tUs: 1, op: 'read', offset: 0, length: 512 },
      { line: 3, tUs: 2, op: 'write', offset: 512, length: 4096 },
      { line: 5, tUs: 3, op: 'read', offset: 4096, length: 8 },
    ]);
    for (const chunk of [1, 2, 3, 7, 13]) expect(await parse(text, chunk)).toEqual(whole);
  });

  it('accepts an empty done_us cell', async () => {
    expect(await parse('t_us,op,offset,length,done_us\n5,read,0,1,\n')).toEqual([
      { line: 2, tUs: 5, op: 'read', offset: 0, length: 1 },
    ]);
  });

  const bad: Array<[string, string, RegExp]> = [
    ['wrong header', 'time,op,offset,length\n', /line 1: expected the header/],
    ['empty file', '', /empty trace/],
    ['missing field', 't_us,op,offset,length\n1,read,0\n', /line 2: expected 4 fields, got 3/],
    ['extra field', 't_us,op,offset,length\n1,read,0,1\n2,read,0,1,9\n', /line 3: expected 4 fields, got 5/],
    ['negative offset', 't_us,op,offset,length\n1,read,-5,1\n', /line 2: offset "-5" is not a non-negative integer/],
    ['non-number', 't_us,op,offset,length\n1,read,0,1\n1,read,0x10,1\n', /line 3: offset "0x10"/],
    ['fractional time', 't_us,op,offset,length\n1.5,read,0,1\n', /line 2: t_us "1.5"/],
    ['huge number', 't_us,op,offset,length\n1,read,99999999999999999999,1\n', /line 2: offset/],
    ['bad op', 't_us,op,offset,length\n1,re ad,0,1\n', /line 2: bad operation name/],
    ['binary garbage', 't_us,op,offset,length\n\x00\x01\x02\n', /line 2: expected 4 fields/],
  ];
  for (const [name, text, message] of bad) {
    it(`rejects: ${name}`, async () => {
      const err = await parse(text).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(InvalidTraceError);
      expect((err as Error).message).toMatch(message);
      expect((err as Error).message.startsWith('t.csv: ')).toBe(true);
    });
  }

  it('rejects an endless line without buffering it all', async () => {
    async function* endless(): AsyncGenerator<string> {
      yield 't_us,op,offset,length\n1,read,';
      for (let i = 0; i < 1_000_000; i++) yield '9'.repeat(1024);
      throw new Error('read the whole stream');
    }
    await expect(collect(parseTrace(endless(), 'x.csv'))).rejects.toThrow(`line 2: longer than ${MAX_TRACE_LINE} characters`);
  });

  it('names the file in errors from readTrace', async () => {
    const path = join(dir, 'bad.csv');
    await writeFile(path, 't_us,op,offset,length\n1,read,0,1\n2,read,x,1\n');
    await expect(collect(readTrace(path))).rejects.toThrow(`${path}: line 3: offset "x"`);
    await expect(collect(readTrace(join(dir, 'missing.csv')))).rejects.toThrow(FileNotFoundError);
  });
});
