/**
 * Who is on the other end of a connection, for the per-client connection
 * limit: the remote address on TCP, the peer process's effective uid on a
 * unix socket.
 *
 * Node has no SO_PEERCRED. Instead of a native addon, the uid comes from what
 * Linux shows anyway: fstat() of the accepted socket gives its inode; `ss -xp`
 * (iproute2, the kernel's sock_diag) gives that socket's peer inode and the
 * processes holding the peer; /proc/PID/status gives such a process's uid.
 * Seeing another user's processes needs root (or CAP_SYS_PTRACE), as for
 * `ss -p` itself: a peer whose process cannot be seen has no identity, and
 * the limit does not apply to it.
 */
import { execFile } from 'node:child_process';
import { fstatSync, readFileSync } from 'node:fs';
import type { Socket } from 'node:net';

export interface ClientIdentity {
  /** Equal for connections of one client ("uid:1000", "addr:192.0.2.7"). */
  key: string;
  /** For logs and refusal messages ("uid 1000", "192.0.2.7"). */
  label: string;
}

/** Unix peers not found in one `ss` snapshot are looked up once more (the socket may be younger than it). */
const SS_ATTEMPTS = 2;
const SS_TIMEOUT_MS = 5000;
const SS_MAX_OUTPUT = 64 * 1024 * 1024;

interface UnixSocketEntry {
  peer: number;
  pids: number[];
}

interface Lookup {
  inode: number;
  attempts: number;
  resolve(identity: ClientIdentity | null): void;
}

/** Node's handle of a connected socket carries its descriptor (not a public API, stable since Node 0.x). */
function socketFd(socket: Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}

/** An IPv4 client on a dual-stack listener shows as ::ffff:a.b.c.d; it is the same client as a.b.c.d. */
function normalizeAddress(address: string): string {
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  return m ? m[1]! : address.toLowerCase();
}

/**
 * `ss -xpH` lines: netid, state, recv-q, send-q, local path (or *), local
 * inode, peer path (or *), peer inode, then users:(("name",pid=N,fd=M),...)
 * when the holder can be seen.
 */
export function parseUnixSockets(text: string): Map<number, UnixSocketEntry> {
  const sockets = new Map<number, UnixSocketEntry>();
  for (const line of text.split('\n')) {
    const m = /^\S+\s+\S+\s+\d+\s+\d+\s+.*?\s(\d+)\s+.*?\s(\d+)(?:\s+users:\((.*)\))?\s*$/.exec(line);
    if (!m) continue;
    const pids = [...(m[3] ?? '').matchAll(/pid=(\d+)/g)].map((p) => Number(p[1]));
    sockets.set(Number(m[1]), { peer: Number(m[2]), pids });
  }
  return sockets;
}

/** The effective uid of a process, from /proc/PID/status ("Uid: real effective saved fs"). */
function effectiveUid(pid: number): number | undefined {
  try {
    const m = /^Uid:\s+\d+\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

export type IdentityWarning = (message: string) => void;

/** Identifies clients; unix look-ups that arrive together share one `ss` run. */
export class ClientIdentifier {
  private queue: Lookup[] = [];
  private running = false;
  private ssMissing = false;
  private warnedUnseen = false;

  constructor(private readonly warn: IdentityWarning = () => undefined) {}

  /** The client of a just-accepted socket; null when it cannot be told. */
  identify(socket: Socket): Promise<ClientIdentity | null> {
    if (socket.remoteAddress !== undefined) {
      const address = normalizeAddress(socket.remoteAddress);
      return Promise.resolve({ key: `addr:${address}`, label: address });
    }
    const fd = socketFd(socket);
    if (fd === undefined || this.ssMissing) return Promise.resolve(null);
    let inode: number;
    try {
      // Now, while the descriptor is surely this socket's.
      inode = fstatSync(fd).ino;
    } catch {
      return Promise.resolve(null);
    }
    return new Promise((resolve) => {
      this.queue.push({ inode, attempts: 0, resolve });
      this.run();
    });
  }

  private run(): void {
    if (this.running || this.queue.length === 0) return;
    this.running = true;
    const batch = this.queue;
    this.queue = [];
    execFile('ss', ['-xpH'], { timeout: SS_TIMEOUT_MS, maxBuffer: SS_MAX_OUTPUT, encoding: 'utf8' }, (err, stdout) => {
      this.running = false;
      if (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
          this.ssMissing = true;
          this.warn('ss (iproute2) is not installed: unix socket clients cannot be told apart, the per-client connection limit applies to TCP only');
        }
        for (const lookup of batch) lookup.resolve(null);
      } else {
        this.settle(batch, parseUnixSockets(stdout));
      }
      this.run();
    });
  }

  private settle(batch: Lookup[], sockets: Map<number, UnixSocketEntry>): void {
    for (const lookup of batch) {
      const own = sockets.get(lookup.inode);
      if (own === undefined) {
        lookup.attempts++;
        if (lookup.attempts < SS_ATTEMPTS) this.queue.push(lookup);
        else lookup.resolve(null);
        continue;
      }
      const peer = sockets.get(own.peer);
      const uid = peer?.pids.map(effectiveUid).find((u) => u !== undefined);
      if (uid === undefined) {
        if (!this.warnedUnseen) {
          this.warnedUnseen = true;
          this.warn('cannot see the process behind a unix socket client (the agent needs root to see other users\' processes): such clients are not counted per client');
        }
        lookup.resolve(null);
        continue;
      }
      lookup.resolve({ key: `uid:${uid}`, label: `uid ${uid}` });
    }
  }
}
