import net from 'node:net';
import { claimSocketPath } from '../../net/unix-socket-path.js';
import { AgentError } from '../../errors.js';
import { BufferBudget } from './buffer-budget.js';
import { ClientIdentifier, type ClientIdentity } from './client-identity.js';
import { MemoryRelease } from './memory-release.js';
import { NbdConnection } from './connection.js';
import type { ConnectionLimits, NbdLogger, ServerCounters } from './context.js';
import type { ExportProvider } from './export.js';
import type { TlsCredentials } from './tls.js';
import { NBD_DEFAULT_PORT, PORTABLE_MAX_BLOCK } from '../protocol.js';

export type { NbdLogger, NbdLogLevel } from './context.js';

export interface NbdServerOptions {
  /** Connections at once, negotiating or not (default 128); see dropOldestNegotiating. */
  maxConnections?: number;
  /** Connections at once from one client: a unix peer's uid, a TCP peer's address (default maxConnections: no limit of its own). */
  maxConnectionsPerClient?: number;
  /** Reply buffers held at most over all connections (default 256 MiB, at least 2 x maxRequestBytes); see BufferBudget. */
  maxBufferedBytes?: number;
  /** Requests served concurrently per connection (default 64); beyond it the socket is not read. */
  maxInFlightPerConnection?: number;
  /** Read bytes in flight per connection before the socket is not read (default 64 MiB). */
  maxInFlightBytesPerConnection?: number;
  /** Largest READ/CACHE length, advertised as the maximum block size (default 32 MiB). */
  maxRequestBytes?: number;
  /** Largest option payload accepted during negotiation (default 64 KiB). */
  maxOptionBytes?: number;
  /** Options per connection before it is considered a flood (default 256). */
  maxOptions?: number;
  /** Time allowed from connect to the transmission phase (default 30 s; 0 = none). */
  handshakeTimeoutMs?: number;
  /** Time allowed to finish a started request or option (default 30 s; 0 = none). */
  stallTimeoutMs?: number;
  /** close(): time to drain in-flight requests before connections are dropped (default 30 s). */
  closeTimeoutMs?: number;
  logger?: NbdLogger;
  /**
   * TLS (NBD_OPT_STARTTLS) with these credentials. `require`: a TCP client
   * gets NBD_REP_ERR_TLS_REQD until it starts TLS; unix socket clients are
   * local, guarded by the socket's permissions, and may start TLS or not.
   */
  tls?: { mode: 'on' | 'require'; credentials: TlsCredentials };
}

export interface NbdServerStats {
  /** Connections open now (handshaking or transmitting). */
  activeConnections: number;
  /** Connections accepted since start. */
  totalConnections: number;
  /** Connections closed on accept because maxConnections was reached and none could make room. */
  rejectedConnections: number;
  /** Connections still negotiating that were dropped to make room for a newcomer. */
  droppedConnections: number;
  /** Connections refused because their client already had maxConnectionsPerClient open. */
  rejectedPerClient: number;
  /** Bytes of reply buffers held now (reads being served or waiting for the client to take them). */
  bufferedBytes: number;
  /** Most reply buffer bytes held at once since start. */
  peakBufferedBytes: number;
  /** The bound on bufferedBytes (maxBufferedBytes). */
  maxBufferedBytes: number;
  /** Connections that read no requests now because the reply buffer budget is spent. */
  pausedConnections: number;
  /** Request bytes received and not yet parsed, over all connections (bounded per connection). */
  requestBufferedBytes: number;
  /** Connections that reached the transmission phase. */
  handshakes: number;
  /** Transmission requests received (NBD_CMD_DISC excluded). */
  requests: number;
  /** Requests whose replies are not yet sent, over all connections. */
  requestsInFlight: number;
  /** Bytes served by successful reads. */
  bytesRead: number;
  /** Reads that failed in the export (answered EIO). */
  readErrors: number;
  /** Connections dropped for breaking the protocol, stalling or flooding. */
  protocolErrors: number;
  /** Connections that started TLS, and those whose TLS handshake failed (wrong key, untrusted certificate, dropped). */
  tlsSessions: number;
  tlsFailures: number;
}

const MiB = 1024 * 1024;

function positiveInteger(name: string, value: number | undefined, fallback: number, min = 1, max = Number.MAX_SAFE_INTEGER): number {
  const v = value ?? fallback;
  if (!Number.isSafeInteger(v) || v < min || v > max) {
    throw new AgentError(`NBD server option ${name} must be an integer from ${min} to ${max}, got ${String(value)}`);
  }
  return v;
}

function listenError(err: NodeJS.ErrnoException, where: string): AgentError {
  switch (err.code) {
    case 'EADDRINUSE':
      return new AgentError(`${where} is already in use by another process`, { cause: err });
    case 'EACCES':
    case 'EPERM':
      return new AgentError(`permission denied listening on ${where}`, { cause: err });
    case 'ENOENT':
      return new AgentError(`cannot listen on ${where}: directory does not exist`, { cause: err });
    case 'EADDRNOTAVAIL':
      return new AgentError(`cannot listen on ${where}: address not available on this host`, { cause: err });
    default:
      return new AgentError(`cannot listen on ${where}: ${err.message}`, { cause: err });
  }
}

/**
 * A read-only NBD server (fixed newstyle; INFO/GO, structured replies,
 * base:allocation block status) over an ExportProvider.
 */
export class NbdServer {
  private readonly limits: ConnectionLimits;
  private readonly maxConnections: number;
  private readonly closeTimeoutMs: number;
  private readonly log: NbdLogger;
  private readonly listeners: net.Server[] = [];
  private readonly connections = new Set<NbdConnection>();
  private readonly counters: ServerCounters = { handshakes: 0, tlsSessions: 0, tlsFailures: 0, requests: 0, bytesRead: 0, readErrors: 0, protocolErrors: 0 };
  private readonly budget: BufferBudget;
  private readonly maxConnectionsPerClient: number;
  private readonly identifier: ClientIdentifier;
  private readonly memoryRelease = new MemoryRelease();
  /** Open connections by client key. */
  private readonly perClient = new Map<string, number>();
  private totalConnections = 0;
  private rejectedConnections = 0;
  private droppedConnections = 0;
  private rejectedPerClient = 0;
  private closing: Promise<void> | null = null;
  private readonly tls: NbdServerOptions['tls'];

  constructor(
    private readonly provider: ExportProvider,
    options: NbdServerOptions = {},
  ) {
    const maxRequestBytes = positiveInteger('maxRequestBytes', options.maxRequestBytes, PORTABLE_MAX_BLOCK, 4096, 0x7fffffff);
    this.limits = {
      maxInFlight: positiveInteger('maxInFlightPerConnection', options.maxInFlightPerConnection, 64, 1, 65536),
      maxInFlightBytes: positiveInteger('maxInFlightBytesPerConnection', options.maxInFlightBytesPerConnection, Math.max(64 * MiB, maxRequestBytes)),
      maxRequestBytes,
      maxOptionBytes: positiveInteger('maxOptionBytes', options.maxOptionBytes, 64 * 1024, 4096 + 64, 16 * MiB),
      maxOptions: positiveInteger('maxOptions', options.maxOptions, 256),
      handshakeTimeoutMs: positiveInteger('handshakeTimeoutMs', options.handshakeTimeoutMs, 30_000, 0),
      stallTimeoutMs: positiveInteger('stallTimeoutMs', options.stallTimeoutMs, 30_000, 0),
    };
    this.maxConnections = positiveInteger('maxConnections', options.maxConnections, 128);
    this.maxConnectionsPerClient = positiveInteger(
      'maxConnectionsPerClient', options.maxConnectionsPerClient, this.maxConnections, 1, this.maxConnections,
    );
    // The shared half must hold the largest request, or such a request could wait forever.
    const maxBufferedBytes = positiveInteger('maxBufferedBytes', options.maxBufferedBytes, 256 * MiB, 2 * maxRequestBytes);
    this.budget = new BufferBudget(maxBufferedBytes, this.maxConnections);
    this.closeTimeoutMs = positiveInteger('closeTimeoutMs', options.closeTimeoutMs, 30_000, 0);
    this.tls = options.tls;
    const logger = options.logger;
    // A throwing logger must not break a connection or leave a rejection unhandled.
    this.log = logger === undefined ? () => undefined : (level, msg, fields) => {
      try {
        logger(level, msg, fields);
      } catch {
        // ignored
      }
    };
    this.identifier = new ClientIdentifier((message) => this.log('warn', message));
  }

  get stats(): NbdServerStats {
    let requestsInFlight = 0;
    let requestBufferedBytes = 0;
    for (const c of this.connections) {
      requestsInFlight += c.requestsInFlight;
      requestBufferedBytes += c.requestBufferedBytes;
    }
    return {
      activeConnections: this.connections.size,
      totalConnections: this.totalConnections,
      rejectedConnections: this.rejectedConnections,
      droppedConnections: this.droppedConnections,
      rejectedPerClient: this.rejectedPerClient,
      bufferedBytes: this.budget.usedBytes,
      peakBufferedBytes: this.budget.peakBytes,
      maxBufferedBytes: this.budget.limitBytes,
      pausedConnections: this.budget.waitingAccounts,
      requestBufferedBytes,
      handshakes: this.counters.handshakes,
      requests: this.counters.requests,
      requestsInFlight,
      bytesRead: this.counters.bytesRead,
      readErrors: this.counters.readErrors,
      protocolErrors: this.counters.protocolErrors,
      tlsSessions: this.counters.tlsSessions,
      tlsFailures: this.counters.tlsFailures,
    };
  }

  /**
   * Listens on a unix socket. A leftover socket file nobody answers on is
   * replaced; a live one, or a path that is not a socket, is an AgentError.
   */
  async listenUnix(path: string): Promise<void> {
    this.assertOpen();
    if (await claimSocketPath(path)) this.log('info', 'removed a stale NBD socket', { path });
    await this.listen({ path }, `socket ${path}`);
  }

  /** Listens on a socket passed by systemd (socket activation), unix or TCP. */
  async listenFd(fd: number, name: string): Promise<void> {
    this.assertOpen();
    await this.listen({ fd } as net.ListenOptions, `passed socket ${name} (fd ${fd})`);
  }

  /** Listens on TCP (default 127.0.0.1:10809); returns the bound address (useful with port 0). */
  async listenTcp(host = '127.0.0.1', port: number = NBD_DEFAULT_PORT): Promise<{ host: string; port: number }> {
    this.assertOpen();
    const server = await this.listen({ host, port }, `${host.includes(':') ? `[${host}]` : host}:${port}`);
    const address = server.address() as net.AddressInfo;
    return { host: address.address, port: address.port };
  }

  /**
   * Stops accepting, lets every connection in transmission finish the
   * requests it has read (no new ones are read), then closes them; drops
   * connections still negotiating. Connections left after closeTimeoutMs are
   * dropped. Idempotent.
   */
  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    const listenersClosed = Promise.all(this.listeners.map((l) => new Promise<void>((resolve) => l.close(() => resolve()))));
    const connections = [...this.connections];
    for (const c of connections) c.shutdown();
    const drained = Promise.all(connections.map((c) => c.done));
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      drained.then(() => false),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), this.closeTimeoutMs))),
    ]);
    clearTimeout(timer);
    if (timedOut) {
      this.log('warn', 'dropping connections that did not drain in time', { connections: this.connections.size, timeoutMs: this.closeTimeoutMs });
      for (const c of this.connections) c.destroy('server close timed out');
    }
    // Closing a unix listener also removes its socket file (libuv does it).
    await listenersClosed;
    this.memoryRelease.cancel();
    this.log('info', 'NBD server closed', { ...this.stats });
  }

  private assertOpen(): void {
    if (this.closing !== null) throw new AgentError('NBD server is closed');
  }

  private listen(options: net.ListenOptions, where: string): Promise<net.Server> {
    const server = net.createServer({ allowHalfOpen: true }, (socket) => this.accept(socket));
    return new Promise<net.Server>((resolve, reject) => {
      const onError = (err: NodeJS.ErrnoException): void => reject(listenError(err, where));
      server.once('error', onError);
      server.listen(options, () => {
        server.off('error', onError);
        if (this.closing !== null) {
          // close() came while this listen was on its way: it did not see this listener, so nothing else would close it.
          server.close();
          reject(new AgentError('NBD server is closed'));
          return;
        }
        server.on('error', (err) => this.log('error', 'listener error', { where, error: err.message }));
        this.listeners.push(server);
        this.log('info', 'NBD server listening', { where });
        resolve(server);
      });
    });
  }

  private accept(socket: net.Socket): void {
    if (this.closing === null && this.connections.size >= this.maxConnections) this.dropOldestNegotiating();
    if (this.closing !== null || this.connections.size >= this.maxConnections) {
      if (this.closing === null) {
        this.rejectedConnections++;
        this.log('warn', 'connection refused: too many connections', { maxConnections: this.maxConnections });
      }
      socket.on('error', () => undefined);
      socket.destroy();
      return;
    }
    this.totalConnections++;
    // "both the client and server SHOULD disable Nagle's algorithm" (TCP only; a no-op on unix sockets).
    socket.setNoDelay(true);
    const id = this.totalConnections;
    let admittedAs: string | null = null;
    let ended = false;
    // Without a limit of its own, nobody needs identifying (a unix look-up runs ss).
    const identified = this.maxConnectionsPerClient < this.maxConnections ? this.identifier.identify(socket) : Promise.resolve(null);
    const admission = identified.then((identity) => {
      if (ended) return null;
      const refusal = this.refusalFor(identity, id);
      if (refusal === null && identity !== null) {
        admittedAs = identity.key;
        this.perClient.set(identity.key, (this.perClient.get(identity.key) ?? 0) + 1);
      }
      return refusal;
    });
    const connection = new NbdConnection(
      socket,
      {
        provider: this.provider,
        limits: this.limits,
        log: this.log,
        counters: this.counters,
        budget: this.budget.open(),
        admission,
        dropped: (bytes) => this.memoryRelease.noteDropped(bytes),
        isShuttingDown: () => this.closing !== null,
        // remoteAddress is set for TCP peers only.
        ...(this.tls ? { tls: { credentials: this.tls.credentials, required: this.tls.mode === 'require' && socket.remoteAddress !== undefined } } : {}),
      },
      id,
    );
    this.connections.add(connection);
    this.log('debug', 'connection accepted', { connection: connection.id, remote: socket.remoteAddress ?? 'unix' });
    void connection.done.finally(() => {
      ended = true;
      this.connections.delete(connection);
      if (admittedAs !== null) {
        const left = (this.perClient.get(admittedAs) ?? 1) - 1;
        if (left > 0) this.perClient.set(admittedAs, left);
        else this.perClient.delete(admittedAs);
      }
    });
  }

  /** Why a client may not open another connection, or null when it may (unknown clients are not counted). */
  private refusalFor(identity: ClientIdentity | null, connection: number): string | null {
    if (identity === null) return null;
    const open = this.perClient.get(identity.key) ?? 0;
    if (open < this.maxConnectionsPerClient) return null;
    this.rejectedPerClient++;
    this.log('warn', 'connection refused: too many connections from one client', {
      connection,
      client: identity.label,
      open,
      maxConnectionsPerClient: this.maxConnectionsPerClient,
    });
    return `too many connections from ${identity.label} (${open} open; the server allows ${this.maxConnectionsPerClient} per client)`;
  }

  /**
   * The server is full: makes room by dropping the connection that has been
   * negotiating longest. A real client negotiates in milliseconds, so clients
   * that stall in the handshake (up to handshakeTimeoutMs each) only push out
   * one another, never a connection in transmission or a newcomer.
   */
  private dropOldestNegotiating(): void {
    for (const connection of this.connections) {
      // Set order is insertion order: the first negotiating one is the oldest.
      if (!connection.negotiating) continue;
      this.connections.delete(connection);
      this.droppedConnections++;
      this.log('warn', 'connection dropped: still negotiating while the server is full', {
        connection: connection.id,
        maxConnections: this.maxConnections,
      });
      connection.destroy('dropped for a new client: still negotiating while the server was full');
      return;
    }
  }
}
