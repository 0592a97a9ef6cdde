/**
 * Error classes, one per failure, each with a stable string `code` and the
 * process exit code the CLI maps it to (modelled on undici's errors).
 *
 * Exit codes are part of the CLI contract; see README "Exit codes".
 */

import { dirname } from 'node:path';

export const ExitCode = {
  OK: 0,
  /** verify found a mismatch (data, checksum, identity or digest). */
  VERIFY_FAILED: 1,
  /** bad flags or arguments (oclif uses 2 for parse errors too). */
  USAGE: 2,
  /** input unreadable, malformed or unsupported (image, map, segment, index, trace). */
  BAD_INPUT: 3,
  /** I/O failure on output or storage (cannot write, disk full, storage fault). */
  IO: 4,
  /** profile: the boot did not finish before --timeout. */
  BOOT_TIMEOUT: 5,
  /** profile: QEMU missing or the guest could not boot. */
  BOOT_FAILED: 6,
  /** agent: cannot start (port in use, bad config) or cannot reach it. */
  AGENT: 7,
  /** a bug: an unexpected exception. */
  INTERNAL: 70,
} as const;
export type ExitCodeValue = (typeof ExitCode)[keyof typeof ExitCode];

export abstract class BootcacheError extends Error {
  abstract readonly code: string;
  abstract readonly exitCode: ExitCodeValue;
  /** The file or object the error is about, when there is one. */
  readonly file?: string;

  constructor(message: string, options?: { file?: string; cause?: unknown }) {
    super(options?.file ? `${options.file}: ${message}` : message, { cause: options?.cause });
    this.name = new.target.name;
    if (options?.file !== undefined) this.file = options.file;
  }
}

/** Malformed or inconsistent image (bad magic, out-of-range tables, ...). */
export class InvalidImageError extends BootcacheError {
  readonly code = 'BC_INVALID_IMAGE';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/** A valid image using a feature bootcache refuses (encryption, external data file, ...). */
export class UnsupportedImageError extends BootcacheError {
  readonly code = 'BC_UNSUPPORTED_IMAGE';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/** The image's corrupt bit is set (qcow2 v3 incompatible bit 1); --force overrides. */
export class CorruptImageError extends BootcacheError {
  readonly code = 'BC_CORRUPT_IMAGE';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/** A backing chain is unusable: cycle, too deep, protocol name, missing file. */
export class BackingChainError extends BootcacheError {
  readonly code = 'BC_BACKING_CHAIN';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/** A .bcmap file that fails its checks. */
export class InvalidMapError extends BootcacheError {
  readonly code = 'BC_INVALID_MAP';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/** A .bcseg file that fails its structural checks. */
export class InvalidSegmentError extends BootcacheError {
  readonly code = 'BC_INVALID_SEGMENT';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/** A .bcidx image index that fails its structural checks. */
export class InvalidIndexError extends BootcacheError {
  readonly code = 'BC_INVALID_INDEX';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/** A trace file that cannot be parsed. */
export class InvalidTraceError extends BootcacheError {
  readonly code = 'BC_INVALID_TRACE';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/** The file given does not exist or cannot be opened. */
export class FileNotFoundError extends BootcacheError {
  readonly code = 'BC_NOT_FOUND';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/** A file whose kind (image, map, segment) cannot be recognised. */
export class UnknownFileTypeError extends BootcacheError {
  readonly code = 'BC_UNKNOWN_FILE_TYPE';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/** Map, segment and image do not belong together (identity, digest, sizes). */
export class MismatchError extends BootcacheError {
  readonly code = 'BC_MISMATCH';
  readonly exitCode = ExitCode.VERIFY_FAILED;
}

/** Segment data differs from the image. */
export class VerificationError extends BootcacheError {
  readonly code = 'BC_VERIFY_FAILED';
  readonly exitCode = ExitCode.VERIFY_FAILED;
}

/** Bad flag values that the parser cannot catch alone. */
export class UsageError extends BootcacheError {
  readonly code = 'BC_USAGE';
  readonly exitCode = ExitCode.USAGE;
}

/** A read or write failed on a file or the storage system. */
export class StorageIOError extends BootcacheError {
  readonly code: string = 'BC_IO';
  readonly exitCode = ExitCode.IO;
}

/**
 * One storage read request failed (an I/O error, a timeout, an injected
 * fault): the same request may succeed when it is sent again.
 */
export class StorageReadError extends StorageIOError {
  override readonly code = 'BC_STORAGE_READ';
}

/**
 * The file or object changed on storage after it was opened (its version
 * differs): the version being read is gone, so no read of it is answered.
 */
export class ImageChangedError extends BootcacheError {
  readonly code = 'BC_IMAGE_CHANGED';
  readonly exitCode = ExitCode.IO;
}

/** Agent configuration or start-up failure, or the control socket is unreachable. */
export class AgentError extends BootcacheError {
  readonly code = 'BC_AGENT';
  readonly exitCode = ExitCode.AGENT;
}

/** profile: the guest did not reach the end-of-boot condition in time. */
export class BootTimeoutError extends BootcacheError {
  readonly code = 'BC_BOOT_TIMEOUT';
  readonly exitCode = ExitCode.BOOT_TIMEOUT;
}

/** profile: QEMU missing, failed to start, or the guest died. */
export class BootFailedError extends BootcacheError {
  readonly code = 'BC_BOOT_FAILED';
  readonly exitCode = ExitCode.BOOT_FAILED;
}

/**
 * A conditional put lost a race: the object is no longer the version the
 * writer read (or exists where it expected none). The writer re-reads and
 * tries again.
 */
export class ConflictError extends BootcacheError {
  readonly code = 'BC_CONFLICT';
  readonly exitCode = ExitCode.IO;
}

/** The host's limits (an address-space limit, `ulimit -v`) leave no room for the work. */
export class ResourceLimitError extends BootcacheError {
  readonly code = 'BC_RESOURCE_LIMIT';
  readonly exitCode = ExitCode.IO;
}

/** TLS credentials (--tls-certificates, --tls-psk) that are missing, unreadable or malformed. */
export class TlsCredentialsError extends BootcacheError {
  readonly code = 'BC_TLS_CREDENTIALS';
  readonly exitCode = ExitCode.AGENT;
}

/** A client's TLS handshake failed (wrong key, untrusted certificate, dropped, timed out): that connection ends. */
export class TlsHandshakeError extends BootcacheError {
  readonly code = 'BC_TLS_HANDSHAKE';
  readonly exitCode = ExitCode.IO;
}

/** Turns a Node system error (ENOENT, EACCES, ...) into a one-line bootcache error. */
export function fromSystemError(err: unknown, file: string, doing: string): BootcacheError {
  if (err instanceof BootcacheError) return err;
  const e = err as NodeJS.ErrnoException;
  switch (e?.code) {
    case 'ENOENT':
      return new FileNotFoundError(`no such file (while ${doing})`, { file, cause: err });
    case 'EISDIR':
      return new FileNotFoundError(`is a directory, expected a file (while ${doing})`, { file, cause: err });
    case 'EACCES':
    case 'EPERM':
      return new StorageIOError(`permission denied (while ${doing})`, { file, cause: err });
    case 'ENOSPC':
      return new StorageIOError(`no space left on device (while ${doing})`, { file, cause: err });
    default:
      return new StorageIOError(`${e?.message ?? String(err)} (while ${doing})`, { file, cause: err });
  }
}

// --- CLI inputs and outputs (exit codes as in the README table) ---

/** An input path that exists but is not a regular file (a directory, a socket, a device). */
export class NotAFileError extends BootcacheError {
  readonly code = 'BC_NOT_A_FILE';
  readonly exitCode = ExitCode.BAD_INPUT;
}

/**
 * An output that cannot be written (its directory is missing or read-only,
 * it is a directory, the disk is full): exit 4, whatever the errno.
 */
export class OutputError extends StorageIOError {
  /** Turns a system error met while writing `file` into a one-line OutputError; bootcache errors pass through. */
  static from(err: unknown, file: string, doing: string): BootcacheError {
    if (err instanceof BootcacheError) return err;
    const e = err as NodeJS.ErrnoException;
    const why = ((): string => {
      switch (e?.code) {
        case 'ENOENT':
          return `directory ${dirname(file)} does not exist`;
        case 'ENOTDIR':
          return `a parent of it is not a directory`;
        case 'EISDIR':
          return 'is a directory';
        case 'EACCES':
        case 'EPERM':
          return 'permission denied';
        case 'EROFS':
          return 'read-only file system';
        case 'ENOSPC':
          return 'no space left on device';
        default:
          return e?.message ?? String(err);
      }
    })();
    return new OutputError(`cannot write: ${why} (while ${doing})`, { file, cause: err });
  }
}
