/**
 * Room on the cache directory's filesystem: the check at open (can it hold
 * the configured capacity?) and the capacity a cache shrinks to when its
 * writes fail for lack of space. The device (cache-device.ts) does the
 * shrinking; this module only measures and decides.
 */
import { stat, statfs } from 'node:fs/promises';
import { join } from 'node:path';

export interface FilesystemRoom {
  /** Size of the filesystem (statfs f_blocks × f_bsize). */
  totalBytes: number;
  /** Bytes an unprivileged writer may still use (f_bavail × f_bsize). */
  availableBytes: number;
  /** Bytes the cache's own files take on it now (allocated blocks, not their sparse sizes). */
  cacheBytes: number;
}

/** The filesystem's room for the cache, counting what the cache's files take already; undefined where statfs fails. */
export async function measureRoom(dir: string, files: readonly string[]): Promise<FilesystemRoom | undefined> {
  const fs = await statfs(dir).catch(() => undefined);
  if (!fs) return undefined;
  let cacheBytes = 0;
  for (const name of files) {
    const st = await stat(join(dir, name)).catch(() => undefined);
    // st_blocks counts 512-byte units whatever the filesystem's block size (stat(2)).
    if (st) cacheBytes += st.blocks * 512;
  }
  return { totalBytes: fs.blocks * fs.bsize, availableBytes: fs.bavail * fs.bsize, cacheBytes };
}

/** The warning for a filesystem that cannot hold `capacityBytes` of cache, or undefined when it can. */
export function roomWarning(dir: string, room: FilesystemRoom, capacityBytes: number): string | undefined {
  const canHold = room.availableBytes + room.cacheBytes;
  if (canHold >= capacityBytes) return undefined;
  return (
    `cache directory ${dir}: its filesystem can hold ${mib(canHold)} of cache (${mib(room.availableBytes)} free, ` +
    `${mib(room.cacheBytes)} in the cache), less than the cache size ${mib(capacityBytes)}; ` +
    'the cache will shrink to what fits when the disk fills'
  );
}

/**
 * The share of its data file's allocated bytes a cache keeps when a write
 * finds the disk full: the rest becomes free space on the filesystem, room
 * for the agent's segment rebuilds (DIR/tmp), the index files and other
 * writers, so that the next write does not find the disk full again.
 */
const KEEP_AFTER_NO_SPACE = 3 / 4;

/**
 * The slot count a cache of `usableSlots` shrinks to after a write failed
 * with ENOSPC, its data file taking `allocatedBytes` on disk; at least
 * `minSlots`, and at most one less than now.
 */
export function shrunkSlots(allocatedBytes: number, blockSize: number, usableSlots: number, minSlots: number): number {
  const keep = Math.floor((allocatedBytes * KEEP_AFTER_NO_SPACE) / blockSize);
  return Math.max(minSlots, Math.min(usableSlots - 1, keep));
}

/** True for a write that failed because the filesystem (or the user's quota) is full. */
export function isNoSpace(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ENOSPC' || code === 'EDQUOT';
}

/** Bytes as MiB with one decimal, for log lines. */
export function mib(bytes: number): string {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}
