/**
 * The transmission phase of one connection ("Transmission" in doc/proto.md):
 * requests are received in order, judged by validateRequest, and served up
 * to maxInFlight at a time, replied to in completion order (matched by
 * handle).
 */
import type { Socket } from 'node:net';
import { ImageChangedError } from '../../errors.js';
import { NbdProtocolViolationError, ReadCancelledError, StreamEndedError } from '../errors.js';
import * as P from '../protocol.js';
import { toBlockStatus } from './block-status.js';
import { errorText, type ConnectionContext, type ConnectionIo, type NbdLogger } from './context.js';
import { BASE_ALLOCATION_ID, type Negotiated } from './handshake.js';
import { validateRequest } from './validate-request.js';

/** Block status descriptors per reply; the client asks again for the rest ("NBD_REPLY_TYPE_BLOCK_STATUS"). */
const MAX_BLOCK_STATUS_DESCRIPTORS = 4096;

/** A block status reply's payload: a 32-bit context id, then 32-bit length and flags per descriptor ("NBD_REPLY_TYPE_BLOCK_STATUS"). */
function blockStatusPayloadBytes(descriptors: number): number {
  return 4 + 8 * descriptors;
}

export class Transmission {
  private stopping = false;
  // Requests in flight: counted from header until the reply is handed to the kernel.
  private inFlight = 0;
  private inFlightBytes = 0;
  private slotWaiter: (() => void) | null = null;
  private idleWaiters: Array<() => void> = [];

  constructor(
    private readonly socket: Socket,
    private readonly io: ConnectionIo,
    private readonly ctx: ConnectionContext,
    private readonly log: NbdLogger,
    private readonly agreed: Negotiated,
  ) {}

  /** Requests whose replies are not yet handed to the kernel. */
  get requestsInFlight(): number {
    return this.inFlight;
  }

  /** Reads no more requests; those read are still served (shutdown). */
  stop(): void {
    this.stopping = true;
    this.wakeSlotWaiter();
  }

  /** Resolves once every request read so far has its reply handed to the kernel. */
  idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Receives and serves requests until the client or the server ends the phase; why it ended. */
  async run(): Promise<string> {
    for (;;) {
      if (this.stopping) return 'server shutting down';
      // Nobody to answer: requests still buffered are dropped, not served.
      if (this.socket.destroyed) return 'connection lost';
      if (!this.hasSlot()) {
        await new Promise<void>((resolve) => (this.slotWaiter = resolve));
        continue;
      }
      let header: Buffer;
      try {
        header = await this.io.reader.read(P.REQUEST_HEADER_BYTES);
      } catch (err) {
        if (err instanceof ReadCancelledError) return 'server shutting down';
        if (err instanceof StreamEndedError) {
          return err.partialBytes > 0
            ? `client disconnected with a truncated request (${err.partialBytes} bytes)`
            : 'client disconnected without NBD_CMD_DISC';
        }
        throw err;
      }
      const request = P.decodeRequestHeader(header);
      if (request.magic !== P.NBD_REQUEST_MAGIC) {
        throw new NbdProtocolViolationError(`bad request magic 0x${request.magic.toString(16)}`);
      }
      // "The server MUST handle all outstanding requests ... and close the TCP session"
      if (request.type === P.NBD_CMD_DISC) return 'client sent NBD_CMD_DISC';
      this.ctx.counters.requests++;
      if (request.type === P.NBD_CMD_WRITE) await this.receiveWritePayload(request.length);
      const rejection = validateRequest(request, this.agreed);
      if (rejection !== null) {
        this.replyError(request.handle, request.type, rejection.errno, rejection.message);
        continue;
      }
      const pending = this.serve(request);
      if (pending !== undefined) await pending;
    }
  }

  /** A WRITE's payload follows its header, whatever the reply will be; it is dropped as it comes. */
  private async receiveWritePayload(length: number): Promise<void> {
    const max = this.ctx.limits.maxRequestBytes;
    if (length > max) {
      // "either the server or the client MAY initiate a hard disconnect if the payload of an NBD_CMD_WRITE ... would be large enough to be deemed a denial of service"
      throw new NbdProtocolViolationError(`NBD_CMD_WRITE payload of ${length} bytes exceeds the ${max}-byte limit`);
    }
    await this.io.reader.skip(length);
  }

  /** Serves a request validateRequest passed; returns a promise only while it waits for buffer memory. */
  private serve(request: P.RequestHeader): Promise<void> | undefined {
    const exp = this.agreed.export;
    const { handle, type, flags, offset, length } = request;
    switch (type) {
      case P.NBD_CMD_READ:
        if (length === 0) {
          // "The client SHOULD NOT request a read length of 0 ... the server SHOULD NOT disconnect"
          return this.replyNow(this.dataReplyParts(handle, offset, Buffer.alloc(0)));
        }
        // A single OFFSET_DATA chunk always satisfies NBD_CMD_FLAG_DF: lengths are capped at maxRequestBytes.
        return this.withBuffers(exp.bufferBytes?.(offset, length) ?? length, (buffered) =>
          this.startWork(handle, type, length, buffered, async () => {
            const data = await exp.read(offset, length);
            if (data.length !== length) {
              throw new Error(`export returned ${data.length} bytes for a ${length}-byte read`);
            }
            this.ctx.counters.bytesRead += length;
            return this.dataReplyParts(handle, offset, data);
          }),
        );
      case P.NBD_CMD_FLUSH:
        return this.replyNow(okReplyParts(handle));
      case P.NBD_CMD_CACHE: {
        const cache = exp.cache;
        if (cache === undefined || length === 0) return this.replyNow(okReplyParts(handle));
        // The hint reads the range into memory like a READ, only for less long.
        return this.withBuffers(exp.bufferBytes?.(offset, length) ?? length, (buffered) =>
          this.startWork(handle, type, 0, buffered, async () => {
            await cache.call(exp, offset, length);
            return okReplyParts(handle);
          }),
        );
      }
      case P.NBD_CMD_BLOCK_STATUS: {
        const reqOne = (flags & P.NBD_CMD_FLAG_REQ_ONE) !== 0;
        const most = reqOne ? 1 : MAX_BLOCK_STATUS_DESCRIPTORS;
        return this.withBuffers(blockStatusPayloadBytes(most), (buffered) =>
          this.startWork(handle, type, 0, buffered, async () => {
            const extents = await exp.extents(offset, length);
            return blockStatusReplyParts(handle, toBlockStatus(extents, offset, length, this.agreed.minBlock, most));
          }),
        );
      }
      default:
        // validateRequest passes no other command.
        return this.replyError(handle, type, P.NBD_EINVAL, `unknown ${P.commandName(type)}`);
    }
  }

  // --- In-flight accounting ----------------------------------------------

  private hasSlot(): boolean {
    const { maxInFlight, maxInFlightBytes } = this.ctx.limits;
    return this.inFlight === 0 || (this.inFlight < maxInFlight && this.inFlightBytes < maxInFlightBytes);
  }

  private acquire(bytes: number): void {
    this.inFlight++;
    this.inFlightBytes += bytes;
  }

  private release(bytes: number, buffered = 0): void {
    this.ctx.budget.release(buffered);
    // A reply the client never took: its buffer is garbage now.
    if (buffered > 0 && this.socket.destroyed) this.ctx.dropped(buffered);
    this.inFlight--;
    this.inFlightBytes -= bytes;
    if (this.hasSlot()) this.wakeSlotWaiter();
    if (this.inFlight === 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  private wakeSlotWaiter(): void {
    const w = this.slotWaiter;
    this.slotWaiter = null;
    w?.();
  }

  /**
   * Runs `start` once `bytes` of the server's buffer budget are this
   * connection's. When the budget is spent, the connection reads no more
   * requests until its own or others' replies drain: its socket is paused, so
   * the client is held back by flow control, and the promise returned keeps
   * the request loop waiting. A connection that closes meanwhile starts nothing.
   */
  private withBuffers(wanted: number, start: (buffered: number) => void): Promise<void> | undefined {
    // An export's alignment may ask a little more than the largest request; the server checked that one fits.
    const bytes = Math.min(wanted, this.ctx.budget.largestTake);
    const taken = this.ctx.budget.take(bytes);
    if (taken === true) {
      start(bytes);
      return undefined;
    }
    this.socket.pause();
    this.log('debug', 'reply buffer budget spent: not reading requests', { bytes, held: this.ctx.budget.heldBytes });
    return taken.then((granted) => {
      if (granted) start(bytes);
    });
  }

  /** Runs provider work for one request; any failure becomes an EIO reply. `buffered` budget bytes are released with it. */
  private startWork(handle: Buffer, type: number, bytes: number, buffered: number, work: () => Promise<Buffer[]>): void {
    this.acquire(bytes);
    work()
      .catch((err: unknown) => {
        if (type === P.NBD_CMD_READ) this.ctx.counters.readErrors++;
        // A changed image fails every read that needs storage; the agent said so once already.
        this.log(err instanceof ImageChangedError ? 'debug' : 'warn', 'request failed', { command: P.commandName(type), error: errorText(err) });
        return this.errorReplyParts(handle, P.NBD_EIO, `${P.commandName(type)} failed: ${errorText(err)}`);
      })
      .then((parts) => this.io.send(parts))
      .catch((err: unknown) => this.log('error', 'sending reply failed', { error: errorText(err) }))
      .finally(() => this.release(bytes, buffered));
  }

  // --- Replies ("Simple reply message", "Structured reply chunk message") --

  private replyError(handle: Buffer, type: number, errno: number, message: string): undefined {
    this.log('debug', 'request refused', { command: P.commandName(type), errno, message });
    return this.replyNow(this.errorReplyParts(handle, errno, message));
  }

  /** Immediate replies hold a slot too, until flushed: a client that never reads its replies cannot grow our buffers. */
  private replyNow(parts: Buffer[]): undefined {
    this.acquire(0);
    void this.io.send(parts).finally(() => this.release(0));
    return undefined;
  }

  private errorReplyParts(handle: Buffer, errno: number, message: string): Buffer[] {
    if (!this.agreed.structured) return [P.encodeSimpleReply(handle, errno)];
    // With structured replies READ errors MUST be structured; others SHOULD be, to carry the message.
    const msg = P.encodeString(message);
    const header = P.encodeStructuredHeader(handle, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_ERROR, 6 + msg.length);
    const body = Buffer.alloc(6);
    body.writeUInt32BE(errno, 0);
    body.writeUInt16BE(msg.length, 4);
    return [header, body, msg];
  }

  private dataReplyParts(handle: Buffer, offset: number, data: Buffer): Buffer[] {
    if (!this.agreed.structured) return [P.encodeSimpleReply(handle, 0), data];
    if (data.length === 0) {
      return [P.encodeStructuredHeader(handle, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_NONE, 0)];
    }
    // The data is all in memory, so no error can follow: the data chunk itself can be final.
    const header = Buffer.alloc(P.STRUCTURED_HEADER_BYTES + 8);
    P.writeStructuredHeader(header, handle, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, 8 + data.length);
    header.writeUInt32BE(Math.floor(offset / 0x100000000), P.STRUCTURED_HEADER_BYTES);
    header.writeUInt32BE(offset % 0x100000000, P.STRUCTURED_HEADER_BYTES + 4);
    return [header, data];
  }
}

/** A simple reply is allowed for non-READ requests even with structured replies ("Simple reply message"). */
function okReplyParts(handle: Buffer): Buffer[] {
  return [P.encodeSimpleReply(handle, 0)];
}

function blockStatusReplyParts(handle: Buffer, descriptors: { length: number; flags: number }[]): Buffer[] {
  const payload = Buffer.alloc(blockStatusPayloadBytes(descriptors.length));
  payload.writeUInt32BE(BASE_ALLOCATION_ID, 0);
  descriptors.forEach((d, i) => {
    payload.writeUInt32BE(d.length, 4 + 8 * i);
    payload.writeUInt32BE(d.flags, 8 + 8 * i);
  });
  return [P.encodeStructuredHeader(handle, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_BLOCK_STATUS, payload.length), payload];
}
