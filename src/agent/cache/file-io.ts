/**
 * Small file helpers for the cache device: positional writes on the
 * callback API (cheaper than FileHandle's), reads of files that may be
 * missing, and process liveness for scratch directories.
 */
import { write } from 'node:fs';
import { open, readdir, readFile, rm, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { fromSystemError } from '../../errors.js';

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

/**
 * The buffers with neighbours in memory (views of one ArrayBuffer, each
 * starting where the previous ends) merged into one view: a segment chunk's
 * blocks stored in consecutive slots become one write instead of one iovec
 * per block (each iovec costs a conversion when the write is submitted).
 */
export function coalesceViews(chunks: Buffer[]): Buffer[] {
  const out: Buffer[] = [];
  let i = 0;
  while (i < chunks.length) {
    const first = chunks[i]!;
    let length = first.length;
    let j = i + 1;
    while (j < chunks.length && chunks[j]!.buffer === first.buffer && chunks[j]!.byteOffset === first.byteOffset + length) {
      length += chunks[j]!.length;
      j++;
    }
    out.push(j === i + 1 ? first : Buffer.from(first.buffer, first.byteOffset, length));
    i = j;
  }
  return out;
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

/** True while a process with this pid exists (EPERM: it exists, owned by someone else). */
export function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Removes the scratch directories under `parent` named `<prefix><pid>-…` whose
 * process is gone (SIGKILL, a second signal, OOM): the agent's and the
 * replay's warm-ups name theirs so. Never this process's own.
 */
export async function removeDeadProcessDirs(parent: string, prefix: string): Promise<void> {
  // Prefixes are fixed names of letters and dashes: nothing to escape.
  const pattern = new RegExp(`^${prefix}(\\d+)-`);
  const names = await readdir(parent).catch(() => [] as string[]);
  for (const name of names) {
    const pid = pattern.exec(name)?.[1];
    if (pid === undefined || Number(pid) === process.pid || isRunning(Number(pid))) continue;
    await rm(join(parent, name), { recursive: true, force: true }).catch(() => undefined);
  }
}
