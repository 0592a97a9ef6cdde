/**
 * Who may connect to the agent's unix sockets. Connecting to a unix socket
 * needs write permission on it (unix(7)), so the mode and group decide which
 * users (e.g. the one QEMU or libvirt runs as) can use the exports.
 */
import { execFile } from 'node:child_process';
import { chmod, chown, readFile } from 'node:fs/promises';
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
