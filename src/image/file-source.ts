import { open, realpath, type FileHandle } from 'node:fs/promises';
import { dirname, isAbsolute, resolve, sep } from 'node:path';
import { BackingChainError, StorageIOError, fromSystemError } from '../errors.js';
import type { ByteSource, SourceOpener } from './types.js';

/** A local file as a ByteSource. */
export class FileByteSource implements ByteSource {
  private constructor(
    readonly name: string,
    readonly size: number,
    readonly stamp: string,
    private readonly handle: FileHandle,
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
      // Storage identity: size and mtime in nanoseconds (a rewrite changes mtime).
      return new FileByteSource(path, Number(st.size), `${st.size}:${st.mtimeNs}`, handle);
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
    this.checkRange(offset, length);
    checkTarget(target, targetOffset, length);
    let done = 0;
    while (done < length) {
      let bytesRead: number;
      try {
        ({ bytesRead } = await this.handle.read(target, targetOffset + done, length - done, offset + done));
      } catch (err) {
        throw fromSystemError(err, this.name, `reading at offset ${offset + done}`);
      }
      if (bytesRead === 0) {
        throw new StorageIOError(`file shrank while reading at offset ${offset + done}`, { file: this.name });
      }
      done += bytesRead;
    }
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
