/**
 * Small file helpers for the cache device: positional writes on the
 * callback API (cheaper than FileHandle's), and the directory lock.
 */
import { write } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { link, open, readdir, readFile, realpath, rm, stat, unlink, writeFile, type FileHandle } from 'node:fs/promises';
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
 * Takes the cache directory's lock file. It holds the owner's pid and a
 * random token ("PID TOKEN\n"); a lock whose pid no longer runs (kill -9) is
 * taken over.
 *
 * The lock is written to a private file first and hard-linked into place
 * (link(2) fails if the lock exists), so a lock is never seen empty: an empty
 * lock, read between create and write, looked stale and let a second process
 * take over a live cache.
 *
 * A stale lock is replaced only under a takeover marker (LOCK.takeover,
 * created exclusively), and only if the lock still holds exactly what was
 * read as stale: two processes that both read the same dead pid would
 * otherwise both remove "the stale lock", the second one the lock the first
 * had just taken, and both run on one cache. The live lock is never moved or
 * removed by anyone but its owner. A marker left by a crash is stale when its
 * pid is dead, when it names this process but none of its acquires (pid 1 of
 * a killed container, restarted), or when it is older than TAKEOVER_STALE_MS
 * (a takeover takes microseconds). What remains open needs a kernel lock,
 * flock(2), which Node lacks without a native addon: a taker stalled past
 * TAKEOVER_STALE_MS inside its takeover, and pids across pid namespaces.
 * `hooks` exist for tests.
 */
export async function acquireLock(path: string, dir: string, hooks: { beforeTakeover?: () => Promise<void> } = {}): Promise<void> {
  const token = randomBytes(6).toString('hex');
  const content = `${process.pid} ${token}\n`;
  const mine = join(dirname(path), `${basename(path)}.${process.pid}.${token}${LOCK_TEMP_SUFFIX}`);
  const key = await lockKey(path);
  ownAcquires.set(mine, content);
  try {
    await writeFile(mine, content, { mode: 0o644, flag: 'wx' });
  } catch (err) {
    ownAcquires.delete(mine);
    throw fromSystemError(err, path, 'locking the cache directory');
  }
  // Long enough to outlast a takeover marker that is about to turn stale.
  const deadline = Date.now() + TAKEOVER_STALE_MS + 1000;
  try {
    for (let attempt = 0; attempt < 5 || Date.now() < deadline; attempt++) {
      try {
        await link(mine, path);
        heldLocks.set(key, content); // no await between the link and this: a second open here sees the hold
        return;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw fromSystemError(err, path, 'locking the cache directory');
      }
      const seen = await readLock(path);
      if (seen === undefined) continue; // released meanwhile
      const owner = pidOf(seen);
      if (owner === process.pid && heldLocks.has(key)) {
        throw new AgentError(`cache directory ${dir} is in use by this process (opened twice)`);
      }
      // Our own pid without our hold: a previous process that had this pid (pid 1 in a container, killed), so stale.
      if (owner !== undefined && owner !== process.pid && isRunning(owner)) {
        throw new AgentError(`cache directory ${dir} is in use by process ${owner}`);
      }
      await hooks.beforeTakeover?.();
      await removeStaleLock(path, seen, mine, content);
    }
    throw new AgentError(`cache directory ${dir}: could not take the lock ${path}`);
  } finally {
    await unlink(mine).catch(() => undefined);
    ownAcquires.delete(mine);
  }
}

/**
 * This process's acquireLock calls in progress: temp file path -> the lock
 * contents it links. A temp file or takeover marker with our pid that none of
 * them owns is a dead predecessor's (pid 1 restarted).
 */
const ownAcquires = new Map<string, string>();

/** A takeover marker older than this is stale whatever its pid (see acquireLock). */
const TAKEOVER_STALE_MS = 5000;

/**
 * Removes the lock at `path` if it still holds `stale`, under the takeover
 * marker (linked from `mine`, so it is never seen empty); returns without
 * removing anything when another process is taking over (the caller tries
 * again).
 */
async function removeStaleLock(path: string, stale: string, mine: string, content: string): Promise<void> {
  const marker = `${path}.takeover`;
  try {
    await link(mine, marker);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw fromSystemError(err, marker, 'taking over a stale cache lock');
    const other = await readLock(marker);
    if (other === undefined) return; // gone meanwhile
    const otherPid = pidOf(other);
    // ctime: link(2) sets it when the marker is made (its mtime is the temp file's).
    const age = await stat(marker).then((st) => Date.now() - st.ctimeMs, () => 0);
    const dead = otherPid === undefined || (otherPid === process.pid ? ![...ownAcquires.values()].includes(other) : !isRunning(otherPid));
    if (dead || age > TAKEOVER_STALE_MS) {
      // Only the marker we judged stale: one that replaced it meanwhile stays.
      if ((await readLock(marker)) === other) await unlink(marker).catch(() => undefined);
    } else {
      await new Promise((resolve) => setTimeout(resolve, 10)); // let the other takeover finish
    }
    return;
  }
  try {
    if ((await readLock(path)) === stale) {
      await unlink(path).catch((err: unknown) => {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw fromSystemError(err, path, 'removing a stale cache lock');
      });
    }
  } finally {
    // Ours only: if ours was judged stale and replaced (a stall past TAKEOVER_STALE_MS), the new one stays.
    if ((await readLock(marker).catch(() => undefined)) === content) await unlink(marker).catch(() => undefined);
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
    if (!/^\d+$/.test(pid)) return;
    // Our own pid: a previous process's (pid 1 restarted) unless this process is using it.
    const stale = Number(pid) === process.pid ? !ownAcquires.has(join(dir, name)) : !isRunning(Number(pid));
    if (stale) await unlink(join(dir, name)).catch(() => undefined);
  }));
}

/** A lock file's contents, or undefined when there is none. */
async function readLock(path: string): Promise<string | undefined> {
  return (await readIfExists(path, 'reading the cache lock'))?.toString('latin1');
}

/** The pid a lock's contents name, or undefined when they name none. */
function pidOf(lock: string): number | undefined {
  const pid = Number.parseInt(lock, 10);
  return Number.isSafeInteger(pid) && pid > 0 ? pid : undefined;
}

/** True when the lock file holds the lock this process took. */
export async function holdsLock(path: string): Promise<boolean> {
  const mine = heldLocks.get(await lockKey(path));
  return mine !== undefined && (await readLock(path).catch(() => undefined)) === mine;
}

/** Removes the lock if it is still the one this process took (never one another process took over). */
export async function releaseLock(path: string): Promise<void> {
  const key = await lockKey(path);
  const mine = heldLocks.get(key);
  if (mine === undefined) return;
  try {
    if ((await readLock(path).catch(() => undefined)) === mine) await unlink(path).catch(() => undefined);
  } finally {
    // Only now: a reopen here during the release sees the hold ("opened twice"), not a stale lock to take over.
    if (heldLocks.get(key) === mine) heldLocks.delete(key);
  }
}

/** Locks this process holds, by lockKey, with their contents: tells a second open here from a lock a previous process with our pid left. */
const heldLocks = new Map<string, string>();

/** A lock's identity whichever path names it: its directory's real path. */
async function lockKey(path: string): Promise<string> {
  const dir = await realpath(dirname(path)).catch(() => resolve(dirname(path)));
  return join(dir, basename(path));
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
