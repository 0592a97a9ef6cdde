/**
 * Who may connect to the agent's unix sockets. Connecting to a unix socket
 * needs write permission on it (unix(7)), so the mode and group decide which
 * users (e.g. the one QEMU or libvirt runs as) can use the exports.
 */
import { chmod, chown, readFile } from 'node:fs/promises';
import { AgentError, UsageError } from '../errors.js';

/** The gid of a group given by name (looked up in /etc/group) or as a number. */
export async function resolveGroup(group: string, groupFile = '/etc/group'): Promise<number> {
  if (/^\d+$/.test(group)) return Number(group);
  let text: string;
  try {
    text = await readFile(groupFile, 'utf8');
  } catch (err) {
    throw new UsageError(`socketGroup: cannot read ${groupFile} to look up group ${JSON.stringify(group)} (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  // group(5): name:password:GID:members
  for (const line of text.split('\n')) {
    const [name, , gid] = line.split(':');
    if (name === group && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  throw new UsageError(`socketGroup: no group named ${JSON.stringify(group)} in ${groupFile}`);
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
