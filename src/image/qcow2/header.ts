/**
 * qcow2 header and header-extension parsing, with the checks of QEMU's
 * qcow2_do_open / qcow2_read_extensions (block/qcow2.c) plus bounds checks
 * against the file size. Pure: works on buffers, throws bootcache errors.
 */
import { CorruptImageError, InvalidImageError, UnsupportedImageError } from '../../errors.js';
import {
  AUTOCLEAR_BITMAPS_BIT,
  AUTOCLEAR_DATA_FILE_RAW_BIT,
  BITMAPS_EXT_SIZE,
  CRYPTO_EXT_SIZE,
  MAX_BITMAPS,
  MAX_BITMAP_DIRECTORY_SIZE,
  COMPRESSION_DEFLATE,
  COMPRESSION_TYPE_OFFSET,
  COMPRESSION_ZSTD,
  CRYPT_AES,
  CRYPT_LUKS,
  CRYPT_NONE,
  EXT_BACKING_FORMAT,
  EXT_BITMAPS,
  EXT_CRYPTO_HEADER,
  EXT_DATA_FILE,
  EXT_END,
  EXT_FEATURE_TABLE,
  EXT_HEADER_SIZE,
  FEATURE_ENTRY_SIZE,
  FEATURE_NAME_SIZE,
  FEATURE_TYPE_INCOMPATIBLE,
  INCOMPAT_COMPRESSION_BIT,
  INCOMPAT_CORRUPT_BIT,
  INCOMPAT_DATA_FILE_BIT,
  INCOMPAT_DIRTY_BIT,
  INCOMPAT_EXTL2_BIT,
  INCOMPAT_KNOWN_MASK,
  L1_ENTRY_SIZE,
  MAX_BACKING_FILE_NAME,
  MAX_BACKING_FORMAT_LENGTH,
  MAX_CLUSTER_BITS,
  MAX_REFCOUNT_ORDER,
  MIN_CLUSTER_BITS,
  MIN_EXTL2_CLUSTER_BITS,
  QCOW2_MAGIC,
  QCOW_MAX_L1_SIZE,
  QCOW_MAX_REFTABLE_SIZE,
  QCOW_MAX_SNAPSHOTS,
  SECTOR_SIZE,
  SNAPSHOT_HEADER_SIZE,
  V2_HEADER_LENGTH,
  V3_MIN_HEADER_LENGTH,
  L2_ENTRY_SIZE,
  EXTENDED_L2_ENTRY_SIZE,
} from './spec.js';

export type CompressionType = 'zlib' | 'zstd';

export interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  clusterSize: number;
  /** Guest size in bytes, as QEMU exposes it (whole 512-byte sectors). */
  virtualSize: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  refcountOrder: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  headerLength: number;
  compressionType: CompressionType;
  extendedL2: boolean;
  dirty: boolean;
  corrupt: boolean;
  /** Entries per L2 table and bytes per L2 entry. */
  l2Entries: number;
  l2EntrySize: number;
  backingFile?: string;
  backingFormat?: string;
  /** The bitmaps extension, when it is in use (autoclear bit 0) and so must be checked. */
  bitmaps?: BitmapsExtension;
}

export interface HeaderExtensions {
  backingFormat?: string;
  /** Feature names by `${type}:${bit}` from the feature name table. */
  featureNames: Map<string, string>;
  dataFileName?: string;
  hasCryptoHeader: boolean;
  bitmaps?: BitmapsExtension;
}

/** "Bitmaps extension" fields. */
export interface BitmapsExtension {
  nbBitmaps: number;
  reserved: number;
  directorySize: bigint;
  directoryOffset: bigint;
}

/** Bytes the fixed header needs, whatever the version (v3 up to compression_type). */
export const HEADER_PROBE_SIZE = 112;

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

/** Reads a 64-bit field, refusing values a JS number cannot hold exactly. */
function u64(buf: Buffer, offset: number, field: string, file: string): number {
  const v = buf.readBigUInt64BE(offset);
  if (v > MAX_SAFE) {
    throw new InvalidImageError(`qcow2 header field ${field} (${v}) is too large`, { file });
  }
  return Number(v);
}

function hex(n: number | bigint): string {
  return `0x${n.toString(16)}`;
}

/**
 * Parses and validates the header. `head` holds at least the first
 * min(fileSize, HEADER_PROBE_SIZE) bytes; `headerCluster` (read once the
 * cluster size is known) the first cluster. Throws on anything QEMU would
 * refuse, and on tables that do not fit in the file.
 */
export function parseHeader(
  headerCluster: Buffer,
  fileSize: number,
  file: string,
  options: { force: boolean },
): { header: Qcow2Header; extensions: HeaderExtensions } {
  const fixed = parseFixedHeader(headerCluster, fileSize, file);
  const { clusterSize, clusterBits, version } = fixed;
  if (headerCluster.length < clusterSize) {
    throw new InvalidImageError(
      `file is truncated: ${fileSize} bytes, shorter than its first cluster (${clusterSize} bytes)`,
      { file },
    );
  }
  const buf = headerCluster;

  // "Header" bytes 8-15 / 16-19: backing file name offset and size.
  const backingFileOffset = u64(buf, 8, 'backing_file_offset', file);
  const backingFileSize = buf.readUInt32BE(16);
  if (backingFileOffset > clusterSize) {
    throw new InvalidImageError(`invalid backing file name offset ${backingFileOffset} (outside the header cluster)`, { file });
  }
  // Header extensions run up to the backing file name, or the end of the first cluster.
  const extEnd = backingFileOffset !== 0 ? backingFileOffset : clusterSize;

  // "Header" bytes 72-103 exist only in version 3.
  let incompatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4; // "refcount_order": always 4 for version 2
  let headerLength = V2_HEADER_LENGTH;
  if (version === 3) {
    incompatibleFeatures = buf.readBigUInt64BE(72);
    autoclearFeatures = buf.readBigUInt64BE(88);
    refcountOrder = buf.readUInt32BE(96);
    headerLength = fixed.headerLength;
  }
  const bit = (mask: bigint, n: number): boolean => ((mask >> BigInt(n)) & 1n) === 1n;

  // "Additional fields", byte 104: compression_type, present when header_length > 104.
  const rawCompression = headerLength > COMPRESSION_TYPE_OFFSET ? buf[COMPRESSION_TYPE_OFFSET]! : COMPRESSION_DEFLATE;
  const compressionBit = bit(incompatibleFeatures, INCOMPAT_COMPRESSION_BIT);
  let compressionType: CompressionType;
  if (rawCompression === COMPRESSION_DEFLATE) {
    compressionType = 'zlib';
    // Incompatible bit 3: set if and only if compression_type is non-zero.
    if (compressionBit) {
      throw new InvalidImageError('compression type incompatible feature bit is set but compression_type is deflate', { file });
    }
  } else if (rawCompression === COMPRESSION_ZSTD) {
    compressionType = 'zstd';
    if (!compressionBit) {
      throw new InvalidImageError('compression_type is zstd but the compression type incompatible feature bit is not set', { file });
    }
  } else {
    throw new UnsupportedImageError(`unknown qcow2 compression type ${rawCompression}`, { file });
  }

  // "Header": an implementation must fail to open an image with an unknown incompatible bit.
  const unknownFeatures = incompatibleFeatures & ~INCOMPAT_KNOWN_MASK;
  if (unknownFeatures !== 0n) {
    let names = new Map<string, string>();
    try {
      names = parseExtensions(buf, headerLength, extEnd, file).featureNames;
    } catch {
      // The feature names are only for the message; a broken table must not hide the real error.
    }
    throw new UnsupportedImageError(`unsupported qcow2 feature(s): ${describeFeatures(unknownFeatures, names)}`, { file });
  }

  // Incompatible bit 1: corrupt. Reading is still possible, but only on request.
  const corrupt = bit(incompatibleFeatures, INCOMPAT_CORRUPT_BIT);
  if (corrupt && !options.force) {
    throw new CorruptImageError('image is marked corrupt (qcow2 corrupt bit set); run qemu-img check, or use --force to read it anyway', { file });
  }
  // Incompatible bit 2: guest clusters live in an external data file.
  if (bit(incompatibleFeatures, INCOMPAT_DATA_FILE_BIT)) {
    throw new UnsupportedImageError('images with an external data file are not supported', { file });
  }
  // Autoclear bit 1 (raw external data) may only be set together with incompatible bit 2.
  if (bit(autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW_BIT)) {
    throw new InvalidImageError('raw external data bit is set without an external data file', { file });
  }
  if (refcountOrder > MAX_REFCOUNT_ORDER) {
    throw new InvalidImageError(`refcount_order ${refcountOrder} is too large (at most ${MAX_REFCOUNT_ORDER})`, { file });
  }

  // "Header" bytes 32-35: crypt_method.
  const cryptMethod = buf.readUInt32BE(32);
  if (cryptMethod !== CRYPT_NONE) {
    const kind = cryptMethod === CRYPT_AES ? 'AES' : cryptMethod === CRYPT_LUKS ? 'LUKS' : `method ${cryptMethod}`;
    throw new UnsupportedImageError(`encrypted images are not supported (${kind} encryption)`, { file });
  }

  // Incompatible bit 4: extended L2 entries; subclusters must be at least 512 bytes.
  const extendedL2 = bit(incompatibleFeatures, INCOMPAT_EXTL2_BIT);
  if (extendedL2 && clusterBits < MIN_EXTL2_CLUSTER_BITS) {
    throw new InvalidImageError(
      `extended L2 entries need clusters of at least ${1 << MIN_EXTL2_CLUSTER_BITS} bytes (cluster size is ${clusterSize})`,
      { file },
    );
  }

  // "Header" bytes 24-31: size. QEMU exposes whole sectors only.
  const size = u64(buf, 24, 'size', file);
  const virtualSize = size - (size % SECTOR_SIZE);

  const validateTable = (name: string, offset: number, entries: number, entrySize: number, maxBytes: number): void => {
    if (entries > Math.floor(maxBytes / entrySize)) {
      throw new InvalidImageError(`${name} is too large (${entries} entries, at most ${Math.floor(maxBytes / entrySize)})`, { file });
    }
    if (offset % clusterSize !== 0) {
      throw new InvalidImageError(`${name} offset ${hex(offset)} is not aligned to the cluster size (${clusterSize})`, { file });
    }
    const bytes = entries * entrySize;
    if (bytes > 0 && offset + bytes > fileSize) {
      throw new InvalidImageError(
        `${name} (offset ${hex(offset)}, ${bytes} bytes) extends past the end of the file (${fileSize} bytes)`,
        { file },
      );
    }
    if (bytes > 0 && offset === 0) {
      throw new InvalidImageError(`${name} overlaps the qcow2 header (offset 0)`, { file });
    }
  };

  // "Header" bytes 48-59: refcount table; QEMU needs one to open the image.
  const refcountTableOffset = u64(buf, 48, 'refcount_table_offset', file);
  const refcountTableClusters = buf.readUInt32BE(56);
  if (refcountTableClusters === 0) {
    throw new InvalidImageError('image has no reference count table (refcount_table_clusters is 0)', { file });
  }
  validateTable('reference count table', refcountTableOffset, refcountTableClusters, clusterSize, QCOW_MAX_REFTABLE_SIZE);

  // "Header" bytes 60-71: snapshot table (entries are at least 40 bytes).
  const nbSnapshots = buf.readUInt32BE(60);
  const snapshotsOffset = u64(buf, 64, 'snapshots_offset', file);
  validateTable('snapshot table', snapshotsOffset, nbSnapshots, SNAPSHOT_HEADER_SIZE, SNAPSHOT_HEADER_SIZE * QCOW_MAX_SNAPSHOTS);

  // "Header" bytes 36-47: active L1 table.
  const l1Size = buf.readUInt32BE(36);
  const l1TableOffset = u64(buf, 40, 'l1_table_offset', file);
  validateTable('L1 table', l1TableOffset, l1Size, L1_ENTRY_SIZE, QCOW_MAX_L1_SIZE);
  const l2EntrySize = extendedL2 ? EXTENDED_L2_ENTRY_SIZE : L2_ENTRY_SIZE;
  const l2Entries = clusterSize / l2EntrySize;
  // The L1 table must cover the whole virtual disk ("L1 table is too small" in QEMU).
  const l1Needed = Math.ceil(size / (clusterSize * l2Entries));
  if (l1Needed > 0x7fffffff) {
    throw new InvalidImageError(`virtual size ${size} is too large for cluster size ${clusterSize}`, { file });
  }
  if (l1Size < l1Needed) {
    throw new InvalidImageError(`L1 table is too small: ${l1Size} entries, the virtual size needs ${l1Needed}`, { file });
  }

  const extensions = parseExtensions(buf, headerLength, extEnd, file);
  if (extensions.hasCryptoHeader) {
    // "Full disk encryption header pointer": absent unless crypt_method is LUKS (and it is none here).
    throw new InvalidImageError('image has a full disk encryption header extension but is not encrypted', { file });
  }
  // Autoclear bit 0: only then does QEMU use (and so check) the bitmaps extension.
  const bitmaps = bit(autoclearFeatures, AUTOCLEAR_BITMAPS_BIT) ? extensions.bitmaps : undefined;
  if (bitmaps !== undefined) validateBitmapsExtension(bitmaps, clusterSize, file);
  if (extensions.dataFileName !== undefined) {
    throw new UnsupportedImageError(
      `images with an external data file are not supported (data file ${quoteShort(extensions.dataFileName)})`,
      { file },
    );
  }

  let backingFile: string | undefined;
  if (backingFileOffset !== 0) {
    if (backingFileSize > Math.min(MAX_BACKING_FILE_NAME, clusterSize - backingFileOffset)) {
      throw new InvalidImageError(
        `backing file name is too long (${backingFileSize} bytes at offset ${backingFileOffset}; at most ${MAX_BACKING_FILE_NAME}, inside the first cluster)`,
        { file },
      );
    }
    // QEMU treats an empty name as no backing file.
    if (backingFileSize > 0) backingFile = buf.toString('utf8', backingFileOffset, backingFileOffset + backingFileSize);
  }

  const header: Qcow2Header = {
    version,
    clusterBits,
    clusterSize,
    virtualSize,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    refcountOrder,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    headerLength,
    compressionType,
    extendedL2,
    dirty: bit(incompatibleFeatures, INCOMPAT_DIRTY_BIT),
    corrupt,
    l2Entries,
    l2EntrySize,
  };
  if (bitmaps !== undefined) header.bitmaps = bitmaps;
  if (backingFile !== undefined) {
    header.backingFile = backingFile;
    if (extensions.backingFormat !== undefined) header.backingFormat = extensions.backingFormat;
  }
  return { header, extensions };
}

/**
 * The fields needed before the first cluster can be read: magic, version,
 * cluster size, header length. `head` is the start of the file.
 */
export function parseFixedHeader(
  head: Buffer,
  fileSize: number,
  file: string,
): { version: 2 | 3; clusterBits: number; clusterSize: number; headerLength: number } {
  if (head.length < 4 || head.readUInt32BE(0) !== QCOW2_MAGIC) {
    const got = head.length >= 4 ? hex(head.readUInt32BE(0)) : `${head.length}-byte file`;
    throw new InvalidImageError(`not a qcow2 image (bad magic: ${got})`, { file });
  }
  if (head.length < V2_HEADER_LENGTH) {
    throw new InvalidImageError(`file is truncated: ${fileSize} bytes, too short for a qcow2 header`, { file });
  }
  // "Header" bytes 4-7: valid versions are 2 and 3.
  const version = head.readUInt32BE(4);
  if (version !== 2 && version !== 3) {
    throw new UnsupportedImageError(`qcow2 version ${version} is not supported (only versions 2 and 3)`, { file });
  }
  // "Header" bytes 20-23: cluster_bits.
  const clusterBits = head.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new InvalidImageError(
      `unsupported cluster size: cluster_bits is ${clusterBits} (must be ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS})`,
      { file },
    );
  }
  const clusterSize = 2 ** clusterBits;
  let headerLength = V2_HEADER_LENGTH;
  if (version === 3) {
    if (head.length < V3_MIN_HEADER_LENGTH) {
      throw new InvalidImageError(`file is truncated: ${fileSize} bytes, too short for a version 3 qcow2 header`, { file });
    }
    // "Header" bytes 100-103: header_length, at least 104 for version 3.
    headerLength = head.readUInt32BE(100);
    if (headerLength < V3_MIN_HEADER_LENGTH) {
      throw new InvalidImageError(`qcow2 header is too short: header_length ${headerLength} (at least ${V3_MIN_HEADER_LENGTH})`, { file });
    }
  }
  if (headerLength > clusterSize) {
    throw new InvalidImageError(`qcow2 header_length ${headerLength} exceeds the cluster size (${clusterSize})`, { file });
  }
  if (headerLength > fileSize) {
    throw new InvalidImageError(`file is truncated: ${fileSize} bytes, shorter than its header (${headerLength} bytes)`, { file });
  }
  return { version, clusterBits, clusterSize, headerLength };
}

/**
 * Walks the header extensions in [start, end) of the first cluster ("Header
 * extensions"): each is type, length, data padded to 8 bytes; type 0 ends
 * the list; unknown types are skipped.
 */
export function parseExtensions(buf: Buffer, start: number, end: number, file: string): HeaderExtensions {
  const result: HeaderExtensions = { featureNames: new Map(), hasCryptoHeader: false };
  const limit = Math.min(end, buf.length);
  const seen = new Set<number>();
  let offset = start;
  while (offset < limit) {
    if (offset + EXT_HEADER_SIZE > limit) {
      throw new InvalidImageError(`header extension at offset ${offset} does not fit in the header area (ends at ${limit})`, { file });
    }
    const type = buf.readUInt32BE(offset);
    const length = buf.readUInt32BE(offset + 4);
    offset += EXT_HEADER_SIZE;
    if (length > limit - offset) {
      throw new InvalidImageError(
        `header extension ${hex(type)} is too large (${length} bytes at offset ${offset}, header area ends at ${limit})`,
        { file },
      );
    }
    const data = buf.subarray(offset, offset + length);
    const badLength = (name: string, expected: string): InvalidImageError =>
      new InvalidImageError(`${name} header extension has a bad length (${length} bytes, expected ${expected})`, { file });
    if (type !== EXT_END && KNOWN_EXTENSIONS.has(type)) {
      // "Unless stated otherwise, each header extension type shall appear at most once."
      if (seen.has(type)) throw new InvalidImageError(`header extension ${hex(type)} appears more than once`, { file });
      seen.add(type);
    }
    switch (type) {
      case EXT_END:
        return result;
      case EXT_BACKING_FORMAT:
        // "String header extensions": not NUL terminated; QEMU's buffer holds 15 characters.
        if (length > MAX_BACKING_FORMAT_LENGTH) {
          throw new InvalidImageError(`backing format header extension is too long (${length} bytes)`, { file });
        }
        result.backingFormat = data.toString('latin1');
        break;
      case EXT_FEATURE_TABLE:
        // "Feature name table": 48-byte entries of type, bit number, name.
        if (length % FEATURE_ENTRY_SIZE !== 0) throw badLength('feature name table', `a multiple of ${FEATURE_ENTRY_SIZE}`);
        for (let e = 0; e < length; e += FEATURE_ENTRY_SIZE) {
          const nameBytes = data.subarray(e + 2, e + 2 + FEATURE_NAME_SIZE);
          const nul = nameBytes.indexOf(0);
          const name = nameBytes.toString('utf8', 0, nul === -1 ? FEATURE_NAME_SIZE : nul);
          result.featureNames.set(`${data[e]}:${data[e + 1]}`, name);
        }
        break;
      case EXT_DATA_FILE:
        result.dataFileName = data.toString('utf8');
        break;
      case EXT_CRYPTO_HEADER:
        // "Full disk encryption header pointer": offset and length.
        if (length !== CRYPTO_EXT_SIZE) throw badLength('full disk encryption', `${CRYPTO_EXT_SIZE}`);
        result.hasCryptoHeader = true;
        break;
      case EXT_BITMAPS:
        // "Bitmaps extension": QEMU refuses any other length. Bitmaps do not change guest data.
        if (length !== BITMAPS_EXT_SIZE) throw badLength('bitmaps', `${BITMAPS_EXT_SIZE}`);
        result.bitmaps = {
          nbBitmaps: data.readUInt32BE(0),
          reserved: data.readUInt32BE(4),
          directorySize: data.readBigUInt64BE(8),
          directoryOffset: data.readBigUInt64BE(16),
        };
        break;
      default:
        // Unknown extension: "can be safely ignored".
        break;
    }
    offset += Math.ceil(length / 8) * 8;
  }
  return result;
}

const KNOWN_EXTENSIONS = new Set([EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_CRYPTO_HEADER, EXT_DATA_FILE]);

/** The checks QEMU's qcow2_read_extensions makes on a bitmaps extension in use ("Bitmaps extension"). */
function validateBitmapsExtension(ext: BitmapsExtension, clusterSize: number, file: string): void {
  const fail = (why: string): never => {
    throw new InvalidImageError(`bitmaps header extension: ${why}`, { file });
  };
  // Bytes 4-7: "Reserved, must be zero".
  if (ext.reserved !== 0) fail('reserved field is not zero');
  // Bytes 0-3: nb_bitmaps "must be greater than or equal to 1"; QEMU supports 65535.
  if (ext.nbBitmaps === 0) fail('nb_bitmaps is 0');
  if (ext.nbBitmaps > MAX_BITMAPS) fail(`${ext.nbBitmaps} bitmaps, more than ${MAX_BITMAPS}`);
  // Bytes 16-23: the directory "must be aligned to a cluster boundary".
  if (ext.directoryOffset % BigInt(clusterSize) !== 0n) fail(`bitmap directory offset ${hex(ext.directoryOffset)} is not cluster aligned`);
  if (ext.directorySize === 0n) fail('bitmap directory size is 0');
  if (ext.directoryOffset > MAX_SAFE) fail(`bitmap directory offset ${hex(ext.directoryOffset)} is out of range`);
  if (ext.directorySize > BigInt(MAX_BITMAP_DIRECTORY_SIZE)) {
    fail(`bitmap directory size ${ext.directorySize} is larger than ${MAX_BITMAP_DIRECTORY_SIZE}`);
  }
}

/** A name from the image for a message: quoted (no control characters) and at most 64 characters. */
function quoteShort(name: string): string {
  const max = 64;
  return JSON.stringify(name.length > max ? name.slice(0, max) : name) + (name.length > max ? '...' : '');
}

/** Names unknown incompatible bits, from the feature name table where it has them. */
function describeFeatures(mask: bigint, names: Map<string, string>): string {
  const parts: string[] = [];
  for (let b = 0; b < 64; b++) {
    if (((mask >> BigInt(b)) & 1n) === 0n) continue;
    const name = names.get(`${FEATURE_TYPE_INCOMPATIBLE}:${b}`);
    parts.push(name ? `${JSON.stringify(name)} (incompatible bit ${b})` : `unknown incompatible feature bit ${b}`);
  }
  return parts.join(', ');
}
