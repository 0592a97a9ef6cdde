/**
 * verify --adopt: re-stamps a map and its segment with the identity of an
 * image that holds the same data (a copy made without keeping the mtime).
 * Only after verifySegment compared every block and found the identity to be
 * the only difference (VerifyReport.adoptable). Both files are replaced
 * atomically; the segment's blocks, checksums and digests are copied
 * unchanged, in its version, only its header (identity, header checksum) is new.
 */
import { createHash } from 'node:crypto';
import { MismatchError } from '../errors.js';
import { withAtomicFile } from '../format/atomic-write.js';
import { BootMap, saveMap } from '../format/map.js';
import { SegmentReader, encodeSegmentHeader, segmentLayout } from '../format/segment.js';
import type { DiskImage } from '../image/types.js';
import type { VerifyReport } from './verify.js';

/** Segment data copied per read while re-stamping. */
const COPY_CHUNK_BYTES = 8 * 1024 * 1024;

export interface AdoptResult {
  identity: string;
  /** The files rewritten (a file already stamped for the image is left alone). */
  rewritten: string[];
}

export async function adoptForImage(
  image: DiskImage,
  map: BootMap,
  mapPath: string,
  segmentPath: string,
  report: VerifyReport,
): Promise<AdoptResult> {
  if (!report.adoptable) {
    throw new MismatchError(`not adopted: ${report.problems[0] ?? 'the segment does not match the image'}`, { file: segmentPath });
  }
  const rewritten: string[] = [];
  const reader = await SegmentReader.open(segmentPath);
  try {
    if (reader.identity !== image.identity) {
      await restampSegment(reader, segmentPath, image.identity);
      rewritten.push(segmentPath);
    }
  } finally {
    await reader.close();
  }
  if (map.identity !== image.identity) {
    const fields = { blockSize: map.blockSize, virtualSize: map.virtualSize, boots: map.boots, bitmap: map.bitmap, history: map.history };
    await saveMap(mapPath, new BootMap({ ...fields, identity: image.identity }));
    rewritten.push(mapPath);
  }
  return { identity: image.identity, rewritten };
}

/** Writes the segment again with a header for `identity`: same version, blocks, checksum and digest tables. */
async function restampSegment(reader: SegmentReader, path: string, identity: string): Promise<void> {
  const h = reader.header;
  const layout = segmentLayout(h.blockCount, h.blockSize, { version: h.version, checksumAlgorithm: h.checksumAlgorithm });
  // The table area is the table and the zero padding up to the data (docs/formats.md, "Segment (.bcseg)").
  const tableArea = Buffer.alloc(layout.dataOffset - layout.tableOffset);
  reader.blockChecksums(0, h.blockCount).copy(tableArea, 0);
  const digests = reader.hasDigests ? reader.blockDigests(0, h.blockCount) : undefined;
  const header = encodeSegmentHeader({
    version: h.version,
    blockSize: h.blockSize,
    blockCount: h.blockCount,
    virtualSize: h.virtualSize,
    identity,
    mapDigest: h.mapDigest,
    dataSha256: h.dataSha256,
    tableSha256: createHash('sha256').update(tableArea).digest('hex'),
    checksumAlgorithm: h.checksumAlgorithm,
    ...(h.digests ? { digestTableSha256: h.digests.tableSha256 } : {}),
  });
  await withAtomicFile(path, async (file) => {
    await file.write(header, 0);
    if (digests) await file.write(digests, layout.digestOffset);
    await file.write(tableArea, layout.tableOffset);
    const length = reader.dataLength;
    for (let done = 0; done < length; done += COPY_CHUNK_BYTES) {
      const n = Math.min(COPY_CHUNK_BYTES, length - done);
      await file.write(await reader.source.read(h.dataOffset + done, n), layout.dataOffset + done);
    }
  });
}
