/**
 * NBD protocol behaviour of the server, driven by a client written here that
 * can also break the rules: option and request edge cases, hostile clients,
 * concurrency, ordering, draining and listening.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, lstatSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { AgentError, StorageIOError } from '../../src/errors.js';
import { ExportNotFoundError } from '../../src/nbd/errors.js';
import { DiskImageExport, type ExportProvider, type NbdExport } from '../../src/nbd/server/export.js';
import * as P from '../../src/nbd/protocol.js';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server/server.js';
import { SocketReader } from '../../src/nbd/server/socket-reader.js';
import { FileByteSource } from '../../src/image/file-source.js';
import { RawImage } from '../../src/image/raw.js';
import type { Extent } from '../../src/image/types.js';

// ---------------------------------------------------------------------------
// A test NBD client: fixed newstyle, INFO/GO, structured replies, block
// status, pipelined requests matched by handle, raw options and requests.
// ---------------------------------------------------------------------------

type NbdTarget = { path: string } | { host: string; port?: number };

/** The server answered an option with an error reply. */
class NbdOptionError extends Error {
  constructor(
    readonly option: number,
    readonly reply: number,
    message: string,
  ) {
    super(message);
    this.name = 'NbdOptionError';
  }
}

/** The server answered a request with an error. */
class NbdRequestError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
    this.name = 'NbdRequestError';
  }
}

/** The server sent something this client cannot accept. */
class NbdClientProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NbdClientProtocolError';
  }
}

interface OptionReply {
  type: number;
  data: Buffer;
}

interface BlockSizeInfo {
  minimum: number;
  preferred: number;
  maximum: number;
}

interface ExportInfo {
  size: number;
  transmissionFlags: number;
  name?: string;
  description?: string;
  blockSize?: BlockSizeInfo;
}

interface BlockStatusExtent {
  length: number;
  flags: number;
}

interface NbdReply {
  /** 0 on success, else an NBD error value. */
  error: number;
  /** Error message from a structured error chunk. */
  message?: string;
  /** READ: the assembled data (on success). */
  data?: Buffer;
  /** BLOCK_STATUS: descriptors per metadata context id. */
  blockStatus?: Map<number, BlockStatusExtent[]>;
  /** Structured chunks received (0 for a simple reply). */
  chunks: number;
  /** Content chunks (OFFSET_DATA / OFFSET_HOLE) received. */
  contentChunks: number;
}

/** Largest reply payload accepted from a server. */
const MAX_REPLY_PAYLOAD = 64 * 1024 * 1024 + 64;

function connectSocket(target: NbdTarget, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket =
      'path' in target ? net.connect({ path: target.path }) : net.connect({ host: target.host, port: target.port ?? P.NBD_DEFAULT_PORT });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`timed out connecting to NBD server`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.off('error', reject);
      socket.setNoDelay(true);
      resolve(socket);
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

function nameBytes(name: string): Buffer {
  const b = Buffer.from(name, 'utf8');
  const out = Buffer.alloc(4 + b.length);
  out.writeUInt32BE(b.length, 0);
  b.copy(out, 4);
  return out;
}

/** Data of NBD_OPT_{LIST,SET}_META_CONTEXT. */
function metaContextData(exportName: string, queries: string[]): Buffer {
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  return Buffer.concat([nameBytes(exportName), count, ...queries.map(nameBytes)]);
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO. */
function infoGoData(exportName: string, infoRequests: number[]): Buffer {
  const requests = Buffer.alloc(2 + 2 * infoRequests.length);
  requests.writeUInt16BE(infoRequests.length, 0);
  infoRequests.forEach((r, i) => requests.writeUInt16BE(r, 2 + 2 * i));
  return Buffer.concat([nameBytes(exportName), requests]);
}

function replyMessage(reply: OptionReply): string {
  return reply.data.toString('utf8');
}

/** The negotiation phase of one connection. */
class NbdHandshake {
  private structured = false;
  private metaContexts = new Map<number, string>();

  private constructor(
    readonly socket: net.Socket,
    readonly reader: SocketReader,
    readonly handshakeFlags: number,
  ) {}

  /** Connects, reads the greeting and sends the client flags (fixed newstyle and no-zeroes by default). */
  static async connect(target: NbdTarget, options: { clientFlags?: number; timeoutMs?: number } = {}): Promise<NbdHandshake> {
    const socket = await connectSocket(target, options.timeoutMs ?? 10_000);
    socket.on('error', () => undefined);
    const reader = new SocketReader(socket);
    try {
      const greeting = await reader.read(18);
      if (greeting.readBigUInt64BE(0) !== P.NBD_INIT_MAGIC || greeting.readBigUInt64BE(8) !== P.NBD_OPTS_MAGIC) {
        throw new NbdClientProtocolError('not a newstyle NBD server');
      }
      const handshakeFlags = greeting.readUInt16BE(16);
      const flags =
        options.clientFlags ??
        (P.NBD_FLAG_C_FIXED_NEWSTYLE | (handshakeFlags & P.NBD_FLAG_NO_ZEROES ? P.NBD_FLAG_C_NO_ZEROES : 0));
      const clientFlags = Buffer.alloc(4);
      clientFlags.writeUInt32BE(flags, 0);
      socket.write(clientFlags);
      return new NbdHandshake(socket, reader, handshakeFlags);
    } catch (err) {
      socket.destroy();
      throw err;
    }
  }

  /** Writes one option without waiting for its reply. */
  sendOption(option: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): void {
    const header = Buffer.alloc(P.OPTION_HEADER_BYTES);
    header.writeBigUInt64BE(P.NBD_OPTS_MAGIC, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(declaredLength, 12);
    this.socket.write(Buffer.concat([header, data]));
  }

  /** Reads one option reply (payload bounded to 64 KiB). */
  async readOptionReply(): Promise<OptionReply & { option: number }> {
    const header = await this.reader.read(P.OPTION_REPLY_HEADER_BYTES);
    if (header.readBigUInt64BE(0) !== P.NBD_REP_MAGIC) throw new NbdClientProtocolError('bad option reply magic');
    const length = header.readUInt32BE(16);
    if (length > 64 * 1024) throw new NbdClientProtocolError(`option reply of ${length} bytes`);
    const data = Buffer.from(await this.reader.read(length));
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data };
  }

  /** Sends an option and collects replies up to the final one (ACK or an error). */
  async option(option: number, data?: Buffer): Promise<OptionReply[]> {
    this.sendOption(option, data);
    const replies: OptionReply[] = [];
    for (;;) {
      const reply = await this.readOptionReply();
      if (reply.option !== option) throw new NbdClientProtocolError(`reply for option ${reply.option}, expected ${option}`);
      replies.push({ type: reply.type, data: reply.data });
      if (reply.type === P.NBD_REP_ACK || (reply.type & P.NBD_REP_FLAG_ERROR) !== 0) return replies;
    }
  }

  private async optionOk(option: number, data?: Buffer): Promise<OptionReply[]> {
    const replies = await this.option(option, data);
    const last = replies[replies.length - 1]!;
    if (last.type !== P.NBD_REP_ACK) {
      throw new NbdOptionError(option, last.type, `${P.optionName(option)} refused (0x${last.type.toString(16)}): ${replyMessage(last)}`);
    }
    return replies.slice(0, -1);
  }

  async list(): Promise<string[]> {
    const replies = await this.optionOk(P.NBD_OPT_LIST);
    return replies
      .filter((r) => r.type === P.NBD_REP_SERVER)
      .map((r) => r.data.subarray(4, 4 + r.data.readUInt32BE(0)).toString('utf8'));
  }

  async structuredReplies(): Promise<void> {
    await this.optionOk(P.NBD_OPT_STRUCTURED_REPLY);
    this.structured = true;
  }

  async listMetaContexts(exportName: string, queries: string[] = []): Promise<string[]> {
    const replies = await this.optionOk(P.NBD_OPT_LIST_META_CONTEXT, metaContextData(exportName, queries));
    return replies.filter((r) => r.type === P.NBD_REP_META_CONTEXT).map((r) => r.data.subarray(4).toString('utf8'));
  }

  async setMetaContexts(exportName: string, queries: string[]): Promise<Map<number, string>> {
    const replies = await this.optionOk(P.NBD_OPT_SET_META_CONTEXT, metaContextData(exportName, queries));
    this.metaContexts = new Map(
      replies.filter((r) => r.type === P.NBD_REP_META_CONTEXT).map((r) => [r.data.readUInt32BE(0), r.data.subarray(4).toString('utf8')]),
    );
    return this.metaContexts;
  }

  async info(exportName: string, infoRequests: number[] = [P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION, P.NBD_INFO_BLOCK_SIZE]): Promise<ExportInfo> {
    return parseInfo(await this.optionOk(P.NBD_OPT_INFO, infoGoData(exportName, infoRequests)));
  }

  /** NBD_OPT_GO: on success the connection enters transmission. */
  async go(exportName: string, infoRequests: number[] = [P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION, P.NBD_INFO_BLOCK_SIZE]): Promise<NbdClient> {
    const info = parseInfo(await this.optionOk(P.NBD_OPT_GO, infoGoData(exportName, infoRequests)));
    return new NbdClient(this.socket, this.reader, info, this.structured, this.metaContexts);
  }

  /** NBD_OPT_EXPORT_NAME: the old way in; the server disconnects if it refuses. */
  async exportName(exportName: string): Promise<NbdClient> {
    this.sendOption(P.NBD_OPT_EXPORT_NAME, Buffer.from(exportName, 'utf8'));
    const reply = await this.reader.read(10);
    if ((this.handshakeFlags & P.NBD_FLAG_NO_ZEROES) === 0) await this.reader.skip(P.EXPORT_NAME_PADDING_BYTES);
    const info: ExportInfo = { size: Number(reply.readBigUInt64BE(0)), transmissionFlags: reply.readUInt16BE(8) };
    return new NbdClient(this.socket, this.reader, info, this.structured, this.metaContexts);
  }

  /** NBD_OPT_ABORT, then close. */
  async abort(): Promise<void> {
    try {
      await this.option(P.NBD_OPT_ABORT);
    } finally {
      this.socket.destroy();
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

function parseInfo(replies: OptionReply[]): ExportInfo {
  let info: ExportInfo | null = null;
  let name: string | undefined;
  let description: string | undefined;
  let blockSize: BlockSizeInfo | undefined;
  for (const r of replies) {
    if (r.type !== P.NBD_REP_INFO || r.data.length < 2) continue;
    const type = r.data.readUInt16BE(0);
    if (type === P.NBD_INFO_EXPORT && r.data.length === 12) {
      info = { size: Number(r.data.readBigUInt64BE(2)), transmissionFlags: r.data.readUInt16BE(10) };
    } else if (type === P.NBD_INFO_NAME) {
      name = r.data.subarray(2).toString('utf8');
    } else if (type === P.NBD_INFO_DESCRIPTION) {
      description = r.data.subarray(2).toString('utf8');
    } else if (type === P.NBD_INFO_BLOCK_SIZE && r.data.length === 14) {
      blockSize = { minimum: r.data.readUInt32BE(2), preferred: r.data.readUInt32BE(6), maximum: r.data.readUInt32BE(10) };
    }
  }
  if (info === null) throw new NbdClientProtocolError('server accepted the export without NBD_INFO_EXPORT');
  if (name !== undefined) info.name = name;
  if (description !== undefined) info.description = description;
  if (blockSize !== undefined) info.blockSize = blockSize;
  return info;
}

interface PendingRequest {
  type: number;
  offset: number;
  length: number;
  resolve(reply: NbdReply): void;
  reply: NbdReply;
}

interface NbdClientOptions {
  exportName?: string;
  /** Negotiate structured replies (default true). */
  structuredReplies?: boolean;
  /** Select base:allocation for block status (default false). */
  blockStatus?: boolean;
  /** Ask for NBD_INFO_BLOCK_SIZE in GO, committing to the constraints (default true). */
  requestBlockSize?: boolean;
  timeoutMs?: number;
}

/** The transmission phase: pipelined requests, replies matched by handle. */
class NbdClient {
  /** Resolves when the connection is closed (after DISC or on error). */
  readonly closed: Promise<void>;
  private readonly pending = new Map<bigint, PendingRequest>();
  private nextHandle = 1n;
  private failure: Error | null = null;

  constructor(
    readonly socket: net.Socket,
    private readonly reader: SocketReader,
    readonly info: ExportInfo,
    readonly structured: boolean,
    readonly metaContexts: Map<number, string>,
  ) {
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
    void this.readReplies();
  }

  static async connect(target: NbdTarget, options: NbdClientOptions = {}): Promise<NbdClient> {
    const hs = await NbdHandshake.connect(target, options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs });
    try {
      const name = options.exportName ?? '';
      if (options.structuredReplies ?? true) await hs.structuredReplies();
      if (options.blockStatus ?? false) await hs.setMetaContexts(name, [P.BASE_ALLOCATION]);
      const requests = [P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION];
      if (options.requestBlockSize ?? true) requests.push(P.NBD_INFO_BLOCK_SIZE);
      return await hs.go(name, requests);
    } catch (err) {
      hs.close();
      throw err;
    }
  }

  get size(): number {
    return this.info.size;
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.pending.size;
  }

  /** Sends one request; resolves with the reply (errors are in the reply, not thrown). */
  request(type: number, options: { flags?: number; offset?: number; length?: number; payload?: Buffer } = {}): Promise<NbdReply> {
    if (this.failure !== null) return Promise.reject(this.failure);
    const handle = this.nextHandle++;
    const offset = options.offset ?? 0;
    const length = options.length ?? options.payload?.length ?? 0;
    const header = Buffer.alloc(P.REQUEST_HEADER_BYTES);
    header.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
    header.writeUInt16BE(options.flags ?? 0, 4);
    header.writeUInt16BE(type, 6);
    header.writeBigUInt64BE(handle, 8);
    header.writeBigUInt64BE(BigInt(offset), 16);
    header.writeUInt32BE(length, 24);
    const promise =
      type === P.NBD_CMD_DISC
        ? Promise.resolve<NbdReply>({ error: 0, chunks: 0, contentChunks: 0 })
        : new Promise<NbdReply>((resolve) => {
            this.pending.set(handle, { type, offset, length, resolve, reply: { error: 0, chunks: 0, contentChunks: 0 } });
          });
    this.socket.write(options.payload === undefined ? header : Buffer.concat([header, options.payload]));
    return promise;
  }

  async read(offset: number, length: number, flags = 0): Promise<Buffer> {
    const reply = await this.request(P.NBD_CMD_READ, { offset, length, flags });
    if (reply.error !== 0) throw new NbdRequestError(reply.error, `read of ${length} bytes at ${offset} failed: error ${reply.error}${reply.message ? ` (${reply.message})` : ''}`);
    return reply.data ?? Buffer.alloc(0);
  }

  /** Block status for the first negotiated context. */
  async blockStatus(offset: number, length: number, flags = 0): Promise<BlockStatusExtent[]> {
    const reply = await this.request(P.NBD_CMD_BLOCK_STATUS, { offset, length, flags });
    if (reply.error !== 0) throw new NbdRequestError(reply.error, `block status failed: error ${reply.error}${reply.message ? ` (${reply.message})` : ''}`);
    const first = [...(reply.blockStatus?.values() ?? [])][0];
    return first ?? [];
  }

  /** NBD_CMD_DISC: the server finishes in-flight requests, then closes. */
  async disconnect(): Promise<void> {
    if (!this.socket.destroyed) {
      void this.request(P.NBD_CMD_DISC);
      this.socket.end();
    }
    await this.closed;
  }

  destroy(): void {
    this.socket.destroy();
  }

  private async readReplies(): Promise<void> {
    try {
      for (;;) {
        const magic = (await this.reader.read(4)).readUInt32BE(0);
        if (magic === P.NBD_SIMPLE_REPLY_MAGIC) await this.readSimple();
        else if (magic === P.NBD_STRUCTURED_REPLY_MAGIC) await this.readChunk();
        else throw new NbdClientProtocolError(`bad reply magic 0x${magic.toString(16)}`);
      }
    } catch (err) {
      this.failure = err instanceof Error ? err : new Error(String(err));
      this.socket.destroy();
      for (const p of this.pending.values()) p.resolve({ ...p.reply, error: p.reply.error || P.NBD_ESHUTDOWN, message: `connection lost: ${this.failure.message}` });
      this.pending.clear();
    }
  }

  private take(handle: bigint): PendingRequest {
    const p = this.pending.get(handle);
    if (p === undefined) throw new NbdClientProtocolError(`reply for unknown handle ${handle}`);
    return p;
  }

  private async readSimple(): Promise<void> {
    const rest = await this.reader.read(12);
    const error = rest.readUInt32BE(0);
    const handle = rest.readBigUInt64BE(4);
    const p = this.take(handle);
    this.pending.delete(handle);
    p.reply.error = error;
    if (p.type === P.NBD_CMD_READ && error === 0) {
      if (this.structured) throw new NbdClientProtocolError('simple reply to a READ after structured replies were negotiated');
      p.reply.data = Buffer.from(await this.reader.read(p.length));
    }
    p.resolve(p.reply);
  }

  private async readChunk(): Promise<void> {
    if (!this.structured) throw new NbdClientProtocolError('structured reply without negotiation');
    const rest = await this.reader.read(16);
    const flags = rest.readUInt16BE(0);
    const type = rest.readUInt16BE(2);
    const handle = rest.readBigUInt64BE(4);
    const length = rest.readUInt32BE(12);
    if (length > MAX_REPLY_PAYLOAD) throw new NbdClientProtocolError(`reply chunk of ${length} bytes`);
    const p = this.take(handle);
    const payload = await this.reader.read(length);
    const reply = p.reply;
    reply.chunks++;
    switch (type) {
      case P.NBD_REPLY_TYPE_NONE:
        if (length !== 0) throw new NbdClientProtocolError('NBD_REPLY_TYPE_NONE with a payload');
        break;
      case P.NBD_REPLY_TYPE_OFFSET_DATA:
      case P.NBD_REPLY_TYPE_OFFSET_HOLE: {
        if (p.type !== P.NBD_CMD_READ) throw new NbdClientProtocolError('content chunk for a non-READ request');
        const offset = Number(payload.readBigUInt64BE(0));
        const size = type === P.NBD_REPLY_TYPE_OFFSET_DATA ? length - 8 : payload.readUInt32BE(8);
        if (offset < p.offset || offset + size > p.offset + p.length || size <= 0) {
          throw new NbdClientProtocolError(`content chunk [${offset}, +${size}) outside the request`);
        }
        reply.data ??= Buffer.alloc(p.length);
        if (type === P.NBD_REPLY_TYPE_OFFSET_DATA) payload.copy(reply.data, offset - p.offset, 8);
        else reply.data.fill(0, offset - p.offset, offset - p.offset + size);
        reply.contentChunks++;
        break;
      }
      case P.NBD_REPLY_TYPE_BLOCK_STATUS: {
        if ((length - 4) % 8 !== 0 || length < 12) throw new NbdClientProtocolError(`block status chunk of ${length} bytes`);
        const id = payload.readUInt32BE(0);
        const extents: BlockStatusExtent[] = [];
        for (let pos = 4; pos < length; pos += 8) {
          extents.push({ length: payload.readUInt32BE(pos), flags: payload.readUInt32BE(pos + 4) });
        }
        reply.blockStatus ??= new Map();
        reply.blockStatus.set(id, extents);
        break;
      }
      default:
        if ((type & P.NBD_REPLY_TYPE_FLAG_ERROR) !== 0 && length >= 6) {
          reply.error = payload.readUInt32BE(0) || P.NBD_EINVAL;
          const msgLength = Math.min(payload.readUInt16BE(4), length - 6);
          reply.message = payload.subarray(6, 6 + msgLength).toString('utf8');
        } else {
          throw new NbdClientProtocolError(`unknown reply chunk type ${type}`);
        }
    }
    if ((flags & P.NBD_REPLY_FLAG_DONE) !== 0) {
      this.pending.delete(handle);
      if (reply.error === 0 && p.type === P.NBD_CMD_READ) reply.data ??= Buffer.alloc(p.length);
      if (reply.error !== 0) delete reply.data;
      p.resolve(reply);
    }
  }
}

// ---------------------------------------------------------------------------
// Fixtures: a random raw image served through RawImage, with hooks to delay
// or fail reads and counters to see what the server asked of the export.
// ---------------------------------------------------------------------------

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const dir = mkdtempSync(join(tmpdir(), 'bc-nbd-proto-'));
const imagePath = join(dir, 'disk.raw');
const data = randomBytes(SIZE);
writeFileSync(imagePath, data);

interface Hooks {
  /** Milliseconds to hold a read at this offset before serving it. */
  delay?: (offset: number, length: number) => number;
  /** Make a read fail (as a storage fault would). */
  fail?: (offset: number) => boolean;
}

interface ExportCounters {
  opened: number;
  closed: number;
  reads: number;
  caches: number;
  active: number;
  maxActive: number;
}

class HookedExport implements NbdExport {
  private active = 0;
  maxActive = 0;

  constructor(
    private readonly inner: DiskImageExport,
    private readonly hooks: Hooks,
    private readonly counters: ExportCounters,
  ) {}

  get name(): string {
    return this.inner.name;
  }

  get size(): number {
    return this.inner.size;
  }

  readonly description = 'hooked test disk';

  async read(offset: number, length: number): Promise<Buffer> {
    this.counters.reads++;
    this.active++;
    this.counters.active++;
    this.maxActive = Math.max(this.maxActive, this.active);
    this.counters.maxActive = Math.max(this.counters.maxActive, this.maxActive);
    try {
      const ms = this.hooks.delay?.(offset, length) ?? 0;
      if (ms > 0) await new Promise((r) => setTimeout(r, ms));
      if (this.hooks.fail?.(offset)) throw new StorageIOError('simulated storage fault', { file: imagePath });
      return await this.inner.read(offset, length);
    } finally {
      this.active--;
      this.counters.active--;
    }
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.inner.extents(offset, length);
  }

  async cache(): Promise<void> {
    this.counters.caches++;
  }

  async close(): Promise<void> {
    this.counters.closed++;
    await this.inner.close();
  }
}

function makeProvider(hooks: Hooks = {}): { provider: ExportProvider; counters: ExportCounters; exports: HookedExport[] } {
  const counters: ExportCounters = { opened: 0, closed: 0, reads: 0, caches: 0, active: 0, maxActive: 0 };
  const exports: HookedExport[] = [];
  const provider: ExportProvider = {
    list: async () => ['disk', 'spare'],
    open: async (name) => {
      if (name !== 'disk' && name !== '') throw new ExportNotFoundError(`no export named ${JSON.stringify(name)}`);
      const image = await RawImage.open(await FileByteSource.open(imagePath));
      counters.opened++;
      const exp = new HookedExport(new DiskImageExport('disk', image), hooks, counters);
      exports.push(exp);
      return exp;
    },
  };
  return { provider, counters, exports };
}

const servers: NbdServer[] = [];
let socketSeq = 0;

async function startServer(
  options: NbdServerOptions = {},
  hooks: Hooks = {},
): Promise<{ server: NbdServer; target: { path: string }; counters: ExportCounters; exports: HookedExport[]; logs: string[] }> {
  const { provider, counters, exports } = makeProvider(hooks);
  const logs: string[] = [];
  const server = new NbdServer(provider, { logger: (level, msg, fields) => logs.push(`${level} ${msg} ${JSON.stringify(fields ?? {})}`), ...options });
  const path = join(dir, `s${socketSeq++}.sock`);
  await server.listenUnix(path);
  servers.push(server);
  return { server, target: { path }, counters, exports, logs };
}

afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.close()));
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** Resolves when the socket closes; rejects after `ms`. */
function closedWithin(socket: net.Socket, ms: number, what = 'socket'): Promise<void> {
  if (socket.destroyed || socket.readyState === 'closed') return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what} still open after ${ms} ms`)), ms);
    socket.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

async function waitFor(cond: () => boolean, ms = 5000): Promise<void> {
  const until = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > until) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Connects and completes the greeting: ready to send options. */
async function handshake(target: { path: string }, clientFlags?: number): Promise<NbdHandshake> {
  return NbdHandshake.connect(target, clientFlags === undefined ? {} : { clientFlags });
}

function requestHeader(type: number, handle: bigint, offset: bigint, length: number, flags = 0, magic = P.NBD_REQUEST_MAGIC): Buffer {
  const h = Buffer.alloc(P.REQUEST_HEADER_BYTES);
  h.writeUInt32BE(magic, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(handle, 8);
  h.writeBigUInt64BE(offset, 16);
  h.writeUInt32BE(length, 24);
  return h;
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

describe('NBD server: handshake', () => {
  it('greets with fixed newstyle and no-zeroes, and answers NBD_OPT_INFO', async () => {
    const { target } = await startServer();
    const hs = await handshake(target);
    expect(hs.handshakeFlags).toBe(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
    const info = await hs.info('disk');
    expect(info.size).toBe(SIZE);
    expect(info.name).toBe('disk');
    expect(info.description).toBe('hooked test disk');
    expect(info.blockSize).toEqual({ minimum: 512, preferred: 4096, maximum: 32 * MiB });
    const flags = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_READ_ONLY | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_CACHE | P.NBD_FLAG_CAN_MULTI_CONN;
    expect(info.transmissionFlags).toBe(flags);
    // DF is offered only once structured replies are negotiated.
    await hs.structuredReplies();
    expect((await hs.info('disk')).transmissionFlags).toBe(flags | P.NBD_FLAG_SEND_DF);
    const client = await hs.go('disk');
    expect((await client.read(0, 4096)).equals(data.subarray(0, 4096))).toBe(true);
    await client.disconnect();
  });

  it('answers an unknown option with NBD_REP_ERR_UNSUP and negotiation goes on', async () => {
    const { target } = await startServer();
    const hs = await handshake(target);
    for (const option of [99, P.NBD_OPT_EXTENDED_HEADERS, P.NBD_OPT_PEEK_EXPORT]) {
      const replies = await hs.option(option, Buffer.from('whatever'));
      expect(replies).toHaveLength(1);
      expect(replies[0]!.type).toBe(P.NBD_REP_ERR_UNSUP);
    }
    const client = await hs.go('disk');
    expect((await client.read(8192, 512)).equals(data.subarray(8192, 8192 + 512))).toBe(true);
    await client.disconnect();
  });

  it('refuses NBD_OPT_STARTTLS with NBD_REP_ERR_POLICY (NBD_REP_ERR_INVALID with data)', async () => {
    const { target } = await startServer();
    const hs = await handshake(target);
    const [reply] = await hs.option(P.NBD_OPT_STARTTLS);
    expect(reply!.type).toBe(P.NBD_REP_ERR_POLICY);
    expect(reply!.data.toString()).toMatch(/TLS/);
    const [withData] = await hs.option(P.NBD_OPT_STARTTLS, Buffer.from('x'));
    expect(withData!.type).toBe(P.NBD_REP_ERR_INVALID);
    const client = await hs.go('disk');
    await client.disconnect();
  });

  it('answers an unknown export with NBD_REP_ERR_UNKNOWN for INFO and GO, then GO works', async () => {
    const { target, counters } = await startServer();
    const hs = await handshake(target);
    await expect(hs.info('nope')).rejects.toMatchObject({ reply: P.NBD_REP_ERR_UNKNOWN });
    await expect(hs.go('nope')).rejects.toMatchObject({ reply: P.NBD_REP_ERR_UNKNOWN });
    const client = await hs.go('disk');
    expect(client.size).toBe(SIZE);
    await client.disconnect();
    // INFO without describe() opened and closed the export; GO's stays open until the end.
    await waitFor(() => counters.closed === counters.opened);
  });

  it('drops the connection on NBD_OPT_EXPORT_NAME for an unknown export', async () => {
    const { target } = await startServer();
    const hs = await handshake(target);
    await expect(hs.exportName('nope')).rejects.toThrow();
    await closedWithin(hs.socket, 2000);
  });

  it('enters transmission with NBD_OPT_EXPORT_NAME, with and without the 124 zero bytes', async () => {
    const { target } = await startServer();
    // With NO_ZEROES (the client helper sets it when offered).
    const a = await (await handshake(target)).exportName('disk');
    expect(a.info).toEqual({ size: SIZE, transmissionFlags: expect.any(Number) as number });
    expect((await a.read(0, 512)).equals(data.subarray(0, 512))).toBe(true);
    await a.disconnect();
    // Without: the server must send the padding.
    const hs = await handshake(target, P.NBD_FLAG_C_FIXED_NEWSTYLE);
    hs.sendOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk'));
    const reply = await hs.reader.read(10 + 124);
    expect(Number(reply.readBigUInt64BE(0))).toBe(SIZE);
    expect(reply.subarray(10).equals(Buffer.alloc(124))).toBe(true);
    hs.close();
  });

  it('lists exports, and rejects NBD_OPT_LIST with data', async () => {
    const { target } = await startServer();
    const hs = await handshake(target);
    expect(await hs.list()).toEqual(['disk', 'spare']);
    const [bad] = await hs.option(P.NBD_OPT_LIST, Buffer.from([1]));
    expect(bad!.type).toBe(P.NBD_REP_ERR_INVALID);
    await hs.abort();
  });

  it('acknowledges NBD_OPT_ABORT and closes', async () => {
    const { target, counters } = await startServer();
    const hs = await handshake(target);
    const [reply] = await hs.option(P.NBD_OPT_ABORT);
    expect(reply!.type).toBe(P.NBD_REP_ACK);
    await closedWithin(hs.socket, 2000);
    expect(counters.opened).toBe(0);
  });

  it('refuses export names with a NUL byte or over 4096 bytes', async () => {
    const { target } = await startServer();
    const hs = await handshake(target);
    for (const name of ['di\0sk', 'x'.repeat(4097)]) {
      await expect(hs.info(name)).rejects.toMatchObject({ reply: P.NBD_REP_ERR_INVALID });
      await expect(hs.go(name)).rejects.toMatchObject({ reply: P.NBD_REP_ERR_INVALID });
    }
    const [bad] = await hs.option(P.NBD_OPT_SET_META_CONTEXT, metaContextData('a\0b', [P.BASE_ALLOCATION]));
    expect(bad!.type).toBe(P.NBD_REP_ERR_INVALID);
    const client = await hs.go('disk');
    await client.disconnect();
    // NBD_OPT_EXPORT_NAME cannot answer an error: the server hangs up.
    const hs2 = await handshake(target);
    await expect(hs2.exportName('di\0sk')).rejects.toThrow();
    await closedWithin(hs2.socket, 2000);
  });

  it('rejects malformed INFO/GO and meta context payloads with NBD_REP_ERR_INVALID', async () => {
    const { target } = await startServer();
    const hs = await handshake(target);
    const cases: Array<[number, Buffer]> = [
      [P.NBD_OPT_GO, Buffer.from([0, 0])], // too short
      [P.NBD_OPT_GO, Buffer.from([0, 0, 0, 9, 0x64, 0, 0])], // name length past the end
      [P.NBD_OPT_INFO, Buffer.concat([infoGoData('disk', [3]), Buffer.from([0])])], // trailing byte
      [P.NBD_OPT_LIST_META_CONTEXT, Buffer.concat([metaContextData('disk', ['base:allocation']).subarray(0, 14)])], // truncated query
      [P.NBD_OPT_LIST_META_CONTEXT, metaContextData('disk', ['nonamespace'])],
      [P.NBD_OPT_STRUCTURED_REPLY, Buffer.from([1])],
    ];
    for (const [option, payload] of cases) {
      const replies = await hs.option(option, payload);
      expect(replies.map((r) => r.type)).toEqual([P.NBD_REP_ERR_INVALID]);
    }
    // A huge claimed query count is bounded by the option length, not trusted.
    const huge = metaContextData('disk', []);
    huge.writeUInt32BE(0xffffffff, 8);
    expect((await hs.option(P.NBD_OPT_LIST_META_CONTEXT, huge)).map((r) => r.type)).toEqual([P.NBD_REP_ERR_INVALID]);
    const client = await hs.go('disk');
    await client.disconnect();
  });

  it('negotiates base:allocation: LIST wildcards, SET needs structured replies and the same export', async () => {
    const { target } = await startServer();
    const hs = await handshake(target);
    const [early] = await hs.option(P.NBD_OPT_SET_META_CONTEXT, metaContextData('disk', [P.BASE_ALLOCATION]));
    expect(early!.type).toBe(P.NBD_REP_ERR_INVALID);
    expect(await hs.listMetaContexts('disk')).toEqual([P.BASE_ALLOCATION]);
    expect(await hs.listMetaContexts('disk', ['base:'])).toEqual([P.BASE_ALLOCATION]);
    expect(await hs.listMetaContexts('disk', ['qemu:dirty-bitmap:x', 'base:other'])).toEqual([]);
    await expect(hs.listMetaContexts('nope')).rejects.toMatchObject({ reply: P.NBD_REP_ERR_UNKNOWN });
    await hs.structuredReplies();
    expect([...(await hs.setMetaContexts('disk', ['base:', 'x-foo:bar']))]).toEqual([]);
    const set = await hs.setMetaContexts('disk', [P.BASE_ALLOCATION]);
    expect([...set.values()]).toEqual([P.BASE_ALLOCATION]);
    const client = await hs.go('disk');
    const extents = await client.blockStatus(0, SIZE);
    expect(extents).toEqual([{ length: SIZE, flags: 0 }]);
    await client.disconnect();

    // Contexts set for another export name do not carry over to GO.
    const hs2 = await handshake(target);
    await hs2.structuredReplies();
    await hs2.setMetaContexts('', [P.BASE_ALLOCATION]);
    const other = await hs2.go('disk');
    const reply = await other.request(P.NBD_CMD_BLOCK_STATUS, { offset: 0, length: 4096 });
    expect(reply.error).toBe(P.NBD_EINVAL);
    await other.disconnect();
  });

  it('answers an oversized option with NBD_REP_ERR_TOO_BIG and drops absurd ones', async () => {
    const { target } = await startServer();
    const hs = await handshake(target);
    const [reply] = await hs.option(P.NBD_OPT_INFO, Buffer.alloc(100 * 1024));
    expect(reply!.type).toBe(P.NBD_REP_ERR_TOO_BIG);
    const client = await hs.go('disk');
    await client.disconnect();

    // A 4 GiB claim: never allocated, the connection is dropped at once.
    const hs2 = await handshake(target);
    hs2.sendOption(P.NBD_OPT_GO, Buffer.alloc(0), 0xffffffff);
    await closedWithin(hs2.socket, 2000);
    const hs3 = await handshake(target);
    hs3.sendOption(P.NBD_OPT_EXPORT_NAME, Buffer.alloc(0), 1024 * 1024);
    await closedWithin(hs3.socket, 2000);
  });

  it('drops clients with unknown flags, bad option magic, or an option flood', async () => {
    const { server, target } = await startServer({ maxOptions: 20 });
    const a = await handshake(target, P.NBD_FLAG_C_FIXED_NEWSTYLE | 0x100);
    await closedWithin(a.socket, 2000);

    const b = await handshake(target);
    b.socket.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    await closedWithin(b.socket, 2000);

    const c = await handshake(target);
    for (let i = 0; i < 19; i++) expect((await c.option(P.NBD_OPT_STRUCTURED_REPLY))[0]!.type).toBe(P.NBD_REP_ACK);
    c.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
    c.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
    await closedWithin(c.socket, 2000);
    await waitFor(() => server.stats.protocolErrors === 3);
  });

  it('closes connections that do not finish the handshake in time (slowloris)', async () => {
    const { server, target, logs } = await startServer({ handshakeTimeoutMs: 300 });
    const idle = await handshake(target);
    const slow = await handshake(target);
    slow.socket.write(Buffer.from('IHAV')); // a quarter of an option header
    await closedWithin(idle.socket, 3000);
    await closedWithin(slow.socket, 3000);
    expect(logs.some((l) => l.includes('handshake timeout'))).toBe(true);
    // Others are still served.
    const client = await NbdClient.connect(target, { exportName: 'disk' });
    expect((await client.read(0, 512)).equals(data.subarray(0, 512))).toBe(true);
    await client.disconnect();
    await waitFor(() => server.stats.activeConnections === 0);
  });

  it('makes room for a new client by dropping the longest-negotiating connection, never one in transmission', async () => {
    const { server, target, logs } = await startServer({ maxConnections: 3 });
    const serving = await NbdClient.connect(target, { exportName: 'disk' });
    // Two clients that stall in the handshake fill the server.
    const stalledOld = await handshake(target);
    await waitFor(() => server.stats.activeConnections === 2);
    const stalledNew = await handshake(target);
    await waitFor(() => server.stats.activeConnections === 3);
    // A real client still gets in: the oldest staller makes room, then the next one.
    const fresh = await NbdClient.connect(target, { exportName: 'disk' });
    await closedWithin(stalledOld.socket, 2000, 'the oldest stalled handshake');
    expect(stalledNew.socket.destroyed).toBe(false);
    const another = await NbdClient.connect(target, { exportName: 'disk' });
    await closedWithin(stalledNew.socket, 2000, 'the other stalled handshake');
    expect(logs.filter((l) => l.includes('still negotiating while the server is full'))).toHaveLength(2);
    expect(server.stats).toMatchObject({ droppedConnections: 2, rejectedConnections: 0 });
    // Full of connections in transmission: a newcomer is refused, nobody is dropped.
    await expect(NbdClient.connect(target, { exportName: 'disk' })).rejects.toThrow();
    expect(server.stats).toMatchObject({ droppedConnections: 2, rejectedConnections: 1 });
    for (const c of [serving, fresh, another]) expect((await c.read(0, 512)).equals(data.subarray(0, 512))).toBe(true);
    await Promise.all([serving.disconnect(), fresh.disconnect(), another.disconnect()]);
  });

  it('refuses connections beyond maxConnections and serves the rest', async () => {
    const { server, target } = await startServer({ maxConnections: 2 });
    const a = await NbdClient.connect(target, { exportName: 'disk' });
    const b = await NbdClient.connect(target, { exportName: 'disk' });
    await expect(NbdClient.connect(target, { exportName: 'disk' })).rejects.toThrow();
    expect(server.stats.rejectedConnections).toBe(1);
    expect((await a.read(0, 512)).equals(data.subarray(0, 512))).toBe(true);
    await a.disconnect();
    await waitFor(() => server.stats.activeConnections === 1);
    const c = await NbdClient.connect(target, { exportName: 'disk' });
    await Promise.all([b.disconnect(), c.disconnect()]);
  });
});

describe('NBD server: providers', () => {
  it('uses describe() for INFO and meta contexts, and advertises a 1-byte minimum for odd sizes', async () => {
    const oddPath = join(dir, 'odd.raw');
    const odd = randomBytes(MiB + 3);
    writeFileSync(oddPath, odd);
    let opened = 0;
    let described = 0;
    const provider: ExportProvider = {
      list: async () => ['odd'],
      describe: async (name) => {
        described++;
        if (name !== 'odd') throw new ExportNotFoundError(`no export named ${name}`);
        return { name: 'odd', size: odd.length, description: 'odd-sized' };
      },
      open: async (name) => {
        if (name !== 'odd') throw new ExportNotFoundError(`no export named ${name}`);
        opened++;
        return new DiskImageExport('odd', await RawImage.open(await FileByteSource.open(oddPath)), 'odd-sized');
      },
    };
    const server = new NbdServer(provider);
    servers.push(server);
    const path = join(dir, 'odd.sock');
    await server.listenUnix(path);
    const hs = await handshake({ path });
    const info = await hs.info('odd');
    expect(info).toMatchObject({ size: MiB + 3, description: 'odd-sized', blockSize: { minimum: 1, preferred: 4096, maximum: 32 * MiB } });
    await expect(hs.info('even')).rejects.toMatchObject({ reply: P.NBD_REP_ERR_UNKNOWN });
    await hs.structuredReplies();
    await hs.setMetaContexts('odd', [P.BASE_ALLOCATION]);
    expect(opened).toBe(0);
    expect(described).toBe(3);
    const client = await hs.go('odd');
    expect(opened).toBe(1);
    expect((await client.read(MiB - 1, 4)).equals(odd.subarray(MiB - 1))).toBe(true);
    expect(await client.blockStatus(1, MiB + 2)).toEqual([{ length: MiB + 2, flags: 0 }]);
    await client.disconnect();
    const cmp = await new Promise<number | null>((resolve) => {
      const child = spawn('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', oddPath, `nbd+unix:///odd?socket=${path}`], { stdio: 'ignore' });
      child.on('close', resolve);
    });
    expect(cmp).toBe(0);
  });

  it('reports a provider that cannot open an export as not available, and a failing list', async () => {
    const provider: ExportProvider = {
      list: async () => {
        throw new Error('catalogue offline');
      },
      open: async () => {
        throw new StorageIOError('storage unreachable', { file: 's3://bucket/disk.qcow2' });
      },
    };
    const server = new NbdServer(provider);
    servers.push(server);
    const path = join(dir, 'broken.sock');
    await server.listenUnix(path);
    const hs = await handshake({ path });
    await expect(hs.list()).rejects.toMatchObject({ reply: P.NBD_REP_ERR_PLATFORM, message: expect.stringMatching(/catalogue offline/) as string });
    await expect(hs.go('disk')).rejects.toMatchObject({ reply: P.NBD_REP_ERR_UNKNOWN, message: expect.stringMatching(/storage unreachable/) as string });
    await hs.abort();
  });
});

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

describe('NBD server: transmission', () => {
  it('serves reads with simple and with structured replies', async () => {
    const { target } = await startServer();
    for (const structuredReplies of [false, true]) {
      const client = await NbdClient.connect(target, { exportName: 'disk', structuredReplies });
      expect(client.structured).toBe(structuredReplies);
      for (const [offset, length] of [[0, 4096], [SIZE - 512, 512], [3 * MiB, 13 * MiB], [1 * MiB, 5 * MiB]] as const) {
        const reply = await client.request(P.NBD_CMD_READ, { offset, length });
        expect(reply.error).toBe(0);
        expect(reply.data!.equals(data.subarray(offset, offset + length))).toBe(true);
        expect(reply.chunks).toBe(structuredReplies ? 1 : 0);
      }
      // DF: one content chunk (here always the case).
      if (structuredReplies) {
        const df = await client.request(P.NBD_CMD_READ, { offset: 0, length: 65536, flags: P.NBD_CMD_FLAG_DF });
        expect(df.error).toBe(0);
        expect(df.contentChunks).toBe(1);
      }
      await client.disconnect();
    }
  });

  it('reads the whole image, 32 MiB requests included', async () => {
    const { target } = await startServer();
    const client = await NbdClient.connect(target, { exportName: 'disk' });
    const whole = await client.read(0, SIZE);
    expect(whole.equals(data)).toBe(true);
    await client.disconnect();
  });

  it('answers reads over the maximum block size with EINVAL and stays usable', async () => {
    const { target, counters } = await startServer();
    for (const structuredReplies of [false, true]) {
      const client = await NbdClient.connect(target, { exportName: 'disk', structuredReplies });
      const big = await client.request(P.NBD_CMD_READ, { offset: 0, length: 32 * MiB + 512 });
      expect(big.error).toBe(P.NBD_EINVAL);
      expect(big.data).toBeUndefined();
      if (structuredReplies) expect(big.message).toMatch(/maximum block size/);
      const huge = await client.request(P.NBD_CMD_READ, { offset: 0, length: 0xfffffe00 });
      expect(huge.error).toBe(P.NBD_EINVAL);
      expect((await client.read(512, 512)).equals(data.subarray(512, 1024))).toBe(true);
      await client.disconnect();
    }
    expect(counters.reads).toBe(2);
  });

  it('answers out-of-range requests with EINVAL', async () => {
    const { target } = await startServer();
    const client = await NbdClient.connect(target, { exportName: 'disk', blockStatus: true });
    for (const [offset, length] of [[SIZE, 512], [SIZE - 512, 1024], [2 ** 53, 512], [2 ** 63, 512]] as const) {
      const reply = await client.request(P.NBD_CMD_READ, { offset, length });
      expect(reply.error).toBe(P.NBD_EINVAL);
      expect(reply.message).toMatch(/beyond the end/);
      expect((await client.request(P.NBD_CMD_BLOCK_STATUS, { offset, length })).error).toBe(P.NBD_EINVAL);
      expect((await client.request(P.NBD_CMD_CACHE, { offset, length })).error).toBe(P.NBD_EINVAL);
    }
    // The high offset bits really are on the wire (not truncated to 53 bits).
    const header = requestHeader(P.NBD_CMD_READ, 77n, 0xffffffffffffff00n, 256);
    expect(header.readBigUInt64BE(16)).toBe(0xffffffffffffff00n);
    await client.disconnect();
  });

  it('enforces the 512-byte minimum only when the client asked for block sizes', async () => {
    const { target } = await startServer();
    const strict = await NbdClient.connect(target, { exportName: 'disk', requestBlockSize: true });
    expect((await strict.request(P.NBD_CMD_READ, { offset: 1, length: 512 })).error).toBe(P.NBD_EINVAL);
    expect((await strict.request(P.NBD_CMD_READ, { offset: 512, length: 100 })).error).toBe(P.NBD_EINVAL);
    expect((await strict.read(1024, 512)).equals(data.subarray(1024, 1536))).toBe(true);
    await strict.disconnect();

    for (const structuredReplies of [true, false]) {
      const loose = await NbdClient.connect(target, { exportName: 'disk', requestBlockSize: false, structuredReplies });
      expect((await loose.read(1, 511)).equals(data.subarray(1, 512))).toBe(true);
      expect((await loose.read(SIZE - 3, 3)).equals(data.subarray(SIZE - 3))).toBe(true);
      await loose.disconnect();
    }
    const old = await (await handshake(target)).exportName('disk');
    expect((await old.read(12345, 678)).equals(data.subarray(12345, 12345 + 678))).toBe(true);
    await old.disconnect();
  });

  it('answers writes, trims and write-zeroes with EPERM, consuming write payloads', async () => {
    const { target } = await startServer();
    for (const structuredReplies of [false, true]) {
      const client = await NbdClient.connect(target, { exportName: 'disk', structuredReplies });
      const write = await client.request(P.NBD_CMD_WRITE, { offset: 0, payload: Buffer.alloc(1 * MiB, 0x55) });
      expect(write.error).toBe(P.NBD_EPERM);
      const empty = await client.request(P.NBD_CMD_WRITE, { offset: 0, payload: Buffer.alloc(0) });
      expect(empty.error).toBe(P.NBD_EPERM);
      expect((await client.request(P.NBD_CMD_TRIM, { offset: 0, length: 4096 })).error).toBe(P.NBD_EPERM);
      expect((await client.request(P.NBD_CMD_WRITE_ZEROES, { offset: 0, length: 4096 })).error).toBe(P.NBD_EPERM);
      // The payload did not desynchronise the stream, and nothing was written.
      expect((await client.read(0, 1 * MiB)).equals(data.subarray(0, 1 * MiB))).toBe(true);
      await client.disconnect();
    }
    expect(readFileSync(imagePath).subarray(0, MiB).equals(data.subarray(0, MiB))).toBe(true);
  });

  it('drops a client announcing a write payload over the maximum', async () => {
    const { server, target } = await startServer();
    const client = await NbdClient.connect(target, { exportName: 'disk' });
    client.socket.write(requestHeader(P.NBD_CMD_WRITE, 1n, 0n, 64 * MiB));
    await closedWithin(client.socket, 2000);
    await waitFor(() => server.stats.protocolErrors === 1);
  });

  it('answers unknown commands and flags with EINVAL', async () => {
    const { target } = await startServer();
    const client = await NbdClient.connect(target, { exportName: 'disk', blockStatus: true });
    expect((await client.request(42, { offset: 0, length: 512 })).error).toBe(P.NBD_EINVAL);
    expect((await client.request(P.NBD_CMD_READ, { offset: 0, length: 512, flags: 0x8000 })).error).toBe(P.NBD_EINVAL);
    expect((await client.request(P.NBD_CMD_READ, { offset: 0, length: 512, flags: P.NBD_CMD_FLAG_REQ_ONE })).error).toBe(P.NBD_EINVAL);
    expect((await client.request(P.NBD_CMD_FLUSH, { flags: P.NBD_CMD_FLAG_DF })).error).toBe(P.NBD_EINVAL);
    expect((await client.request(P.NBD_CMD_FLUSH, { offset: 512 })).error).toBe(P.NBD_EINVAL);
    expect((await client.request(P.NBD_CMD_CACHE, { offset: 0, length: 512, flags: P.NBD_CMD_FLAG_DF })).error).toBe(P.NBD_EINVAL);
    expect((await client.request(P.NBD_CMD_BLOCK_STATUS, { offset: 0, length: 512, flags: P.NBD_CMD_FLAG_DF })).error).toBe(P.NBD_EINVAL);
    // FUA is harmless on a read-only export and tolerated.
    expect((await client.request(P.NBD_CMD_FLUSH, { flags: P.NBD_CMD_FLAG_FUA })).error).toBe(0);
    await client.disconnect();
    // DF without structured replies is not allowed (SEND_DF is not offered then).
    const simple = await NbdClient.connect(target, { exportName: 'disk', structuredReplies: false });
    expect((await simple.request(P.NBD_CMD_READ, { offset: 0, length: 512, flags: P.NBD_CMD_FLAG_DF })).error).toBe(P.NBD_EINVAL);
    await simple.disconnect();
  });

  it('answers FLUSH, CACHE and zero-length reads with success', async () => {
    const { target, counters } = await startServer();
    for (const structuredReplies of [false, true]) {
      const client = await NbdClient.connect(target, { exportName: 'disk', structuredReplies });
      expect((await client.request(P.NBD_CMD_FLUSH)).error).toBe(0);
      expect((await client.request(P.NBD_CMD_CACHE, { offset: 0, length: 8 * MiB })).error).toBe(0);
      const empty = await client.request(P.NBD_CMD_READ, { offset: 4096, length: 0 });
      expect(empty.error).toBe(0);
      expect(empty.data?.length ?? 0).toBe(0);
      await client.disconnect();
    }
    expect(counters.caches).toBe(2);
  });

  it('reports block status with REQ_ONE, and refuses it when not negotiated', async () => {
    const { target } = await startServer();
    const client = await NbdClient.connect(target, { exportName: 'disk', blockStatus: true });
    expect(await client.blockStatus(MiB, 4 * MiB)).toEqual([{ length: 4 * MiB, flags: 0 }]);
    expect(await client.blockStatus(0, 4096, P.NBD_CMD_FLAG_REQ_ONE)).toEqual([{ length: 4096, flags: 0 }]);
    expect((await client.request(P.NBD_CMD_BLOCK_STATUS, { offset: 0, length: 0 })).error).toBe(P.NBD_EINVAL);
    await client.disconnect();
    for (const structuredReplies of [true, false]) {
      const plain = await NbdClient.connect(target, { exportName: 'disk', structuredReplies });
      expect((await plain.request(P.NBD_CMD_BLOCK_STATUS, { offset: 0, length: 4096 })).error).toBe(P.NBD_EINVAL);
      await plain.disconnect();
    }
  });

  it('answers EIO when the export fails a read, and keeps serving', async () => {
    const { server, target } = await startServer({}, { fail: (offset) => offset === 4 * MiB });
    for (const structuredReplies of [false, true]) {
      const client = await NbdClient.connect(target, { exportName: 'disk', structuredReplies });
      const reply = await client.request(P.NBD_CMD_READ, { offset: 4 * MiB, length: 4096 });
      expect(reply.error).toBe(P.NBD_EIO);
      if (structuredReplies) expect(reply.message).toMatch(/simulated storage fault/);
      expect((await client.read(0, 4096)).equals(data.subarray(0, 4096))).toBe(true);
      await client.disconnect();
    }
    expect(server.stats.readErrors).toBe(2);
  });

  it('reassembles a client that sends one byte at a time', async () => {
    const { target } = await startServer();
    const socket = net.connect(target);
    await new Promise((r) => socket.once('connect', r));
    const reader = new SocketReader(socket);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES, 0);
    const option = Buffer.alloc(P.OPTION_HEADER_BYTES);
    option.writeBigUInt64BE(P.NBD_OPTS_MAGIC, 0);
    option.writeUInt32BE(P.NBD_OPT_EXPORT_NAME, 8);
    option.writeUInt32BE(4, 12);
    const requests = [0, 1, 2].map((i) => requestHeader(P.NBD_CMD_READ, BigInt(i + 1), BigInt(i * 4096), 4096));
    const bytes = Buffer.concat([flags, option, Buffer.from('disk'), ...requests]);
    for (const byte of bytes) {
      socket.write(Buffer.from([byte]));
      await new Promise((r) => setImmediate(r));
    }
    const greeting = await reader.read(18);
    expect(greeting.readBigUInt64BE(0)).toBe(P.NBD_INIT_MAGIC);
    expect(Number((await reader.read(10)).readBigUInt64BE(0))).toBe(SIZE);
    for (let i = 0; i < 3; i++) {
      const reply = await reader.read(P.SIMPLE_REPLY_BYTES);
      expect(reply.readUInt32BE(0)).toBe(P.NBD_SIMPLE_REPLY_MAGIC);
      expect(reply.readUInt32BE(4)).toBe(0);
      const handle = Number(reply.readBigUInt64BE(8));
      const payload = await reader.read(4096);
      expect(payload.equals(data.subarray((handle - 1) * 4096, handle * 4096))).toBe(true);
    }
    socket.destroy();
  });

  it('replies out of order, matched by handle', async () => {
    const { target } = await startServer({}, { delay: (offset) => (offset === 0 ? 300 : 0) });
    const client = await NbdClient.connect(target, { exportName: 'disk' });
    const order: number[] = [];
    const slow = client.read(0, 4096).then((b) => (order.push(0), b));
    const fast = [1, 2, 3].map((i) => client.read(i * 4096, 4096).then((b) => (order.push(i), b)));
    const results = await Promise.all([slow, ...fast]);
    expect(order[order.length - 1]).toBe(0);
    results.forEach((b, i) => expect(b.equals(data.subarray(i * 4096, (i + 1) * 4096))).toBe(true));
    await client.disconnect();
  });

  it('serves 64 connections with 64 requests in flight each, never more', async () => {
    const { server, target, counters, exports } = await startServer({}, { delay: () => 5 });
    const clients = await Promise.all(Array.from({ length: 64 }, () => NbdClient.connect(target, { exportName: 'disk' })));
    expect(server.stats.activeConnections).toBe(64);
    await Promise.all(
      clients.map(async (client, c) => {
        const reads = Array.from({ length: 128 }, (_, i) => {
          const offset = ((c * 131 + i * 97) % (SIZE / 4096)) * 4096;
          return client.read(offset, 4096).then((b) => ({ offset, b }));
        });
        expect(client.inFlight).toBe(128);
        for (const { offset, b } of await Promise.all(reads)) expect(b.equals(data.subarray(offset, offset + 4096))).toBe(true);
      }),
    );
    expect(counters.reads).toBe(64 * 128);
    for (const e of exports) expect(e.maxActive).toBeLessThanOrEqual(64);
    expect(Math.max(...exports.map((e) => e.maxActive))).toBe(64);
    await Promise.all(clients.map((c) => c.disconnect()));
    await waitFor(() => counters.closed === 64);
  });

  it('stops reading from a client that does not read its replies', async () => {
    const { server, target, counters } = await startServer();
    const client = await NbdClient.connect(target, { exportName: 'disk' });
    client.socket.pause(); // never read replies
    const burst = Buffer.concat(Array.from({ length: 2000 }, (_, i) => requestHeader(P.NBD_CMD_READ, BigInt(i + 1), 0n, MiB)));
    client.socket.write(burst);
    await new Promise((r) => setTimeout(r, 500));
    // 2000 MiB asked for; the server holds at most its in-flight limit and what fits in socket buffers.
    expect(counters.reads).toBeLessThan(100);
    expect(server.stats.requestsInFlight).toBeLessThanOrEqual(64);
    client.destroy();
    await waitFor(() => counters.closed === 1);
  });

  it('finishes in-flight reads before closing on NBD_CMD_DISC', async () => {
    const { target, counters } = await startServer({}, { delay: () => 200 });
    const client = await NbdClient.connect(target, { exportName: 'disk' });
    const reads = Array.from({ length: 8 }, (_, i) => client.read(i * MiB, 64 * 1024));
    void client.request(P.NBD_CMD_DISC);
    const results = await Promise.all(reads);
    results.forEach((b, i) => expect(b.equals(data.subarray(i * MiB, i * MiB + 64 * 1024))).toBe(true));
    await client.closed;
    await waitFor(() => counters.closed === 1);
  });

  it('drains in-flight reads on server.close()', async () => {
    const { server, target, counters } = await startServer({}, { delay: () => 300 });
    const client = await NbdClient.connect(target, { exportName: 'disk' });
    const idle = await handshake(target); // still negotiating: dropped at once
    const reads = Array.from({ length: 4 }, (_, i) => client.read(i * 4096, 4096));
    await waitFor(() => counters.active === 4);
    const closing = server.close();
    const results = await Promise.all(reads);
    results.forEach((b, i) => expect(b.equals(data.subarray(i * 4096, (i + 1) * 4096))).toBe(true));
    await closing;
    await closedWithin(idle.socket, 1000);
    await client.closed;
    expect(counters.closed).toBe(1);
    expect(server.stats.activeConnections).toBe(0);
    await expect(NbdClient.connect(target)).rejects.toThrow();
  });

  it('survives clients that vanish mid-request, send garbage or truncated headers', async () => {
    const { server, target, counters } = await startServer({ stallTimeoutMs: 300 }, { delay: (offset) => (offset === 0 ? 200 : 0) });
    // Disconnect with a read in flight.
    const a = await NbdClient.connect(target, { exportName: 'disk' });
    void a.request(P.NBD_CMD_READ, { offset: 0, length: 4096 });
    await waitFor(() => counters.active === 1);
    a.destroy();
    // Truncated header, then disconnect.
    const b = await NbdClient.connect(target, { exportName: 'disk' });
    b.socket.end(requestHeader(P.NBD_CMD_READ, 1n, 0n, 4096).subarray(0, 13));
    // Bad request magic.
    const c = await NbdClient.connect(target, { exportName: 'disk' });
    c.socket.write(requestHeader(P.NBD_CMD_READ, 1n, 0n, 4096, 0, 0x12345678));
    await closedWithin(c.socket, 2000, 'bad magic');
    // Half a header, then silence: dropped after the stall timeout.
    const d = await NbdClient.connect(target, { exportName: 'disk' });
    d.socket.write(requestHeader(P.NBD_CMD_READ, 1n, 0n, 4096).subarray(0, 20));
    await closedWithin(d.socket, 3000, 'half header');
    // Half a write payload, then silence.
    const e = await NbdClient.connect(target, { exportName: 'disk' });
    e.socket.write(Buffer.concat([requestHeader(P.NBD_CMD_WRITE, 1n, 0n, 4096), Buffer.alloc(100)]));
    await closedWithin(e.socket, 3000, 'half payload');
    // Garbage before any handshake.
    const f = net.connect(target);
    f.on('error', () => undefined);
    f.resume();
    f.write(randomBytes(4096));
    await closedWithin(f, 2000, 'garbage');

    await waitFor(() => server.stats.activeConnections === 0 && counters.closed === counters.opened);
    expect(server.stats.protocolErrors).toBeGreaterThanOrEqual(4);
    const ok = await NbdClient.connect(target, { exportName: 'disk' });
    expect((await ok.read(4096, 4096)).equals(data.subarray(4096, 8192))).toBe(true);
    await ok.disconnect();
  });
});

// ---------------------------------------------------------------------------
// Listening
// ---------------------------------------------------------------------------

describe('NBD server: listening', () => {
  it('refuses a unix socket in use, replaces a stale one, and never replaces other files', async () => {
    const { target } = await startServer();
    const second = new NbdServer(makeProvider().provider);
    await expect(second.listenUnix(target.path)).rejects.toThrow(AgentError);
    await expect(second.listenUnix(target.path)).rejects.toThrow(/already in use/);

    // A socket file left by a dead process.
    const stale = join(dir, 'stale.sock');
    const child = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(stale)}, () => process.kill(process.pid, 'SIGKILL'))`]);
    await new Promise((r) => child.on('exit', r));
    expect(lstatSync(stale).isSocket()).toBe(true);
    await second.listenUnix(stale);
    const client = await NbdClient.connect({ path: stale }, { exportName: 'disk' });
    await client.disconnect();
    await second.close();
    expect(existsSync(stale)).toBe(false);

    const regular = join(dir, 'not-a-socket');
    writeFileSync(regular, 'keep me');
    const third = new NbdServer(makeProvider().provider);
    await expect(third.listenUnix(regular)).rejects.toThrow(/not a socket/);
    expect(readFileSync(regular, 'utf8')).toBe('keep me');
    await expect(third.listenUnix(join(dir, 'no', 'such', 'dir.sock'))).rejects.toThrow(AgentError);
    await third.close();
  });

  it('does not keep a listener whose listen finished after close()', async () => {
    const server = new NbdServer(makeProvider().provider);
    const path = join(dir, 'closed-while-listening.sock');
    const listening = server.listenUnix(path);
    await server.close();
    await expect(listening).rejects.toThrow(/NBD server is closed/);
    await new Promise((r) => setTimeout(r, 50));
    expect(existsSync(path)).toBe(false);
    const tcp = server.listenTcp('127.0.0.1', 0).catch((e: unknown) => e);
    expect(await tcp).toBeInstanceOf(AgentError);
  });

  it('serves over TCP and refuses a port in use', async () => {
    const { provider } = makeProvider();
    const server = new NbdServer(provider);
    servers.push(server);
    const { port } = await server.listenTcp('127.0.0.1', 0);
    const client = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk' });
    expect((await client.read(0, 4096)).equals(data.subarray(0, 4096))).toBe(true);
    await client.disconnect();
    const other = new NbdServer(provider);
    const err = await other.listenTcp('127.0.0.1', port).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AgentError);
    expect((err as AgentError).message).toBe(`127.0.0.1:${port} is already in use by another process`);
    expect((err as AgentError).exitCode).toBe(7);
    await other.close();
  });

  it('rejects bad options with a clear error', () => {
    expect(() => new NbdServer(makeProvider().provider, { maxInFlightPerConnection: 0 })).toThrow(AgentError);
    expect(() => new NbdServer(makeProvider().provider, { maxRequestBytes: 100 })).toThrow(/maxRequestBytes/);
  });
});
