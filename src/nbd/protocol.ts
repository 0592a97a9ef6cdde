/**
 * NBD protocol constants. Section names refer to the NBD protocol
 * specification, doc/proto.md in the NetworkBlockDevice/nbd repository
 * (fixed newstyle, INFO/GO, structured replies, block status).
 * All integers on the wire are big-endian ("Conventions").
 */

// --- Magics ---------------------------------------------------------------

/** "NBDMAGIC": first 8 bytes the server sends ("Newstyle negotiation"). */
export const NBD_INIT_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": server greeting and prefix of every client option ("Newstyle negotiation"). */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** Prefix of every option reply ("Fixed newstyle negotiation"). */
export const NBD_REP_MAGIC = 0x3e889045565a9n;
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
/** Zero padding after NBD_OPT_EXPORT_NAME's reply unless NO_ZEROES ("Newstyle negotiation"). */
export const EXPORT_NAME_PADDING_BYTES = 124;
/** Strings (export names, messages) MUST be no longer than 4096 bytes ("Conventions"). */
export const MAX_STRING_BYTES = 4096;
/** Reads up to 2^25 bytes SHOULD NOT be considered a denial of service ("Block size constraints"). */
export const PORTABLE_MAX_BLOCK = 32 * 1024 * 1024;
/** The IANA port for NBD ("Newstyle negotiation"). */
export const NBD_DEFAULT_PORT = 10809;

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
