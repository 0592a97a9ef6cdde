/**
 * The cache directory's lock: an exclusive flock(2) on DIR/cache.lock.
 *
 * The kernel drops an flock when the last descriptor of its open file
 * description closes, so the lock dies with its holder: a kill -9 frees it
 * at once, and a pid reused after a reboot blocks nothing. Node has no flock
 * call, so flock(1) (util-linux) is handed our descriptor as its fd 3, locks
 * that open file description and exits; the lock then lives exactly as long
 * as our descriptor. Chosen over an abstract unix socket, which is per
 * network namespace (no exclusion between containers sharing a cache volume)
 * and whose name any local user can bind first, and over a native addon.
 *
 * The file holds the holder's pid, for humans and for the refusal message;
 * nothing decides by it.
 */
import { spawn } from 'node:child_process';
import { constants } from 'node:fs';
import { open, realpath, stat, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { AgentError, fromSystemError } from '../../errors.js';

interface HeldLock {
  handle: FileHandle | undefined;
  /** The lock file's real path (see lockPathKey). */
  path: string;
}

/** Locks this process holds or is taking, by the lock file's dev:ino: tells a second open of one directory here from another process's hold. */
const heldLocks = new Map<string, HeldLock>();

/** flock(1)'s exit status when the file is locked by someone else (its --conflict-exit-code). */
const FLOCK_CONFLICT = 75;

/** Tries to open and lock: a holder may release (remove) the file between our open and our flock. */
const ATTEMPTS = 5;

/**
 * Takes the lock on `path` (the lock file of cache directory `dir`). A lock
 * held by another process is an AgentError naming the pid its file holds; a
 * second take by this process is "opened twice".
 */
export async function acquireLock(path: string, dir: string): Promise<void> {
  const realPath = await lockPathKey(path);
  for (let attempt = 0; attempt < ATTEMPTS; attempt++) {
    let handle: FileHandle;
    try {
      // 0600: any process that can open the file can flock it, and so keep the agent from starting.
      handle = await open(path, constants.O_RDWR | constants.O_CREAT | constants.O_NOFOLLOW, 0o600);
    } catch (err) {
      throw fromSystemError(err, path, 'locking the cache directory');
    }
    let reserved: string | undefined;
    let kept = false;
    try {
      const st = await handle.stat();
      const key = `${st.dev}:${st.ino}`;
      // No await between this check and the set: a concurrent take here sees the hold.
      if (heldLocks.has(key)) throw new AgentError(`cache directory ${dir} is in use by this process (opened twice)`);
      heldLocks.set(key, { handle: undefined, path: realPath });
      reserved = key;
      if (!(await flockExclusive(handle))) {
        if (!(await namesInode(path, st.dev, st.ino))) continue; // released and removed meanwhile: try the new file
        const pid = Number.parseInt(await handle.readFile({ encoding: 'latin1' }).catch(() => ''), 10);
        const owner = Number.isSafeInteger(pid) && pid > 0 ? `process ${pid}` : 'another process';
        throw new AgentError(`cache directory ${dir} is in use by ${owner}`);
      }
      // Locked an inode the previous holder had already unlinked: it locks nothing any more.
      if (!(await namesInode(path, st.dev, st.ino))) continue;
      await handle.truncate(0);
      await handle.write(`${process.pid}\n`, 0, 'latin1');
      heldLocks.set(key, { handle, path: realPath });
      kept = true;
      return;
    } catch (err) {
      throw fromSystemError(err, path, 'locking the cache directory');
    } finally {
      if (!kept) {
        if (reserved !== undefined) heldLocks.delete(reserved);
        await handle.close().catch(() => undefined);
      }
    }
  }
  throw new AgentError(`cache directory ${dir}: could not take the lock ${path} (it was replaced ${ATTEMPTS} times while being taken)`);
}

/** True when this process holds the lock that `path` names now. */
export async function holdsLock(path: string): Promise<boolean> {
  const st = await stat(path).catch(() => undefined);
  const held = heldLocks.get(keyOf(st));
  return held?.handle !== undefined && held.path === (await lockPathKey(path));
}

/** Releases the lock on `path` if this process holds it: the file is removed while still locked, then closed. */
export async function releaseLock(path: string): Promise<void> {
  const realPath = await lockPathKey(path);
  for (const [key, held] of heldLocks) {
    if (held.path !== realPath || held.handle === undefined) continue;
    const st = await stat(path).catch(() => undefined);
    // Only our own file: one a human replaced stays.
    if (keyOf(st) === key) await unlink(path).catch(() => undefined);
    await held.handle.close().catch(() => undefined);
    heldLocks.delete(key);
    return;
  }
}

function keyOf(st: { dev: number; ino: number } | undefined): string {
  return st ? `${st.dev}:${st.ino}` : '';
}

async function namesInode(path: string, dev: number, ino: number): Promise<boolean> {
  const st = await stat(path).catch(() => undefined);
  return st !== undefined && st.dev === dev && st.ino === ino;
}

/** The lock file's path with its directory's symlinks resolved. */
async function lockPathKey(path: string): Promise<string> {
  const dir = await realpath(dirname(path)).catch(() => resolve(dirname(path)));
  return join(dir, basename(path));
}

/** flock -xn on the handle's open file description (see the module comment); false when another holds it. */
function flockExclusive(handle: FileHandle): Promise<boolean> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn('flock', ['--exclusive', '--nonblock', '--conflict-exit-code', String(FLOCK_CONFLICT), '3'], {
      stdio: ['ignore', 'ignore', 'pipe', handle.fd],
    });
    let stderr = '';
    child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
      if (stderr.length < 1000) stderr += chunk;
    });
    child.on('error', (err: NodeJS.ErrnoException) => {
      const why = err.code === 'ENOENT' ? 'flock(1) is not installed (util-linux)' : `cannot run flock(1): ${err.message}`;
      reject(new AgentError(`cannot lock the cache directory: ${why}`));
    });
    child.on('close', (code, signal) => {
      if (code === 0) resolvePromise(true);
      else if (code === FLOCK_CONFLICT) resolvePromise(false);
      else {
        const detail = stderr.trim().split('\n')[0] || (signal ? `killed by ${signal}` : `exit status ${code}`);
        reject(new AgentError(`cannot lock the cache directory: flock(1) failed: ${detail}`));
      }
    });
  });
}
