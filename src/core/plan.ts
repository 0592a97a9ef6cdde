/**
 * Splits a map's set blocks into chunks of consecutive ranks for streaming:
 * each chunk is a few runs of image blocks (pieces) whose data is contiguous
 * in the segment. Shared by buildSegment and verifySegment.
 */
import { hasUsableReadInto } from '../image/file-source.js';
import type { DiskImage } from '../image/types.js';
import type { Bitmap } from '../format/bitmap.js';

/** A run of image blocks [block, block + count). */
export interface Piece {
  block: number;
  count: number;
}

export interface Chunk {
  /** Rank of the first block of the chunk. */
  rank: number;
  /** Total blocks in the chunk. */
  blocks: number;
  pieces: Piece[];
}

/**
 * Each chunk is read, hashed twice (whole data and per block) and written;
 * at 1 MiB it stays in the CPU caches between those passes, and the ring of
 * chunk buffers stays small. Measured with bench/formats.js: 4 MiB chunks
 * cost about a third more CPU time.
 */
export const DEFAULT_READ_CHUNK_BYTES = 1024 * 1024;
/** Image reads per chunk at most, so scattered maps do not queue thousands of reads. */
const MAX_PIECES_PER_CHUNK = 64;

export function chunkBlocksFor(readChunkBytes: number, blockSize: number): number {
  if (!Number.isFinite(readChunkBytes) || readChunkBytes <= 0) throw new RangeError(`read chunk size ${readChunkBytes} is invalid`);
  return Math.max(1, Math.floor(readChunkBytes / blockSize));
}

/** Chunks of at most `chunkBlocks` blocks covering every set bit, in rank order. */
export function* planChunks(bitmap: Bitmap, chunkBlocks: number): Generator<Chunk> {
  let chunk: Chunk = { rank: 0, blocks: 0, pieces: [] };
  for (const run of bitmap.runs()) {
    let block = run.start;
    let left = run.length;
    while (left > 0) {
      const take = Math.min(left, chunkBlocks - chunk.blocks);
      chunk.pieces.push({ block, count: take });
      chunk.blocks += take;
      block += take;
      left -= take;
      if (chunk.blocks === chunkBlocks || chunk.pieces.length === MAX_PIECES_PER_CHUNK) {
        yield chunk;
        chunk = { rank: chunk.rank + chunk.blocks, blocks: 0, pieces: [] };
      }
    }
  }
  if (chunk.blocks > 0) yield chunk;
}

/**
 * Reads a piece from the image as whole blocks; the image's last block, if
 * partial, is zero-padded to a full block.
 */
export async function readPiece(image: DiskImage, piece: Piece, blockSize: number): Promise<Buffer> {
  const offset = piece.block * blockSize;
  const length = piece.count * blockSize;
  const available = Math.min(length, image.virtualSize - offset);
  const data = await image.read(offset, available);
  if (available === length) return data;
  const padded = Buffer.alloc(length);
  data.copy(padded, 0);
  return padded;
}

/**
 * An image that can read into a caller's buffer. Optional: reusing buffers
 * avoids faulting in fresh memory for every read, which costs as much as the
 * read itself for large copies.
 */
export type ReadIntoImage = DiskImage & Required<Pick<DiskImage, 'readInto'>>;

/** See hasUsableReadInto: a wrapper overriding only read() is read with read(). */
export function canReadInto(image: DiskImage): image is ReadIntoImage {
  return hasUsableReadInto(image);
}

/**
 * Reads all pieces of a chunk into `target` (chunk.blocks × blockSize bytes),
 * zero-padding the last image block. Settles only when no read is still
 * writing into `target`.
 */
export async function readChunkInto(image: ReadIntoImage, chunk: Chunk, blockSize: number, target: Buffer): Promise<void> {
  let position = 0;
  const results = await Promise.allSettled(
    chunk.pieces.map((piece) => {
      const at = position;
      const length = piece.count * blockSize;
      position += length;
      const offset = piece.block * blockSize;
      const available = Math.min(length, image.virtualSize - offset);
      if (available < length) target.fill(0, at + available, at + length);
      return image.readInto(offset, available, target, at);
    }),
  );
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}

/**
 * Runs `produce` for items in order with at most `depth` running ahead, and
 * hands the results to `consume` in order. Memory stays bounded by `depth`
 * results plus the one being consumed.
 */
export async function pipeline<T, R>(
  items: Iterator<T>,
  depth: number,
  produce: (item: T) => Promise<R>,
  consume: (result: R, item: T) => Promise<void>,
): Promise<void> {
  const queue: Array<{ item: T; result: Promise<R> }> = [];
  const fill = (): void => {
    while (queue.length < depth) {
      const next = items.next();
      if (next.done) return;
      const result = produce(next.value);
      result.catch(() => undefined); // surfaced when awaited below
      queue.push({ item: next.value, result });
    }
  };
  try {
    fill();
    while (queue.length > 0) {
      const head = queue.shift()!;
      const result = await head.result;
      fill();
      await consume(result, head.item);
    }
  } finally {
    // Let reads already started finish before the caller closes files.
    await Promise.allSettled(queue.map((q) => q.result));
  }
}
