/**
 * Judges one transmission request before it is served, as nbdkit's
 * server/protocol.c does (validate_request before handle_request): the
 * command, its flags, its offset and length against the export and the
 * agreed block sizes, and the export being read-only. A request that passes
 * can be served without further checks. Section names refer to doc/proto.md.
 */
import * as P from '../protocol.js';
import type { Negotiated } from './handshake.js';

/** The fields of a request header that decide whether it is valid ("Request message"). */
export interface RequestFields {
  flags: number;
  type: number;
  offset: number;
  length: number;
}

/** Why a request is refused: the error value to reply and a message for the client. */
export interface Rejection {
  errno: number;
  message: string;
}

/**
 * null when `request` may be served, else its rejection. NBD_CMD_DISC is not
 * judged (it has no reply), and a WRITE's payload is consumed before it.
 */
export function validateRequest(request: RequestFields, agreed: Negotiated): Rejection | null {
  const { flags, type, offset, length } = request;
  // Flags allowed beside NBD_CMD_FLAG_FUA, and whether the length is capped by the maximum block size.
  let allowed: number;
  let capped: boolean;
  switch (type) {
    case P.NBD_CMD_READ:
      // "NBD_CMD_FLAG_DF ... only valid if structured replies have been negotiated"
      allowed = agreed.structured ? P.NBD_CMD_FLAG_DF : 0;
      capped = true;
      break;
    case P.NBD_CMD_WRITE:
    case P.NBD_CMD_TRIM:
    case P.NBD_CMD_WRITE_ZEROES:
      // "SHOULD return NBD_EPERM if it receives a write or trim request on a read-only export"
      return reject(P.NBD_EPERM, 'export is read-only');
    case P.NBD_CMD_FLUSH:
      if (!flagsAllowed(flags, 0)) return unsupportedFlags(flags, type);
      if (offset !== 0 || length !== 0) {
        // "For a flush request, length and offset are reserved, and MUST be set to all-zero."
        return reject(P.NBD_EINVAL, 'NBD_CMD_FLUSH with non-zero offset or length');
      }
      return null;
    case P.NBD_CMD_CACHE:
      // "if it advertised the command, the server MUST reject any command flags it does not recognize"
      allowed = 0;
      capped = true;
      break;
    case P.NBD_CMD_BLOCK_STATUS:
      if (!agreed.structured || !agreed.blockStatus) {
        // "Servers SHOULD reply with NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS without selecting at least one metadata context."
        return reject(P.NBD_EINVAL, 'no metadata context was negotiated');
      }
      allowed = P.NBD_CMD_FLAG_REQ_ONE;
      capped = false;
      break;
    default:
      // "The server SHOULD return NBD_EINVAL if it receives an unknown command."
      return reject(P.NBD_EINVAL, `unknown ${P.commandName(type)}`);
  }
  if (!flagsAllowed(flags, allowed)) return unsupportedFlags(flags, type);
  const range = rangeError(agreed, offset, length, capped);
  if (range !== null) return reject(P.NBD_EINVAL, range);
  if (type === P.NBD_CMD_BLOCK_STATUS && length === 0) {
    // A reply needs one non-empty descriptor, which a zero-length request cannot have.
    return reject(P.NBD_EINVAL, 'NBD_CMD_BLOCK_STATUS of length 0');
  }
  return null;
}

/** FUA is tolerated on every command: nothing is ever written, so there is nothing to persist. */
function flagsAllowed(flags: number, allowed: number): boolean {
  return (flags & ~(P.NBD_CMD_FLAG_FUA | allowed)) === 0;
}

function unsupportedFlags(flags: number, type: number): Rejection {
  return reject(P.NBD_EINVAL, `unsupported flags 0x${flags.toString(16)} for ${P.commandName(type)}`);
}

/**
 * EINVAL reasons ("Error values", "Block size constraints"): longer than the
 * maximum block size (READ and CACHE only), beyond the end of the export, or
 * not aligned to the minimum block size once the client agreed to it.
 */
function rangeError(agreed: Negotiated, offset: number, length: number, capped: boolean): string | null {
  const max = agreed.maxBlock;
  if (capped && length > max) {
    return `request of ${length} bytes exceeds the ${max}-byte maximum block size`;
  }
  const size = agreed.export.size;
  if (offset + length > size) {
    return `request of ${length} bytes at offset ${offset} is beyond the end of the export (${size} bytes)`;
  }
  if (agreed.blockSizeAgreed) {
    const min = agreed.minBlock;
    if (offset % min !== 0 || length % min !== 0) {
      return `request of ${length} bytes at offset ${offset} is not aligned to the ${min}-byte minimum block size`;
    }
  }
  return null;
}

function reject(errno: number, message: string): Rejection {
  return { errno, message };
}
