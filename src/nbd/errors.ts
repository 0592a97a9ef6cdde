/**
 * NBD errors, client and server side, one class per failure with a stable
 * `code` (see src/errors.ts). Client errors reach the CLI (replay, warm);
 * server errors end one connection and are logged, never shown as an exit
 * status, so their exit codes only keep the contract complete.
 */
import { BootcacheError, ExitCode } from '../errors.js';

// --- Client -----------------------------------------------------------------

/** The server cannot be reached (refused, no such socket, DNS failure, timeout). */
export class NbdConnectError extends BootcacheError {
  readonly code = 'BC_NBD_CONNECT';
  readonly exitCode = ExitCode.IO;
}

/** The server refused the handshake or spoke something that is not NBD. */
export class NbdHandshakeError extends BootcacheError {
  readonly code = 'BC_NBD_HANDSHAKE';
  readonly exitCode = ExitCode.IO;
}

/** The server has no export with the requested name. */
export class NbdUnknownExportError extends BootcacheError {
  readonly code = 'BC_NBD_UNKNOWN_EXPORT';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/** The server answered a request with an error value (EIO, EINVAL, ...). */
export class NbdServerError extends BootcacheError {
  readonly code = 'BC_NBD_SERVER_ERROR';
  readonly exitCode = ExitCode.IO;
  /** The errno name from the reply, e.g. "EIO". */
  readonly errno: string;

  constructor(message: string, errno: string, options?: { cause?: unknown }) {
    super(message, options);
    this.errno = errno;
  }
}

/** The connection dropped, or the server broke the protocol during transmission. */
export class NbdDisconnectedError extends BootcacheError {
  readonly code = 'BC_NBD_DISCONNECTED';
  readonly exitCode = ExitCode.IO;
}

/** A malformed NBD URI. */
export class NbdUriError extends BootcacheError {
  readonly code = 'BC_NBD_URI';
  readonly exitCode = ExitCode.USAGE;
}

// --- Server -----------------------------------------------------------------

/** The client asked for an export the provider does not have. */
export class ExportNotFoundError extends BootcacheError {
  readonly code = 'BC_EXPORT_NOT_FOUND';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/** The client broke a MUST of the protocol: hard disconnect ("Terminating the transmission phase"). */
export class NbdProtocolViolationError extends BootcacheError {
  readonly code = 'BC_NBD_PROTOCOL_VIOLATION';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/** The server does not serve this client (per-client connection limit); it was told why. */
export class NbdClientRefusedError extends BootcacheError {
  readonly code = 'BC_NBD_CLIENT_REFUSED';
  readonly exitCode = ExitCode.IO;
}

/** The peer closed the stream (or it failed) before the bytes asked for arrived. */
export class StreamEndedError extends BootcacheError {
  readonly code = 'BC_NBD_STREAM_ENDED';
  readonly exitCode = ExitCode.IO;

  constructor(
    message: string,
    /** Bytes of a partial message that were received before the end. */
    readonly partialBytes: number,
  ) {
    super(message);
  }
}

/** A message was started but not finished within the stall timeout (slowloris). */
export class StreamStalledError extends BootcacheError {
  readonly code = 'BC_NBD_STREAM_STALLED';
  readonly exitCode = ExitCode.IO;
}

/** The reader was cancelled locally (server shutdown). */
export class ReadCancelledError extends BootcacheError {
  readonly code = 'BC_NBD_READ_CANCELLED';
  readonly exitCode = ExitCode.IO;

  constructor() {
    super('read cancelled');
  }
}
