/**
 * verify: checks a segment against its map and image. A segment that does
 * not parse (magic, version, sizes, header checksum, checksum table hash) is
 * a malformed input: SegmentReader's InvalidSegmentError, not a report. A
 * damaged digest table is reported, entry by entry. On a well-formed segment
 * every check that can run does run, so one report says everything that is
 * wrong:
 * - header:    the segment parses (always pass in a report)
 * - identity:  segment, map and image all carry the image's identity
 * - mapDigest: the segment was laid out from this map (digest, block size, block count)
 * - checksums: each block matches its table checksum; the data matches dataSha256
 * - digests:   each block's stored digest is the SHA-256 of the segment's
 *              block and of the image's block (skip: a version 1 segment)
 * - data:      each block equals the image data at select(rank) × blockSize
 */
import { createHash } from 'node:crypto';
import { hasUsableReadInto } from '../image/file-source.js';
import type { ByteSource, DiskImage } from '../image/types.js';
import { shortHex } from '../format/binary.js';
import type { BootMap } from '../format/map.js';
import { BLOCK_DIGEST_LENGTH, SegmentReader, blockDigest, checksumKind, type BlockHashKind, type SegmentSource } from '../format/segment.js';
import { createChecksummer, sharedBuffer } from './checksum-worker.js';
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

export type CheckStatus = 'pass' | 'fail' | 'skip';

export interface VerifyChecks {
  header: CheckStatus;
  identity: CheckStatus;
  mapDigest: CheckStatus;
  checksums: CheckStatus;
  digests: CheckStatus;
  data: CheckStatus;
}

/** What is wrong with one block, in this order, joined by '+'. */
export type MismatchReason =
  | 'checksum'
  | 'digest'
  | 'data'
  | 'checksum+digest'
  | 'checksum+data'
  | 'digest+data'
  | 'checksum+digest+data';

export interface VerifyMismatch {
  /** Position of the block in the segment. */
  rank: number;
  /** Image block index (select(rank)); null when the map does not fit the segment. */
  block: number | null;
  /** Byte offset of the block in the image; null when the map does not fit the segment. */
  imageOffset: number | null;
  /**
   * checksum: the segment block does not match its stored checksum;
   * digest: its stored digest is not the SHA-256 of the segment block;
   * data: the segment block differs from the image; combinations joined by '+'.
   */
  reason: MismatchReason;
}

export interface VerifyReport {
  ok: boolean;
  segment: string;
  checks: VerifyChecks;
  /** Blocks whose data was read and checked. */
  blocksChecked: number;
  /** Blocks the segment holds (0 when its header is unreadable). */
  blockCount: number;
  checksumMismatches: number;
  /** Blocks whose stored digest is not the SHA-256 of the segment's block. */
  digestMismatches: number;
  /** Blocks whose stored digest is not the SHA-256 of the image's block (counted where the data differs). */
  imageDigestMismatches: number;
  dataMismatches: number;
  /** The first `maxMismatches` bad blocks, in rank order. */
  mismatches: VerifyMismatch[];
  /** One line per failed or skipped check. */
  problems: string[];
  /**
   * Only the identity differs: the image holds the data the map and segment
   * were made from (every block compared), as after a copy that did not keep
   * the mtime. `verify --adopt` re-stamps them for this image.
   */
  adoptable: boolean;
}

export interface VerifyOptions {
  readChunkBytes?: number;
  readAhead?: number;
  /** Mismatches listed in the report (default 10); all are counted. */
  maxMismatches?: number;
  onProgress?: (doneBlocks: number, totalBlocks: number) => void;
  /** Compute block checksums and digests on a worker thread (segments of 16 MiB or more; default off, see checksum-worker.ts). */
  checksumWorker?: boolean;
}

/** Opens `segmentPath` and verifies it; a segment that does not parse throws InvalidSegmentError. */
export async function verifySegment(
  image: DiskImage,
  map: BootMap,
  segmentPath: string,
  options: VerifyOptions = {},
): Promise<VerifyReport> {
  const reader = await SegmentReader.open(segmentPath, { allowDamagedDigests: true });
  try {
    return await verifySegmentReader(image, map, reader, options);
  } finally {
    await reader.close();
  }
}

/**
 * Verifies an open segment (from a file or any SegmentSource). Open it with
 * allowDamagedDigests for a report that names damaged digest entries.
 */
export async function verifySegmentReader(
  image: DiskImage,
  map: BootMap,
  reader: SegmentReader,
  options: VerifyOptions = {},
): Promise<VerifyReport> {
  const problems: string[] = [];
  const checks: VerifyChecks = {
    header: 'pass',
    identity: 'pass',
    mapDigest: 'pass',
    checksums: 'pass',
    digests: reader.hasDigests ? 'pass' : 'skip',
    data: 'pass',
  };
  if (!reader.hasDigests) problems.push(`no block digests: a version ${reader.header.version} segment`);
  if (!reader.digestTableIntact) {
    checks.digests = 'fail';
    problems.push('digest table does not match its SHA-256 in the header: the digest table is corrupted');
  }

  if (reader.identity !== image.identity) {
    checks.identity = 'fail';
    problems.push(
      `segment was built for image identity ${shortHex(reader.identity)}, ${image.name} has ${shortHex(image.identity)} (image rewritten?)`,
    );
  }
  if (map.identity !== image.identity) {
    checks.identity = 'fail';
    problems.push(`map is for image identity ${shortHex(map.identity)}, ${image.name} has ${shortHex(image.identity)}`);
  }

  const mapDigest = map.mapDigest();
  if (reader.mapDigest !== mapDigest) {
    checks.mapDigest = 'fail';
    problems.push(`segment was laid out from map digest ${shortHex(reader.mapDigest)}, this map's digest is ${shortHex(mapDigest)}`);
  }
  if (reader.blockSize !== map.blockSize) {
    checks.mapDigest = 'fail';
    problems.push(`segment block size is ${reader.blockSize}, the map's is ${map.blockSize}`);
  }
  if (reader.blockCount !== map.blocksSet) {
    checks.mapDigest = 'fail';
    problems.push(`segment holds ${reader.blockCount} blocks, the map has ${map.blocksSet} set`);
  }
  if (reader.virtualSize !== map.virtualSize) {
    checks.mapDigest = 'fail';
    problems.push(`segment is for a ${reader.virtualSize}-byte disk, the map for ${map.virtualSize} bytes`);
  }

  // Comparing with the image needs the map's ranks to line up with the segment.
  const canCompare =
    reader.blockSize === map.blockSize && reader.blockCount === map.blocksSet && map.virtualSize === image.virtualSize;
  if (!canCompare) {
    checks.data = 'skip';
    problems.push('data not compared with the image: the map does not fit the segment or the image');
  }

  const maxMismatches = options.maxMismatches ?? 10;
  const mismatches: VerifyMismatch[] = [];
  let checksumMismatches = 0;
  let digestMismatches = 0;
  let imageDigestMismatches = 0;
  let dataMismatches = 0;
  let blocksChecked = 0;
  const blockSize = reader.blockSize;
  const totalBlocks = reader.blockCount;
  const chunkBlocks = chunkBlocksFor(options.readChunkBytes ?? DEFAULT_READ_CHUNK_BYTES, blockSize);
  const dataHash = createHash('sha256');
  const entryLength = reader.header.checksumLength;
  const kinds: readonly BlockHashKind[] = reader.hasDigests
    ? [checksumKind(reader.checksumAlgorithm), 'sha256']
    : [checksumKind(reader.checksumAlgorithm)];

  const record = (rank: number, block: number | null, checksumOk: boolean, digestOk: boolean, dataOk: boolean): void => {
    if (!checksumOk) checksumMismatches++;
    if (!digestOk) digestMismatches++;
    if (!dataOk) dataMismatches++;
    if (mismatches.length < maxMismatches) {
      const parts = [checksumOk ? '' : 'checksum', digestOk ? '' : 'digest', dataOk ? '' : 'data'].filter((p) => p !== '');
      mismatches.push({ rank, block, imageOffset: block === null ? null : block * blockSize, reason: parts.join('+') as MismatchReason });
    }
  };

  const chunks: Iterator<Chunk> = canCompare ? planChunks(map.bitmap, chunkBlocks) : rankChunks(totalBlocks, chunkBlocks);
  // As in buildSegment: block checksums optionally on a worker while this
  // thread hashes the whole data and compares it with the image.
  const checksummer = createChecksummer(reader.dataLength, options.checksumWorker);
  const readAhead = Math.max(1, options.readAhead ?? 3);
  // Segment and image data go through rings of reusable buffers. A slot is
  // taken again readAhead + 1 chunks later: by then the chunk it held has been
  // consumed (pipeline() starts reading chunk k + readAhead just before
  // consuming chunk k, and each consume finishes with its data).
  const slotBytes = chunkBlocks * blockSize;
  const ringSize = readAhead + 1;
  const segmentInto = sourceReadInto(reader.source);
  const segmentRing = checksummer.wantsShared || segmentInto
    ? Array.from({ length: ringSize }, () => (checksummer.wantsShared ? sharedBuffer(slotBytes) : Buffer.allocUnsafeSlow(slotBytes)))
    : [];
  const imageInto = canCompare && canReadInto(image) ? image : undefined;
  const imageRing = imageInto ? Array.from({ length: ringSize }, () => Buffer.allocUnsafeSlow(slotBytes)) : [];
  let produced = 0;
  try {
    await pipeline(
      chunks,
      readAhead,
      async (chunk) => {
        const slot = produced++ % ringSize;
        const length = chunk.blocks * blockSize;
        let segment: Promise<Buffer>;
        if (segmentInto) {
          const target = segmentRing[slot]!.subarray(0, length);
          segment = segmentInto(reader.blockOffset(chunk.rank), length, target, 0).then(() => target);
        } else {
          segment = reader.readBlocks(chunk.rank, chunk.blocks);
        }
        let images: Promise<Buffer[]>;
        if (!canCompare) {
          images = Promise.resolve([]);
        } else if (imageInto) {
          const target = imageRing[slot]!.subarray(0, length);
          images = readChunkInto(imageInto, chunk, blockSize, target).then(() => pieceViews(target, chunk, blockSize));
        } else {
          images = Promise.all(chunk.pieces.map((p) => readPiece(image, p, blockSize)));
        }
        // Both settle before the slot can be handed out again.
        const [seg, img] = await Promise.allSettled([segment, images]);
        if (seg.status === 'rejected') throw seg.reason;
        if (img.status === 'rejected') throw img.reason;
        return [seg.value, img.value, slot] as const;
      },
      async ([read, images, slot], chunk) => {
        let segment = read;
        if (checksummer.wantsShared && !segmentInto) {
          segment = segmentRing[slot]!.subarray(0, read.length);
          read.copy(segment);
        }
        const computed = checksummer.tables(segment, blockSize, kinds);
        dataHash.update(segment);
        // Compare piece by piece; look at single blocks only where something differs.
        const badData = new Set<number>(); // ranks
        // Where the data differs, the stored digest is also checked against the image's block
        // (elsewhere the image's block is the segment's, whose digest is checked below).
        let offset = 0;
        let rank = chunk.rank;
        for (let p = 0; p < chunk.pieces.length; p++) {
          const count = chunk.pieces[p].count;
          const imageData = images[p];
          const segPiece = segment.subarray(offset, offset + count * blockSize);
          if (imageData !== undefined && !segPiece.equals(imageData)) {
            for (let i = 0; i < count; i++) {
              const range = [i * blockSize, (i + 1) * blockSize] as const;
              if (segPiece.subarray(...range).equals(imageData.subarray(...range))) continue;
              badData.add(rank + i);
              if (reader.hasDigests && !blockDigest(imageData.subarray(...range)).equals(reader.blockDigest(rank + i))) {
                imageDigestMismatches++;
              }
            }
          }
          offset += count * blockSize;
          rank += count;
        }
        const [checksums, digests] = await computed;
        const stored = reader.blockChecksums(chunk.rank, chunk.blocks);
        const storedDigests = digests ? reader.blockDigests(chunk.rank, chunk.blocks) : undefined;
        if (badData.size > 0 || !checksums!.equals(stored) || (storedDigests && !digests!.equals(storedDigests))) {
          rank = chunk.rank;
          for (const piece of chunk.pieces) {
            for (let i = 0; i < piece.count; i++, rank++) {
              const t = (rank - chunk.rank) * entryLength;
              const checksumOk = checksums!.subarray(t, t + entryLength).equals(stored.subarray(t, t + entryLength));
              const d = (rank - chunk.rank) * BLOCK_DIGEST_LENGTH;
              const digestOk = !storedDigests || digests!.subarray(d, d + BLOCK_DIGEST_LENGTH).equals(storedDigests.subarray(d, d + BLOCK_DIGEST_LENGTH));
              const dataOk = !badData.has(rank);
              if (!checksumOk || !digestOk || !dataOk) record(rank, canCompare ? piece.block + i : null, checksumOk, digestOk, dataOk);
            }
          }
        }
        blocksChecked += chunk.blocks;
        options.onProgress?.(blocksChecked, totalBlocks);
      },
    );
  } finally {
    await checksummer.close();
  }

  if (checksumMismatches > 0) {
    checks.checksums = 'fail';
    problems.push(`${checksumMismatches} of ${totalBlocks} blocks do not match their stored checksums`);
  }
  if (digestMismatches > 0) {
    checks.digests = 'fail';
    problems.push(`${digestMismatches} of ${totalBlocks} blocks do not match their stored digests`);
  }
  if (imageDigestMismatches > 0) {
    checks.digests = 'fail';
    problems.push(`${imageDigestMismatches} of ${totalBlocks} stored digests are not the SHA-256 of the image's block`);
  }
  const dataSha256 = dataHash.digest('hex');
  if (dataSha256 !== reader.dataSha256) {
    checks.checksums = 'fail';
    problems.push(`segment data SHA-256 is ${shortHex(dataSha256)}, the header says ${shortHex(reader.dataSha256)}`);
  }
  if (dataMismatches > 0) {
    checks.data = 'fail';
    problems.push(`${dataMismatches} of ${totalBlocks} blocks differ from the image`);
  }
  const adoptable =
    checks.identity === 'fail' &&
    (['header', 'mapDigest', 'checksums', 'data'] as const).every((c) => checks[c] === 'pass') &&
    checks.digests !== 'fail';
  if (adoptable) {
    problems.push(
      `data and checksums of all ${totalBlocks} blocks matched ${image.name}: it holds the same data, but its identity ` +
        '(file size and mtime, or metadata) differs, as after a copy that did not keep the mtime (cp -p and rsync -a keep it); ' +
        '`bootcache verify --adopt` re-stamps the map and segment for it',
    );
  }
  return {
    // A version 1 segment's skipped digests do not fail it.
    ok: Object.entries(checks).every(([check, status]) => status === 'pass' || (check === 'digests' && status === 'skip')),
    adoptable,
    segment: reader.name,
    checks,
    blocksChecked,
    blockCount: totalBlocks,
    checksumMismatches,
    digestMismatches,
    imageDigestMismatches,
    dataMismatches,
    mismatches,
    problems,
  };
}

/** A segment source's readInto, when it has a usable one (FileByteSource does). */
function sourceReadInto(source: SegmentSource): NonNullable<ByteSource['readInto']> | undefined {
  return hasUsableReadInto(source) ? source.readInto.bind(source) : undefined;
}

/** Views of `data` (a chunk read with readChunkInto), one per piece. */
function pieceViews(data: Buffer, chunk: Chunk, blockSize: number): Buffer[] {
  let offset = 0;
  return chunk.pieces.map((piece) => {
    const view = data.subarray(offset, offset + piece.count * blockSize);
    offset += piece.count * blockSize;
    return view;
  });
}

/** Chunks over ranks alone, when the map cannot place the blocks in the image. */
function* rankChunks(totalBlocks: number, chunkBlocks: number): Generator<Chunk> {
  for (let rank = 0; rank < totalBlocks; rank += chunkBlocks) {
    const blocks = Math.min(chunkBlocks, totalBlocks - rank);
    // Pieces carry no image position here; they only split the chunk for the loop above.
    yield { rank, blocks, pieces: [{ block: -1, count: blocks }] };
  }
}
