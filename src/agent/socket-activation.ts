/**
 * Sockets passed by systemd (socket activation, sd_listen_fds(3)): the
 * listening sockets start at fd 3; LISTEN_FDS says how many, LISTEN_PID
 * that they are for this process, and LISTEN_FDNAMES names them
 * (FileDescriptorName= in the .socket unit), colon-separated.
 *
 * The agent takes a socket named `control` as its control socket, and every
 * other one as an NBD listener (unix or TCP), as nbdkit and qemu-nbd take
 * theirs.
 */
import { UsageError } from '../errors.js';

/** sd_listen_fds(3): SD_LISTEN_FDS_START. */
export const LISTEN_FDS_START = 3;

export interface PassedSocket {
  fd: number;
  /** FileDescriptorName=, or "unknown" (systemd's default). */
  name: string;
}

/**
 * The sockets passed to this process; none unless LISTEN_PID names it (or
 * names the parent that re-ran it, see bin/run.js). Clears the variables, as
 * sd_listen_fds(1) does, so that no child takes the sockets for its own.
 */
export function passedSockets(env: NodeJS.ProcessEnv = process.env, pid = process.pid, ppid = process.ppid): PassedSocket[] {
  const { LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES } = env;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (LISTEN_PID === undefined || LISTEN_FDS === undefined) return [];
  const forUs = LISTEN_PID === String(pid) || (env.BOOTCACHE_REEXEC === '1' && LISTEN_PID === String(ppid));
  if (!forUs) return [];
  if (!/^[1-9]\d{0,3}$/.test(LISTEN_FDS)) throw new UsageError(`LISTEN_FDS must be a small positive number, got ${JSON.stringify(LISTEN_FDS)}`);
  const count = Number(LISTEN_FDS);
  const names = LISTEN_FDNAMES === undefined ? [] : LISTEN_FDNAMES.split(':');
  return Array.from({ length: count }, (_, i) => ({ fd: LISTEN_FDS_START + i, name: names[i] || 'unknown' }));
}
