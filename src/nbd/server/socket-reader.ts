import type { Socket } from 'node:net';
import { ReadCancelledError, StreamEndedError, StreamStalledError } from '../errors.js';

interface Waiter {
  length: number;
  /** true while a message is half-read: stalls count even with nothing buffered. */
  midMessage: boolean;
  resolve(): void;
  reject(err: Error): void;
}

export interface SocketReaderOptions {
  /** Pause the socket when this many bytes are buffered and unread. */
  highWaterMark?: number;
  /** Fail a read of a started message that makes no full progress for this long; 0 = never. */
  stallTimeoutMs?: number;
}

/**
 * Exact-length reads from a socket with bounded buffering: the socket is
 * paused while more than highWaterMark bytes wait unread, so a peer that
 * sends faster than we consume is held back by TCP flow control instead of
 * growing our memory.
 */
export class SocketReader {
  /** Unconsumed chunks are chunks[head..]; a moving head keeps consumption O(1) with many tiny chunks. */
  private chunks: Buffer[] = [];
  private head = 0;
  private buffered = 0;
  private waiter: Waiter | null = null;
  private failure: Error | null = null;
  private stallTimer: NodeJS.Timeout | null = null;
  private readonly highWaterMark: number;
  private readonly stallTimeoutMs: number;
  private readonly listeners: { data(chunk: Buffer): void; end(): void; close(): void; error(err: Error): void };

  constructor(
    private readonly socket: Socket,
    options: SocketReaderOptions = {},
  ) {
    this.highWaterMark = options.highWaterMark ?? 1024 * 1024;
    this.stallTimeoutMs = options.stallTimeoutMs ?? 0;
    this.listeners = {
      data: (chunk: Buffer) => this.onData(chunk),
      end: () => this.fail(new StreamEndedError('peer closed the connection', this.buffered)),
      close: () => this.fail(new StreamEndedError('connection closed', this.buffered)),
      error: (err: Error) => this.fail(new StreamEndedError(`connection failed: ${err.message}`, this.buffered)),
    };
    socket.on('data', this.listeners.data);
    socket.on('end', this.listeners.end);
    socket.on('close', this.listeners.close);
    socket.on('error', this.listeners.error);
  }

  /**
   * Stops reading: the socket is paused (what arrives stays in it for the
   * next reader, e.g. a TLS session over it) and this reader lets go of it.
   * Returns the bytes it had received and not handed out.
   */
  detach(): number {
    this.socket.pause();
    this.socket.off('data', this.listeners.data);
    this.socket.off('end', this.listeners.end);
    this.socket.off('close', this.listeners.close);
    this.socket.off('error', this.listeners.error);
    const left = this.buffered;
    this.fail(new ReadCancelledError());
    return left;
  }

  /** Bytes received and not yet consumed. */
  get bufferedBytes(): number {
    return this.buffered;
  }

  /** Exactly `length` bytes. `midMessage` arms the stall timer even before the first byte. */
  read(length: number, midMessage = false): Promise<Buffer> {
    if (this.buffered >= length) {
      return Promise.resolve(this.take(length));
    }
    return this.waitFor(length, midMessage).then(() => this.take(length));
  }

  /** Consumes and drops `length` bytes without holding more than what already arrived. */
  async skip(length: number): Promise<void> {
    let left = length;
    while (left > 0) {
      if (this.buffered === 0) await this.waitFor(1, true);
      const n = Math.min(left, this.buffered);
      this.drop(n);
      left -= n;
    }
  }

  private waitFor(length: number, midMessage: boolean): Promise<void> {
    if (this.waiter !== null) {
      return Promise.reject(new Error('SocketReader: concurrent reads are not supported'));
    }
    if (this.failure !== null) {
      return Promise.reject(this.failure);
    }
    return new Promise<void>((resolve, reject) => {
      this.waiter = { length, midMessage, resolve, reject };
      this.armStallTimer();
      if (this.socket.isPaused()) this.socket.resume();
    });
  }

  /** Fails any pending read with ReadCancelledError; later reads fail too. */
  cancel(): void {
    this.fail(new ReadCancelledError());
  }

  private onData(chunk: Buffer): void {
    if (this.failure !== null) return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const w = this.waiter;
    if (w !== null && this.buffered >= w.length) {
      this.waiter = null;
      this.clearStallTimer();
      w.resolve();
    } else if (w !== null) {
      this.armStallTimer();
    }
    if (this.buffered >= this.highWaterMark && this.waiter === null) {
      this.socket.pause();
    }
  }

  private take(length: number): Buffer {
    let out: Buffer;
    const first = this.chunks[this.head];
    if (length === 0) {
      out = Buffer.alloc(0);
    } else if (first !== undefined && first.length >= length) {
      out = first.subarray(0, length);
      this.consumeFirst(first, length);
    } else {
      out = Buffer.allocUnsafe(length);
      let done = 0;
      while (done < length) {
        const c = this.chunks[this.head]!;
        const n = Math.min(c.length, length - done);
        c.copy(out, done, 0, n);
        done += n;
        this.consumeFirst(c, n);
      }
    }
    this.afterConsume(length);
    return out;
  }

  private drop(length: number): void {
    let left = length;
    while (left > 0) {
      const c = this.chunks[this.head]!;
      const n = Math.min(c.length, left);
      this.consumeFirst(c, n);
      left -= n;
    }
    this.afterConsume(length);
  }

  /** Removes n bytes from the first unconsumed chunk c. */
  private consumeFirst(c: Buffer, n: number): void {
    if (n < c.length) {
      this.chunks[this.head] = c.subarray(n);
      return;
    }
    this.head++;
    if (this.head === this.chunks.length) {
      this.chunks = [];
      this.head = 0;
    } else if (this.head >= 1024 && this.head * 2 >= this.chunks.length) {
      this.chunks = this.chunks.slice(this.head);
      this.head = 0;
    }
  }

  private afterConsume(length: number): void {
    this.buffered -= length;
    if (this.buffered < this.highWaterMark / 2 && this.socket.isPaused() && this.failure === null) {
      this.socket.resume();
    }
  }

  private fail(err: Error): void {
    if (this.failure !== null) return;
    this.failure = err;
    this.clearStallTimer();
    const w = this.waiter;
    this.waiter = null;
    w?.reject(err);
  }

  private armStallTimer(): void {
    const w = this.waiter;
    if (this.stallTimeoutMs <= 0 || this.stallTimer !== null || w === null) return;
    if (!w.midMessage && this.buffered === 0) return;
    this.stallTimer = setTimeout(() => {
      this.stallTimer = null;
      if (this.waiter === null) return;
      this.fail(
        new StreamStalledError(
          `incomplete message: ${this.buffered} of ${this.waiter.length} bytes after ${this.stallTimeoutMs} ms`,
        ),
      );
    }, this.stallTimeoutMs);
    this.stallTimer.unref();
  }

  private clearStallTimer(): void {
    if (this.stallTimer !== null) {
      clearTimeout(this.stallTimer);
      this.stallTimer = null;
    }
  }
}
