import type { LayerIdentity } from './identity.js';

/**
 * The disk image abstraction shared by every reader (raw, qcow2) and every
 * consumer (segment builder, verifier, NBD exports).
 */

/** A read-only, range-addressable byte store: a local file, an object, ... */
export interface ByteSource {
  /** Path or object key, used in error messages and to resolve backing names. */
  readonly name: string;
  /** Size in bytes at open time. */
  readonly size: number;
  /**
   * Storage identity of this version of the bytes: size plus mtime (files) or
   * ETag (object stores). Changes whenever the object is rewritten.
   */
  readonly stamp: string;
  /**
   * The version opened (see ObjectStat.version). Every read checks that it
   * is still the version on storage, and throws ImageChangedError otherwise:
   * a source never returns bytes of two versions.
   */
  readonly version: string;
  /** When this version was written (ms since the epoch), when the storage says. */
  readonly modifiedMs?: number;
  /** Bytes from offset 0 held in memory since the open (OpenOptions.head): reads inside them make no request. */
  readonly headLength?: number;
  /**
   * Reads exactly `length` bytes at `offset`. Throws StorageIOError when the
   * range goes past the end of the source, StorageReadError when the read
   * request failed (worth a retry).
   */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * Optional: like read(), but into target[targetOffset, targetOffset + length).
   * Lets callers reuse buffers: faulting in fresh memory for every read can
   * cost more than the read itself. See readSourceInto for the fallback.
   */
  readInto?(offset: number, length: number, target: Buffer, targetOffset: number): Promise<void>;
  close(): Promise<void>;
}

/** Opens sources by name; used for backing files. */
export interface SourceOpener {
  /**
   * Opens `name` as referenced from `from` (relative names resolve against
   * the directory of `from`). Returns the source and a canonical key (real
   * path) used for cycle detection.
   */
  openRelative(from: ByteSource, name: string): Promise<{ source: ByteSource; key: string }>;
}

export type ImageFormat = 'raw' | 'qcow2';

/**
 * Allocation state of a guest range, as seen through the whole backing chain:
 * - data: bytes come from some layer's data (may still be zeros)
 * - zero: explicitly zero (qcow2 zero cluster / subcluster) in the topmost layer that decides
 * - unallocated: no layer holds it; reads as zeros
 */
export type ExtentKind = 'data' | 'zero' | 'unallocated';

export interface Extent {
  offset: number;
  length: number;
  kind: ExtentKind;
}

/**
 * An extent of a disk image, with the layer that decides it, like
 * `qemu-img map`'s depth (0 = this image, 1 = its backing file, ...):
 * - data, zero: the layer that holds the range;
 * - unallocated: the layer where the lookup ended, i.e. the bottom layer, or
 *   the layer reading it as zeros past the end of its shorter backing file.
 */
export interface ImageExtent extends Extent {
  depth: number;
}

/**
 * One layer of a backing chain, top first. Its format, stamp and metadata
 * are the layer's identity inputs (src/image/identity.ts).
 */
export interface LayerInfo extends LayerIdentity {
  name: string;
  format: ImageFormat;
  virtualSize: number;
  fileSize: number;
  /** qcow2 only */
  version?: number;
  clusterSize?: number;
  compressionType?: 'zlib' | 'zstd';
  extendedL2?: boolean;
  /** Backing file name as written in the header, and its format if given. */
  backingFile?: string;
  backingFormat?: string;
  /** Host bytes used by data clusters of this layer (qcow2), or file size (raw). */
  allocatedBytes: number;
}

export interface DiskImage {
  readonly format: ImageFormat;
  readonly name: string;
  /** Guest-visible size in bytes. */
  readonly virtualSize: number;
  /**
   * Guest-visible bytes [offset, offset+length). Ranges past virtualSize are
   * an error (callers clamp).
   */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * Optional: like read(), but into target[targetOffset, targetOffset + length),
   * so callers can reuse buffers (see ByteSource.readInto).
   */
  readInto?(offset: number, length: number, target: Buffer, targetOffset: number): Promise<void>;
  /**
   * Allocation extents covering [offset, offset+length), in order, adjacent
   * extents merged when both their kind and their depth match.
   */
  extents(offset: number, length: number): Promise<ImageExtent[]>;
  /** The chain, this image first. */
  layers(): LayerInfo[];
  /** Hex SHA-256 identity; see src/image/identity.ts for how it is formed. */
  readonly identity: string;
  close(): Promise<void>;
}

export interface OpenImageOptions {
  /** Force a format for the top image instead of probing. */
  format?: ImageFormat;
  /** Open qcow2 images whose corrupt bit is set. */
  force?: boolean;
  /** Maximum backing chain depth (default 16). */
  maxChainDepth?: number;
}
