/**
 * Small file helpers for the cache device: positional writes on the
 * callback API (cheaper than FileHandle's), and the directory lock.
 */
import { write } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { link, open, readdir, readFile, realpath, unlink, writeFile, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
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
 *
 * The pid is written to a private file first and hard-linked into place
 * (link(2) fails if the lock exists), so a lock is never seen empty: an
 * empty lock, read between create and write, looked stale and let a second
 * process take over a live cache.
 */
export async function acquireLock(path: string, dir: string): Promise<void> {
  const mine = `${path}.${process.pid}.${randomBytes(6).toString('hex')}${LOCK_TEMP_SUFFIX}`;
  try {
    await writeFile(mine, `${process.pid}\n`, { mode: 0o644, flag: 'wx' });
  } catch (err) {
    throw fromSystemError(err, path, 'locking the cache directory');
  }
  try {
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        await link(mine, path);
        heldLocks.add(await lockKey(path));
        return;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw fromSystemError(err, path, 'locking the cache directory');
      }
      const owner = await lockOwner(path);
      if (owner === process.pid && heldLocks.has(await lockKey(path))) {
        throw new AgentError(`cache directory ${dir} is in use by this process (opened twice)`);
      }
      // Our own pid without our hold: a previous process that had this pid (pid 1 in a container, killed), so stale.
      if (owner !== undefined && owner !== process.pid && isRunning(owner)) {
        throw new AgentError(`cache directory ${dir} is in use by process ${owner}`);
      }
      await unlink(path).catch((err: unknown) => {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw fromSystemError(err, path, 'removing a stale cache lock');
      });
    }
    throw new AgentError(`cache directory ${dir}: could not take the lock ${path}`);
  } finally {
    await unlink(mine).catch(() => undefined);
  }
}

/** Suffix of the private files acquireLock links into place; one left by a crash is removed by removeStaleLockTemps. */
const LOCK_TEMP_SUFFIX = '.lock-tmp';

/** Removes lock temp files (see acquireLock) of processes that no longer run. */
export async function removeStaleLockTemps(dir: string, lockName: string): Promise<void> {
  const names = await readdir(dir).catch(() => [] as string[]);
  await Promise.all(names.map(async (name) => {
    // LOCK.PID.HEX.lock-tmp
    if (!name.startsWith(`${lockName}.`) || !name.endsWith(LOCK_TEMP_SUFFIX)) return;
    const pid = name.slice(lockName.length + 1).split('.')[0] ?? '';
    if (/^\d+$/.test(pid) && !isRunning(Number(pid))) await unlink(join(dir, name)).catch(() => undefined);
  }));
}

/** The pid in a lock file, or undefined when there is none or it is unreadable. */
async function lockOwner(path: string): Promise<number | undefined> {
  const owner = Number.parseInt((await readIfExists(path, 'reading the cache lock'))?.toString('latin1') ?? '', 10);
  return Number.isSafeInteger(owner) && owner > 0 ? owner : undefined;
}

/** True when the lock file holds this process's pid. */
export async function holdsLock(path: string): Promise<boolean> {
  return (await lockOwner(path).catch(() => undefined)) === process.pid;
}

/** Removes the lock if it is still this process's (never one another process took over). */
export async function releaseLock(path: string): Promise<void> {
  const key = await lockKey(path);
  const owner = await lockOwner(path).catch(() => undefined);
  heldLocks.delete(key);
  if (owner !== undefined && owner !== process.pid) return;
  await unlink(path).catch(() => undefined);
}

/** Locks this process holds, by lockKey: tells a second open here from a lock a previous process with our pid left. */
const heldLocks = new Set<string>();

/** A lock's identity whichever path names it: its directory's real path. */
async function lockKey(path: string): Promise<string> {
  const dir = await realpath(dirname(path)).catch(() => resolve(dirname(path)));
  return join(dir, basename(path));
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
