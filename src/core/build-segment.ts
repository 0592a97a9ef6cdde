/**
 * build-segment: copy the blocks a map selects out of an image into a .bcseg,
 * streaming with bounded memory. Runs of set bits become large image reads;
 * a few chunks are read ahead while the current one is hashed and written.
 */
import { createHash } from 'node:crypto';
import { MismatchError } from '../errors.js';
import type { DiskImage } from '../image/types.js';
import { AtomicFile } from '../format/atomic-write.js';
import { shortHex } from '../format/binary.js';
import type { BootMap } from '../format/map.js';
import {
  BLOCK_CHECKSUM_LENGTH,
  BLOCK_DIGEST_LENGTH,
  SEGMENT_VERSION,
  encodeSegmentHeader,
  segmentLayout,
  type BlockHashKind,
  type SegmentVersion,
} from '../format/segment.js';
import { createChecksummer, hashTable, sharedBuffer } from './checksum-worker.js';
import {
  DEFAULT_READ_CHUNK_BYTES,
  canReadInto,
  chunkBlocksFor,
  pipeline,
  planChunks,
  readChunkInto,
  readPiece,
} from './plan.js';

export interface BuildSegmentOptions {
  /** Called after each chunk is written. */
  onProgress?: (doneBlocks: number, totalBlocks: number) => void;
  /** Target size of one read chunk (default 1 MiB, see DEFAULT_READ_CHUNK_BYTES). */
  readChunkBytes?: number;
  /** Chunks read ahead of the one being hashed (default 3). */
  readAhead?: number;
  /**
   * Start flushing written data to disk every this many bytes (default
   * 32 MiB), so that disk writes overlap the copy and the final fsync is short.
   * 0 disables it.
   */
  syncEveryBytes?: number;
  /** Compute block checksums and digests on a worker thread (segments of 16 MiB or more; default off, see checksum-worker.ts). */
  checksumWorker?: boolean;
  /** Segment version to write (default SEGMENT_VERSION; 1, without digests, for tests and benchmarks). */
  version?: SegmentVersion;
}

export interface BuildSegmentResult {
  path: string;
  /** Blocks in the segment (the map's popcount). */
  blocks: number;
  /** Bytes of block data (blocks × blockSize). */
  bytes: number;
  /** Size of the .bcseg file. */
  fileBytes: number;
  blockSize: number;
  /** Segment version written (2: with per-block digests). */
  version: SegmentVersion;
  dataSha256: string;
  identity: string;
  mapDigest: string;
}

const DEFAULT_SYNC_EVERY_BYTES = 32 * 1024 * 1024;

/** Throws MismatchError unless `map` was made for `image`. */
export function checkMapMatchesImage(image: DiskImage, map: BootMap): void {
  if (map.identity !== image.identity) {
    throw new MismatchError(
      `map is for image identity ${shortHex(map.identity)} but ${image.name} has identity ${shortHex(image.identity)} ` +
        '(the image was rewritten or is another image)',
    );
  }
  if (map.virtualSize !== image.virtualSize) {
    throw new MismatchError(`map is for a ${map.virtualSize}-byte disk but ${image.name} is ${image.virtualSize} bytes`);
  }
}

export async function buildSegment(
  image: DiskImage,
  map: BootMap,
  outPath: string,
  options: BuildSegmentOptions = {},
): Promise<BuildSegmentResult> {
  checkMapMatchesImage(image, map);
  const blockSize = map.blockSize;
  const totalBlocks = map.blocksSet;
  const version = options.version ?? SEGMENT_VERSION;
  const layout = segmentLayout(totalBlocks, blockSize, { version });
  // Checksums always; digests from version 2 (docs/formats.md, "Segment (.bcseg)").
  const kinds: readonly BlockHashKind[] = version === 1 ? ['crc32'] : ['crc32', 'sha256'];
  const chunkBlocks = chunkBlocksFor(options.readChunkBytes ?? DEFAULT_READ_CHUNK_BYTES, blockSize);
  const readAhead = Math.max(1, options.readAhead ?? 3);
  const mapDigest = map.mapDigest();
  const syncEveryBytes = options.syncEveryBytes ?? DEFAULT_SYNC_EVERY_BYTES;

  const dataHash = createHash('sha256');
  const tableHash = createHash('sha256');
  const digestTableHash = createHash('sha256');
  const file = await AtomicFile.create(outPath);
  // Per-block checksums and digests run here or, if asked, on a worker while this thread
  // hashes the whole data. Chunks go through a ring of reusable buffers
  // (shared with the worker, if any): filled by the reads when the image can
  // read into a buffer, else (worker only) copied from the read buffers. A buffer is taken again only after the
  // chunk it held has been written: at most readAhead chunks are being read,
  // one hashed and one written.
  const checksummer = createChecksummer(totalBlocks * blockSize, options.checksumWorker);
  const readInto = canReadInto(image) ? image : undefined;
  const slotBytes = chunkBlocks * blockSize;
  const slots = checksummer.wantsShared || readInto
    ? Array.from({ length: readAhead + 2 }, () => (checksummer.wantsShared ? sharedBuffer(slotBytes) : Buffer.allocUnsafeSlow(slotBytes)))
    : [];
  let slotNumber = 0;
  const takeSlot = (blocks: number): Buffer => slots[slotNumber++ % slots.length].subarray(0, blocks * blockSize);
  let pendingWrite: Promise<unknown> = Promise.resolve();
  try {
    let doneBlocks = 0;
    let unsyncedBytes = 0;
    await pipeline(
      planChunks(map.bitmap, chunkBlocks),
      readAhead,
      async (chunk) => {
        if (!readInto) return Promise.all(chunk.pieces.map((piece) => readPiece(image, piece, blockSize)));
        const slot = takeSlot(chunk.blocks);
        await readChunkInto(readInto, chunk, blockSize, slot);
        return [slot];
      },
      async (buffers, chunk) => {
        let data = buffers;
        if (checksummer.wantsShared && !readInto) {
          const slot = takeSlot(chunk.blocks);
          let offset = 0;
          for (const buf of buffers) offset += buf.copy(slot, offset);
          data = [slot];
        }
        const tables = checksummer.wantsShared
          ? checksummer.tables(data[0], blockSize, kinds)
          : Promise.resolve(kinds.map((kind) => Buffer.concat(data.map((buf) => hashTable(buf, blockSize, kind)))));
        for (const buf of data) dataHash.update(buf);
        const [checksums, digests] = await tables;
        tableHash.update(checksums!);
        if (digests) digestTableHash.update(digests);
        // One write in flight while the next chunk is hashed.
        await pendingWrite;
        pendingWrite = Promise.all([
          file.writev(data, layout.dataOffset + chunk.rank * blockSize),
          file.write(checksums!, layout.tableOffset + chunk.rank * BLOCK_CHECKSUM_LENGTH),
          ...(digests ? [file.write(digests, layout.digestOffset + chunk.rank * BLOCK_DIGEST_LENGTH)] : []),
        ]);
        pendingWrite.catch(() => undefined); // surfaced by the next await
        doneBlocks += chunk.blocks;
        unsyncedBytes += chunk.blocks * blockSize;
        if (syncEveryBytes > 0 && unsyncedBytes >= syncEveryBytes) {
          await pendingWrite;
          file.startBackgroundSync();
          unsyncedBytes = 0;
        }
        options.onProgress?.(doneBlocks, totalBlocks);
      },
    );
    await pendingWrite;
    // The table hash covers the zero padding up to the data offset.
    tableHash.update(Buffer.alloc(layout.dataOffset - layout.tableOffset - layout.tableLength));
    const dataSha256 = dataHash.digest('hex');
    const header = encodeSegmentHeader({
      version,
      blockSize,
      blockCount: totalBlocks,
      virtualSize: map.virtualSize,
      identity: map.identity,
      mapDigest,
      dataSha256,
      tableSha256: tableHash.digest('hex'),
      ...(version === 1 ? {} : { digestTableSha256: digestTableHash.digest('hex') }),
    });
    // Zero padding up to the data offset (an empty segment ends there).
    await file.write(Buffer.alloc(layout.dataOffset - layout.tableOffset - layout.tableLength), layout.tableOffset + layout.tableLength);
    await file.write(header, 0);
    await file.commit();
    return {
      path: outPath,
      blocks: totalBlocks,
      bytes: totalBlocks * blockSize,
      fileBytes: layout.fileSize,
      blockSize,
      version,
      dataSha256,
      identity: map.identity,
      mapDigest,
    };
  } catch (err) {
    await pendingWrite.catch(() => undefined);
    await file.abort();
    throw err;
  } finally {
    await checksummer.close();
  }
}
