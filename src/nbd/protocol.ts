/**
 * NBD protocol constants and wire encoding, shared by the server
 * (src/nbd/server) and the client (src/nbd/client) so that they cannot
 * drift. Section names refer to the NBD protocol specification, doc/proto.md
 * in the NetworkBlockDevice/nbd repository (fixed newstyle, INFO/GO,
 * structured replies, block status). All integers on the wire are
 * big-endian ("Conventions").
 */

// --- Magics ---------------------------------------------------------------

/** "NBDMAGIC": first 8 bytes the server sends ("Newstyle negotiation"). */
export const NBD_INIT_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": server greeting and prefix of every client option ("Newstyle negotiation"). */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** Prefix of every option reply ("Fixed newstyle negotiation"). */
export const NBD_REP_MAGIC = 0x3e889045565a9n;
/**
 * "Oldstyle negotiation": cliserv_magic in place of IHAVEOPT. Only a client
 * meets it (to refuse it: oldstyle carries no export name).
 */
export const CLISERV_MAGIC = 0x00420281861253n;
/** Request header magic ("Request message"). */
export const NBD_REQUEST_MAGIC = 0x25609513;
/** Simple reply magic ("Simple reply message"). */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** Structured reply chunk magic ("Structured reply chunk message"). */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// --- Handshake flags ("Handshake flags", 16 bits, server -> client) ---------

/** bit 0: server supports fixed newstyle. */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
/** bit 1: server can omit the 124 zero bytes after NBD_OPT_EXPORT_NAME. */
export const NBD_FLAG_NO_ZEROES = 1 << 1;

// --- Client flags ("Client flags", 32 bits, client -> server) --------------

/** bit 0: client speaks fixed newstyle. */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
/** bit 1: client does not want the 124 zero bytes. */
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// --- Transmission flags ("Transmission flags", 16 bits) -------------------

/** bit 0: MUST always be 1. */
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
/** bit 1: export is read-only; writes MUST be errored. */
export const NBD_FLAG_READ_ONLY = 1 << 1;
/** bit 2: exposes NBD_CMD_FLUSH. */
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
/** bit 3: exposes NBD_CMD_FLAG_FUA. */
export const NBD_FLAG_SEND_FUA = 1 << 3;
/** bit 4: export behaves like a rotational medium. */
export const NBD_FLAG_ROTATIONAL = 1 << 4;
/** bit 5: exposes NBD_CMD_TRIM. */
export const NBD_FLAG_SEND_TRIM = 1 << 5;
/** bit 6: exposes NBD_CMD_WRITE_ZEROES. */
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
/** bit 7: NBD_CMD_READ honours NBD_CMD_FLAG_DF; only with structured replies. */
export const NBD_FLAG_SEND_DF = 1 << 7;
/** bit 8: several connections may be used at once (no per-connection cache). */
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
/** bit 10: exposes NBD_CMD_CACHE. */
export const NBD_FLAG_SEND_CACHE = 1 << 10;

// --- Option types ("Option types") ----------------------------------------

export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
/** Withdrawn PEEK_EXPORT extension; answered with NBD_REP_ERR_UNSUP. */
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
/** Extended headers (newer spec revisions); not supported, so NBD_REP_ERR_UNSUP. */
export const NBD_OPT_EXTENDED_HEADERS = 11;

// --- Option reply types ("Option reply types") ----------------------------

export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
/** Error replies have bit 31 set. */
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2;
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3;
export const NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4;
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;
export const NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8;
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9;

// --- Information types (NBD_REP_INFO, under "NBD_OPT_INFO and NBD_OPT_GO") --

export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// --- Command types ("Request types") --------------------------------------

export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

// --- Command flags ("Command flags", 16 bits) -----------------------------

/** bit 0: force unit access (valid on any command when SEND_FUA). */
export const NBD_CMD_FLAG_FUA = 1 << 0;
/** bit 1: WRITE_ZEROES must not punch a hole. */
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
/** bit 2: READ reply in at most one content chunk. */
export const NBD_CMD_FLAG_DF = 1 << 2;
/** bit 3: BLOCK_STATUS reply with exactly one extent per context. */
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
/** bit 4: WRITE_ZEROES must fail fast if not faster than a write. */
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// --- Structured reply flags and types -------------------------------------

/** "Structured reply flags" bit 0: final chunk of this reply. */
export const NBD_REPLY_FLAG_DONE = 1 << 0;
/** "Structured reply types". */
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
/** Error chunk types have bit 15 set. */
export const NBD_REPLY_TYPE_FLAG_ERROR = 1 << 15;
export const NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_FLAG_ERROR + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_FLAG_ERROR + 2;

// --- base:allocation flags ("base:allocation metadata context") -----------

/** The metadata context this server offers. */
export const BASE_ALLOCATION = 'base:allocation';
/** bit 0: extent is a hole (not allocated in the backend). */
export const NBD_STATE_HOLE = 1 << 0;
/** bit 1: extent reads as zeroes. */
export const NBD_STATE_ZERO = 1 << 1;

// --- Error values ("Error values") ----------------------------------------

export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// --- Sizes -----------------------------------------------------------------

/** Server greeting: NBDMAGIC 8, IHAVEOPT 8, handshake flags 2 ("Newstyle negotiation"). */
export const GREETING_BYTES = 18;
/** Client flags after the greeting: 32 bits ("Newstyle negotiation"). */
export const CLIENT_FLAGS_BYTES = 4;

/** Request header: magic 4, flags 2, type 2, handle 8, offset 8, length 4 ("Request message"). */
export const REQUEST_HEADER_BYTES = 28;
/** Simple reply header: magic 4, error 4, handle 8 ("Simple reply message"). */
export const SIMPLE_REPLY_BYTES = 16;
/** Structured chunk header: magic 4, flags 2, type 2, handle 8, length 4. */
export const STRUCTURED_HEADER_BYTES = 20;
/** Option header: magic 8, option 4, length 4 ("Newstyle negotiation"). */
export const OPTION_HEADER_BYTES = 16;
/** Option reply header: magic 8, option 4, type 4, length 4 ("Fixed newstyle negotiation"). */
export const OPTION_REPLY_HEADER_BYTES = 20;
/** NBD_OPT_EXPORT_NAME reply before the padding: 64-bit size, 16-bit transmission flags ("Newstyle negotiation"). */
export const EXPORT_NAME_REPLY_BYTES = 10;
/** Zero padding after NBD_OPT_EXPORT_NAME's reply unless NO_ZEROES ("Newstyle negotiation"). */
export const EXPORT_NAME_PADDING_BYTES = 124;
/** NBD_INFO_EXPORT: 16-bit type, 64-bit size, 16-bit transmission flags ("NBD_REP_INFO"). */
export const NBD_INFO_EXPORT_BYTES = 12;
/** NBD_INFO_BLOCK_SIZE: 16-bit type, 32-bit minimum, preferred and maximum ("NBD_REP_INFO"). */
export const NBD_INFO_BLOCK_SIZE_BYTES = 14;
/** Strings (export names, messages) MUST be no longer than 4096 bytes ("Conventions"). */
export const MAX_STRING_BYTES = 4096;
// "Block size constraints": what a client assumes when the server advertises none.
export const DEFAULT_MIN_BLOCK = 1;
export const DEFAULT_PREFERRED_BLOCK = 4096;
/**
 * Reads up to 2^25 bytes SHOULD NOT be considered a denial of service, and a
 * client SHOULD NOT send more unless the server advertised more ("Block size
 * constraints").
 */
export const PORTABLE_MAX_BLOCK = 32 * 1024 * 1024;
/** The IANA port for NBD ("Newstyle negotiation"). */
export const NBD_DEFAULT_PORT = 10809;

// --- Strings ("Conventions") -----------------------------------------------

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** A spec "string": valid UTF-8, no NUL, at most 4096 bytes ("Conventions"). */
export function decodeString(bytes: Buffer, what: string): string | { error: string } {
  if (bytes.length > MAX_STRING_BYTES) return { error: `${what} is ${bytes.length} bytes (limit ${MAX_STRING_BYTES})` };
  if (bytes.includes(0)) return { error: `${what} contains a NUL byte` };
  try {
    return utf8.decode(bytes);
  } catch {
    return { error: `${what} is not valid UTF-8` };
  }
}

/** A message as a spec string: NULs become spaces, cut to 4096 bytes of whole UTF-8 characters. */
export function encodeString(message: string): Buffer {
  let b = Buffer.from(message.replace(/\0/g, ' '), 'utf8');
  if (b.length > MAX_STRING_BYTES) b = Buffer.from(b.subarray(0, MAX_STRING_BYTES).toString('utf8').replace(/\uFFFD+$/, ''), 'utf8');
  return b;
}

// --- Handshake messages ---------------------------------------------------

/** C: IHAVEOPT, 32-bit option, 32-bit length, data ("Newstyle negotiation"). */
export function encodeOption(option: number, data: Buffer): Buffer {
  const out = Buffer.alloc(OPTION_HEADER_BYTES + data.length);
  out.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
  out.writeUInt32BE(option, 8);
  out.writeUInt32BE(data.length, 12);
  data.copy(out, OPTION_HEADER_BYTES);
  return out;
}

/** S: reply magic, 32-bit option, 32-bit reply type, 32-bit length ("Fixed newstyle negotiation"); the payload follows. */
export function encodeOptionReplyHeader(option: number, type: number, length: number): Buffer {
  const header = Buffer.alloc(OPTION_REPLY_HEADER_BYTES);
  header.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(type, 12);
  header.writeUInt32BE(length, 16);
  return header;
}

// --- Transmission messages --------------------------------------------------

/** A request header as received ("Request message"); the magic is checked by the caller. */
export interface RequestHeader {
  magic: number;
  flags: number;
  type: number;
  /** Echoed in the reply; a copy, never a view of the socket's chunk. */
  handle: Buffer;
  /** Offsets past 2^53 cannot be inside any export: they read as Number.MAX_SAFE_INTEGER, out of range. */
  offset: number;
  length: number;
}

/** "Request message": magic, 16-bit flags, 16-bit type, 64-bit handle, 64-bit offset, 32-bit length. */
export function decodeRequestHeader(header: Buffer): RequestHeader {
  const hi = header.readUInt32BE(16);
  return {
    magic: header.readUInt32BE(0),
    flags: header.readUInt16BE(4),
    type: header.readUInt16BE(6),
    handle: Buffer.from(header.subarray(8, 16)),
    offset: hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 0x100000000 + header.readUInt32BE(20),
    length: header.readUInt32BE(24),
  };
}

/** C: a request header with no flags ("Request message"); `cookie` is the 64-bit handle as a safe integer. */
export function encodeRequest(type: number, cookie: number, offset: number, length: number): Buffer {
  const out = Buffer.alloc(REQUEST_HEADER_BYTES);
  out.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  out.writeUInt16BE(0, 4);
  out.writeUInt16BE(type, 6);
  out.writeUInt32BE(Math.floor(cookie / 0x1_0000_0000), 8);
  out.writeUInt32BE(cookie % 0x1_0000_0000, 12);
  out.writeBigUInt64BE(BigInt(offset), 16);
  out.writeUInt32BE(length, 24);
  return out;
}

/** S: magic, 32-bit error, 64-bit handle ("Simple reply message"). */
export function encodeSimpleReply(handle: Buffer, errno: number): Buffer {
  const b = Buffer.alloc(SIMPLE_REPLY_BYTES);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(errno, 4);
  handle.copy(b, 8);
  return b;
}

/** S: magic, 16-bit flags, 16-bit type, 64-bit handle, 32-bit length ("Structured reply chunk message"), at the start of `b`. */
export function writeStructuredHeader(b: Buffer, handle: Buffer, flags: number, type: number, length: number): void {
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  handle.copy(b, 8);
  b.writeUInt32BE(length, 16);
}

export function encodeStructuredHeader(handle: Buffer, flags: number, type: number, length: number): Buffer {
  const b = Buffer.alloc(STRUCTURED_HEADER_BYTES);
  writeStructuredHeader(b, handle, flags, type, length);
  return b;
}

// --- Names for logs and messages ---------------------------------------------

const OPTION_NAMES: Record<number, string> = {
  [NBD_OPT_EXPORT_NAME]: 'NBD_OPT_EXPORT_NAME',
  [NBD_OPT_ABORT]: 'NBD_OPT_ABORT',
  [NBD_OPT_LIST]: 'NBD_OPT_LIST',
  [NBD_OPT_PEEK_EXPORT]: 'NBD_OPT_PEEK_EXPORT',
  [NBD_OPT_STARTTLS]: 'NBD_OPT_STARTTLS',
  [NBD_OPT_INFO]: 'NBD_OPT_INFO',
  [NBD_OPT_GO]: 'NBD_OPT_GO',
  [NBD_OPT_STRUCTURED_REPLY]: 'NBD_OPT_STRUCTURED_REPLY',
  [NBD_OPT_LIST_META_CONTEXT]: 'NBD_OPT_LIST_META_CONTEXT',
  [NBD_OPT_SET_META_CONTEXT]: 'NBD_OPT_SET_META_CONTEXT',
  [NBD_OPT_EXTENDED_HEADERS]: 'NBD_OPT_EXTENDED_HEADERS',
};

const COMMAND_NAMES: Record<number, string> = {
  [NBD_CMD_READ]: 'NBD_CMD_READ',
  [NBD_CMD_WRITE]: 'NBD_CMD_WRITE',
  [NBD_CMD_DISC]: 'NBD_CMD_DISC',
  [NBD_CMD_FLUSH]: 'NBD_CMD_FLUSH',
  [NBD_CMD_TRIM]: 'NBD_CMD_TRIM',
  [NBD_CMD_CACHE]: 'NBD_CMD_CACHE',
  [NBD_CMD_WRITE_ZEROES]: 'NBD_CMD_WRITE_ZEROES',
  [NBD_CMD_BLOCK_STATUS]: 'NBD_CMD_BLOCK_STATUS',
};

/** Human-readable option name for logs. */
export function optionName(option: number): string {
  return OPTION_NAMES[option] ?? `option ${option}`;
}

/** Human-readable command name for logs. */
export function commandName(type: number): string {
  return COMMAND_NAMES[type] ?? `command ${type}`;
}

const OPTION_REPLY_ERRORS: Record<number, string> = {
  [NBD_REP_ERR_UNSUP]: 'NBD_REP_ERR_UNSUP',
  [NBD_REP_ERR_POLICY]: 'NBD_REP_ERR_POLICY',
  [NBD_REP_ERR_INVALID]: 'NBD_REP_ERR_INVALID',
  [NBD_REP_ERR_PLATFORM]: 'NBD_REP_ERR_PLATFORM',
  [NBD_REP_ERR_TLS_REQD]: 'NBD_REP_ERR_TLS_REQD',
  [NBD_REP_ERR_UNKNOWN]: 'NBD_REP_ERR_UNKNOWN',
  [NBD_REP_ERR_SHUTDOWN]: 'NBD_REP_ERR_SHUTDOWN',
  [NBD_REP_ERR_BLOCK_SIZE_REQD]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  [NBD_REP_ERR_TOO_BIG]: 'NBD_REP_ERR_TOO_BIG',
};

/** Name of an option reply error type ("Option reply types"), for messages. */
export function optionReplyName(type: number): string {
  return OPTION_REPLY_ERRORS[type] ?? `option reply 0x${type.toString(16)}`;
}

const ERRNO_NAMES: Record<number, string> = {
  [NBD_EPERM]: 'EPERM',
  [NBD_EIO]: 'EIO',
  [NBD_ENOMEM]: 'ENOMEM',
  [NBD_EINVAL]: 'EINVAL',
  [NBD_ENOSPC]: 'ENOSPC',
  [NBD_EOVERFLOW]: 'EOVERFLOW',
  [NBD_ENOTSUP]: 'ENOTSUP',
  [NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

/** Name of an error value in a reply ("Error values"), for messages. */
export function errnoName(error: number): string {
  return ERRNO_NAMES[error] ?? `errno ${error}`;
}
