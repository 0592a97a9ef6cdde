/**
 * Client-only NBD protocol values and helpers. The wire constants (magics,
 * flags, option, reply, command and error values, header sizes) are shared
 * with the server: they live in src/nbd/protocol.ts and are imported
 * from there, so client and server cannot drift. Section names refer to the
 * NBD protocol specification (NetworkBlockDevice/nbd, doc/proto.md).
 */
import {
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_PLATFORM,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  PORTABLE_MAX_BLOCK,
} from '../protocol.js';

/**
 * "Oldstyle negotiation": cliserv_magic in place of IHAVEOPT. Only a client
 * meets it (to refuse it: oldstyle carries no export name).
 */
export const CLISERV_MAGIC = 0x00420281861253n;

// "Block size constraints": what a client assumes when the server advertises none.
export const DEFAULT_MIN_BLOCK = 1;
export const DEFAULT_PREFERRED_BLOCK = 4096;
/** Clients SHOULD NOT send requests larger than 32 MiB unless the server advertised more. */
export const DEFAULT_MAX_PAYLOAD = PORTABLE_MAX_BLOCK;

/** Size of the NBD_OPT_EXPORT_NAME reply before the padding: 64-bit size, 16-bit transmission flags. */
export const EXPORT_NAME_REPLY_BYTES = 10;

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
