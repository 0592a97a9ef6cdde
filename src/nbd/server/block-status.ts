import type { Extent, ExtentKind } from '../../image/types.js';
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from '../protocol.js';

/** One NBD_REPLY_TYPE_BLOCK_STATUS descriptor ("Structured reply types"). */
export interface BlockStatusDescriptor {
  length: number;
  flags: number;
}

/**
 * base:allocation flags for an extent kind ("base:allocation metadata
 * context"). An explicit zero extent is reported as a hole too: it holds no
 * data of its own (qcow2 zero clusters), which is what qemu-nbd reports.
 */
export function allocationFlags(kind: ExtentKind): number {
  switch (kind) {
    case 'data':
      return 0;
    case 'zero':
    case 'unallocated':
      return NBD_STATE_HOLE | NBD_STATE_ZERO;
  }
}

interface Piece {
  start: number;
  end: number;
  flags: number;
}

/**
 * Turns provider extents into block status descriptors for
 * [offset, offset+length):
 * - ranges the extents leave uncovered get status 0 (always safe: "the server
 *   MAY always safely report a status of 0");
 * - boundaries that fall inside a block of `alignment` bytes are moved to the
 *   block end, the mixed block getting the flags common to all its parts
 *   (descriptor lengths MUST be multiples of the advertised minimum block
 *   size, NBD_CMD_BLOCK_STATUS);
 * - at most `maxDescriptors` descriptors; the client asks again for the rest.
 * Always returns at least one descriptor when length > 0.
 */
export function toBlockStatus(
  extents: readonly Extent[],
  offset: number,
  length: number,
  alignment: number,
  maxDescriptors: number,
): BlockStatusDescriptor[] {
  const end = offset + length;
  if (length <= 0) return [];
  const pieces: Piece[] = [];
  let cursor = offset;
  const push = (start: number, stop: number, flags: number): void => {
    const last = pieces[pieces.length - 1];
    if (last !== undefined && last.flags === flags && last.end === start) last.end = stop;
    else pieces.push({ start, end: stop, flags });
  };
  for (const e of extents) {
    const s = Math.max(e.offset, cursor);
    const t = Math.min(e.offset + e.length, end);
    if (!(t > s)) continue;
    if (s > cursor) push(cursor, s, 0);
    push(s, t, allocationFlags(e.kind));
    cursor = t;
    if (cursor >= end) break;
  }
  if (cursor < end) push(cursor, end, 0);

  const out: BlockStatusDescriptor[] = [];
  const emit = (start: number, stop: number, flags: number): void => {
    const last = out[out.length - 1];
    if (last !== undefined && last.flags === flags) last.length += stop - start;
    else out.push({ length: stop - start, flags });
  };
  let i = 0;
  for (let pos = offset; pos < end; ) {
    while (pieces[i]!.end <= pos) i++;
    const piece = pieces[i]!;
    if (piece.end === end || alignment <= 1 || piece.end % alignment === 0) {
      emit(pos, piece.end, piece.flags);
      pos = piece.end;
    } else {
      const blockStart = piece.end - (piece.end % alignment);
      if (blockStart > pos) {
        emit(pos, blockStart, piece.flags);
        pos = blockStart;
      }
      const blockEnd = Math.min(blockStart + alignment, end);
      let flags = piece.flags;
      for (let j = i + 1; j < pieces.length && pieces[j]!.start < blockEnd; j++) flags &= pieces[j]!.flags;
      emit(pos, blockEnd, flags);
      pos = blockEnd;
    }
    // One more than the cap is enough to know we must cut.
    if (out.length > maxDescriptors) break;
  }
  return out.slice(0, Math.max(1, maxDescriptors));
}
