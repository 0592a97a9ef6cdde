import { BootcacheError, ExitCode } from '../errors.js';

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
