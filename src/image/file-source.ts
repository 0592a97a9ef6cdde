import { open, realpath, statfs, type FileHandle } from 'node:fs/promises';
import { fstatSync, type BigIntStats } from 'node:fs';
import { dirname, isAbsolute, resolve, sep } from 'node:path';
import { BackingChainError, BootcacheError, ImageChangedError, StorageIOError, StorageReadError, fromSystemError } from '../errors.js';
import type { ByteSource, SourceOpener } from './types.js';

/**
 * A local file as a ByteSource over the version it was opened on. Each read
 * is followed by an fstat of the open descriptor: when device, inode, size,
 * mtime or ctime differ from the open's, the file was rewritten (or
 * truncated) under us and the read fails with ImageChangedError instead of
 * returning bytes that may be of either version. A writer updates mtime and
 * ctime before it copies data (write(2)), so an fstat that started after
 * the read finished sees any write whose bytes the read returned. Replacing
 * the file by rename is no change here: the descriptor keeps the old inode.
 * Other metadata changes (chmod, chown, a rename of the file) move the
 * ctime, and count as a change: they cannot be told from a rewrite that
 * restored the mtime.
 *
 * On a local file system the fstat is synchronous (a few µs: the inode of an
 * open file is in memory); on any other (NFS, FUSE, ...) it may wait on the
 * network, so it runs on the thread pool, shared by the reads finishing together.
 */
export class FileByteSource implements ByteSource {
  /** Set once a check saw another version: every later read fails at once. */
  private changed: ImageChangedError | undefined;
  /** The fstat that reads finishing now share (see verify). */
  private nextCheck: Promise<void> | undefined;
  /** Reads between their first pread and their check. */
  private reading = 0;

  private constructor(
    readonly name: string,
    readonly size: number,
    readonly stamp: string,
    readonly version: string,
    private readonly handle: FileHandle,
    /** fstat on the event loop (a local file system, see LOCAL_FS_TYPES). */
    private readonly syncCheck: boolean,
    readonly modifiedMs?: number,
  ) {}

  static async open(path: string): Promise<FileByteSource> {
    let handle: FileHandle;
    try {
      handle = await open(path, 'r');
    } catch (err) {
      throw fromSystemError(err, path, 'opening');
    }
    try {
      const st = await handle.stat({ bigint: true });
      if (!st.isFile() && !st.isBlockDevice()) {
        throw new StorageIOError('not a regular file', { file: path });
      }
      const local = await statfs(path).then((fs) => LOCAL_FS_TYPES.has(fs.type >>> 0), () => false);
      return new FileByteSource(path, Number(st.size), fileStamp(st), fileVersion(st), handle, local, Number(st.mtimeMs));
    } catch (err) {
      await handle.close();
      throw fromSystemError(err, path, 'opening');
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.checkRange(offset, length);
    const buf = Buffer.allocUnsafe(length);
    await this.readInto(offset, length, buf, 0);
    return buf;
  }

  async readInto(offset: number, length: number, target: Buffer, targetOffset: number): Promise<void> {
    if (this.changed) throw this.changed;
    this.checkRange(offset, length);
    checkTarget(target, targetOffset, length);
    this.reading++;
    let done = 0;
    try {
      while (done < length) {
        let bytesRead: number;
        try {
          ({ bytesRead } = await this.handle.read(target, targetOffset + done, length - done, offset + done));
        } catch (err) {
          // A rewrite (a truncation) can fail the read: then that is the error to report.
          await this.verify();
          throw readFailure(err, this.name, `reading at offset ${offset + done}`);
        }
        if (bytesRead === 0) {
          await this.verify(); // a shrink changes the size: ImageChangedError
          throw new StorageReadError(`file ended early while reading at offset ${offset + done}`, { file: this.name });
        }
        done += bytesRead;
      }
    } finally {
      this.reading--;
    }
    await this.verify();
  }

  /**
   * Throws ImageChangedError unless the file is still the version opened.
   * Reads that finish before the next fstat starts share it: one fstat per
   * batch of concurrent reads, each checked by an fstat issued after it.
   * With other reads in flight the fstat waits for the end of the event
   * loop's poll phase, so that reads completing in the same turn join it.
   */
  private verify(): Promise<void> {
    if (this.changed) return Promise.reject(this.changed);
    if (this.syncCheck) {
      try {
        this.check(fstatSync(this.handle.fd, { bigint: true }));
        return Promise.resolve();
      } catch (err) {
        return Promise.reject(readFailure(err, this.name, 'checking the version'));
      }
    }
    if (!this.nextCheck) {
      const start = this.reading > 0 ? new Promise<void>((resolve) => setImmediate(resolve)) : Promise.resolve();
      this.nextCheck = start.then(async () => {
        this.nextCheck = undefined; // reads finishing from now on need a later fstat
        let st: BigIntStats;
        try {
          st = await this.handle.stat({ bigint: true });
        } catch (err) {
          throw readFailure(err, this.name, 'checking the version');
        }
        this.check(st);
      });
    }
    return this.nextCheck;
  }

  /** Throws ImageChangedError when `st` (of the open descriptor) is another version than the one opened. */
  private check(st: BigIntStats): void {
    if (!this.changed && fileVersion(st) !== this.version) {
      // Unlinked or replaced by rename: the unlink moved only the ctime, and no path leads to this file for a writer any more.
      if (st.nlink === 0n && fileStamp(st) === this.stamp) return;
      this.changed = new ImageChangedError(
        `changed on storage since it was opened (version ${this.version}, now ${fileVersion(st)}); the version opened can no longer be read`,
        { file: this.name },
      );
    }
    if (this.changed) throw this.changed;
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new StorageIOError(
        `read of ${length} bytes at offset ${offset} is past the end of the file (${this.size} bytes)`,
        { file: this.name },
      );
    }
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}

/** The portable identity stamp of a file: size and mtime in ns (see ObjectStat.stamp). */
export function fileStamp(st: BigIntStats): string {
  return `${st.size}:${st.mtimeNs}`;
}

/** The version of a file on this host: device, inode, size, mtime and ctime in ns (see ObjectStat.version). */
export function fileVersion(st: BigIntStats): string {
  return `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`;
}

/**
 * statfs(2) f_type values of local file systems, whose fstat of an open file
 * never waits on a device or a network (Linux include/uapi/linux/magic.h).
 */
const LOCAL_FS_TYPES = new Set([
  0xef53, // EXT4_SUPER_MAGIC (also ext2, ext3)
  0x58465342, // XFS_SUPER_MAGIC
  0x9123683e, // BTRFS_SUPER_MAGIC
  0xf2f52010, // F2FS_SUPER_MAGIC
  0x01021994, // TMPFS_MAGIC
  0x858458f6, // RAMFS_MAGIC
  0x794c7630, // OVERLAYFS_SUPER_MAGIC
]);

/** Errnos that a second attempt cannot change: reported as they are, never retried. */
const PERMANENT_ERRNOS = new Set(['ENOENT', 'EISDIR', 'EACCES', 'EPERM', 'EBADF', 'EINVAL', 'ESTALE']);

/** A failed read request: StorageReadError (worth a retry) unless its errno says it is permanent. */
function readFailure(err: unknown, file: string, doing: string): BootcacheError {
  if (err instanceof BootcacheError) return err;
  const errno = (err as NodeJS.ErrnoException)?.code;
  if (errno !== undefined && PERMANENT_ERRNOS.has(errno)) return fromSystemError(err, file, doing);
  return new StorageReadError(`${(err as Error)?.message ?? String(err)} (while ${doing})`, { file, cause: err });
}

/** Throws RangeError (a caller bug) unless target[targetOffset, targetOffset + length) exists. */
export function checkTarget(target: Uint8Array, targetOffset: number, length: number): void {
  if (!Number.isSafeInteger(targetOffset) || targetOffset < 0 || targetOffset + length > target.length) {
    throw new RangeError(`${length} bytes at offset ${targetOffset} do not fit in a ${target.length}-byte buffer`);
  }
}

type ReadIntoFn = NonNullable<ByteSource['readInto']>;

/**
 * Whether `from.readInto` may stand in for `from.read`: it must be defined
 * no further up the prototype chain than read(). A wrapper made with
 * Object.create(inner) that overrides only read() (to count, delay or fail
 * reads) would otherwise be bypassed by the readInto it inherits.
 */
export function hasUsableReadInto<T extends Pick<ByteSource, 'read' | 'readInto'>>(
  from: T,
): from is T & { readInto: ReadIntoFn } {
  if (typeof from.readInto !== 'function') return false;
  for (let o: object | null = from; o !== null; o = Object.getPrototypeOf(o) as object | null) {
    if (Object.prototype.hasOwnProperty.call(o, 'readInto')) return true;
    if (Object.prototype.hasOwnProperty.call(o, 'read')) return false;
  }
  return false;
}

/**
 * Reads `length` bytes at `offset` of `from` into target[targetOffset ...]:
 * with readInto when `from` has a usable one, else read() and a copy.
 */
export async function readSourceInto(
  from: Pick<ByteSource, 'read' | 'readInto'>,
  offset: number,
  length: number,
  target: Buffer,
  targetOffset: number,
): Promise<void> {
  if (hasUsableReadInto(from)) return from.readInto(offset, length, target, targetOffset);
  checkTarget(target, targetOffset, length);
  const data = await from.read(offset, length);
  if (data.length !== length) {
    throw new StorageIOError(`read of ${length} bytes at offset ${offset} returned ${data.length} bytes`, { file: (from as { name?: string }).name });
  }
  data.copy(target, targetOffset);
}

/** Resolves backing file names on the local file system. */
export const fileSourceOpener: SourceOpener = {
  async openRelative(from, name) {
    // Joined without normalising: "sub/../x" needs "sub" to exist, as it does for QEMU and the kernel.
    const path = isAbsolute(name) ? name : `${resolve(dirname(from.name))}${sep}${name}`;
    let key: string;
    try {
      key = await realpath(path);
    } catch (err) {
      throw new BackingChainError(`backing file ${JSON.stringify(name)} not found (resolved to ${path})`, {
        file: from.name,
        cause: err,
      });
    }
    return { source: await FileByteSource.open(path), key };
  },
};
