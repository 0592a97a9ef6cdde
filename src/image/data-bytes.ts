/**
 * How many guest bytes of an image read as data (through its backing chain:
 * not zero, not unallocated). What a copy tool reads, and what `inspect`
 * reports.
 */
import type { DiskImage } from './types.js';

/** Extents are listed 1 GiB at a time, so a fragmented image's list stays small. */
const EXTENT_STEP = 1024 ** 3;

export async function imageDataBytes(image: DiskImage): Promise<number> {
  let bytes = 0;
  for (let offset = 0; offset < image.virtualSize; offset += EXTENT_STEP) {
    for (const extent of await image.extents(offset, Math.min(EXTENT_STEP, image.virtualSize - offset))) {
      if (extent.kind === 'data') bytes += extent.length;
    }
  }
  return bytes;
}
