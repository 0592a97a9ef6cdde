import type { Socket } from 'node:net';
import { ImageChangedError } from '../../errors.js';
import { toBlockStatus } from './block-status.js';
import type { BudgetAccount } from './buffer-budget.js';
import { ExportNotFoundError, type ExportDescription, type ExportProvider, type NbdExport } from './export.js';
import * as P from '../protocol.js';
import { ReadCancelledError, SocketReader, StreamEndedError, StreamStalledError } from './socket-reader.js';

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
}

/** The client broke a MUST of the protocol: hard disconnect ("Terminating the transmission phase"). */
class ProtocolViolation extends Error {}

/** The server does not serve this client (per-client connection limit); it was told why. */
class ClientRefused extends Error {}

/** Option payloads above maxOptionBytes but below this are skipped and answered NBD_REP_ERR_TOO_BIG; above, we disconnect. */
const OPTION_DISCARD_LIMIT = 16 * 1024 * 1024;
/** Block status descriptors per reply; the client asks again for the rest ("NBD_REPLY_TYPE_BLOCK_STATUS"). */
const MAX_BLOCK_STATUS_DESCRIPTORS = 4096;
/** Our id for base:allocation in NBD_REP_META_CONTEXT; opaque to clients. */
const BASE_ALLOCATION_ID = 1;
/** Block sizes we advertise ("Block size constraints"). */
const MIN_BLOCK = 512;
const PREFERRED_BLOCK = 4096;
/** After NBD_CMD_DISC or shutdown we half-close; the client should close within this time. */
const LINGER_MS = 5000;
/**
 * Unparsed request bytes kept per connection before its socket is paused.
 * Requests are 28-byte headers (WRITE payloads are dropped as they come), so
 * this holds thousands; a bound per connection keeps request buffers small
 * beside the reply budget.
 */
const REQUEST_BUFFER_BYTES = 64 * 1024;
/** A block status reply's payload: a 32-bit context id, then 32-bit length and flags per descriptor ("NBD_REPLY_TYPE_BLOCK_STATUS"). */
function blockStatusPayloadBytes(descriptors: number): number {
  return 4 + 8 * descriptors;
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** A spec "string": valid UTF-8, no NUL, at most 4096 bytes ("Conventions"). */
function decodeString(bytes: Buffer, what: string): string | { error: string } {
  if (bytes.length > P.MAX_STRING_BYTES) return { error: `${what} is ${bytes.length} bytes (limit ${P.MAX_STRING_BYTES})` };
  if (bytes.includes(0)) return { error: `${what} contains a NUL byte` };
  try {
    return utf8.decode(bytes);
  } catch {
    return { error: `${what} is not valid UTF-8` };
  }
}

/** Messages sent to clients: no NUL, at most 4096 bytes of UTF-8. */
function messageBytes(message: string): Buffer {
  let b = Buffer.from(message.replace(/\0/g, ' '), 'utf8');
  if (b.length > P.MAX_STRING_BYTES) b = Buffer.from(b.subarray(0, P.MAX_STRING_BYTES).toString('utf8').replace(/\uFFFD+$/, ''), 'utf8');
  return b;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Advertised minimum block size: 512 unless the size is not a multiple of it. */
export function minimumBlockSize(size: number): number {
  return size % MIN_BLOCK === 0 ? MIN_BLOCK : 1;
}

interface MetaRequest {
  exportName: string;
  queries: string[];
}

type HandshakeStep = { done: false } | { done: true; export: NbdExport | null };
const CONTINUE: HandshakeStep = { done: false };

/**
 * One client connection: fixed newstyle handshake, then the transmission
 * phase with up to maxInFlight requests served concurrently and replied to
 * in completion order (matched by handle).
 */
export class NbdConnection {
  /** Resolves when the socket is closed and the export (if any) is closed. Never rejects. */
  readonly done: Promise<void>;
  private readonly reader: SocketReader;
  private readonly log: NbdLogger;
  private phase: 'handshake' | 'transmission' | 'closing' = 'handshake';
  private handshakeTimer: NodeJS.Timeout | null = null;
  /** Set when we close the socket ourselves, to log why. */
  private closeReason: string | null = null;
  private stopping = false;
  /** The admission's answer once known: null (served) or why the client is refused. */
  private refusal: string | null | undefined;

  // Negotiated state.
  private noZeroes = false;
  private structured = false;
  private metaExportName: string | null = null;
  private blockSizeAgreed = false;
  private advertisedMinBlock = 1;
  private export: NbdExport | null = null;

  // Requests in flight: counted from header until the reply is handed to the kernel.
  private inFlight = 0;
  private inFlightBytes = 0;
  private slotWaiter: (() => void) | null = null;
  private idleWaiters: Array<() => void> = [];
  private readonly pendingWrites = new Set<() => void>();
  private corked = false;

  constructor(
    private readonly socket: Socket,
    private readonly ctx: ConnectionContext,
    readonly id: number,
  ) {
    const base = ctx.log;
    this.log = (level, msg, fields) => base(level, msg, { connection: id, ...fields });
    this.reader = new SocketReader(socket, {
      highWaterMark: REQUEST_BUFFER_BYTES,
      stallTimeoutMs: ctx.limits.stallTimeoutMs,
    });
    socket.on('error', (err) => this.log('debug', 'socket error', { error: err.message }));
    // TCP only (a no-op on unix sockets): notice peers that vanished without a FIN, e.g. a dead host.
    socket.setKeepAlive(true, 30_000);
    socket.on('close', () => {
      for (const resolve of this.pendingWrites) resolve();
      this.pendingWrites.clear();
      // A request waiting for buffer memory has nobody to answer any more.
      ctx.budget.cancel();
    });
    if (ctx.limits.handshakeTimeoutMs > 0) {
      this.handshakeTimer = setTimeout(() => {
        this.closeReason = `handshake not completed within ${ctx.limits.handshakeTimeoutMs} ms`;
        this.ctx.counters.protocolErrors++;
        this.log('warn', 'handshake timeout', { timeoutMs: ctx.limits.handshakeTimeoutMs });
        this.socket.destroy();
      }, ctx.limits.handshakeTimeoutMs);
    }
    this.done = this.run();
  }

  /** True until the client has finished negotiating (option haggling). */
  get negotiating(): boolean {
    return this.phase === 'handshake';
  }

  /** Requests whose replies are not yet handed to the kernel. */
  get requestsInFlight(): number {
    return this.inFlight;
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
      this.socket.destroy();
      return;
    }
    this.stopping = true;
    this.reader.cancel();
    this.wakeSlotWaiter();
  }

  /** Hard disconnect (used when shutdown takes too long). */
  destroy(reason: string): void {
    this.closeReason ??= reason;
    this.socket.destroy();
  }

  private async run(): Promise<void> {
    let reason = 'closed';
    let level: NbdLogLevel = 'debug';
    try {
      const exp = await this.handshake();
      if (exp === null) {
        reason = 'client ended negotiation';
        await this.endGracefully();
      } else {
        reason = await this.transmit(exp);
      }
    } catch (err) {
      if (err instanceof ProtocolViolation) {
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
      } else if (err instanceof ClientRefused) {
        reason = `refused: ${err.message}`;
      } else {
        level = 'error';
        reason = `internal error: ${errorText(err)}`;
      }
      // A refused client was told why: let the reply reach it (a reset could discard it) before closing.
      if (err instanceof ClientRefused) await this.endGracefully();
      else this.socket.destroy();
    } finally {
      this.phase = 'closing';
      this.clearHandshakeTimer();
    }
    // Requests still running against the export must settle before it closes.
    await this.idle();
    this.ctx.budget.close();
    const exp = this.export;
    this.export = null;
    if (exp !== null) {
      try {
        await exp.close();
      } catch (err) {
        this.log('warn', 'closing export failed', { export: exp.name, error: errorText(err) });
      }
    }
    this.log(level, 'connection closed', { reason: this.closeReason ?? reason });
  }

  // --- Handshake ("Fixed newstyle negotiation") ---------------------------

  private async handshake(): Promise<NbdExport | null> {
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(P.NBD_INIT_MAGIC, 0);
    greeting.writeBigUInt64BE(P.NBD_OPTS_MAGIC, 8);
    greeting.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
    await this.send([greeting]);

    const clientFlags = (await this.reader.read(4, true)).readUInt32BE(0);
    const known = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES;
    if ((clientFlags & ~known) !== 0) {
      // "the server MUST drop the TCP connection if the client sets an unknown flag"
      throw new ProtocolViolation(`unknown client flags 0x${clientFlags.toString(16)}`);
    }
    this.noZeroes = (clientFlags & P.NBD_FLAG_C_NO_ZEROES) !== 0;

    for (let count = 1; ; count++) {
      if (count > this.ctx.limits.maxOptions) {
        // "if a server believes a client's behaviour constitutes a denial of service, it MAY initiate a hard disconnect"
        throw new ProtocolViolation(`more than ${this.ctx.limits.maxOptions} options`);
      }
      const header = await this.reader.read(P.OPTION_HEADER_BYTES);
      if (header.readBigUInt64BE(0) !== P.NBD_OPTS_MAGIC) {
        throw new ProtocolViolation(`bad option magic 0x${header.readBigUInt64BE(0).toString(16)}`);
      }
      const option = header.readUInt32BE(8);
      const length = header.readUInt32BE(12);
      const step = await this.handleOption(option, length);
      if (step.done) return step.export;
    }
  }

  private async handleOption(option: number, length: number): Promise<HandshakeStep> {
    if (this.refusal === undefined) this.refusal = await this.ctx.admission;
    if (this.refusal !== null) return this.refuseOption(option, length, this.refusal);
    const { maxOptionBytes } = this.ctx.limits;
    if (length > maxOptionBytes) {
      if (option === P.NBD_OPT_EXPORT_NAME || length > OPTION_DISCARD_LIMIT) {
        throw new ProtocolViolation(`${P.optionName(option)} carries ${length} bytes (limit ${maxOptionBytes})`);
      }
      await this.reader.skip(length);
      await this.optionReply(option, P.NBD_REP_ERR_TOO_BIG, `option data of ${length} bytes exceeds the ${maxOptionBytes}-byte limit`);
      return CONTINUE;
    }
    const data = await this.reader.read(length, true);
    if (this.ctx.isShuttingDown() && option !== P.NBD_OPT_ABORT) {
      if (option === P.NBD_OPT_EXPORT_NAME) throw new ProtocolViolation('server shutting down');
      await this.optionReply(option, P.NBD_REP_ERR_SHUTDOWN, 'server is shutting down');
      return CONTINUE;
    }
    switch (option) {
      case P.NBD_OPT_EXPORT_NAME:
        return { done: true, export: await this.optExportName(data) };
      case P.NBD_OPT_ABORT:
        // "The server MUST reply with NBD_REP_ACK"; data is ignored.
        await this.optionReply(option, P.NBD_REP_ACK);
        return { done: true, export: null };
      case P.NBD_OPT_LIST:
        await this.optList(data);
        return CONTINUE;
      case P.NBD_OPT_STARTTLS:
        // NOTLS mode: "MUST respond with NBD_REP_ERR_POLICY ... NBD_REP_ERR_INVALID if the client included data"
        await this.optionReply(
          option,
          data.length > 0 ? P.NBD_REP_ERR_INVALID : P.NBD_REP_ERR_POLICY,
          'TLS is not offered by this server',
        );
        return CONTINUE;
      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO: {
        const exp = await this.optInfoGo(option, data);
        return exp === null ? CONTINUE : { done: true, export: exp };
      }
      case P.NBD_OPT_STRUCTURED_REPLY:
        if (data.length > 0) {
          await this.optionReply(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        } else {
          this.structured = true;
          await this.optionReply(option, P.NBD_REP_ACK);
        }
        return CONTINUE;
      case P.NBD_OPT_LIST_META_CONTEXT:
      case P.NBD_OPT_SET_META_CONTEXT:
        await this.optMetaContext(option, data);
        return CONTINUE;
      default:
        // "NBD_REP_ERR_UNSUP: The option sent by the client is unknown"; negotiation continues.
        await this.optionReply(option, P.NBD_REP_ERR_UNSUP, `${P.optionName(option)} is not supported`);
        return CONTINUE;
    }
  }

  /**
   * A refused client (the per-client limit) gets NBD_REP_ERR_POLICY ("unwilling
   * to ... due to local policy") with the reason to every option, so that the
   * one it fails on (NBD_OPT_GO, not an optional one it tries first) carries
   * the message to the user. NBD_OPT_EXPORT_NAME has no error reply: a close.
   * The handshake timeout and maxOptions bound how long it may go on.
   */
  private async refuseOption(option: number, length: number, refusal: string): Promise<HandshakeStep> {
    if (length > OPTION_DISCARD_LIMIT) throw new ClientRefused(refusal);
    await this.reader.skip(length);
    if (option === P.NBD_OPT_EXPORT_NAME) throw new ClientRefused(refusal);
    if (option === P.NBD_OPT_ABORT) {
      await this.optionReply(option, P.NBD_REP_ACK);
      return { done: true, export: null };
    }
    await this.optionReply(option, P.NBD_REP_ERR_POLICY, refusal);
    return CONTINUE;
  }

  /** NBD_OPT_EXPORT_NAME cannot return an error: any failure is a hard disconnect. */
  private async optExportName(data: Buffer): Promise<NbdExport> {
    const name = decodeString(data, 'export name');
    if (typeof name !== 'string') throw new ProtocolViolation(name.error);
    let exp: NbdExport;
    try {
      exp = await this.ctx.provider.open(name);
    } catch (err) {
      throw new ProtocolViolation(`NBD_OPT_EXPORT_NAME ${JSON.stringify(name)}: ${errorText(err)}`);
    }
    this.export = exp;
    if (!Number.isSafeInteger(exp.size) || exp.size < 0) {
      throw new ProtocolViolation(`export ${JSON.stringify(name)} reports an invalid size (${exp.size})`);
    }
    this.advertisedMinBlock = 1;
    this.blockSizeAgreed = false;
    if (this.metaExportName !== name) this.metaExportName = null;
    const reply = Buffer.alloc(10 + (this.noZeroes ? 0 : P.EXPORT_NAME_PADDING_BYTES));
    reply.writeBigUInt64BE(BigInt(exp.size), 0);
    reply.writeUInt16BE(this.transmissionFlags(), 8);
    await this.send([reply]);
    return exp;
  }

  private async optList(data: Buffer): Promise<void> {
    const option = P.NBD_OPT_LIST;
    if (data.length > 0) {
      // "the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID"
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
      return;
    }
    let names: string[];
    try {
      names = await this.ctx.provider.list();
    } catch (err) {
      this.log('warn', 'listing exports failed', { error: errorText(err) });
      await this.optionReply(option, P.NBD_REP_ERR_PLATFORM, `cannot list exports: ${errorText(err)}`);
      return;
    }
    const replies: Buffer[] = [];
    for (const name of names) {
      const bytes = Buffer.from(name, 'utf8');
      if (typeof decodeString(bytes, 'export name') !== 'string') continue;
      const payload = Buffer.alloc(4 + bytes.length);
      payload.writeUInt32BE(bytes.length, 0);
      bytes.copy(payload, 4);
      replies.push(...this.optionReplyParts(option, P.NBD_REP_SERVER, payload));
    }
    replies.push(...this.optionReplyParts(option, P.NBD_REP_ACK));
    await this.send(replies);
  }

  /** NBD_OPT_INFO / NBD_OPT_GO. Returns the opened export when GO succeeded, else null. */
  private async optInfoGo(option: number, data: Buffer): Promise<NbdExport | null> {
    // Data: 32-bit name length, name, 16-bit request count, 16-bit requests.
    if (data.length < 6) {
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, `${P.optionName(option)} data too short`);
      return null;
    }
    const nameLength = data.readUInt32BE(0);
    if (nameLength > data.length - 6) {
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, 'export name length exceeds the option data');
      return null;
    }
    const name = decodeString(data.subarray(4, 4 + nameLength), 'export name');
    if (typeof name !== 'string') {
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, name.error);
      return null;
    }
    const count = data.readUInt16BE(4 + nameLength);
    if (data.length !== 4 + nameLength + 2 + 2 * count) {
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, 'information request count does not match the option length');
      return null;
    }
    const requests = new Set<number>();
    for (let i = 0; i < count; i++) requests.add(data.readUInt16BE(4 + nameLength + 2 + 2 * i));

    let exp: NbdExport | null = null;
    let info: ExportDescription;
    if (option === P.NBD_OPT_GO) {
      try {
        exp = await this.ctx.provider.open(name);
      } catch (err) {
        await this.exportFailure(option, name, err);
        return null;
      }
      // Owned by the connection from now on: closed when it ends, whatever happens.
      this.export = exp;
      info = exp;
    } else {
      const described = await this.describeExport(option, name);
      if (described === null) return null;
      info = described;
    }

    if (!Number.isSafeInteger(info.size) || info.size < 0) {
      if (exp !== null) {
        this.export = null;
        await exp.close().catch(() => undefined);
      }
      await this.exportFailure(option, name, new Error(`export reports an invalid size (${info.size})`));
      return null;
    }
    const minBlock = minimumBlockSize(info.size);
    const infos: Buffer[] = [];
    const exportInfo = Buffer.alloc(12);
    exportInfo.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
    exportInfo.writeBigUInt64BE(BigInt(info.size), 2);
    exportInfo.writeUInt16BE(this.transmissionFlags(), 10);
    infos.push(exportInfo);
    if (requests.has(P.NBD_INFO_NAME)) {
      infos.push(Buffer.concat([u16(P.NBD_INFO_NAME), messageBytes(info.name)]));
    }
    if (requests.has(P.NBD_INFO_DESCRIPTION) && info.description !== undefined) {
      infos.push(Buffer.concat([u16(P.NBD_INFO_DESCRIPTION), messageBytes(info.description)]));
    }
    // Sent even when not asked for (the client ignores what it did not request);
    // enforced only when asked for in NBD_OPT_GO ("NBD_INFO_BLOCK_SIZE").
    const blockSize = Buffer.alloc(14);
    blockSize.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 0);
    blockSize.writeUInt32BE(minBlock, 2);
    blockSize.writeUInt32BE(PREFERRED_BLOCK, 6);
    blockSize.writeUInt32BE(this.maxBlock(minBlock), 10);
    infos.push(blockSize);

    const parts: Buffer[] = [];
    for (const i of infos) parts.push(...this.optionReplyParts(option, P.NBD_REP_INFO, i));
    parts.push(...this.optionReplyParts(option, P.NBD_REP_ACK));
    if (exp !== null) {
      this.advertisedMinBlock = minBlock;
      this.blockSizeAgreed = requests.has(P.NBD_INFO_BLOCK_SIZE);
      // Block status needs SET_META_CONTEXT for this same export name.
      if (this.metaExportName !== name) this.metaExportName = null;
    }
    await this.send(parts);
    return exp;
  }

  /** Looks an export up without keeping it open; replies the error and returns null when it fails. */
  private async describeExport(option: number, name: string): Promise<ExportDescription | null> {
    const provider = this.ctx.provider;
    try {
      if (provider.describe !== undefined) return await provider.describe(name);
      const exp = await provider.open(name);
      const description: ExportDescription = { name: exp.name, size: exp.size };
      if (exp.description !== undefined) description.description = exp.description;
      await exp.close().catch((err: unknown) => this.log('warn', 'closing export failed', { export: name, error: errorText(err) }));
      return description;
    } catch (err) {
      await this.exportFailure(option, name, err);
      return null;
    }
  }

  private async exportFailure(option: number, name: string, err: unknown): Promise<void> {
    if (err instanceof ExportNotFoundError) {
      await this.optionReply(option, P.NBD_REP_ERR_UNKNOWN, `export ${JSON.stringify(name)} not found`);
      return;
    }
    this.log('warn', option === P.NBD_OPT_INFO ? 'describing export failed' : 'opening export failed', { export: name, error: errorText(err) });
    // "NBD_REP_ERR_UNKNOWN: The requested export is not available."
    await this.optionReply(option, P.NBD_REP_ERR_UNKNOWN, `export ${JSON.stringify(name)} is not available: ${errorText(err)}`);
  }

  private async optMetaContext(option: number, data: Buffer): Promise<void> {
    const isSet = option === P.NBD_OPT_SET_META_CONTEXT;
    // "Issuing this command replaces all previously-set metadata contexts (including when this command fails)"
    if (isSet) this.metaExportName = null;
    const request = parseMetaRequest(data);
    if ('error' in request) {
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, request.error);
      return;
    }
    if (isSet && !this.structured) {
      // "This option MUST NOT be requested unless structured replies have been negotiated first"
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, 'negotiate NBD_OPT_STRUCTURED_REPLY first');
      return;
    }
    if ((await this.describeExport(option, request.exportName)) === null) return;

    let selected: boolean;
    if (isSet) {
      // "base:" alone MUST be ignored by SET; unknown leaf names and namespaces are ignored.
      selected = request.queries.includes(P.BASE_ALLOCATION);
    } else {
      // LIST: no queries means all contexts; "base:" is a wildcard for the base namespace.
      selected = request.queries.length === 0 || request.queries.some((q) => q === 'base:' || q === P.BASE_ALLOCATION);
    }
    const parts: Buffer[] = [];
    if (selected) {
      const name = Buffer.from(P.BASE_ALLOCATION, 'utf8');
      const payload = Buffer.alloc(4 + name.length);
      // LIST: "The metadata context ID in these replies is reserved and SHOULD be set to zero"
      payload.writeUInt32BE(isSet ? BASE_ALLOCATION_ID : 0, 0);
      name.copy(payload, 4);
      parts.push(...this.optionReplyParts(option, P.NBD_REP_META_CONTEXT, payload));
    }
    parts.push(...this.optionReplyParts(option, P.NBD_REP_ACK));
    if (isSet && selected) this.metaExportName = request.exportName;
    await this.send(parts);
  }

  private optionReplyParts(option: number, type: number, payload?: Buffer): Buffer[] {
    const header = Buffer.alloc(P.OPTION_REPLY_HEADER_BYTES);
    header.writeBigUInt64BE(P.NBD_REP_MAGIC, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(type, 12);
    header.writeUInt32BE(payload?.length ?? 0, 16);
    return payload !== undefined && payload.length > 0 ? [header, payload] : [header];
  }

  /** One option reply; error replies carry a message for the user ("Option reply types"). */
  private optionReply(option: number, type: number, message?: string): Promise<void> {
    if ((type & P.NBD_REP_FLAG_ERROR) !== 0) {
      this.log('debug', 'option refused', { option: P.optionName(option), reply: type >>> 0, message });
    }
    return this.send(this.optionReplyParts(option, type, message === undefined ? undefined : messageBytes(message)));
  }

  private transmissionFlags(): number {
    return (
      P.NBD_FLAG_HAS_FLAGS |
      P.NBD_FLAG_READ_ONLY |
      P.NBD_FLAG_SEND_FLUSH |
      P.NBD_FLAG_SEND_CACHE |
      // Read-only: every connection sees the same bytes, so multi-conn is safe.
      P.NBD_FLAG_CAN_MULTI_CONN |
      // "MUST leave this flag clear if structured replies have not been negotiated"
      (this.structured ? P.NBD_FLAG_SEND_DF : 0)
    );
  }

  /** Advertised maximum: maxRequestBytes rounded down to a multiple of the minimum. */
  private maxBlock(minBlock: number): number {
    const max = this.ctx.limits.maxRequestBytes;
    return max - (max % minBlock);
  }

  // --- Transmission ------------------------------------------------------

  private async transmit(exp: NbdExport): Promise<string> {
    this.phase = 'transmission';
    this.clearHandshakeTimer();
    this.ctx.counters.handshakes++;
    this.log('debug', 'transmission phase', {
      export: exp.name,
      structured: this.structured,
      blockStatus: this.metaExportName !== null,
      blockSizeAgreed: this.blockSizeAgreed,
    });
    let reason: string;
    for (;;) {
      if (this.stopping) {
        reason = 'server shutting down';
        break;
      }
      if (this.socket.destroyed) {
        // Nobody to answer: requests still buffered are dropped, not served.
        reason = 'connection lost';
        break;
      }
      if (!this.hasSlot()) {
        await new Promise<void>((resolve) => (this.slotWaiter = resolve));
        continue;
      }
      let header: Buffer;
      try {
        header = await this.reader.read(P.REQUEST_HEADER_BYTES);
      } catch (err) {
        if (err instanceof ReadCancelledError) {
          reason = 'server shutting down';
        } else if (err instanceof StreamEndedError) {
          reason =
            err.partialBytes > 0
              ? `client disconnected with a truncated request (${err.partialBytes} bytes)`
              : 'client disconnected without NBD_CMD_DISC';
        } else {
          throw err;
        }
        break;
      }
      const magic = header.readUInt32BE(0);
      if (magic !== P.NBD_REQUEST_MAGIC) {
        throw new ProtocolViolation(`bad request magic 0x${magic.toString(16)}`);
      }
      const flags = header.readUInt16BE(4);
      const type = header.readUInt16BE(6);
      if (type === P.NBD_CMD_DISC) {
        // "The server MUST handle all outstanding requests ... and close the TCP session"
        reason = 'client sent NBD_CMD_DISC';
        break;
      }
      // Copy: the header may be a view of a larger socket chunk.
      const handle = Buffer.from(header.subarray(8, 16));
      const hi = header.readUInt32BE(16);
      // Offsets past 2^53 cannot be inside any export; treat them as out of range.
      const offset = hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 0x100000000 + header.readUInt32BE(20);
      const length = header.readUInt32BE(24);
      this.ctx.counters.requests++;
      const pending = this.handleRequest(exp, flags, type, handle, offset, length);
      if (pending !== undefined) await pending;
    }
    // Drain: every request read so far gets its reply before we close.
    await this.idle();
    await this.endGracefully();
    return reason;
  }

  /** Dispatches one request; returns a promise only when the request has a payload to consume. */
  private handleRequest(
    exp: NbdExport,
    flags: number,
    type: number,
    handle: Buffer,
    offset: number,
    length: number,
  ): Promise<void> | undefined {
    // FUA is tolerated on every command: nothing is ever written, so there is nothing to persist.
    const allowedFlags = (extra: number): boolean => (flags & ~(P.NBD_CMD_FLAG_FUA | extra)) === 0;
    switch (type) {
      case P.NBD_CMD_READ: {
        if (!allowedFlags(this.structured ? P.NBD_CMD_FLAG_DF : 0)) {
          return this.replyError(handle, type, P.NBD_EINVAL, `unsupported flags 0x${flags.toString(16)} for NBD_CMD_READ`);
        }
        const invalid = this.checkRange(exp, offset, length, true);
        if (invalid !== null) return this.replyError(handle, type, P.NBD_EINVAL, invalid);
        if (length === 0) {
          // "The client SHOULD NOT request a read length of 0 ... the server SHOULD NOT disconnect"
          return this.replyData(handle, offset, Buffer.alloc(0));
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
      }
      case P.NBD_CMD_WRITE: {
        if (length > this.ctx.limits.maxRequestBytes) {
          // "either the server or the client MAY initiate a hard disconnect if the payload of an NBD_CMD_WRITE ... would be large enough to be deemed a denial of service"
          throw new ProtocolViolation(`NBD_CMD_WRITE payload of ${length} bytes exceeds the ${this.ctx.limits.maxRequestBytes}-byte limit`);
        }
        return this.reader
          .skip(length)
          .then(() => this.replyError(handle, type, P.NBD_EPERM, 'export is read-only'));
      }
      case P.NBD_CMD_TRIM:
      case P.NBD_CMD_WRITE_ZEROES:
        // "SHOULD return NBD_EPERM if it receives a write or trim request on a read-only export"
        return this.replyError(handle, type, P.NBD_EPERM, 'export is read-only');
      case P.NBD_CMD_FLUSH:
        if (!allowedFlags(0)) return this.replyError(handle, type, P.NBD_EINVAL, `unsupported flags 0x${flags.toString(16)} for NBD_CMD_FLUSH`);
        if (offset !== 0 || length !== 0) {
          // "For a flush request, length and offset are reserved, and MUST be set to all-zero."
          return this.replyError(handle, type, P.NBD_EINVAL, 'NBD_CMD_FLUSH with non-zero offset or length');
        }
        return this.replyOk(handle);
      case P.NBD_CMD_CACHE: {
        // "if it advertised the command, the server MUST reject any command flags it does not recognize"
        if (!allowedFlags(0)) return this.replyError(handle, type, P.NBD_EINVAL, `unsupported flags 0x${flags.toString(16)} for NBD_CMD_CACHE`);
        const invalid = this.checkRange(exp, offset, length, true);
        if (invalid !== null) return this.replyError(handle, type, P.NBD_EINVAL, invalid);
        const cache = exp.cache;
        if (cache === undefined || length === 0) return this.replyOk(handle);
        // The hint reads the range into memory like a READ, only for less long.
        return this.withBuffers(exp.bufferBytes?.(offset, length) ?? length, (buffered) =>
          this.startWork(handle, type, 0, buffered, async () => {
            await cache.call(exp, offset, length);
            return this.okReplyParts(handle);
          }),
        );
      }
      case P.NBD_CMD_BLOCK_STATUS: {
        if (!this.structured || this.metaExportName === null) {
          // "Servers SHOULD reply with NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS without selecting at least one metadata context."
          return this.replyError(handle, type, P.NBD_EINVAL, 'no metadata context was negotiated');
        }
        if (!allowedFlags(P.NBD_CMD_FLAG_REQ_ONE)) {
          return this.replyError(handle, type, P.NBD_EINVAL, `unsupported flags 0x${flags.toString(16)} for NBD_CMD_BLOCK_STATUS`);
        }
        const invalid = this.checkRange(exp, offset, length, false);
        if (invalid !== null) return this.replyError(handle, type, P.NBD_EINVAL, invalid);
        if (length === 0) {
          // A reply needs one non-empty descriptor, which a zero-length request cannot have.
          return this.replyError(handle, type, P.NBD_EINVAL, 'NBD_CMD_BLOCK_STATUS of length 0');
        }
        const reqOne = (flags & P.NBD_CMD_FLAG_REQ_ONE) !== 0;
        return this.withBuffers(blockStatusPayloadBytes(reqOne ? 1 : MAX_BLOCK_STATUS_DESCRIPTORS), (buffered) =>
          this.startWork(handle, type, 0, buffered, async () => {
            const extents = await exp.extents(offset, length);
            const descriptors = toBlockStatus(extents, offset, length, this.advertisedMinBlock, reqOne ? 1 : MAX_BLOCK_STATUS_DESCRIPTORS);
            return this.blockStatusReplyParts(handle, descriptors);
          }),
        );
      }
      default:
        // "The server SHOULD return NBD_EINVAL if it receives an unknown command."
        return this.replyError(handle, type, P.NBD_EINVAL, `unknown ${P.commandName(type)}`);
    }
  }

  /**
   * EINVAL reasons ("Error values", "Block size constraints"): beyond the end
   * of the export, not aligned to the agreed minimum block size, or longer
   * than the maximum block size (READ and CACHE only).
   */
  private checkRange(exp: NbdExport, offset: number, length: number, capped: boolean): string | null {
    const max = this.maxBlock(this.advertisedMinBlock);
    if (capped && length > max) {
      return `request of ${length} bytes exceeds the ${max}-byte maximum block size`;
    }
    if (offset + length > exp.size) {
      return `request of ${length} bytes at offset ${offset} is beyond the end of the export (${exp.size} bytes)`;
    }
    if (this.blockSizeAgreed) {
      const min = this.advertisedMinBlock;
      if (offset % min !== 0 || length % min !== 0) {
        return `request of ${length} bytes at offset ${offset} is not aligned to the ${min}-byte minimum block size`;
      }
    }
    return null;
  }

  // --- Replies -------------------------------------------------------------

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

  private idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
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
      .then((parts) => this.send(parts))
      .catch((err: unknown) => this.log('error', 'sending reply failed', { error: errorText(err) }))
      .finally(() => this.release(bytes, buffered));
  }

  private replyOk(handle: Buffer): undefined {
    return this.replyNow(this.okReplyParts(handle));
  }

  private replyError(handle: Buffer, type: number, errno: number, message: string): undefined {
    this.log('debug', 'request refused', { command: P.commandName(type), errno, message });
    return this.replyNow(this.errorReplyParts(handle, errno, message));
  }

  private replyData(handle: Buffer, offset: number, data: Buffer): undefined {
    return this.replyNow(this.dataReplyParts(handle, offset, data));
  }

  /** Immediate replies hold a slot too, until flushed: a client that never reads its replies cannot grow our buffers. */
  private replyNow(parts: Buffer[]): undefined {
    this.acquire(0);
    void this.send(parts).finally(() => this.release(0));
    return undefined;
  }

  private okReplyParts(handle: Buffer): Buffer[] {
    // A simple reply is allowed for non-READ requests even with structured replies ("Simple reply message").
    return [simpleReply(handle, 0)];
  }

  private errorReplyParts(handle: Buffer, errno: number, message: string): Buffer[] {
    if (!this.structured) return [simpleReply(handle, errno)];
    // With structured replies READ errors MUST be structured; others SHOULD be, to carry the message.
    const msg = messageBytes(message);
    const header = structuredHeader(handle, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_ERROR, 6 + msg.length);
    const body = Buffer.alloc(6);
    body.writeUInt32BE(errno, 0);
    body.writeUInt16BE(msg.length, 4);
    return [header, body, msg];
  }

  private dataReplyParts(handle: Buffer, offset: number, data: Buffer): Buffer[] {
    if (!this.structured) return [simpleReply(handle, 0), data];
    if (data.length === 0) {
      return [structuredHeader(handle, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_NONE, 0)];
    }
    // The data is all in memory, so no error can follow: the data chunk itself can be final.
    const header = Buffer.alloc(P.STRUCTURED_HEADER_BYTES + 8);
    writeStructuredHeader(header, handle, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, 8 + data.length);
    header.writeUInt32BE(Math.floor(offset / 0x100000000), P.STRUCTURED_HEADER_BYTES);
    header.writeUInt32BE(offset % 0x100000000, P.STRUCTURED_HEADER_BYTES + 4);
    return [header, data];
  }

  private blockStatusReplyParts(handle: Buffer, descriptors: { length: number; flags: number }[]): Buffer[] {
    const payload = Buffer.alloc(blockStatusPayloadBytes(descriptors.length));
    payload.writeUInt32BE(BASE_ALLOCATION_ID, 0);
    descriptors.forEach((d, i) => {
      payload.writeUInt32BE(d.length, 4 + 8 * i);
      payload.writeUInt32BE(d.flags, 8 + 8 * i);
    });
    return [structuredHeader(handle, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_BLOCK_STATUS, payload.length), payload];
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

function u16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value, 0);
  return b;
}

function simpleReply(handle: Buffer, errno: number): Buffer {
  const b = Buffer.alloc(P.SIMPLE_REPLY_BYTES);
  b.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(errno, 4);
  handle.copy(b, 8);
  return b;
}

function writeStructuredHeader(b: Buffer, handle: Buffer, flags: number, type: number, length: number): void {
  b.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  handle.copy(b, 8);
  b.writeUInt32BE(length, 16);
}

function structuredHeader(handle: Buffer, flags: number, type: number, length: number): Buffer {
  const b = Buffer.alloc(P.STRUCTURED_HEADER_BYTES);
  writeStructuredHeader(b, handle, flags, type, length);
  return b;
}

/** NBD_OPT_{LIST,SET}_META_CONTEXT data: name length, name, query count, (length, query)*. */
function parseMetaRequest(data: Buffer): MetaRequest | { error: string } {
  if (data.length < 8) return { error: 'meta context request too short' };
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 8) return { error: 'export name length exceeds the option data' };
  const exportName = decodeString(data.subarray(4, 4 + nameLength), 'export name');
  if (typeof exportName !== 'string') return exportName;
  const count = data.readUInt32BE(4 + nameLength);
  let pos = 8 + nameLength;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    // "a query length that would require reading beyond the original length ... MUST fail ... NBD_REP_ERR_INVALID"
    if (pos + 4 > data.length) return { error: 'query count exceeds the option data' };
    const queryLength = data.readUInt32BE(pos);
    pos += 4;
    if (queryLength > data.length - pos) return { error: 'query length exceeds the option data' };
    const query = decodeString(data.subarray(pos, pos + queryLength), 'meta context query');
    if (typeof query !== 'string') return query;
    if (!query.includes(':')) return { error: `meta context query ${JSON.stringify(query)} has no namespace` };
    queries.push(query);
    pos += queryLength;
  }
  if (pos !== data.length) return { error: 'trailing bytes after the meta context queries' };
  return { exportName, queries };
}
