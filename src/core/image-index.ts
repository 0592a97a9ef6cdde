/**
 * index: the image index (.bcidx) of a whole image, and its check against
 * the image. Both read the image once, in ascending order, with large reads
 * (only where the image's extents say data: zero and unallocated ranges read
 * as zeros and are not read), and classify each block: all zeros (no digest)
 * or data (its SHA-256). docs/formats.md, "Image index (.bcidx)".
 */
import { createHash, hash } from 'node:crypto';
import { UsageError } from '../errors.js';
import { AtomicFile } from '../format/atomic-write.js';
import { Bitmap } from '../format/bitmap.js';
import { DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, isValidBlockSize, shortHex } from '../format/binary.js';
import { ImageIndex, checkPreviousKey, encodeIndexHeader, indexBlockCount, indexLayout } from '../format/image-index.js';
import { BLOCK_DIGEST_LENGTH } from '../format/segment.js';
import type { DiskImage } from '../image/types.js';
import {
  DEFAULT_READ_CHUNK_BYTES,
  canReadInto,
  chunkBlocksFor,
  pipeline,
  planChunks,
  readChunkInto,
  readPiece,
  type Chunk,
} from './plan.js';

export interface ScanOptions {
  /** Target size of one image read (default 1 MiB, as build-segment). */
  readChunkBytes?: number;
  /** Chunks read ahead of the one being hashed (default 3). */
  readAhead?: number;
  /** Called after each chunk: blocks read so far, of those the extents say may hold data. */
  onProgress?: (doneBlocks: number, totalBlocks: number) => void;
}

/** Extents are listed 1 GiB at a time, so a fragmented image's list stays small. */
const EXTENT_STEP = 1024 ** 3;

/** Blocks touching a data extent: the only ones that can hold anything but zeros. */
export async function candidateBlocks(image: DiskImage, blockSize: number): Promise<Bitmap> {
  const bitmap = new Bitmap(indexBlockCount(image.virtualSize, blockSize));
  for (let offset = 0; offset < image.virtualSize; offset += EXTENT_STEP) {
    for (const extent of await image.extents(offset, Math.min(EXTENT_STEP, image.virtualSize - offset))) {
      if (extent.kind !== 'data' || extent.length === 0) continue;
      bitmap.setRange(Math.floor(extent.offset / blockSize), Math.ceil((extent.offset + extent.length) / blockSize));
    }
  }
  return bitmap;
}

/**
 * Reads every candidate block once, in ascending order, and calls `visit`
 * with each block that is not all zeros (its full blockSize bytes, the last
 * block zero-padded; a view valid only during the call), then `afterChunk`.
 * Memory: readAhead + 1 chunk buffers.
 */
export async function scanDataBlocks(
  image: DiskImage,
  blockSize: number,
  visit: (block: number, data: Buffer) => void,
  afterChunk: () => Promise<void>,
  options: ScanOptions = {},
): Promise<{ blocksRead: number }> {
  const candidates = await candidateBlocks(image, blockSize);
  const totalBlocks = candidates.popcount();
  const chunkBlocks = chunkBlocksFor(options.readChunkBytes ?? DEFAULT_READ_CHUNK_BYTES, blockSize);
  const readAhead = Math.max(1, options.readAhead ?? 3);
  const zero = Buffer.alloc(blockSize);
  const readInto = canReadInto(image) ? image : undefined;
  // A slot is taken again readAhead + 1 chunks later, after its chunk was consumed (see pipeline()).
  const ring = readInto ? Array.from({ length: readAhead + 1 }, () => Buffer.allocUnsafeSlow(chunkBlocks * blockSize)) : [];
  let produced = 0;
  let blocksRead = 0;
  await pipeline(
    planChunks(candidates, chunkBlocks),
    readAhead,
    async (chunk: Chunk): Promise<Buffer[]> => {
      if (!readInto) return Promise.all(chunk.pieces.map((piece) => readPiece(image, piece, blockSize)));
      const target = ring[produced++ % ring.length]!.subarray(0, chunk.blocks * blockSize);
      await readChunkInto(readInto, chunk, blockSize, target);
      return [target];
    },
    async (buffers, chunk) => {
      const data = buffers.length === 1 ? buffers[0]! : Buffer.concat(buffers);
      let offset = 0;
      for (const piece of chunk.pieces) {
        for (let i = 0; i < piece.count; i++, offset += blockSize) {
          const block = data.subarray(offset, offset + blockSize);
          if (!block.equals(zero)) visit(piece.block + i, block);
        }
      }
      await afterChunk();
      blocksRead += chunk.blocks;
      options.onProgress?.(blocksRead, totalBlocks);
    },
  );
  return { blocksRead };
}

export interface BuildIndexOptions extends ScanOptions {
  /** Default 4096; a power of two 512 .. 2 MiB. Equal to the segment's for digests to be comparable. */
  blockSize?: number;
  /** The image this one is a new version of (see checkPreviousKey). */
  previous?: string | undefined;
}

export interface BuildIndexResult {
  path: string;
  identity: string;
  blockSize: number;
  virtualSize: number;
  blockCount: number;
  /** Blocks with a digest (not all zeros). */
  dataBlocks: number;
  /** Blocks that read as zeros: unallocated, zero, or data that is all zeros. */
  zeroBlocks: number;
  /** Blocks read from the image (those the extents say hold data). */
  blocksRead: number;
  /** Size of the .bcidx file. */
  fileBytes: number;
  /** Bytes of the digest table (32 per data block). */
  tableBytes: number;
  previous: string | null;
  bitmapSha256: string;
  digestTableSha256: string;
}

/** Throws UsageError unless `blockSize` can be an index's block size. */
export function checkIndexBlockSize(blockSize: number): void {
  if (!isValidBlockSize(blockSize)) {
    throw new UsageError(`block size ${blockSize} is not a power of two between ${MIN_BLOCK_SIZE} and ${MAX_BLOCK_SIZE}`);
  }
}

/**
 * Writes the index of `image` to `outPath` atomically. The digest table is
 * written as it is computed, so memory stays at the read buffers and the
 * bitmap (one bit per block), whatever the image's size.
 */
export async function buildImageIndex(image: DiskImage, outPath: string, options: BuildIndexOptions = {}): Promise<BuildIndexResult> {
  const blockSize = options.blockSize ?? DEFAULT_BLOCK_SIZE;
  checkIndexBlockSize(blockSize);
  const previous = options.previous ?? null;
  const problem = previous === null ? undefined : checkPreviousKey(previous);
  if (problem) throw new UsageError(problem);
  let blockCount: number;
  try {
    blockCount = indexBlockCount(image.virtualSize, blockSize);
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const { digestOffset } = indexLayout(blockCount, 0, Buffer.byteLength(previous ?? '', 'utf8'));
  const bitmap = new Bitmap(blockCount);
  const tableHash = createHash('sha256');
  const chunkBlocks = chunkBlocksFor(options.readChunkBytes ?? DEFAULT_READ_CHUNK_BYTES, blockSize);
  const pending = Buffer.allocUnsafe(chunkBlocks * BLOCK_DIGEST_LENGTH);
  let pendingLength = 0;
  let dataBlocks = 0;
  const file = await AtomicFile.create(outPath);
  try {
    const { blocksRead } = await scanDataBlocks(
      image,
      blockSize,
      (block, data) => {
        bitmap.set(block);
        pending.set(hash('sha256', data, 'buffer'), pendingLength);
        pendingLength += BLOCK_DIGEST_LENGTH;
      },
      async () => {
        if (pendingLength === 0) return;
        const entries = pending.subarray(0, pendingLength);
        tableHash.update(entries);
        await file.write(entries, digestOffset + dataBlocks * BLOCK_DIGEST_LENGTH);
        dataBlocks += pendingLength / BLOCK_DIGEST_LENGTH;
        pendingLength = 0;
      },
      options,
    );
    const bitmapSha256 = createHash('sha256').update(bitmap.bytes).digest('hex');
    const digestTableSha256 = tableHash.digest('hex');
    const header = encodeIndexHeader({
      blockSize,
      virtualSize: image.virtualSize,
      identity: image.identity,
      dataBlocks,
      bitmapSha256,
      digestTableSha256,
      previous,
    });
    await file.writev([header, bitmap.bytes], 0);
    await file.commit();
    const layout = indexLayout(blockCount, dataBlocks, Buffer.byteLength(previous ?? '', 'utf8'));
    return {
      path: outPath,
      identity: image.identity,
      blockSize,
      virtualSize: image.virtualSize,
      blockCount,
      dataBlocks,
      zeroBlocks: blockCount - dataBlocks,
      blocksRead,
      fileBytes: layout.fileSize,
      tableBytes: layout.digestTableLength,
      previous,
      bitmapSha256,
      digestTableSha256,
    };
  } catch (err) {
    await file.abort();
    throw err;
  }
}

export type IndexCheckStatus = 'pass' | 'fail' | 'skip';

export interface IndexVerifyChecks {
  /** The index opens (always pass in a report: a malformed index is an InvalidIndexError). */
  header: IndexCheckStatus;
  /** The index's identity is the image's. */
  identity: IndexCheckStatus;
  /** Same virtual size (else nothing can be compared). */
  size: IndexCheckStatus;
  /** The digest table matches its SHA-256 in the header. */
  table: IndexCheckStatus;
  /** Exactly the image's non-zero blocks have digests, each the SHA-256 of the block. */
  digests: IndexCheckStatus;
}

export interface IndexMismatch {
  block: number;
  imageOffset: number;
  /**
   * digest: the stored digest is not the block's SHA-256;
   * missing: the block holds data but the index has no digest for it;
   * extra: the index has a digest but the block reads as zeros.
   */
  reason: 'digest' | 'missing' | 'extra';
}

export interface IndexVerifyReport {
  ok: boolean;
  index: string;
  checks: IndexVerifyChecks;
  blockSize: number;
  /** Blocks read from the image and hashed. */
  blocksChecked: number;
  /** Blocks holding data, in the image / in the index. */
  imageDataBlocks: number;
  indexDataBlocks: number;
  digestMismatches: number;
  missingDigests: number;
  extraDigests: number;
  /** The first `maxMismatches` bad blocks, in block order. */
  mismatches: IndexMismatch[];
  /** One line per failed or skipped check. */
  problems: string[];
}

export interface VerifyIndexOptions extends ScanOptions {
  /** Mismatches listed in the report (default 10); all are counted. */
  maxMismatches?: number;
}

/** Opens the index at `path` (a damaged table is reported, not refused) and checks it against `image`. */
export async function verifyImageIndexFile(image: DiskImage, path: string, options: VerifyIndexOptions = {}): Promise<IndexVerifyReport> {
  const index = await ImageIndex.open(path, { allowDamagedTable: true });
  try {
    return await verifyImageIndex(image, index, options);
  } finally {
    await index.close();
  }
}

/**
 * Recomputes every block's digest from the image and compares it with the
 * index. Open the index with allowDamagedTable for a report that names the
 * damaged entries.
 */
export async function verifyImageIndex(image: DiskImage, index: ImageIndex, options: VerifyIndexOptions = {}): Promise<IndexVerifyReport> {
  await index.loadTable();
  const problems: string[] = [];
  const checks: IndexVerifyChecks = { header: 'pass', identity: 'pass', size: 'pass', table: 'pass', digests: 'pass' };
  if (index.identity !== image.identity) {
    checks.identity = 'fail';
    problems.push(`index was built for image identity ${shortHex(index.identity)}, ${image.name} has ${shortHex(image.identity)} (image rewritten?)`);
  }
  if (!index.tableIntact) {
    checks.table = 'fail';
    problems.push('digest table does not match its SHA-256 in the header: the digest table is corrupted');
  }
  const blockSize = index.blockSize;
  const maxMismatches = options.maxMismatches ?? 10;
  // Found in two ascending passes (the scan, then the index's extra blocks): the first of each make the first overall.
  const found: [IndexMismatch[], IndexMismatch[]] = [[], []];
  const counts = { digest: 0, missing: 0, extra: 0 };
  const note = (block: number, reason: IndexMismatch['reason']): void => {
    counts[reason]++;
    const list = found[reason === 'extra' ? 1 : 0];
    if (list.length < maxMismatches) list.push({ block, imageOffset: block * blockSize, reason });
  };
  let blocksChecked = 0;
  let imageDataBlocks = 0;
  if (index.virtualSize !== image.virtualSize) {
    checks.size = 'fail';
    checks.digests = 'skip';
    problems.push(`index is for a ${index.virtualSize}-byte disk, ${image.name} is ${image.virtualSize} bytes: digests not compared`);
  } else {
    const seen = new Bitmap(index.blockCount);
    ({ blocksRead: blocksChecked } = await scanDataBlocks(
      image,
      blockSize,
      (block, data) => {
        seen.set(block);
        imageDataBlocks++;
        const stored = index.digestOf(block);
        if (stored === undefined) note(block, 'missing');
        else if (!stored.equals(hash('sha256', data, 'buffer'))) note(block, 'digest');
      },
      async () => undefined,
      options,
    ));
    for (const run of index.bitmap.runs()) {
      for (let block = run.start; block < run.start + run.length; block++) if (!seen.get(block)) note(block, 'extra');
    }
    if (counts.digest > 0) problems.push(`${counts.digest} of ${imageDataBlocks} data blocks do not match their stored digests`);
    if (counts.missing > 0) problems.push(`${counts.missing} blocks hold data but have no digest in the index`);
    if (counts.extra > 0) problems.push(`${counts.extra} blocks have a digest in the index but read as zeros`);
    if (counts.digest + counts.missing + counts.extra > 0) checks.digests = 'fail';
  }
  const mismatches = [...found[0], ...found[1]].sort((a, b) => a.block - b.block).slice(0, maxMismatches);
  return {
    ok: Object.values(checks).every((status) => status === 'pass'),
    index: index.name,
    checks,
    blockSize,
    blocksChecked,
    imageDataBlocks,
    indexDataBlocks: index.dataBlocks,
    digestMismatches: counts.digest,
    missingDigests: counts.missing,
    extraDigests: counts.extra,
    mismatches,
    problems,
  };
}
