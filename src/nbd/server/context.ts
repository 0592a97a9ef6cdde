/**
 * What one connection's phases (handshake, transmission) share: the
 * server's settings and counters, and the connection's way to read and
 * write messages.
 */
import type { BudgetAccount } from './buffer-budget.js';
import type { ExportProvider } from './export.js';
import type { SocketReader } from './socket-reader.js';
import type { TlsCredentials } from './tls.js';

export type NbdLogLevel = 'debug' | 'info' | 'warn' | 'error';
export type NbdLogger = (level: NbdLogLevel, msg: string, fields?: Record<string, unknown>) => void;

/** Limits, all resolved (see NbdServerOptions for their meaning). */
export interface ConnectionLimits {
  maxInFlight: number;
  maxInFlightBytes: number;
  maxRequestBytes: number;
  maxOptionBytes: number;
  maxOptions: number;
  handshakeTimeoutMs: number;
  stallTimeoutMs: number;
}

/** Counters shared by all connections of a server. */
export interface ServerCounters {
  handshakes: number;
  /** Connections that completed a TLS handshake, and those whose TLS handshake failed. */
  tlsSessions: number;
  tlsFailures: number;
  requests: number;
  bytesRead: number;
  readErrors: number;
  protocolErrors: number;
}

export interface ConnectionContext {
  provider: ExportProvider;
  limits: ConnectionLimits;
  log: NbdLogger;
  counters: ServerCounters;
  /** This connection's share of the server's reply buffer budget; closed with the connection. */
  budget: BudgetAccount;
  /** Resolves null when the client may be served, else why not (answered to its first option). */
  admission: Promise<string | null>;
  /** Reply buffers of `bytes` were dropped unsent (the client went away with replies unread). */
  dropped(bytes: number): void;
  isShuttingDown(): boolean;
  /** TLS offered to this connection (NBD_OPT_STARTTLS), and whether it must start TLS before anything else. */
  tls?: { credentials: TlsCredentials; required: boolean };
}

/**
 * The connection's message stream. Phases read `reader` and call `send` at
 * each use, never keeping them, so that the connection can swap the stream
 * underneath (NBD_OPT_STARTTLS moves both onto the TLS session).
 */
export interface ConnectionIo {
  readonly reader: SocketReader;
  /**
   * Writes one message as a unit (its parts back to back). Resolves once
   * the bytes are handed to the kernel, or at once if the socket is gone.
   */
  send(parts: Buffer[]): Promise<void>;
  /**
   * NBD_OPT_STARTTLS accepted: stops reading the plaintext stream, sends
   * `ack`, runs the TLS handshake and moves `reader` and `send` onto the
   * session. Throws when the handshake fails (the connection is over).
   */
  startTls(ack: Buffer[]): Promise<void>;
}

export function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
