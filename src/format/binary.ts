/** Small helpers shared by the .bcmap, .bcseg and .bcidx codecs (docs/formats.md). */
import { createHash } from 'node:crypto';

/** Block sizes allowed in maps and segments: powers of two, 512 B .. 2 MiB. */
export const MIN_BLOCK_SIZE = 512;
export const MAX_BLOCK_SIZE = 2 * 1024 * 1024;
export const DEFAULT_BLOCK_SIZE = 4096;

export function isValidBlockSize(n: number): boolean {
  return Number.isInteger(n) && n >= MIN_BLOCK_SIZE && n <= MAX_BLOCK_SIZE && (n & (n - 1)) === 0;
}

/** Image identities are 64 lowercase hex digits (a SHA-256), stored as 32 raw bytes. */
export function isValidIdentity(identity: string): boolean {
  return /^[0-9a-f]{64}$/.test(identity);
}

export function identityToBytes(identity: string): Buffer {
  if (!isValidIdentity(identity)) throw new RangeError(`image identity must be 64 lowercase hex digits, got ${JSON.stringify(identity)}`);
  return Buffer.from(identity, 'hex');
}

/** Reads a u64 LE that must be a safe integer; returns -1 when it is not. */
export function readSafeU64(buf: Buffer, offset: number): number {
  const value = buf.readBigUInt64LE(offset);
  return value > BigInt(Number.MAX_SAFE_INTEGER) ? -1 : Number(value);
}

export function writeU64(buf: Buffer, value: number, offset: number): void {
  buf.writeBigUInt64LE(BigInt(value), offset);
}

export function isAllZero(buf: Uint8Array): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

/** Shortens a hex digest for messages. */
export function shortHex(hex: string): string {
  return hex.length > 16 ? `${hex.slice(0, 16)}…` : hex;
}

/** The 32 raw bytes of a SHA-256 given as 64 lowercase hex digits (`what` names it in the error). */
export function sha256FromHex(hex: string, what: string): Buffer {
  if (!/^[0-9a-f]{64}$/.test(hex)) throw new RangeError(`${what} must be 64 lowercase hex digits`);
  return Buffer.from(hex, 'hex');
}

/** SHA-256 of `buf` with the 32-byte checksum field at `offset` taken as zero (header and file checksums). */
export function sha256WithFieldZeroed(buf: Uint8Array, offset: number): Buffer {
  return createHash('sha256')
    .update(buf.subarray(0, offset))
    .update(Buffer.alloc(32))
    .update(buf.subarray(offset + 32))
    .digest();
}
