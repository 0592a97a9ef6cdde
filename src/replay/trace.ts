import { InvalidTraceError } from '../errors.js';
import { parseTrace, readTrace, type TraceEvent } from '../format/trace.js';

/** One recorded read. Times are microseconds from the start of the recording. */
export interface TraceRead {
  /** Issue time. */
  tUs: number;
  offset: number;
  length: number;
  /** Completion time, when the trace records it. */
  doneUs?: number;
  /** 1-based line number in the trace file. */
  line: number;
}

export interface BootTrace {
  /** The file (or label) the trace came from. */
  source: string;
  /** Reads in issue order (by tUs, then file order). */
  reads: TraceRead[];
  /** True when every read has a completion time (the done_us column). */
  hasCompletionTimes: boolean;
  /** Rows with other ops (e.g. "extents"), which replay ignores. */
  ignoredRows: number;
}

/**
 * Collects the reads of a trace for replay. CSV parsing is the shared
 * streaming parser's (src/format/trace.ts); this adds what replay needs:
 * reads only, non-empty, completion not before issue, issue order.
 */
export async function collectReads(events: AsyncIterable<TraceEvent>, source: string): Promise<BootTrace> {
  const reads: TraceRead[] = [];
  let ignoredRows = 0;
  let missingDone = 0;
  let sorted = true;
  const fail = (line: number, message: string): never => {
    throw new InvalidTraceError(`line ${line}: ${message}`, { file: source });
  };
  for await (const event of events) {
    if (event.op.toLowerCase() !== 'read') {
      ignoredRows++;
      continue;
    }
    const { line, tUs, offset, length, doneUs } = event;
    if (length === 0) fail(line, 'read of length 0');
    if (!Number.isSafeInteger(offset + length)) fail(line, `read end ${offset} + ${length} is too large`);
    const read: TraceRead = { tUs, offset, length, line };
    if (doneUs === undefined) {
      missingDone++;
    } else {
      if (doneUs < tUs) fail(line, `done_us ${doneUs} is before t_us ${tUs}`);
      read.doneUs = doneUs;
    }
    const previous = reads[reads.length - 1];
    if (previous !== undefined && tUs < previous.tUs) sorted = false;
    reads.push(read);
  }
  // Replay follows issue order; the stable sort keeps file order for equal times.
  if (!sorted) reads.sort((a, b) => a.tUs - b.tUs || a.line - b.line);
  return { source, reads, hasCompletionTimes: reads.length > 0 && missingDone === 0, ignoredRows };
}

/** Reads a trace file as a stream (t_us,op,offset,length[,done_us]). */
export function readTraceFile(file: string): Promise<BootTrace> {
  return collectReads(readTrace(file), file);
}

/** Parses trace text held in memory. */
export function parseTraceText(text: string, source = '<trace>'): Promise<BootTrace> {
  return collectReads(parseTrace([text], source), source);
}
