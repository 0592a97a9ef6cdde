/**
 * qcow2 on-disk constants, from QEMU's docs/interop/qcow2.rst ("the spec").
 * Section names below refer to that document. All numbers are big endian.
 *
 * 64-bit table entries are handled as two 32-bit halves (hi = bits 32..63,
 * lo = bits 0..31) so the hot paths stay in plain numbers.
 */

/** "Header", bytes 0-3: "QFI\xfb". */
export const QCOW2_MAGIC = 0x514649fb;

/** "Header": the version 2 header ends at byte 72. */
export const V2_HEADER_LENGTH = 72;
/** "Header": version 3 header_length is at least 104. */
export const V3_MIN_HEADER_LENGTH = 104;
/** "Additional fields": compression_type is byte 104 (present when header_length > 104). */
export const COMPRESSION_TYPE_OFFSET = 104;

/** "Header", cluster_bits: at least 9 (512 B); QEMU's limit is 21 (2 MiB). */
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;

/** "Header", backing_file_size: must not be longer than 1023 bytes. */
export const MAX_BACKING_FILE_NAME = 1023;

/** "Header", crypt_method values. */
export const CRYPT_NONE = 0;
export const CRYPT_AES = 1;
export const CRYPT_LUKS = 2;

/** "Header", incompatible_features bits. */
export const INCOMPAT_DIRTY_BIT = 0;
export const INCOMPAT_CORRUPT_BIT = 1;
export const INCOMPAT_DATA_FILE_BIT = 2;
export const INCOMPAT_COMPRESSION_BIT = 3;
export const INCOMPAT_EXTL2_BIT = 4;
/** Bits 0-4 are defined; bits 5-63 are reserved and must make us refuse the image. */
export const INCOMPAT_KNOWN_MASK = 0x1fn;

/** "Header", autoclear_features bit 0: the bitmaps extension is consistent. */
export const AUTOCLEAR_BITMAPS_BIT = 0;
/** "Header", autoclear_features bit 1: raw external data (needs incompatible bit 2). */
export const AUTOCLEAR_DATA_FILE_RAW_BIT = 1;

/** "Header", refcount_order may not exceed 6. */
export const MAX_REFCOUNT_ORDER = 6;

/** "Additional fields", compression_type values. */
export const COMPRESSION_DEFLATE = 0;
export const COMPRESSION_ZSTD = 1;

/** "Header extensions": type codes. */
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO_HEADER = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;
/** "Header extensions": 4-byte type + 4-byte length, data padded to a multiple of 8. */
export const EXT_HEADER_SIZE = 8;

/** "Feature name table": 48-byte entries (type, bit, 46-byte name). */
export const FEATURE_ENTRY_SIZE = 48;
export const FEATURE_NAME_SIZE = 46;
export const FEATURE_TYPE_INCOMPATIBLE = 0;

/** "Bitmaps extension": nb_bitmaps, reserved, directory size and offset (24 bytes). */
export const BITMAPS_EXT_SIZE = 24;
/** QEMU's limits (block/qcow2.h): QCOW2_MAX_BITMAPS and QCOW2_MAX_BITMAP_DIRECTORY_SIZE. */
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS;
/** "Bitmap directory": fixed part of an entry, before extra data and name. */
export const BITMAP_DIR_ENTRY_SIZE = 24;
/** "Bitmap directory" field limits as QEMU enforces them (block/qcow2-bitmap.c BME_*). */
export const BITMAP_MAX_TABLE_SIZE = 0x8000000;
export const BITMAP_MIN_GRANULARITY_BITS = 9;
export const BITMAP_MAX_GRANULARITY_BITS = 31;
export const BITMAP_MAX_NAME_SIZE = 1023;
export const BITMAP_MAX_PHYS_SIZE = 0x20000000;
/** "Bitmap directory", flags: bit 0 in_use, bit 1 auto; QEMU treats bits 2-31 as reserved. */
export const BITMAP_FLAG_IN_USE = 0x1;
export const BITMAP_RESERVED_FLAGS = 0xfffffffc;
/** "Bitmap directory", type 1: dirty tracking bitmap, the only one defined. */
export const BITMAP_TYPE_DIRTY_TRACKING = 1;
/** "Bitmap table" entry: bits 1-8 and 56-63 reserved, bits 9-55 offset, bit 0 all-ones (offset 0 only). */
export const BITMAP_TABLE_RESERVED_MASK = 0xff000000000001fen;
export const BITMAP_TABLE_OFFSET_MASK = 0x00fffffffffffe00n;
export const BITMAP_TABLE_ALL_ONES = 1n;
/** "Full disk encryption header pointer": offset and length, 8 bytes each. */
export const CRYPTO_EXT_SIZE = 16;

/**
 * QEMU implementation limits (block/qcow2.h), which qcow2_do_open enforces
 * and we mirror so a hostile header cannot make us allocate without bound.
 */
export const QCOW_MAX_L1_SIZE = 32 * 1024 * 1024; // bytes
export const QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024; // bytes
export const QCOW_MAX_SNAPSHOTS = 65536;
/** "Snapshots": a snapshot table entry is at least 40 bytes. */
export const SNAPSHOT_HEADER_SIZE = 40;
/** QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA and QCOW_MAX_SNAPSHOTS_SIZE (block/qcow2.h). */
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;
export const MAX_SNAPSHOT_TABLE_SIZE = 1024 * QCOW_MAX_SNAPSHOTS;
/** QEMU's backing_format buffer is 16 bytes, so the extension must be shorter. */
export const MAX_BACKING_FORMAT_LENGTH = 15;

/** "Cluster mapping": L1 and standard L2 entries are 8 bytes. */
export const L1_ENTRY_SIZE = 8;
export const L2_ENTRY_SIZE = 8;
/** "Extended L2 Entries": 16 bytes, the second 8 being the subcluster bitmap. */
export const EXTENDED_L2_ENTRY_SIZE = 16;
/** "Extended L2 Entries": a standard cluster has 32 subclusters. */
export const SUBCLUSTERS_PER_CLUSTER = 32;
/** QEMU refuses subclusters smaller than 512 bytes, i.e. extended L2 needs cluster_bits >= 14. */
export const MIN_EXTL2_CLUSTER_BITS = 14;

/** "L1 table entry", bits 9-55: L2 table offset. Bit 63 (copied) does not matter for reading. */
export const L1E_OFFSET_HI_MASK = 0x00ffffff; // bits 32-55
export const L1E_OFFSET_LO_MASK = 0xfffffe00; // bits 9-31
/** "L1 table entry", bits 0-8 and 56-62: reserved, set to 0 (QEMU's L1E_RESERVED_MASK). */
export const L1E_RESERVED_HI_MASK = 0x7f000000;
export const L1E_RESERVED_LO_MASK = 0x000001ff;

/** "L2 table entry", bit 62: 1 for compressed clusters (hi half bit 30). */
export const L2E_COMPRESSED_HI_BIT = 0x40000000;
/**
 * "L2 table entry", bit 63: refcount exactly one. 0 for compressed clusters,
 * and set with offset 0 only when an external data file is used.
 */
export const L2E_COPIED_HI_BIT = 0x80000000;
/**
 * "Standard Cluster Descriptor", bits 9-55: host cluster offset (same layout
 * as the L1 entry offset).
 */
export const L2E_OFFSET_HI_MASK = 0x00ffffff;
export const L2E_OFFSET_LO_MASK = 0xfffffe00;
/**
 * "Standard Cluster Descriptor", bit 0: reads as zeros. Only meaningful in
 * version 3 images without extended L2 entries.
 */
export const L2E_ZERO_LO_BIT = 0x1;
/**
 * "Standard Cluster Descriptor", bits 1-8 and 56-61: reserved, set to 0
 * (QEMU's L2E_STD_RESERVED_MASK). Bit 0 is reserved too with extended L2
 * entries ("With version 2 or with extended L2 entries ... always 0").
 */
export const L2E_RESERVED_HI_MASK = 0x3f000000;
export const L2E_RESERVED_LO_MASK = 0x000001fe;

/** "Compressed Clusters Descriptor": sector counts are in 512-byte units. */
export const COMPRESSED_SECTOR_SIZE = 512;
/** "Compressed Clusters Descriptor": the host offset field may not use bits above 55. */
export const MAX_HOST_OFFSET_BITS = 56;

/**
 * "Compressed Clusters Descriptor" with x = 62 - (cluster_bits - 8): bits
 * 0..x-1 hold the host offset, bits x..61 the number of additional sectors.
 */
export function compressedOffsetBits(clusterBits: number): number {
  return 62 - (clusterBits - 8);
}

/** QEMU reports the virtual size in whole 512-byte sectors (bs->total_sectors). */
export const SECTOR_SIZE = 512;
