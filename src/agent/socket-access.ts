/**
 * Who may connect to the agent's unix sockets. Connecting to a unix socket
 * needs write permission on it (unix(7)), so the mode and group decide which
 * users (e.g. the one QEMU or libvirt runs as) can use the exports.
 */
import { execFile } from 'node:child_process';
import { chmod, chown, lstat, readFile, unlink } from 'node:fs/promises';
import { connect } from 'node:net';
import { AgentError, UsageError } from '../errors.js';

/**
 * The gid of a group given by name or as a number. Names are looked up with
 * getent(1), so groups from NSS (LDAP, sssd) resolve as for any other tool;
 * `groupFile` (tests) reads a group(5) file instead. `label` names the
 * setting in errors ("--socket-group", "config: socketGroup").
 */
export async function resolveGroup(group: string, groupFile?: string, label = 'socket group'): Promise<number> {
  if (/^\d+$/.test(group)) return Number(group);
  const entry = groupFile === undefined ? await getentGroup(group, label) : await groupFileEntry(group, groupFile, label);
  // group(5): name:password:GID:members
  const gid = entry?.split(':')[2];
  if (gid === undefined || !/^\d+$/.test(gid)) {
    throw new UsageError(`${label}: no group named ${JSON.stringify(group)}${groupFile === undefined ? '' : ` in ${groupFile}`}`);
  }
  return Number(gid);
}

/** `getent group NAME`'s line, or undefined when there is no such group (exit status 2). */
function getentGroup(group: string, label: string): Promise<string | undefined> {
  return new Promise((resolve, reject) => {
    execFile('getent', ['group', group], { timeout: 10_000 }, (err, stdout) => {
      if (!err) return resolve(stdout.trim().split('\n')[0]);
      if (typeof err.code === 'number') return resolve(undefined);
      reject(new UsageError(`${label}: cannot look up group ${JSON.stringify(group)} with getent (${err.code ?? err.message})`));
    });
  });
}

async function groupFileEntry(group: string, groupFile: string, label: string): Promise<string | undefined> {
  let text: string;
  try {
    text = await readFile(groupFile, 'utf8');
  } catch (err) {
    throw new UsageError(`${label}: cannot read ${groupFile} to look up group ${JSON.stringify(group)} (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  return text.split('\n').find((line) => line.split(':')[0] === group);
}

/** Sets the socket's permission bits, and its group when `gid` is given. */
export async function applySocketAccess(path: string, mode: number, gid?: number): Promise<void> {
  try {
    if (gid !== undefined) await chown(path, -1, gid);
    await chmod(path, mode);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new AgentError(`cannot set the access of socket ${path} (${e.code ?? 'error'}: ${e.message})`, { cause: err });
  }
}

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
