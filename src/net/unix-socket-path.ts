/**
 * Claiming a path for a unix socket to listen on, for any server of ours
 * (the NBD server, the agent's control socket): a stale socket is replaced,
 * anything else is refused.
 */
import { lstat, unlink } from 'node:fs/promises';
import { connect } from 'node:net';
import { AgentError } from '../errors.js';

/** sun_path holds 108 bytes with the terminating NUL (unix(7)); Node cuts longer paths short. */
export const MAX_SOCKET_PATH_BYTES = 107;

/**
 * Makes `path` ready for a unix socket to listen on. A stale socket (nobody
 * answers) is removed, and then true is returned. Anything else at the path
 * is refused, never removed: a regular file, a directory, or a socket in use.
 */
export async function claimSocketPath(path: string): Promise<boolean> {
  const bytes = Buffer.byteLength(path);
  if (bytes > MAX_SOCKET_PATH_BYTES) {
    throw new AgentError(`cannot listen on ${path}: the path is ${bytes} bytes, and a unix socket path can have at most ${MAX_SOCKET_PATH_BYTES}`);
  }
  let existing;
  try {
    existing = await lstat(path);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'ENOENT') return false;
    throw new AgentError(`cannot listen on ${path}: ${e.code === 'ENOTDIR' ? 'a parent is not a directory' : (e.code ?? e.message)}`, { cause: err });
  }
  if (!existing.isSocket()) throw new AgentError(`cannot listen on ${path}: the path exists and is not a socket`);
  if (await socketInUse(path)) throw new AgentError(`socket ${path} is already in use by another process (another agent?)`);
  await unlink(path).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== 'ENOENT') throw new AgentError(`cannot remove the stale socket ${path}: ${err.code ?? err.message}`, { cause: err });
  });
  return true;
}

/** Whether something answers on a unix socket; one that holds it without answering promptly counts as in use. */
function socketInUse(path: string): Promise<boolean> {
  return new Promise<boolean>((resolve, reject) => {
    const probe = connect({ path });
    const timer = setTimeout(() => {
      probe.destroy();
      resolve(true);
    }, 1000);
    probe.once('connect', () => {
      clearTimeout(timer);
      probe.destroy();
      resolve(true);
    });
    probe.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (err.code === 'ECONNREFUSED' || err.code === 'ENOENT') resolve(false);
      else reject(new AgentError(`cannot check socket ${path}: ${err.message}`, { cause: err }));
    });
  });
}
