/** inspect (map and segment part) and file kind detection by magic. */
import { INDEX_MAGIC, ImageIndex } from '../format/image-index.js';
import { MAP_MAGIC, loadMap } from '../format/map.js';
import { BLOCK_CHECKSUM_CRC32, SEGMENT_MAGIC, SegmentReader } from '../format/segment.js';
import { FileByteSource } from '../image/file-source.js';

export type FileKind = 'map' | 'segment' | 'index' | 'image';

/** The kind of a file whose first bytes are `head`: 'map', 'segment' or 'index' by magic, else 'image'. */
export function kindOfHead(head: Buffer): FileKind {
  if (head.subarray(0, MAP_MAGIC.length).equals(MAP_MAGIC)) return 'map';
  if (head.subarray(0, SEGMENT_MAGIC.length).equals(SEGMENT_MAGIC)) return 'segment';
  if (head.subarray(0, INDEX_MAGIC.length).equals(INDEX_MAGIC)) return 'index';
  return 'image';
}

/** 'map', 'segment' or 'index' by magic; anything else is taken to be an image. */
export async function detectFileKind(path: string): Promise<FileKind> {
  const file = await FileByteSource.open(path);
  try {
    return kindOfHead(await file.read(0, Math.min(file.size, 16)));
  } finally {
    await file.close().catch(() => undefined);
  }
}

export interface MapInspection {
  kind: 'map';
  path: string;
  version: number;
  blockSize: number;
  virtualSize: number;
  blockCount: number;
  blocksSet: number;
  /** blocksSet × blockSize: the size of the segment's data. */
  bytes: number;
  /** Maximal runs of set blocks (image reads needed to build the segment). */
  runs: number;
  boots: number;
  identity: string;
  mapDigest: string;
  /** The merge history, when the map has one. */
  history: { window: number; minSeen: number; recorded: number; entries: number } | null;
}

export interface SegmentInspection {
  kind: 'segment';
  path: string;
  version: number;
  blockSize: number;
  blocks: number;
  /** Bytes of block data (blocks × blockSize). */
  bytes: number;
  fileBytes: number;
  virtualSize: number;
  dataOffset: number;
  identity: string;
  mapDigest: string;
  dataSha256: string;
  /** Per-block checksums: 'crc32' or (segments written before 2026-11-27) 'sha256-128'. */
  blockChecksum: 'crc32' | 'sha256-128';
  /** Per-block content digests: 'sha256' (version 2), null in version 1. */
  blockDigest: 'sha256' | null;
}

/** Loads (and so fully checks) a map and summarises it. */
export async function inspectMap(path: string): Promise<MapInspection> {
  const map = await loadMap(path);
  const blocksSet = map.blocksSet;
  return {
    kind: 'map',
    path,
    version: map.version,
    blockSize: map.blockSize,
    virtualSize: map.virtualSize,
    blockCount: map.blockCount,
    blocksSet,
    bytes: blocksSet * map.blockSize,
    runs: map.bitmap.countRuns(),
    boots: map.boots,
    identity: map.identity,
    mapDigest: map.mapDigest(),
    history: map.history
      ? {
          window: map.history.window,
          minSeen: map.history.minSeen,
          recorded: map.history.recorded,
          entries: map.history.blocks.length,
        }
      : null,
  };
}

/** Reads a segment's header and tables (not its data; that is verify's job). */
export async function inspectSegment(path: string): Promise<SegmentInspection> {
  const reader = await SegmentReader.open(path);
  try {
    const h = reader.header;
    return {
      kind: 'segment',
      path,
      version: h.version,
      blockSize: h.blockSize,
      blocks: h.blockCount,
      bytes: reader.dataLength,
      fileBytes: reader.source.size,
      virtualSize: h.virtualSize,
      dataOffset: h.dataOffset,
      identity: h.identity,
      mapDigest: h.mapDigest,
      dataSha256: h.dataSha256,
      blockChecksum: h.checksumAlgorithm === BLOCK_CHECKSUM_CRC32 ? 'crc32' : 'sha256-128',
      blockDigest: h.digests ? 'sha256' : null,
    };
  } finally {
    await reader.close();
  }
}

export interface IndexInspection {
  kind: 'index';
  path: string;
  version: number;
  blockSize: number;
  virtualSize: number;
  blockCount: number;
  /** Blocks with a digest; the others read as zeros. */
  dataBlocks: number;
  /** dataBlocks × blockSize. */
  dataBytes: number;
  fileBytes: number;
  /** Bytes of the digest table (32 per data block). */
  tableBytes: number;
  identity: string;
  blockDigest: 'sha256';
  /** The image this one is a new version of, as stored, or null. */
  previous: string | null;
  bitmapSha256: string;
  digestTableSha256: string;
}

/** Opens (and so fully checks) an image index and summarises it. */
export async function inspectIndex(path: string): Promise<IndexInspection> {
  const index = await ImageIndex.open(path);
  try {
    const h = index.header;
    return {
      kind: 'index',
      path,
      version: h.version,
      blockSize: h.blockSize,
      virtualSize: h.virtualSize,
      blockCount: h.blockCount,
      dataBlocks: h.dataBlocks,
      dataBytes: h.dataBlocks * h.blockSize,
      fileBytes: index.source.size,
      tableBytes: h.dataBlocks * h.digestLength,
      identity: h.identity,
      blockDigest: 'sha256',
      previous: h.previous,
      bitmapSha256: h.bitmapSha256,
      digestTableSha256: h.digestTableSha256,
    };
  } finally {
    await index.close();
  }
}
