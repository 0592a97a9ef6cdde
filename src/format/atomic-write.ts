/**
 * Crash-safe file replacement: write a temp file in the target's directory,
 * fsync it, rename it over the target, fsync the directory. Readers see the
 * old file or the new one, never a partial one; on any error the temp file is
 * removed.
 */
import { randomBytes } from 'node:crypto';
import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { OutputError } from '../errors.js';

/** Temp files are named `.<target name>.tmp-<pid>-<random>` next to the target. */
export function tempPathFor(target: string): string {
  return join(dirname(target), `.${basename(target)}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`);
}

/** True for names made by tempPathFor (used by tests and clean-up tools). */
export function isTempName(name: string): boolean {
  return /^\..+\.tmp-\d+-[0-9a-f]{12}$/.test(name);
}

/**
 * A file being written in place of `target`. Write with positional writes,
 * then commit() (or abort()). Exactly one of the two must be called.
 */
export class AtomicFile {
  private state: 'open' | 'committed' | 'aborted' = 'open';
  private pendingSync: Promise<void> | undefined;

  private constructor(
    readonly target: string,
    readonly tempPath: string,
    private readonly handle: FileHandle,
  ) {}

  static async create(target: string): Promise<AtomicFile> {
    const tempPath = tempPathFor(target);
    let handle: FileHandle;
    try {
      handle = await open(tempPath, 'wx', 0o644);
    } catch (err) {
      throw OutputError.from(err, target, 'creating a temporary file next to it');
    }
    return new AtomicFile(target, tempPath, handle);
  }

  /** Writes all of `data` at `position`. */
  async write(data: Uint8Array, position: number): Promise<void> {
    this.checkOpen();
    try {
      let done = 0;
      while (done < data.length) {
        const { bytesWritten } = await this.handle.write(data, done, data.length - done, position + done);
        done += bytesWritten;
      }
    } catch (err) {
      throw OutputError.from(err, this.target, `writing at offset ${position}`);
    }
  }

  /** Writes the buffers back to back starting at `position`. */
  async writev(buffers: readonly Uint8Array[], position: number): Promise<void> {
    this.checkOpen();
    let total = 0;
    for (const b of buffers) total += b.length;
    try {
      const { bytesWritten } = await this.handle.writev(buffers as Uint8Array[], position);
      if (bytesWritten === total) return;
    } catch (err) {
      throw OutputError.from(err, this.target, `writing at offset ${position}`);
    }
    // Short vectored write: fall back to one write per buffer (rare).
    let offset = position;
    for (const b of buffers) {
      await this.write(b, offset);
      offset += b.length;
    }
  }

  /**
   * Starts flushing the data written so far to disk without waiting for it,
   * so that the final fsync has less left to do. At most one runs at a time.
   */
  startBackgroundSync(): void {
    if (this.state !== 'open' || this.pendingSync) return;
    this.pendingSync = this.handle.datasync().then(
      () => {
        this.pendingSync = undefined;
      },
      () => {
        // The final fsync in commit() reports any real error.
        this.pendingSync = undefined;
      },
    );
  }

  /** fsync, close, rename over the target, fsync the directory. */
  async commit(): Promise<void> {
    this.checkOpen();
    try {
      await this.pendingSync;
      await this.handle.sync();
    } catch (err) {
      await this.abort();
      throw OutputError.from(err, this.target, 'flushing to disk');
    }
    this.state = 'committed';
    try {
      await this.handle.close();
      await rename(this.tempPath, this.target);
    } catch (err) {
      await unlink(this.tempPath).catch(() => undefined);
      throw OutputError.from(err, this.target, 'replacing the file');
    }
    await syncDirectory(dirname(this.target));
  }

  /** Closes and removes the temp file. Safe to call more than once; never throws. */
  async abort(): Promise<void> {
    if (this.state !== 'open') return;
    this.state = 'aborted';
    await this.pendingSync?.catch(() => undefined);
    await this.handle.close().catch(() => undefined);
    await unlink(this.tempPath).catch(() => undefined);
  }

  private checkOpen(): void {
    if (this.state !== 'open') throw new Error(`atomic write of ${this.target} is already ${this.state}`);
  }
}

/**
 * Runs `fn` on a new AtomicFile for `target` and commits it; if `fn` throws,
 * the temp file is removed and the target is left untouched.
 */
export async function withAtomicFile<T>(target: string, fn: (file: AtomicFile) => Promise<T>): Promise<T> {
  const file = await AtomicFile.create(target);
  let result: T;
  try {
    result = await fn(file);
  } catch (err) {
    await file.abort();
    throw err;
  }
  await file.commit();
  return result;
}

/** Replaces `target` with `data` (one buffer, or several written back to back). */
export async function writeFileAtomic(target: string, data: Uint8Array | readonly Uint8Array[]): Promise<void> {
  const buffers = data instanceof Uint8Array ? [data] : data;
  await withAtomicFile(target, async (file) => {
    let offset = 0;
    for (const b of buffers) {
      await file.write(b, offset);
      offset += b.length;
    }
  });
}

/** fsync a directory so a rename in it is durable. */
async function syncDirectory(dir: string): Promise<void> {
  let handle: FileHandle | undefined;
  try {
    handle = await open(dir, 'r');
    await handle.sync();
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // Some file systems cannot fsync directories; the rename itself has happened.
    if (code !== 'EINVAL' && code !== 'ENOTSUP' && code !== 'EISDIR') {
      throw OutputError.from(err, dir, 'flushing the directory to disk');
    }
  } finally {
    await handle?.close().catch(() => undefined);
  }
}
