/**
 * Boot traces: CSV with a header line `t_us,op,offset,length` and an optional
 * fifth column `done_us` (docs/formats.md, "Trace CSV"). Parsed as a stream,
 * one line at a time, with a cap on line length so a hostile file cannot make
 * us buffer it whole.
 */
import { createReadStream } from 'node:fs';
import { InvalidTraceError, fromSystemError } from '../errors.js';

export interface TraceEvent {
  /** 1-based line number in the file (the header is line 1). */
  line: number;
  tUs: number;
  /** Operation name as written (`read`, `write`, `extents`, ...). */
  op: string;
  offset: number;
  length: number;
  /** Completion time, when the trace has the done_us column and the row fills it. */
  doneUs?: number;
}

/** Lines longer than this are rejected (real lines are < 64 bytes). */
export const MAX_TRACE_LINE = 4096;

const HEADER_BASE = ['t_us', 'op', 'offset', 'length'];
const UNSIGNED = /^[0-9]+$/;
const OP_NAME = /^[A-Za-z_][A-Za-z0-9_-]*$/;

/** Streams the events of a trace file. */
export async function* readTrace(path: string): AsyncGenerator<TraceEvent> {
  const stream = createReadStream(path, { encoding: 'latin1', highWaterMark: 256 * 1024 });
  try {
    yield* parseTrace(stream as AsyncIterable<string>, path);
  } catch (err) {
    throw fromSystemError(err, path, 'reading the trace');
  } finally {
    stream.destroy();
  }
}

/** Parses trace text arriving in chunks of any size. `name` is used in errors. */
export async function* parseTrace(
  chunks: AsyncIterable<string | Uint8Array> | Iterable<string | Uint8Array>,
  name = '<trace>',
): AsyncGenerator<TraceEvent> {
  const parser = new TraceLineParser(name);
  let pending = '';
  let lineNumber = 0;
  for await (const chunk of chunks) {
    pending += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('latin1');
    let start = 0;
    for (;;) {
      const nl = pending.indexOf('\n', start);
      if (nl < 0) break;
      lineNumber++;
      const event = parser.parseLine(pending.slice(start, nl), lineNumber);
      if (event) yield event;
      start = nl + 1;
    }
    pending = pending.slice(start);
    if (pending.length > MAX_TRACE_LINE) {
      throw new InvalidTraceError(`line ${lineNumber + 1}: longer than ${MAX_TRACE_LINE} characters`, { file: name });
    }
  }
  if (pending.length > 0) {
    lineNumber++;
    const event = parser.parseLine(pending, lineNumber);
    if (event) yield event;
  }
  if (!parser.sawHeader) throw new InvalidTraceError('empty trace: no header line', { file: name });
}

class TraceLineParser {
  sawHeader = false;
  private columns = 0;

  constructor(private readonly name: string) {}

  private fail(line: number, message: string): never {
    throw new InvalidTraceError(`line ${line}: ${message}`, { file: this.name });
  }

  parseLine(raw: string, line: number): TraceEvent | undefined {
    if (raw.length > MAX_TRACE_LINE) this.fail(line, `longer than ${MAX_TRACE_LINE} characters`);
    let text = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
    if (!this.sawHeader) {
      if (line === 1 && text.startsWith('\xef\xbb\xbf')) text = text.slice(3); // UTF-8 BOM read as latin1
      const names = text.split(',').map((s) => s.trim());
      const withDone = names.length === 5 && names[4] === 'done_us';
      if ((names.length !== 4 && !withDone) || HEADER_BASE.some((h, i) => names[i] !== h)) {
        this.fail(line, `expected the header "t_us,op,offset,length" (optionally ",done_us"), got ${JSON.stringify(text.slice(0, 80))}`);
      }
      this.sawHeader = true;
      this.columns = names.length;
      return undefined;
    }
    if (text.trim() === '') return undefined;
    const fields = text.split(',');
    if (fields.length !== this.columns) {
      this.fail(line, `expected ${this.columns} fields, got ${fields.length}`);
    }
    const op = fields[1].trim();
    if (!OP_NAME.test(op)) this.fail(line, `bad operation name ${JSON.stringify(op.slice(0, 40))}`);
    const event: TraceEvent = {
      line,
      tUs: this.number(fields[0], 't_us', line),
      op,
      offset: this.number(fields[2], 'offset', line),
      length: this.number(fields[3], 'length', line),
    };
    if (this.columns === 5 && fields[4].trim() !== '') event.doneUs = this.number(fields[4], 'done_us', line);
    return event;
  }

  private number(field: string, column: string, line: number): number {
    const s = field.trim();
    const value = UNSIGNED.test(s) ? Number(s) : NaN;
    if (!Number.isSafeInteger(value)) {
      this.fail(line, `${column} ${JSON.stringify(s.slice(0, 40))} is not a non-negative integer`);
    }
    return value;
  }
}
