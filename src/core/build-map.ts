/** build-map: a boot trace becomes a single-boot map. */
import { InvalidTraceError, UsageError } from '../errors.js';
import { Bitmap } from '../format/bitmap.js';
import { DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, isValidBlockSize } from '../format/binary.js';
import { BootMap, blockCountFor } from '../format/map.js';
import { readTrace, type TraceEvent } from '../format/trace.js';

/** What a map is built for: an open DiskImage fits. */
export interface MapTarget {
  readonly virtualSize: number;
  readonly identity: string;
}

export interface BuildMapOptions {
  /** Default 4096; a power of two 512 .. 2 MiB. */
  blockSize?: number;
  /** Trace name for error messages. */
  traceName?: string;
}

export interface BuildMapResult {
  map: BootMap;
  /** Read events counted. */
  reads: number;
  /** Events of other operations, ignored. */
  otherOps: number;
  /** Sum of read lengths (bytes requested, before rounding to blocks). */
  readBytes: number;
}

/**
 * Sets every block that a read in `events` touches. Other operations are
 * ignored. A read past the end of the image is an InvalidTraceError naming
 * the line. The map has boots = 1 and no history.
 */
export async function buildMapFromTrace(
  target: MapTarget,
  events: AsyncIterable<TraceEvent> | Iterable<TraceEvent>,
  options: BuildMapOptions = {},
): Promise<BuildMapResult> {
  const blockSize = options.blockSize ?? DEFAULT_BLOCK_SIZE;
  if (!isValidBlockSize(blockSize)) {
    throw new UsageError(`block size ${blockSize} is not a power of two between ${MIN_BLOCK_SIZE} and ${MAX_BLOCK_SIZE}`);
  }
  const { virtualSize, identity } = target;
  const bitmap = new Bitmap(blockCountFor(virtualSize, blockSize));
  let reads = 0;
  let otherOps = 0;
  let readBytes = 0;
  for await (const event of events) {
    if (event.op !== 'read') {
      otherOps++;
      continue;
    }
    reads++;
    readBytes += event.length;
    const end = event.offset + event.length;
    if (end > virtualSize) {
      throw new InvalidTraceError(
        `line ${event.line}: read of ${event.length} bytes at offset ${event.offset} goes past the end of the image (${virtualSize} bytes)`,
        options.traceName === undefined ? undefined : { file: options.traceName },
      );
    }
    if (event.length === 0) continue;
    bitmap.setRange(Math.floor(event.offset / blockSize), Math.ceil(end / blockSize));
  }
  const map = new BootMap({ blockSize, virtualSize, identity, boots: 1, bitmap });
  return { map, reads, otherOps, readBytes };
}

/** buildMapFromTrace over a trace file, streamed. */
export async function buildMapFromTraceFile(
  target: MapTarget,
  tracePath: string,
  options: Omit<BuildMapOptions, 'traceName'> = {},
): Promise<BuildMapResult> {
  return buildMapFromTrace(target, readTrace(tracePath), { ...options, traceName: tracePath });
}
