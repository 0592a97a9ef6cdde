/**
 * The snapshot table checks QEMU makes when it opens an image
 * (qcow2_do_read_snapshots in block/qcow2-snapshot.c): it refuses the image
 * when an entry has too much extra data, or the table grows too big. The
 * snapshots themselves do not change what the guest reads, so only their
 * sizes are read, one window at a time.
 */
import { InvalidImageError } from '../../errors.js';
import type { ByteSource } from '../types.js';
import type { Qcow2Header } from './header.js';
import { readZeroPadded } from './padded-read.js';
import { MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_SIZE, SNAPSHOT_HEADER_SIZE } from './spec.js';

/** Bytes of the table read at once. */
const WINDOW = 64 * 1024;

export async function checkSnapshotTable(source: ByteSource, header: Qcow2Header): Promise<void> {
  let windowStart = 0;
  let window: Buffer = Buffer.alloc(0);
  const fixedPart = async (at: number): Promise<Buffer> => {
    if (at < windowStart || at + SNAPSHOT_HEADER_SIZE > windowStart + window.length) {
      windowStart = at;
      window = await readZeroPadded(source, at, WINDOW);
    }
    return window.subarray(at - windowStart, at - windowStart + SNAPSHOT_HEADER_SIZE);
  };
  const start = header.snapshotsOffset;
  let offset = start;
  for (let i = 0; i < header.nbSnapshots; i++) {
    // "Snapshot table entry": entries start on 8-byte boundaries ("Padding to round up ... multiple of 8").
    offset = Math.ceil(offset / 8) * 8;
    const h = await fixedPart(offset);
    // Bytes 12-13 id_str_size, 14-15 name_size, 36-39 extra_data_size.
    const idSize = h.readUInt16BE(12);
    const nameSize = h.readUInt16BE(14);
    const extraSize = h.readUInt32BE(36);
    if (extraSize > MAX_SNAPSHOT_EXTRA_DATA) {
      throw new InvalidImageError(
        `snapshot table entry ${i} has too much extra data (${extraSize} bytes, at most ${MAX_SNAPSHOT_EXTRA_DATA})`,
        { file: source.name },
      );
    }
    offset += SNAPSHOT_HEADER_SIZE + extraSize + idSize + nameSize;
    if (offset - start > MAX_SNAPSHOT_TABLE_SIZE) {
      throw new InvalidImageError(`snapshot table is too big (more than ${MAX_SNAPSHOT_TABLE_SIZE} bytes at entry ${i})`, {
        file: source.name,
      });
    }
  }
}
