/**
 * One client connection: its socket and lifetime. The handshake
 * (handshake.ts) runs first, then the transmission phase (transmission.ts);
 * this module owns what they share (the message stream, the opened export)
 * and how the connection ends.
 */
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { TlsHandshakeError } from '../../errors.js';
import { NbdClientRefusedError, NbdProtocolViolationError, ReadCancelledError, StreamEndedError, StreamStalledError } from '../errors.js';
import { errorText, type ConnectionContext, type ConnectionIo, type NbdLogger, type NbdLogLevel } from './context.js';
import { Handshake } from './handshake.js';
import { SocketReader } from './socket-reader.js';
import { Transmission } from './transmission.js';

/** After NBD_CMD_DISC or shutdown we half-close; the client should close within this time. */
const LINGER_MS = 5000;
/**
 * Unparsed request bytes kept per connection before its socket is paused.
 * Requests are 28-byte headers (WRITE payloads are dropped as they come), so
 * this holds thousands; a bound per connection keeps request buffers small
 * beside the reply budget.
 */
const REQUEST_BUFFER_BYTES = 64 * 1024;

export class NbdConnection {
  /** Resolves when the socket is closed and the export (if any) is closed. Never rejects. */
  readonly done: Promise<void>;
  private readonly io: ConnectionIo;
  private readonly log: NbdLogger;
  private readonly handshake: Handshake;
  private transmission: Transmission | null = null;
  private phase: 'handshake' | 'transmission' | 'closing' = 'handshake';
  private handshakeTimer: NodeJS.Timeout | null = null;
  /** Set when we close the socket ourselves, to log why. */
  private closeReason: string | null = null;
  private readonly pendingWrites = new Set<() => void>();
  private corked = false;

  /** The message stream: the accepted socket, or the TLS session over it after NBD_OPT_STARTTLS. */
  private socket: Socket;
  private reader: SocketReader;
  /** The accepted socket: destroyed with the TLS session over it. */
  private readonly accepted: Socket;

  constructor(
    socket: Socket,
    private readonly ctx: ConnectionContext,
    readonly id: number,
  ) {
    const base = ctx.log;
    this.log = (level, msg, fields) => base(level, msg, { connection: id, ...fields });
    this.socket = socket;
    this.accepted = socket;
    this.reader = this.readerOf(socket);
    const self = this;
    this.io = {
      get reader() {
        return self.reader;
      },
      send: (parts) => this.send(parts),
      startTls: (ack) => this.startTls(ack),
    };
    this.handshake = new Handshake(this.io, ctx, this.log);
    // TCP only (a no-op on unix sockets): notice peers that vanished without a FIN, e.g. a dead host.
    socket.setKeepAlive(true, 30_000);
    this.watch(socket);
    if (ctx.limits.handshakeTimeoutMs > 0) {
      this.handshakeTimer = setTimeout(() => {
        this.closeReason = `handshake not completed within ${ctx.limits.handshakeTimeoutMs} ms`;
        this.ctx.counters.protocolErrors++;
        this.log('warn', 'handshake timeout', { timeoutMs: ctx.limits.handshakeTimeoutMs });
        this.kill();
      }, ctx.limits.handshakeTimeoutMs);
    }
    this.done = this.run();
  }

  private kill(): void {
    this.socket.destroy();
    this.accepted.destroy();
  }

  private readerOf(socket: Socket): SocketReader {
    return new SocketReader(socket, { highWaterMark: REQUEST_BUFFER_BYTES, stallTimeoutMs: this.ctx.limits.stallTimeoutMs });
  }

  private watch(socket: Socket): void {
    socket.on('error', (err) => this.log('debug', 'socket error', { error: err.message }));
    socket.on('close', () => {
      for (const resolve of this.pendingWrites) resolve();
      this.pendingWrites.clear();
      // A request waiting for buffer memory has nobody to answer any more.
      this.ctx.budget.cancel();
    });
  }

  /**
   * NBD_OPT_STARTTLS: the plaintext reader lets go before the ack is sent,
   * so the client's first TLS bytes stay in the socket for the TLS session.
   * Bytes the client sent before the ack break "TLS support" in doc/proto.md.
   */
  private async startTls(ack: Buffer[]): Promise<void> {
    const tls = this.ctx.tls;
    if (tls === undefined) throw new NbdProtocolViolationError('NBD_OPT_STARTTLS without TLS credentials');
    const early = this.reader.detach();
    if (early > 0) throw new NbdProtocolViolationError(`${early} bytes sent after NBD_OPT_STARTTLS before its reply`);
    // The ack goes out and the TLS session takes the socket in the same tick: the client's
    // first TLS bytes, and its close if it gives up at once, then reach the session.
    const raw = this.socket;
    while (raw.writableCorked > 0) raw.uncork();
    raw.write(Buffer.concat(ack));
    const timeoutMs = this.ctx.limits.handshakeTimeoutMs > 0 ? this.ctx.limits.handshakeTimeoutMs : 30_000;
    let secure: TLSSocket;
    try {
      secure = await tls.credentials.upgrade(raw, timeoutMs);
    } catch (err) {
      this.ctx.counters.tlsFailures++;
      throw err;
    }
    this.ctx.counters.tlsSessions++;
    this.socket = secure;
    this.reader = this.readerOf(secure);
    this.watch(secure);
    this.log('debug', 'TLS started', { protocol: secure.getProtocol() });
  }

  /** True until the client has finished negotiating (option haggling). */
  get negotiating(): boolean {
    return this.phase === 'handshake';
  }

  /** Requests whose replies are not yet handed to the kernel. */
  get requestsInFlight(): number {
    return this.transmission?.requestsInFlight ?? 0;
  }

  /** Request bytes received and not yet parsed. */
  get requestBufferedBytes(): number {
    return this.reader.bufferedBytes;
  }

  /**
   * Server shutdown: a connection still negotiating is dropped; one in
   * transmission stops reading, finishes its in-flight requests, then closes.
   */
  shutdown(): void {
    if (this.phase === 'handshake') {
      this.closeReason = 'server shutting down';
      this.kill();
      return;
    }
    this.reader.cancel();
    this.transmission?.stop();
  }

  /** Hard disconnect (used when shutdown takes too long). */
  destroy(reason: string): void {
    this.closeReason ??= reason;
    this.kill();
  }

  private async run(): Promise<void> {
    let reason = 'closed';
    let level: NbdLogLevel = 'debug';
    try {
      const agreed = await this.handshake.run();
      if (agreed === null) {
        reason = 'client ended negotiation';
        await this.endGracefully();
      } else {
        this.phase = 'transmission';
        this.clearHandshakeTimer();
        this.ctx.counters.handshakes++;
        this.log('debug', 'transmission phase', {
          export: agreed.export.name,
          structured: agreed.structured,
          blockStatus: agreed.blockStatus,
          blockSizeAgreed: agreed.blockSizeAgreed,
        });
        this.transmission = new Transmission(this.socket, this.io, this.ctx, this.log, agreed);
        reason = await this.transmission.run();
        // Drain: every request read so far gets its reply before we close.
        await this.transmission.idle();
        await this.endGracefully();
      }
    } catch (err) {
      if (err instanceof NbdProtocolViolationError) {
        this.ctx.counters.protocolErrors++;
        level = 'warn';
        reason = `protocol violation: ${err.message}`;
      } else if (err instanceof StreamStalledError) {
        this.ctx.counters.protocolErrors++;
        level = 'warn';
        reason = `client stalled: ${err.message}`;
      } else if (err instanceof StreamEndedError) {
        reason = err.partialBytes > 0 ? `client disconnected mid-message (${err.partialBytes} bytes pending)` : 'client disconnected';
      } else if (err instanceof ReadCancelledError) {
        reason = 'server shutting down';
      } else if (err instanceof NbdClientRefusedError) {
        reason = `refused: ${err.message}`;
      } else if (err instanceof TlsHandshakeError) {
        level = 'warn';
        reason = err.message;
      } else {
        level = 'error';
        reason = `internal error: ${errorText(err)}`;
      }
      // A refused client was told why: let the reply reach it (a reset could discard it) before closing.
      if (err instanceof NbdClientRefusedError) await this.endGracefully();
      else this.kill();
    } finally {
      this.phase = 'closing';
      this.clearHandshakeTimer();
    }
    // Requests still running against the export must settle before it closes.
    await this.transmission?.idle();
    this.ctx.budget.close();
    const exp = this.handshake.openedExport;
    if (exp !== null) {
      try {
        await exp.close();
      } catch (err) {
        this.log('warn', 'closing export failed', { export: exp.name, error: errorText(err) });
      }
    }
    this.log(level, 'connection closed', { reason: this.closeReason ?? reason });
  }

  /**
   * Writes one message as a unit (its parts are written back to back, so
   * they never interleave with another reply). Resolves once the bytes are
   * handed to the kernel, or at once if the socket is gone.
   */
  private send(parts: Buffer[]): Promise<void> {
    const socket = this.socket;
    if (socket.destroyed || !socket.writable) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const done = (): void => {
        this.pendingWrites.delete(done);
        resolve();
      };
      this.pendingWrites.add(done);
      // Stay corked until the current tick ends: replies completing together go out in one writev.
      if (!this.corked) {
        this.corked = true;
        socket.cork();
        process.nextTick(() => {
          this.corked = false;
          socket.uncork();
        });
      }
      for (let i = 0; i < parts.length - 1; i++) socket.write(parts[i]!);
      socket.write(parts[parts.length - 1]!, done);
    });
  }

  private async endGracefully(): Promise<void> {
    const socket = this.socket;
    if (socket.destroyed) return;
    // Whatever the client still sends is dropped; reading on lets us see its FIN.
    this.reader.cancel();
    socket.resume();
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => socket.destroy(), LINGER_MS);
      socket.once('close', () => {
        clearTimeout(timer);
        resolve();
      });
      socket.end();
    });
  }

  private clearHandshakeTimer(): void {
    if (this.handshakeTimer !== null) {
      clearTimeout(this.handshakeTimer);
      this.handshakeTimer = null;
    }
  }
}
