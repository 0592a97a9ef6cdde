/**
 * Reads of qcow2 side tables (snapshot table, bitmap directory and tables)
 * the way QEMU's block layer does them: bytes past the end of the file read
 * as zeros instead of failing.
 */
import type { ByteSource } from '../types.js';

export async function readZeroPadded(source: ByteSource, offset: number, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  const inFile = Math.max(0, Math.min(length, source.size - offset));
  if (inFile > 0) (await source.read(offset, inFile)).copy(out);
  return out;
}
