import net from 'node:net';
import { BootcacheError, UsageError } from '../../errors.js';
import { ByteQueue } from './byte-queue.js';
import {
  NbdConnectError,
  NbdDisconnectedError,
  NbdHandshakeError,
  NbdServerError,
  NbdUnknownExportError,
} from '../errors.js';
import {
  CLIENT_FLAGS_BYTES,
  CLISERV_MAGIC,
  DEFAULT_MIN_BLOCK,
  DEFAULT_PREFERRED_BLOCK,
  EXPORT_NAME_PADDING_BYTES,
  EXPORT_NAME_REPLY_BYTES,
  GREETING_BYTES,
  MAX_STRING_BYTES,
  NBD_CMD_DISC,
  NBD_CMD_READ,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_BLOCK_SIZE_BYTES,
  NBD_INFO_EXPORT,
  NBD_INFO_EXPORT_BYTES,
  NBD_INIT_MAGIC,
  NBD_OPTS_MAGIC,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_REP_ACK,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_FLAG_ERROR,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  OPTION_REPLY_HEADER_BYTES,
  PORTABLE_MAX_BLOCK,
  SIMPLE_REPLY_BYTES,
  encodeOption,
  encodeRequest,
  errnoName,
  optionReplyName,
} from '../protocol.js';
import { formatNbdTarget, parseNbdUri, type NbdTarget } from './uri.js';

export interface NbdClientOptions {
  /** Deadline for connecting and completing the handshake (default 10 s). */
  connectTimeoutMs?: number;
  /** A read with no reply after this long fails the connection (default 60 s; 0 disables). */
  requestTimeoutMs?: number;
}

export interface NbdBlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** What the handshake told us about the export. */
export interface NbdExportInfo {
  /** The target as a URI, for messages. */
  uri: string;
  exportName: string;
  /** Export size in bytes. */
  size: number;
  transmissionFlags: number;
  readOnly: boolean;
  /** NBD_FLAG_CAN_MULTI_CONN: several connections may be used. */
  canMultiConn: boolean;
  /** From NBD_INFO_BLOCK_SIZE, or the spec defaults when the server sent none. */
  blockSize: NbdBlockSize;
  /** How transmission was entered: NBD_OPT_GO, or the NBD_OPT_EXPORT_NAME fallback; NBD_OPT_INFO for probe(), which does not enter it. */
  negotiation: 'NBD_OPT_GO' | 'NBD_OPT_INFO' | 'NBD_OPT_EXPORT_NAME';
}

interface PendingRead {
  offset: number;
  length: number;
  /** Where the payload goes as it arrives (see read()); else one buffer once it is all in. */
  into?: Buffer;
  resolve: (data: Buffer) => void;
  reject: (err: Error) => void;
  timer?: NodeJS.Timeout;
}

interface HandshakeWaiter {
  bytes: number;
  resolve: (data: Buffer) => void;
  reject: (err: Error) => void;
}

/** Largest option reply payload accepted; guards memory against a hostile server. */
const MAX_OPTION_REPLY = 64 * 1024;

/**
 * A small NBD client: fixed newstyle handshake with NBD_OPT_GO (falling back
 * to NBD_OPT_EXPORT_NAME), simple replies, and any number of reads in flight,
 * matched to their replies by cookie.
 */
export class NbdClient {
  private readonly queue = new ByteQueue();
  private readonly pending = new Map<number, PendingRead>();
  /** The reply whose payload is arriving: it lands in `into`, `filled` bytes so far. */
  private receiving: { cookie: number; read: PendingRead; into: Buffer; filled: number } | undefined;
  private waiter: HandshakeWaiter | undefined;
  private transmission = false;
  private nextCookie = 1;
  private failure: BootcacheError | undefined;
  private socketError: Error | undefined;
  private closing = false;
  /** close() callers waiting for the reads in flight to finish. */
  private drainWaiters: Array<() => void> = [];
  private closed: Promise<void>;
  private exportInfo!: NbdExportInfo;

  private constructor(
    private readonly socket: net.Socket,
    receiver: Receiver,
    private readonly label: string,
    private readonly requestTimeoutMs: number,
  ) {
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
    receiver.attach((chunk) => this.onData(chunk));
    socket.on('error', (err) => {
      this.socketError = err;
    });
    socket.on('close', () => this.onClose());
  }

  /** Connects, negotiates the export and enters the transmission phase. */
  static async connect(target: NbdTarget | string, options: NbdClientOptions = {}): Promise<NbdClient> {
    const { client, socket, exportName } = await NbdClient.openHandshake(target, options, options.requestTimeoutMs ?? 60_000);
    try {
      client.exportInfo = await client.handshake(exportName);
    } catch (err) {
      socket.destroy();
      throw err;
    }
    socket.setTimeout(0);
    client.transmission = true;
    client.pump();
    return client;
  }

  /** The socket and a client on it, with the handshake deadline armed. */
  private static async openHandshake(
    target: NbdTarget | string,
    options: NbdClientOptions,
    requestTimeoutMs: number,
  ): Promise<{ client: NbdClient; socket: net.Socket; exportName: string }> {
    const parsed = typeof target === 'string' ? parseNbdUri(target) : target;
    // NBD strings SHOULD be <= 256 bytes and MUST be <= 4096 ("Conventions").
    if (Buffer.byteLength(parsed.exportName) > MAX_STRING_BYTES) {
      throw new UsageError(`export name is longer than ${MAX_STRING_BYTES} bytes`);
    }
    const label = formatNbdTarget(parsed);
    const timeoutMs = options.connectTimeoutMs ?? 10_000;
    const receiver = new Receiver();
    const socket = await openSocket(parsed, label, timeoutMs, receiver);
    const client = new NbdClient(socket, receiver, label, requestTimeoutMs);
    socket.setTimeout(timeoutMs, () => {
      client.fail(new NbdHandshakeError(
        `${label}: no NBD handshake from the server within ${timeoutMs / 1000} s ` +
          '(a busy qemu-nbd serves one client at a time unless started with --shared)',
      ));
    });
    return { client, socket, exportName: parsed.exportName };
  }

  /**
   * Asks the server about an export without opening it: NBD_OPT_INFO, then
   * NBD_OPT_ABORT ("NBD_OPT_INFO and NBD_OPT_GO": INFO never enters
   * transmission, so a server such as the bootcache agent starts no prefetch
   * and no boot recording). Throws as connect() does for an unknown export or
   * an unreachable server; undefined when the server does not know
   * NBD_OPT_INFO (not fixed newstyle, or NBD_REP_ERR_UNSUP).
   */
  static async probe(target: NbdTarget | string, options: NbdClientOptions = {}): Promise<NbdExportInfo | undefined> {
    const { client, socket, exportName } = await NbdClient.openHandshake(target, options, 0);
    try {
      // Without fixed newstyle only NBD_OPT_EXPORT_NAME is valid: hang up.
      const { fixed } = await client.greet();
      if (!fixed) return undefined;
      let info: NbdExportInfo | undefined;
      try {
        info = await client.optionInfoOrGo(exportName, NBD_OPT_INFO);
      } catch (err) {
        // Only "no such export" is definitive; a server may refuse INFO (policy, say) and still
        // serve GO, whose own errors then come at connect().
        if (err instanceof NbdUnknownExportError) throw err;
        return undefined;
      }
      // NBD_OPT_ABORT: the server acknowledges and closes; wait a moment for that rather than reset it.
      client.abortNegotiation();
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([client.closed, new Promise<void>((resolve) => (timer = setTimeout(resolve, 1000)))]);
      clearTimeout(timer);
      return info;
    } finally {
      socket.setTimeout(0);
      socket.destroy();
      await client.closed;
    }
  }

  get info(): NbdExportInfo {
    return this.exportInfo;
  }

  get size(): number {
    return this.exportInfo.size;
  }

  /** Reads sent and not yet answered. */
  get inFlight(): number {
    return this.pending.size;
  }

  /**
   * Reads `length` bytes at `offset`. Any number of reads may be in flight.
   * Requests larger than the server's maximum payload are split; requests
   * not aligned to its minimum block size are widened and trimmed.
   *
   * With `into` (at least `length` bytes), the data lands there as it
   * arrives, as a VM's does in its own memory, and the result is a view of
   * it; without, each read gets a buffer of its own.
   */
  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new UsageError(`invalid read: offset ${offset}, length ${length}`);
    }
    if (offset + length > this.size) {
      throw new UsageError(`${this.label}: read of ${length} bytes at offset ${offset} is past the end of the export (${this.size} bytes)`);
    }
    if (into !== undefined && into.length < length) {
      throw new UsageError(`invalid read: ${length} bytes into a buffer of ${into.length}`);
    }
    if (length === 0) return Buffer.alloc(0);
    const { minimum, maximum } = this.exportInfo.blockSize;
    const start = offset - (offset % minimum);
    const end = Math.min(this.size, Math.ceil((offset + length) / minimum) * minimum);
    // Largest request that respects both the maximum and the minimum alignment.
    const step = Math.max(minimum, maximum - (maximum % minimum));
    // Aligned reads into the caller's buffer receive in place; the others are trimmed (and copied) after.
    const inPlace = into !== undefined && start === offset && end - start === length;
    const parts: Promise<Buffer>[] = [];
    for (let at = start; at < end; at += step) parts.push(this.send(at, Math.min(step, end - at), inPlace ? into.subarray(at - start) : undefined));
    const received = await Promise.all(parts);
    if (inPlace) return into.subarray(0, length);
    const whole = received.length === 1 ? received[0]! : Buffer.concat(received);
    const data = whole.subarray(offset - start, offset - start + length);
    if (into === undefined) return data;
    data.copy(into);
    return into.subarray(0, length);
  }

  /** Waits for reads in flight, sends NBD_CMD_DISC and closes the connection. */
  async close(): Promise<void> {
    if (this.closing) return this.closed;
    this.closing = true;
    if (this.pending.size > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
    if (this.failure === undefined && !this.socket.destroyed) {
      // "Terminating the transmission phase": NBD_CMD_DISC, offset and length zero, no reply.
      this.socket.end(encodeRequest(NBD_CMD_DISC, this.nextCookie++, 0, 0));
      const timer = setTimeout(() => this.socket.destroy(), 2000);
      await this.closed;
      clearTimeout(timer);
      return;
    }
    this.socket.destroy();
    await this.closed;
  }

  private send(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    if (this.closing) return Promise.reject(new NbdDisconnectedError(`${this.label}: read after close()`));
    const cookie = this.nextCookie++;
    return new Promise<Buffer>((resolve, reject) => {
      const read: PendingRead = { offset, length, resolve, reject };
      if (into !== undefined) read.into = into;
      if (this.requestTimeoutMs > 0) {
        read.timer = setTimeout(() => {
          this.fail(new NbdDisconnectedError(
            `${this.label}: no reply to a read of ${length} bytes at offset ${offset} within ${this.requestTimeoutMs / 1000} s`,
          ));
        }, this.requestTimeoutMs);
      }
      this.pending.set(cookie, read);
      this.socket.write(encodeRequest(NBD_CMD_READ, cookie, offset, length));
    });
  }

  // ---- handshake ("Handshake" section of the spec) ----

  private async handshake(exportName: string): Promise<NbdExportInfo> {
    const { fixed, noZeroes } = await this.greet();
    if (fixed) {
      const info = await this.optionInfoOrGo(exportName, NBD_OPT_GO);
      if (info !== undefined) return info;
    }
    return this.optionExportName(exportName, noZeroes);
  }

  /** Reads the server's greeting and sends the client flags. */
  private async greet(): Promise<{ fixed: boolean; noZeroes: boolean }> {
    // S: NBDMAGIC, IHAVEOPT, 16-bit handshake flags ("Newstyle negotiation").
    const hello = await this.handshakeRead(GREETING_BYTES, 'the greeting');
    const magic = hello.readBigUInt64BE(0);
    if (magic !== NBD_INIT_MAGIC) {
      throw new NbdHandshakeError(`${this.label}: not an NBD server (greeting starts 0x${magic.toString(16).padStart(16, '0')}, expected NBDMAGIC)`);
    }
    const style = hello.readBigUInt64BE(8);
    if (style === CLISERV_MAGIC) {
      throw new NbdHandshakeError(`${this.label}: server uses oldstyle negotiation, which is not supported (use a newstyle server)`);
    }
    if (style !== NBD_OPTS_MAGIC) {
      throw new NbdHandshakeError(`${this.label}: bad NBD greeting (0x${style.toString(16)} where IHAVEOPT was expected)`);
    }
    const handshakeFlags = hello.readUInt16BE(16);
    const fixed = (handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
    const noZeroes = (handshakeFlags & NBD_FLAG_NO_ZEROES) !== 0;
    const clientFlags = Buffer.alloc(CLIENT_FLAGS_BYTES);
    clientFlags.writeUInt32BE((fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0));
    this.socket.write(clientFlags);
    return { fixed, noZeroes };
  }

  /**
   * NBD_OPT_GO or NBD_OPT_INFO (same request and replies) with an
   * NBD_INFO_BLOCK_SIZE request; undefined if the server does not know the option.
   */
  private async optionInfoOrGo(exportName: string, opt: typeof NBD_OPT_GO | typeof NBD_OPT_INFO): Promise<NbdExportInfo | undefined> {
    const optName = opt === NBD_OPT_GO ? 'NBD_OPT_GO' : 'NBD_OPT_INFO';
    const name = Buffer.from(exportName, 'utf8');
    // Data: 32-bit name length, name, 16-bit number of info requests, 16-bit each.
    const data = Buffer.alloc(4 + name.length + 2 + 2);
    data.writeUInt32BE(name.length, 0);
    name.copy(data, 4);
    data.writeUInt16BE(1, 4 + name.length);
    data.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 6 + name.length);
    this.socket.write(encodeOption(opt, data));

    let size: number | undefined;
    let transmissionFlags = 0;
    let blockSize: NbdBlockSize | undefined;
    for (;;) {
      // S: 64-bit reply magic, 32-bit option, 32-bit reply type, 32-bit length, data.
      const header = await this.handshakeRead(OPTION_REPLY_HEADER_BYTES, `the reply to ${optName}`);
      if (header.readBigUInt64BE(0) !== NBD_REP_MAGIC) {
        throw new NbdHandshakeError(`${this.label}: bad option reply magic from the server`);
      }
      const option = header.readUInt32BE(8);
      const type = header.readUInt32BE(12);
      const length = header.readUInt32BE(16);
      if (option !== opt) throw new NbdHandshakeError(`${this.label}: server replied to option ${option}, expected ${optName}`);
      if (length > MAX_OPTION_REPLY) throw new NbdHandshakeError(`${this.label}: option reply of ${length} bytes is too large`);
      const payload = await this.handshakeRead(length, `the reply to ${optName}`);

      if (type === NBD_REP_INFO) {
        if (payload.length < 2) throw new NbdHandshakeError(`${this.label}: NBD_REP_INFO shorter than 2 bytes`);
        const infoType = payload.readUInt16BE(0);
        if (infoType === NBD_INFO_EXPORT) {
          // 16-bit type, 64-bit size, 16-bit transmission flags; length MUST be 12.
          if (payload.length !== NBD_INFO_EXPORT_BYTES) {
            throw new NbdHandshakeError(`${this.label}: NBD_INFO_EXPORT of ${payload.length} bytes (expected ${NBD_INFO_EXPORT_BYTES})`);
          }
          size = exportSize(payload.readBigUInt64BE(2), this.label);
          transmissionFlags = payload.readUInt16BE(10);
        } else if (infoType === NBD_INFO_BLOCK_SIZE) {
          // 16-bit type, 32-bit minimum, preferred, maximum; length MUST be 14.
          if (payload.length !== NBD_INFO_BLOCK_SIZE_BYTES) {
            throw new NbdHandshakeError(`${this.label}: NBD_INFO_BLOCK_SIZE of ${payload.length} bytes (expected ${NBD_INFO_BLOCK_SIZE_BYTES})`);
          }
          blockSize = checkBlockSize(payload.readUInt32BE(2), payload.readUInt32BE(6), payload.readUInt32BE(10), this.label);
        }
        // Clients MUST ignore information types they do not recognise.
        continue;
      }
      if (type === NBD_REP_ACK) {
        if (size === undefined) throw new NbdHandshakeError(`${this.label}: server accepted ${optName} without sending NBD_INFO_EXPORT`);
        return this.describe(exportName, size, transmissionFlags, blockSize, optName);
      }
      if (type === NBD_REP_ERR_UNSUP) return undefined;
      const message = serverMessage(payload);
      if ((type & NBD_REP_FLAG_ERROR) !== 0) {
        this.abortNegotiation();
        if (type === NBD_REP_ERR_UNKNOWN) {
          throw new NbdUnknownExportError(`${this.label}: the server has no export named "${exportName}"${message}`);
        }
        if (type === NBD_REP_ERR_TLS_REQD) {
          throw new NbdHandshakeError(`${this.label}: the server requires TLS, which this client does not support${message}`);
        }
        throw new NbdHandshakeError(`${this.label}: the server refused export "${exportName}" (${optionReplyName(type)})${message}`);
      }
      throw new NbdHandshakeError(`${this.label}: unexpected reply type ${type} to ${optName}`);
    }
  }

  /** The old way in: no error reporting, the server just hangs up on an unknown export. */
  private async optionExportName(exportName: string, noZeroes: boolean): Promise<NbdExportInfo> {
    this.socket.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from(exportName, 'utf8')));
    let reply: Buffer;
    try {
      // S: 64-bit size, 16-bit transmission flags, 124 zero bytes unless NO_ZEROES.
      reply = await this.handshakeRead(noZeroes ? EXPORT_NAME_REPLY_BYTES : EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_PADDING_BYTES, 'the reply to NBD_OPT_EXPORT_NAME');
    } catch (err) {
      if (err instanceof NbdHandshakeError && err.cause instanceof NbdDisconnectedError) {
        throw new NbdUnknownExportError(
          `${this.label}: the server closed the connection after NBD_OPT_EXPORT_NAME (no export named "${exportName}"?)`,
          { cause: err },
        );
      }
      throw err;
    }
    const size = exportSize(reply.readBigUInt64BE(0), this.label);
    return this.describe(exportName, size, reply.readUInt16BE(8), undefined, 'NBD_OPT_EXPORT_NAME');
  }

  private describe(
    exportName: string,
    size: number,
    transmissionFlags: number,
    blockSize: NbdBlockSize | undefined,
    negotiation: NbdExportInfo['negotiation'],
  ): NbdExportInfo {
    return {
      uri: this.label,
      exportName,
      size,
      transmissionFlags,
      readOnly: (transmissionFlags & NBD_FLAG_READ_ONLY) !== 0,
      canMultiConn: (transmissionFlags & NBD_FLAG_CAN_MULTI_CONN) !== 0,
      blockSize: blockSize ?? { minimum: DEFAULT_MIN_BLOCK, preferred: DEFAULT_PREFERRED_BLOCK, maximum: PORTABLE_MAX_BLOCK },
      negotiation,
    };
  }

  /** Soft disconnect during option haggling ("Termination of the session during option haggling"). */
  private abortNegotiation(): void {
    if (!this.socket.destroyed) this.socket.end(encodeOption(NBD_OPT_ABORT, Buffer.alloc(0)));
  }

  private handshakeRead(bytes: number, what: string): Promise<Buffer> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    const ready = this.queue.take(bytes);
    if (ready !== undefined) return Promise.resolve(ready);
    return new Promise((resolve, reject) => {
      this.waiter = {
        bytes,
        resolve,
        reject: (err) => reject(err instanceof NbdDisconnectedError
          ? new NbdHandshakeError(`${this.label}: the server closed the connection while sending ${what}`, { cause: err })
          : err),
      };
    });
  }

  // ---- transmission ("Transmission" section of the spec) ----

  /** `chunk` is a view of the socket's receive buffer, valid only until this returns. */
  private onData(chunk: Buffer): void {
    if (this.transmission) {
      this.queue.push(chunk);
      this.pump();
      // The receive buffer takes the next bytes: keep a copy of what is left (a partial header).
      this.queue.detach();
      return;
    }
    // Handshake replies are read later, by awaiting code: keep a copy.
    this.queue.push(Buffer.from(chunk));
    if (this.waiter !== undefined) {
      const data = this.queue.take(this.waiter.bytes);
      if (data !== undefined) {
        const { resolve } = this.waiter;
        this.waiter = undefined;
        resolve(data);
      }
    }
  }

  /** Decodes every complete simple reply in the queue. */
  private pump(): void {
    while (this.failure === undefined) {
      if (this.receiving !== undefined) {
        // The payload goes straight from the receive buffer to its destination, as it arrives.
        const receiving = this.receiving;
        const { cookie, read, into } = receiving;
        receiving.filled += this.queue.takeInto(into, receiving.filled, read.length - receiving.filled);
        if (receiving.filled < read.length) return;
        this.receiving = undefined;
        this.settle(cookie, read);
        read.resolve(into.subarray(0, read.length));
        continue;
      }
      const header = this.queue.take(SIMPLE_REPLY_BYTES);
      if (header === undefined) return;
      const magic = header.readUInt32BE(0);
      if (magic !== NBD_SIMPLE_REPLY_MAGIC) {
        const what = magic === NBD_STRUCTURED_REPLY_MAGIC ? 'a structured reply, which was not negotiated' : `bad reply magic 0x${magic.toString(16)}`;
        this.fail(new NbdDisconnectedError(`${this.label}: protocol error: server sent ${what}`));
        return;
      }
      const error = header.readUInt32BE(4);
      const cookie = header.readUInt32BE(8) * 0x1_0000_0000 + header.readUInt32BE(12);
      const read = this.pending.get(cookie);
      if (read === undefined) {
        this.fail(new NbdDisconnectedError(`${this.label}: protocol error: reply for unknown cookie ${cookie}`));
        return;
      }
      if (error !== 0) {
        // "Simple replies": after an error the server sends no payload for this request.
        this.settle(cookie, read);
        const name = errnoName(error);
        read.reject(new NbdServerError(
          `${this.label}: server error ${name} reading ${read.length} bytes at offset ${read.offset}`,
          name,
        ));
        continue;
      }
      this.receiving = { cookie, read, into: read.into ?? Buffer.allocUnsafe(read.length), filled: 0 };
    }
  }

  private settle(cookie: number, read: PendingRead): void {
    this.pending.delete(cookie);
    if (read.timer !== undefined) clearTimeout(read.timer);
    if (this.pending.size === 0) this.drained();
  }

  private drained(): void {
    const waiters = this.drainWaiters;
    this.drainWaiters = [];
    for (const wake of waiters) wake();
  }

  private onClose(): void {
    if (this.closing && this.pending.size === 0) return;
    const reason = this.socketError !== undefined ? ` (${describeSocketError(this.socketError)})` : '';
    const inFlight = this.pending.size > 0 ? ` with ${this.pending.size} read(s) in flight` : '';
    this.fail(new NbdDisconnectedError(`${this.label}: the server closed the connection${inFlight}${reason}`));
  }

  /** Fails the connection: every waiter and read in flight gets `err`. */
  private fail(err: BootcacheError): void {
    if (this.failure !== undefined) return;
    this.failure = err;
    if (this.waiter !== undefined) {
      const { reject } = this.waiter;
      this.waiter = undefined;
      reject(err);
    }
    const reads = [...this.pending.entries()];
    this.pending.clear();
    this.receiving = undefined;
    for (const [, read] of reads) {
      if (read.timer !== undefined) clearTimeout(read.timer);
      read.reject(err);
    }
    this.drained();
    this.socket.destroy();
  }
}

/** Bytes read from the socket at once, at most. */
const RECEIVE_BUFFER_BYTES = 256 * 1024;

/**
 * Hands the socket's bytes to the client from one receive buffer, reused for
 * every read of the socket: Node's default allocates a fresh buffer per read,
 * whose page faults cost large replies more than their copy (docs/replay.md,
 * "Timing"). Bytes that arrive before the client attaches are copied and
 * delivered on attach.
 */
class Receiver {
  private deliver: ((chunk: Buffer) => void) | undefined;
  private early: Buffer[] = [];

  readonly options: net.OnReadOpts = {
    buffer: Buffer.allocUnsafeSlow(RECEIVE_BUFFER_BYTES),
    callback: (bytes: number, buf: Uint8Array): boolean => {
      const chunk = Buffer.from(buf.buffer, buf.byteOffset, bytes);
      if (this.deliver) this.deliver(chunk);
      else this.early.push(Buffer.from(chunk));
      return true;
    },
  };

  attach(deliver: (chunk: Buffer) => void): void {
    this.deliver = deliver;
    for (const chunk of this.early.splice(0)) deliver(chunk);
  }
}

function openSocket(target: NbdTarget, label: string, timeoutMs: number, receiver: Receiver): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = target.transport === 'unix'
      ? net.createConnection({ path: target.socket, onread: receiver.options })
      : net.createConnection({ host: target.host, port: target.port, onread: receiver.options });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new NbdConnectError(`cannot connect to ${label}: timed out after ${timeoutMs / 1000} s`));
    }, timeoutMs);
    const onError = (err: Error): void => {
      clearTimeout(timer);
      socket.destroy();
      reject(new NbdConnectError(`cannot connect to ${label}: ${describeSocketError(err)}`, { cause: err }));
    };
    socket.once('error', onError);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeListener('error', onError);
      if (target.transport === 'tcp') socket.setNoDelay(true);
      resolve(socket);
    });
  });
}

function describeSocketError(err: Error): string {
  const code = (err as NodeJS.ErrnoException).code;
  switch (code) {
    case 'ECONNREFUSED': return 'connection refused (is the server running?)';
    case 'ENOENT': return 'no such socket';
    case 'EACCES': return 'permission denied';
    case 'ENOTFOUND': return 'unknown host';
    case 'ECONNRESET': return 'connection reset by the server';
    case 'EPIPE': return 'broken pipe';
    case 'ETIMEDOUT': return 'timed out';
    default: return code ?? err.message;
  }
}

function exportSize(size: bigint, label: string): number {
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new NbdHandshakeError(`${label}: export size ${size} is too large`);
  return Number(size);
}

/** "Block size constraints": minimum and preferred are powers of two; maximum >= preferred >= minimum. */
function checkBlockSize(minimum: number, preferred: number, maximum: number, label: string): NbdBlockSize {
  const pow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
  if (!pow2(minimum) || minimum > 65536 || !pow2(preferred) || preferred < minimum || maximum < minimum) {
    throw new NbdHandshakeError(`${label}: invalid block sizes from the server (minimum ${minimum}, preferred ${preferred}, maximum ${maximum})`);
  }
  return { minimum, preferred, maximum: Math.min(maximum, 0xffff_ffff) };
}

/** An error reply's optional message, made safe for a one-line error. */
function serverMessage(payload: Buffer): string {
  const text = payload.toString('utf8').replace(/[\u0000-\u001f\u007f]+/g, ' ').trim().slice(0, 200);
  return text === '' ? '' : `: ${text}`;
}
