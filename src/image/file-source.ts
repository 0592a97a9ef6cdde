import { open, realpath, type FileHandle } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
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
    if (offset < 0 || length < 0 || offset + length > this.size) {
      throw new StorageIOError(
        `read of ${length} bytes at offset ${offset} is past the end of the file (${this.size} bytes)`,
        { file: this.name },
      );
    }
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      let bytesRead: number;
      try {
        ({ bytesRead } = await this.handle.read(buf, done, length - done, offset + done));
      } catch (err) {
        throw fromSystemError(err, this.name, `reading at offset ${offset + done}`);
      }
      if (bytesRead === 0) {
        throw new StorageIOError(`file shrank while reading at offset ${offset + done}`, { file: this.name });
      }
      done += bytesRead;
    }
    return buf;
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}

/** Resolves backing file names on the local file system. */
export const fileSourceOpener: SourceOpener = {
  async openRelative(from, name) {
    const path = isAbsolute(name) ? name : resolve(dirname(from.name), name);
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
