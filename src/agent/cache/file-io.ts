/**
 * Small file helpers for the cache device: positional writes on the
 * callback API (cheaper than FileHandle's), and the directory lock.
 */
import { constants, write } from 'node:fs';
import { open, readFile, unlink, type FileHandle } from 'node:fs/promises';
import { AgentError, fromSystemError } from '../../errors.js';

/** Writes all of buf at `position`. */
export function pwriteAll(fd: number, buf: Buffer, position: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (err: NodeJS.ErrnoException | null, n: number): void => {
      if (err) return reject(err);
      done += n;
      if (done === buf.length) resolve();
      else write(fd, buf, done, buf.length - done, position + done, step);
    };
    write(fd, buf, 0, buf.length, position, step);
  });
}

/** Writes the buffers back to back at `position`, resuming after short writes. */
export async function writevAll(handle: FileHandle, chunks: Buffer[], position: number): Promise<void> {
  let pending = chunks.filter((c) => c.length > 0);
  while (pending.length > 0) {
    const { bytesWritten } = await handle.writev(pending, position);
    position += bytesWritten;
    let skip = bytesWritten;
    const rest: Buffer[] = [];
    for (const c of pending) {
      if (skip >= c.length) skip -= c.length;
      else {
        rest.push(skip > 0 ? c.subarray(skip) : c);
        skip = 0;
      }
    }
    pending = rest;
  }
}

/** Up to n bytes from the start of the file, or undefined when it does not exist. */
export async function readHead(path: string, n: number): Promise<Buffer | undefined> {
  let handle: FileHandle;
  try {
    handle = await open(path, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw fromSystemError(err, path, 'reading');
  }
  try {
    const buf = Buffer.alloc(n);
    const { bytesRead } = await handle.read(buf, 0, n, 0);
    return buf.subarray(0, bytesRead);
  } catch (err) {
    throw fromSystemError(err, path, 'reading');
  } finally {
    await handle.close();
  }
}

/** The file's contents, or undefined when it does not exist. */
export async function readIfExists(path: string, doing: string): Promise<Buffer | undefined> {
  try {
    return await readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw fromSystemError(err, path, doing);
  }
}

/**
 * Takes the cache directory's lock file (it holds the owner's pid). A lock
 * left by a process that no longer runs (kill -9) is taken over.
 */
export async function acquireLock(path: string, dir: string): Promise<void> {
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const handle = await open(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o644);
      try {
        await handle.writeFile(`${process.pid}\n`);
      } finally {
        await handle.close();
      }
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw fromSystemError(err, path, 'locking the cache directory');
    }
    const owner = Number.parseInt((await readIfExists(path, 'reading the cache lock'))?.toString('latin1') ?? '', 10);
    if (Number.isSafeInteger(owner) && owner > 0 && isRunning(owner)) {
      const who = owner === process.pid ? 'this process (opened twice)' : `process ${owner}`;
      throw new AgentError(`cache directory ${dir} is in use by ${who}`);
    }
    await unlink(path).catch((err: unknown) => {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw fromSystemError(err, path, 'removing a stale cache lock');
    });
  }
  throw new AgentError(`cache directory ${dir}: could not take the lock ${path}`);
}

export async function releaseLock(path: string): Promise<void> {
  await unlink(path).catch(() => undefined);
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
