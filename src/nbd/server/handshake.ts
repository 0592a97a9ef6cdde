/**
 * The handshake of one connection: fixed newstyle negotiation ("Newstyle
 * negotiation", "Option haggling" in doc/proto.md), from the greeting until
 * the client enters transmission (NBD_OPT_GO, NBD_OPT_EXPORT_NAME) or ends
 * the session (NBD_OPT_ABORT).
 *
 * Each option has one handler in `handlers`, run after the checks every
 * option gets (admission, size, shutdown, and TLS when it is required).
 * NBD_OPT_STARTTLS ("TLS support") upgrades the connection when the server
 * has TLS credentials; without them the server is in "NOTLS mode".
 */
import { NbdClientRefusedError, NbdProtocolViolationError, ExportNotFoundError } from '../errors.js';
import * as P from '../protocol.js';
import { errorText, type ConnectionContext, type ConnectionIo, type NbdLogger } from './context.js';
import type { ExportDescription, NbdExport } from './export.js';

/** What the handshake agreed, which the transmission phase serves and judges requests by. */
export interface Negotiated {
  export: NbdExport;
  /** NBD_OPT_STRUCTURED_REPLY was acknowledged. */
  structured: boolean;
  /** base:allocation was selected for this export (NBD_OPT_SET_META_CONTEXT). */
  blockStatus: boolean;
  /** The client asked for NBD_INFO_BLOCK_SIZE in NBD_OPT_GO, so requests MUST respect minBlock ("Block size constraints"). */
  blockSizeAgreed: boolean;
  /** Advertised minimum block size (1 after NBD_OPT_EXPORT_NAME, which advertises none). */
  minBlock: number;
  /** Advertised maximum block size: the longest READ or CACHE. */
  maxBlock: number;
}

/** Option payloads above maxOptionBytes but below this are skipped and answered NBD_REP_ERR_TOO_BIG; above, we disconnect. */
const OPTION_DISCARD_LIMIT = 16 * 1024 * 1024;
/** Our id for base:allocation in NBD_REP_META_CONTEXT; opaque to clients. */
export const BASE_ALLOCATION_ID = 1;
/** Block sizes we advertise ("Block size constraints"). */
const MIN_BLOCK = 512;
const PREFERRED_BLOCK = 4096;

/** Advertised minimum block size: 512 unless the size is not a multiple of it. */
export function minimumBlockSize(size: number): number {
  return size % MIN_BLOCK === 0 ? MIN_BLOCK : 1;
}

type OptionResult = { done: false } | { done: true; export: NbdExport | null };
type OptionHandler = (option: number, data: Buffer) => Promise<OptionResult>;
const CONTINUE: OptionResult = { done: false };

interface MetaRequest {
  exportName: string;
  queries: string[];
}

export class Handshake {
  // Negotiated state.
  private noZeroes = false;
  private structured = false;
  private metaExportName: string | null = null;
  private blockSizeAgreed = false;
  private advertisedMinBlock = 1;
  private opened: NbdExport | null = null;
  /** The admission's answer once known: null (served) or why the client is refused. */
  private refusal: string | null | undefined;
  /** The connection runs over TLS (NBD_OPT_STARTTLS succeeded). */
  private tlsActive = false;

  private readonly handlers = new Map<number, OptionHandler>([
    [P.NBD_OPT_EXPORT_NAME, (_, data) => this.optExportName(data)],
    [P.NBD_OPT_ABORT, (option) => this.optAbort(option)],
    [P.NBD_OPT_LIST, (_, data) => this.optList(data)],
    [P.NBD_OPT_STARTTLS, (option, data) => (this.ctx.tls ? this.optStartTls(option, data) : this.optStartTlsRefused(option, data))],
    [P.NBD_OPT_INFO, (option, data) => this.optInfoGo(option, data)],
    [P.NBD_OPT_GO, (option, data) => this.optInfoGo(option, data)],
    [P.NBD_OPT_STRUCTURED_REPLY, (option, data) => this.optStructuredReply(option, data)],
    [P.NBD_OPT_LIST_META_CONTEXT, (option, data) => this.optMetaContext(option, data)],
    [P.NBD_OPT_SET_META_CONTEXT, (option, data) => this.optMetaContext(option, data)],
  ]);

  constructor(
    private readonly io: ConnectionIo,
    private readonly ctx: ConnectionContext,
    private readonly log: NbdLogger,
  ) {}

  /** The export this handshake opened and not closed again; the connection closes it when it ends. */
  get openedExport(): NbdExport | null {
    return this.opened;
  }

  /** Negotiates; the agreement on entering transmission, null when the client ended the session. */
  async run(): Promise<Negotiated | null> {
    const greeting = Buffer.alloc(P.GREETING_BYTES);
    greeting.writeBigUInt64BE(P.NBD_INIT_MAGIC, 0);
    greeting.writeBigUInt64BE(P.NBD_OPTS_MAGIC, 8);
    greeting.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
    await this.io.send([greeting]);

    const clientFlags = (await this.io.reader.read(P.CLIENT_FLAGS_BYTES, true)).readUInt32BE(0);
    const known = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES;
    if ((clientFlags & ~known) !== 0) {
      // "the server MUST drop the TCP connection if the client sets an unknown flag"
      throw new NbdProtocolViolationError(`unknown client flags 0x${clientFlags.toString(16)}`);
    }
    this.noZeroes = (clientFlags & P.NBD_FLAG_C_NO_ZEROES) !== 0;

    for (let count = 1; ; count++) {
      if (count > this.ctx.limits.maxOptions) {
        // "if a server believes a client's behaviour constitutes a denial of service, it MAY initiate a hard disconnect"
        throw new NbdProtocolViolationError(`more than ${this.ctx.limits.maxOptions} options`);
      }
      const header = await this.io.reader.read(P.OPTION_HEADER_BYTES);
      if (header.readBigUInt64BE(0) !== P.NBD_OPTS_MAGIC) {
        throw new NbdProtocolViolationError(`bad option magic 0x${header.readBigUInt64BE(0).toString(16)}`);
      }
      const option = header.readUInt32BE(8);
      const length = header.readUInt32BE(12);
      const result = await this.handleOption(option, length);
      if (result.done) return result.export === null ? null : this.agreement(result.export);
    }
  }

  private agreement(exp: NbdExport): Negotiated {
    return {
      export: exp,
      structured: this.structured,
      blockStatus: this.metaExportName !== null,
      blockSizeAgreed: this.blockSizeAgreed,
      minBlock: this.advertisedMinBlock,
      maxBlock: this.maxBlock(this.advertisedMinBlock),
    };
  }

  /** The checks every option gets, then its handler. */
  private async handleOption(option: number, length: number): Promise<OptionResult> {
    if (this.refusal === undefined) this.refusal = await this.ctx.admission;
    if (this.refusal !== null) return this.refuseOption(option, length, this.refusal);
    const { maxOptionBytes } = this.ctx.limits;
    if (length > maxOptionBytes) {
      if (option === P.NBD_OPT_EXPORT_NAME || length > OPTION_DISCARD_LIMIT) {
        throw new NbdProtocolViolationError(`${P.optionName(option)} carries ${length} bytes (limit ${maxOptionBytes})`);
      }
      await this.io.reader.skip(length);
      await this.optionReply(option, P.NBD_REP_ERR_TOO_BIG, `option data of ${length} bytes exceeds the ${maxOptionBytes}-byte limit`);
      return CONTINUE;
    }
    const data = await this.io.reader.read(length, true);
    if (this.ctx.isShuttingDown() && option !== P.NBD_OPT_ABORT) {
      if (option === P.NBD_OPT_EXPORT_NAME) throw new NbdProtocolViolationError('server shutting down');
      await this.optionReply(option, P.NBD_REP_ERR_SHUTDOWN, 'server is shutting down');
      return CONTINUE;
    }
    if (this.ctx.tls?.required && !this.tlsActive && option !== P.NBD_OPT_STARTTLS && option !== P.NBD_OPT_ABORT) {
      // "TLS-only mode": NBD_REP_ERR_TLS_REQD to every other option; NBD_OPT_EXPORT_NAME cannot be answered, so a close.
      if (option === P.NBD_OPT_EXPORT_NAME) throw new NbdClientRefusedError('NBD_OPT_EXPORT_NAME before TLS, which this server requires');
      await this.optionReply(option, P.NBD_REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
      return CONTINUE;
    }
    const handler = this.handlers.get(option);
    if (handler === undefined) {
      // "NBD_REP_ERR_UNSUP: The option sent by the client is unknown"; negotiation continues.
      await this.optionReply(option, P.NBD_REP_ERR_UNSUP, `${P.optionName(option)} is not supported`);
      return CONTINUE;
    }
    return handler(option, data);
  }

  /**
   * A refused client (the per-client limit) gets NBD_REP_ERR_POLICY ("unwilling
   * to ... due to local policy") with the reason to every option, so that the
   * one it fails on (NBD_OPT_GO, not an optional one it tries first) carries
   * the message to the user. NBD_OPT_EXPORT_NAME has no error reply: a close.
   * The handshake timeout and maxOptions bound how long it may go on.
   */
  private async refuseOption(option: number, length: number, refusal: string): Promise<OptionResult> {
    if (length > OPTION_DISCARD_LIMIT) throw new NbdClientRefusedError(refusal);
    await this.io.reader.skip(length);
    if (option === P.NBD_OPT_EXPORT_NAME) throw new NbdClientRefusedError(refusal);
    if (option === P.NBD_OPT_ABORT) return this.optAbort(option);
    await this.optionReply(option, P.NBD_REP_ERR_POLICY, refusal);
    return CONTINUE;
  }

  /** "The server MUST reply with NBD_REP_ACK"; data is ignored. */
  private async optAbort(option: number): Promise<OptionResult> {
    await this.optionReply(option, P.NBD_REP_ACK);
    return { done: true, export: null };
  }

  /** NOTLS mode: "MUST respond with NBD_REP_ERR_POLICY ... NBD_REP_ERR_INVALID if the client included data". */
  private async optStartTlsRefused(option: number, data: Buffer): Promise<OptionResult> {
    await this.optionReply(option, data.length > 0 ? P.NBD_REP_ERR_INVALID : P.NBD_REP_ERR_POLICY, 'TLS is not offered by this server');
    return CONTINUE;
  }

  /**
   * "TLS support": ack, then the TLS handshake; a second STARTTLS or one with
   * data is NBD_REP_ERR_INVALID. What was negotiated in plaintext is
   * forgotten: the client negotiates again over TLS.
   */
  private async optStartTls(option: number, data: Buffer): Promise<OptionResult> {
    if (data.length > 0 || this.tlsActive) {
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, this.tlsActive ? 'TLS is already started' : 'NBD_OPT_STARTTLS takes no data');
      return CONTINUE;
    }
    await this.io.startTls(optionReplyParts(option, P.NBD_REP_ACK));
    this.tlsActive = true;
    this.structured = false;
    this.metaExportName = null;
    return CONTINUE;
  }

  private async optStructuredReply(option: number, data: Buffer): Promise<OptionResult> {
    if (data.length > 0) {
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
    } else {
      this.structured = true;
      await this.optionReply(option, P.NBD_REP_ACK);
    }
    return CONTINUE;
  }

  /** NBD_OPT_EXPORT_NAME cannot return an error: any failure is a hard disconnect. */
  private async optExportName(data: Buffer): Promise<OptionResult> {
    const name = P.decodeString(data, 'export name');
    if (typeof name !== 'string') throw new NbdProtocolViolationError(name.error);
    let exp: NbdExport;
    try {
      exp = await this.ctx.provider.open(name);
    } catch (err) {
      throw new NbdProtocolViolationError(`NBD_OPT_EXPORT_NAME ${JSON.stringify(name)}: ${errorText(err)}`);
    }
    this.opened = exp;
    if (!Number.isSafeInteger(exp.size) || exp.size < 0) {
      throw new NbdProtocolViolationError(`export ${JSON.stringify(name)} reports an invalid size (${exp.size})`);
    }
    this.advertisedMinBlock = 1;
    this.blockSizeAgreed = false;
    if (this.metaExportName !== name) this.metaExportName = null;
    const reply = Buffer.alloc(P.EXPORT_NAME_REPLY_BYTES + (this.noZeroes ? 0 : P.EXPORT_NAME_PADDING_BYTES));
    reply.writeBigUInt64BE(BigInt(exp.size), 0);
    reply.writeUInt16BE(this.transmissionFlags(), 8);
    await this.io.send([reply]);
    return { done: true, export: exp };
  }

  private async optList(data: Buffer): Promise<OptionResult> {
    const option = P.NBD_OPT_LIST;
    if (data.length > 0) {
      // "the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID"
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
      return CONTINUE;
    }
    let names: string[];
    try {
      names = await this.ctx.provider.list();
    } catch (err) {
      this.log('warn', 'listing exports failed', { error: errorText(err) });
      await this.optionReply(option, P.NBD_REP_ERR_PLATFORM, `cannot list exports: ${errorText(err)}`);
      return CONTINUE;
    }
    const replies: Buffer[] = [];
    for (const name of names) {
      const bytes = Buffer.from(name, 'utf8');
      if (typeof P.decodeString(bytes, 'export name') !== 'string') continue;
      const payload = Buffer.alloc(4 + bytes.length);
      payload.writeUInt32BE(bytes.length, 0);
      bytes.copy(payload, 4);
      replies.push(...optionReplyParts(option, P.NBD_REP_SERVER, payload));
    }
    replies.push(...optionReplyParts(option, P.NBD_REP_ACK));
    await this.io.send(replies);
    return CONTINUE;
  }

  /** NBD_OPT_INFO / NBD_OPT_GO. Done with the opened export when GO succeeded. */
  private async optInfoGo(option: number, data: Buffer): Promise<OptionResult> {
    // Data: 32-bit name length, name, 16-bit request count, 16-bit requests.
    if (data.length < 6) {
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, `${P.optionName(option)} data too short`);
      return CONTINUE;
    }
    const nameLength = data.readUInt32BE(0);
    if (nameLength > data.length - 6) {
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, 'export name length exceeds the option data');
      return CONTINUE;
    }
    const name = P.decodeString(data.subarray(4, 4 + nameLength), 'export name');
    if (typeof name !== 'string') {
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, name.error);
      return CONTINUE;
    }
    const count = data.readUInt16BE(4 + nameLength);
    if (data.length !== 4 + nameLength + 2 + 2 * count) {
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, 'information request count does not match the option length');
      return CONTINUE;
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
        return CONTINUE;
      }
      // Owned by the connection from now on: closed when it ends, whatever happens.
      this.opened = exp;
      info = exp;
    } else {
      const described = await this.describeExport(option, name);
      if (described === null) return CONTINUE;
      info = described;
    }

    if (!Number.isSafeInteger(info.size) || info.size < 0) {
      if (exp !== null) {
        this.opened = null;
        await exp.close().catch(() => undefined);
      }
      await this.exportFailure(option, name, new Error(`export reports an invalid size (${info.size})`));
      return CONTINUE;
    }
    const minBlock = minimumBlockSize(info.size);
    const infos: Buffer[] = [];
    const exportInfo = Buffer.alloc(P.NBD_INFO_EXPORT_BYTES);
    exportInfo.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
    exportInfo.writeBigUInt64BE(BigInt(info.size), 2);
    exportInfo.writeUInt16BE(this.transmissionFlags(), 10);
    infos.push(exportInfo);
    if (requests.has(P.NBD_INFO_NAME)) {
      infos.push(Buffer.concat([u16(P.NBD_INFO_NAME), P.encodeString(info.name)]));
    }
    if (requests.has(P.NBD_INFO_DESCRIPTION) && info.description !== undefined) {
      infos.push(Buffer.concat([u16(P.NBD_INFO_DESCRIPTION), P.encodeString(info.description)]));
    }
    // Sent even when not asked for (the client ignores what it did not request);
    // enforced only when asked for in NBD_OPT_GO ("NBD_INFO_BLOCK_SIZE").
    const blockSize = Buffer.alloc(P.NBD_INFO_BLOCK_SIZE_BYTES);
    blockSize.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 0);
    blockSize.writeUInt32BE(minBlock, 2);
    blockSize.writeUInt32BE(PREFERRED_BLOCK, 6);
    blockSize.writeUInt32BE(this.maxBlock(minBlock), 10);
    infos.push(blockSize);

    const parts: Buffer[] = [];
    for (const i of infos) parts.push(...optionReplyParts(option, P.NBD_REP_INFO, i));
    parts.push(...optionReplyParts(option, P.NBD_REP_ACK));
    if (exp !== null) {
      this.advertisedMinBlock = minBlock;
      this.blockSizeAgreed = requests.has(P.NBD_INFO_BLOCK_SIZE);
      // Block status needs SET_META_CONTEXT for this same export name.
      if (this.metaExportName !== name) this.metaExportName = null;
    }
    await this.io.send(parts);
    return exp === null ? CONTINUE : { done: true, export: exp };
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

  private async optMetaContext(option: number, data: Buffer): Promise<OptionResult> {
    const isSet = option === P.NBD_OPT_SET_META_CONTEXT;
    // "Issuing this command replaces all previously-set metadata contexts (including when this command fails)"
    if (isSet) this.metaExportName = null;
    const request = parseMetaRequest(data);
    if ('error' in request) {
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, request.error);
      return CONTINUE;
    }
    if (isSet && !this.structured) {
      // "This option MUST NOT be requested unless structured replies have been negotiated first"
      await this.optionReply(option, P.NBD_REP_ERR_INVALID, 'negotiate NBD_OPT_STRUCTURED_REPLY first');
      return CONTINUE;
    }
    if ((await this.describeExport(option, request.exportName)) === null) return CONTINUE;

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
      parts.push(...optionReplyParts(option, P.NBD_REP_META_CONTEXT, payload));
    }
    parts.push(...optionReplyParts(option, P.NBD_REP_ACK));
    if (isSet && selected) this.metaExportName = request.exportName;
    await this.io.send(parts);
    return CONTINUE;
  }

  /** One option reply; error replies carry a message for the user ("Option reply types"). */
  private optionReply(option: number, type: number, message?: string): Promise<void> {
    if ((type & P.NBD_REP_FLAG_ERROR) !== 0) {
      this.log('debug', 'option refused', { option: P.optionName(option), reply: type >>> 0, message });
    }
    return this.io.send(optionReplyParts(option, type, message === undefined ? undefined : P.encodeString(message)));
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
}

function optionReplyParts(option: number, type: number, payload?: Buffer): Buffer[] {
  const header = P.encodeOptionReplyHeader(option, type, payload?.length ?? 0);
  return payload !== undefined && payload.length > 0 ? [header, payload] : [header];
}

function u16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value, 0);
  return b;
}

/** NBD_OPT_{LIST,SET}_META_CONTEXT data: name length, name, query count, (length, query)*. */
function parseMetaRequest(data: Buffer): MetaRequest | { error: string } {
  if (data.length < 8) return { error: 'meta context request too short' };
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 8) return { error: 'export name length exceeds the option data' };
  const exportName = P.decodeString(data.subarray(4, 4 + nameLength), 'export name');
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
    const query = P.decodeString(data.subarray(pos, pos + queryLength), 'meta context query');
    if (typeof query !== 'string') return query;
    if (!query.includes(':')) return { error: `meta context query ${JSON.stringify(query)} has no namespace` };
    queries.push(query);
    pos += queryLength;
  }
  if (pos !== data.length) return { error: 'trailing bytes after the meta context queries' };
  return { exportName, queries };
}
