/**
 * The storage system that holds images and their sidecars (.bcmap, .bcseg).
 *
 * Async and range-based so that an S3-compatible object store (ETag as the
 * stamp, ranged GETs, PUT as the atomic publish) fits behind the same
 * interface as a local directory or an NFS mount. Keys are '/'-separated
 * relative paths; no file descriptors cross this interface.
 */
import type { ByteSource } from '../image/types.js';

export interface ObjectStat {
  key: string;
  size: number;
  /**
   * Portable identity stamp: size and mtime (files) or ETag (objects). It
   * survives a copy that keeps mtimes, so maps and segments stay valid.
   */
  stamp: string;
  /**
   * This very version on this storage: device, inode, size, mtime and ctime
   * in ns (files) or ETag (objects). Any rewrite changes it, also one that
   * restores the mtime.
   */
  version: string;
  /** When this version was written (ms since the epoch), when the storage says. */
  modifiedMs?: number;
}

/** Conditions of a put. */
export interface PutOptions {
  /**
   * Replace the object only while it is this version (ObjectStat.version);
   * null: create it only when it does not exist. Otherwise ConflictError.
   */
  ifVersion?: string | null;
}

/** How to open a source: what an object store can save a round trip on. */
export interface OpenOptions {
  /**
   * Bytes from the start the caller reads first (a header). An object store
   * opens with one ranged GET of them instead of a HEAD, and the source serves
   * reads inside them from memory. A file storage ignores it.
   */
  head?: number;
  /**
   * The version the caller has seen (a stat, or a source it opened before):
   * an object store opens with no request, and a read of another version
   * fails with ImageChangedError as usual. A file storage ignores it.
   */
  known?: ObjectStat;
}

export interface Storage {
  /** Human-readable location, e.g. "dir:/srv/images". */
  readonly description: string;
  /** undefined when the object does not exist. */
  stat(key: string): Promise<ObjectStat | undefined>;
  /** Exactly `length` bytes at `offset` (one request). */
  read(key: string, offset: number, length: number): Promise<Buffer>;
  /** The whole object (meant for small objects: maps, segment headers). */
  get(key: string): Promise<Buffer>;
  /**
   * Atomically publishes `body` under `key`: readers see the old object or
   * the new one, never a part; concurrent writers never interleave. A
   * conditional put (options.ifVersion) takes only a Buffer.
   */
  put(key: string, body: Buffer | AsyncIterable<Buffer>, options?: PutOptions): Promise<ObjectStat>;
  /** Objects whose key starts with `prefix`, sorted by key. */
  list(prefix?: string): Promise<ObjectStat[]>;
  /**
   * A ByteSource over one version of the object (ranged reads): once the
   * object changes, its reads fail with ImageChangedError.
   */
  openSource(key: string, options?: OpenOptions): Promise<ByteSource>;
  /**
   * Optional: checks at start that the storage can be used at all (the
   * bucket exists, the credentials are accepted); throws a one-line error.
   */
  ready?(): Promise<void>;
  /** Set when openSource honours OpenOptions.head (one ranged GET for open and head): the open is then a read request. */
  readonly opensWithHead?: boolean;
  /** Opens `name` relative to the directory of `fromKey` (qcow2 backing files). */
  resolveRelative(fromKey: string, name: string): string;
}
