/**
 * The persistent dirty bitmap checks QEMU makes when it opens an image whose
 * bitmaps extension is in use (autoclear bit 0): bitmap_list_load,
 * check_dir_entry, bitmap_table_load and load_bitmap_data in
 * block/qcow2-bitmap.c. QEMU refuses the image when any fails, so we do too,
 * although bitmaps never change what the guest reads. Bitmap data clusters
 * are not read: nothing in them can make QEMU fail.
 */
import { InvalidImageError } from '../../errors.js';
import type { ByteSource } from '../types.js';
import type { BitmapsExtension, Qcow2Header } from './header.js';
import { readZeroPadded } from './padded-read.js';
import {
  BITMAP_DIR_ENTRY_SIZE,
  BITMAP_FLAG_IN_USE,
  BITMAP_MAX_GRANULARITY_BITS,
  BITMAP_MAX_NAME_SIZE,
  BITMAP_MAX_PHYS_SIZE,
  BITMAP_MAX_TABLE_SIZE,
  BITMAP_MIN_GRANULARITY_BITS,
  BITMAP_RESERVED_FLAGS,
  BITMAP_TABLE_ALL_ONES,
  BITMAP_TABLE_OFFSET_MASK,
  BITMAP_TABLE_RESERVED_MASK,
  BITMAP_TYPE_DIRTY_TRACKING,
} from './spec.js';

interface DirectoryEntry {
  name: string;
  tableOffset: number;
  tableSize: number;
  flags: number;
  granularityBits: number;
}

export async function checkBitmaps(source: ByteSource, header: Qcow2Header, ext: BitmapsExtension): Promise<void> {
  const file = source.name;
  const fail = (why: string): never => {
    throw new InvalidImageError(`persistent bitmaps: ${why}`, { file });
  };
  // The header parser bounds both (MAX_BITMAP_DIRECTORY_SIZE, cluster aligned).
  const dir = await readZeroPadded(source, Number(ext.directoryOffset), Number(ext.directorySize));
  const entries: DirectoryEntry[] = [];
  let at = 0;
  while (at < dir.length) {
    if (at + BITMAP_DIR_ENTRY_SIZE > dir.length) fail('broken bitmap directory (an entry runs past its end)');
    if (entries.length + 1 > ext.nbBitmaps) fail(`more bitmaps in the directory than the ${ext.nbBitmaps} the header extension names`);
    // "Bitmap directory" entry: table offset (0-7), table size (8-11), flags (12-15),
    // type (16), granularity_bits (17), name_size (18-19), extra_data_size (20-23).
    const tableOffset = dir.readBigUInt64BE(at);
    const tableSize = dir.readUInt32BE(at + 8);
    const flags = dir.readUInt32BE(at + 12);
    const type = dir[at + 16]!;
    const granularityBits = dir[at + 17]!;
    const nameSize = dir.readUInt16BE(at + 18);
    const extraSize = dir.readUInt32BE(at + 20);
    // "Padding to round up the bitmap directory entry size to the next multiple of 8".
    const next = at + Math.ceil((BITMAP_DIR_ENTRY_SIZE + nameSize + extraSize) / 8) * 8;
    if (next > dir.length) fail('broken bitmap directory (an entry runs past its end)');
    if (extraSize !== 0) fail('bitmap extra data is not supported');
    const name = dir.toString('latin1', at + BITMAP_DIR_ENTRY_SIZE, at + BITMAP_DIR_ENTRY_SIZE + nameSize);
    const bad =
      tableSize === 0 ||
      tableOffset === 0n ||
      tableOffset % BigInt(header.clusterSize) !== 0n ||
      tableSize > BITMAP_MAX_TABLE_SIZE ||
      granularityBits > BITMAP_MAX_GRANULARITY_BITS ||
      granularityBits < BITMAP_MIN_GRANULARITY_BITS ||
      (flags & BITMAP_RESERVED_FLAGS) !== 0 ||
      nameSize === 0 ||
      nameSize > BITMAP_MAX_NAME_SIZE ||
      type !== BITMAP_TYPE_DIRTY_TRACKING;
    if (bad) fail(`bitmap ${JSON.stringify(name)} has an invalid directory entry`);
    // Far past any file: QEMU fails such a read (past its 2^63 limit) or reads zeros; we refuse.
    if (tableOffset + BigInt(tableSize) * 8n > BigInt(Number.MAX_SAFE_INTEGER)) {
      fail(`bitmap ${JSON.stringify(name)} has its table at offset 0x${tableOffset.toString(16)}, out of range`);
    }
    // QEMU's check_dir_entry: the table's clusters must be able to hold a bitmap of the
    // whole disk, unless it is in use (not saved correctly, so not loaded).
    const bitmapBytes = BigInt(tableSize) * BigInt(header.clusterSize);
    if (bitmapBytes > BigInt(BITMAP_MAX_PHYS_SIZE)) fail(`bitmap ${JSON.stringify(name)} has a table larger than ${BITMAP_MAX_PHYS_SIZE} bytes`);
    if ((flags & BITMAP_FLAG_IN_USE) === 0 && BigInt(header.virtualSize) > (bitmapBytes * 8n) << BigInt(granularityBits)) {
      fail(`bitmap ${JSON.stringify(name)} has too small a table for the disk`);
    }
    // QEMU keeps names up to the first NUL (g_strndup).
    const nul = name.indexOf('\0');
    entries.push({ name: nul === -1 ? name : name.slice(0, nul), tableOffset: Number(tableOffset), tableSize, flags, granularityBits });
    at = next;
  }
  if (entries.length !== ext.nbBitmaps) fail(`fewer bitmaps in the directory than the ${ext.nbBitmaps} the header extension names`);

  const seen = new Set<string>();
  for (const e of entries) {
    // "Must be unique among all bitmap names within the bitmaps extension."
    if (seen.has(e.name)) fail(`two bitmaps are named ${JSON.stringify(e.name)}`);
    seen.add(e.name);
    // An in-use bitmap was not saved correctly: QEMU does not load its table.
    if ((e.flags & BITMAP_FLAG_IN_USE) === 0) await checkBitmapTable(source, header, e, fail);
  }
}

async function checkBitmapTable(source: ByteSource, header: Qcow2Header, e: DirectoryEntry, fail: (why: string) => never): Promise<void> {
  const cs = BigInt(header.clusterSize);
  const table = await readZeroPadded(source, e.tableOffset, e.tableSize * 8);
  for (let i = 0; i < e.tableSize; i++) {
    // "Bitmap table" entry rules (QEMU's check_table_entry).
    const entry = table.readBigUInt64BE(i * 8);
    const offset = entry & BITMAP_TABLE_OFFSET_MASK;
    if ((entry & BITMAP_TABLE_RESERVED_MASK) !== 0n || (offset !== 0n && ((entry & BITMAP_TABLE_ALL_ONES) !== 0n || offset % cs !== 0n))) {
      fail(`bitmap ${JSON.stringify(e.name)} has an invalid table entry ${i} (0x${entry.toString(16)})`);
    }
  }
  // The table must have exactly the clusters the bitmap's serialized form needs:
  // one bit per granule of the virtual disk, in 64-bit words.
  const granule = 2 ** e.granularityBits;
  const bytes = header.virtualSize === 0 ? 0 : Math.ceil(header.virtualSize / (granule * 64)) * 8;
  const needed = Math.ceil(bytes / header.clusterSize);
  if (needed !== e.tableSize) {
    fail(`bitmap ${JSON.stringify(e.name)} has ${e.tableSize} table entries, its size needs ${needed}`);
  }
}
