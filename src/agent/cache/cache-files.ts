/**
 * The cache directory's files and geometry: file names, the bounds on block
 * size and slot count, and how the index files (snapshot, journal) are
 * replaced. Shared by recovery on open and by compaction.
 */
import { constants } from 'node:fs';
import { open, readdir, unlink, type FileHandle } from 'node:fs/promises';
import { randomInt } from 'node:crypto';
import { join } from 'node:path';
import { AgentError } from '../../errors.js';
import { isTempName, writeFileAtomic } from '../../format/atomic-write.js';
import { readHead } from './file-io.js';
import { encodeJournalHeader, type JournalHeader } from './journal.js';
import { SNAPSHOT_HEADER_SIZE, decodeSnapshotHeader } from './snapshot.js';

export const FILES = {
  data: 'cache.data',
  snapshot: 'cache.snap',
  journal: 'cache.journal',
  lock: 'cache.lock',
} as const;

/** The files that take the cache's disk space. */
export const SPACE_FILES = [FILES.data, FILES.snapshot, FILES.journal] as const;

/** The open data file and journal (the journal handle is replaced by each compaction). */
export interface Files {
  data: FileHandle;
  journal: FileHandle;
}

export const DEFAULT_BLOCK_SIZE = 4096;
/** The smallest cache accepted, in blocks. */
export const MIN_SLOTS = 8;
/** The in-memory index costs about 40 bytes a slot: 2^27 slots is 512 GiB of 4 KiB blocks. */
export const MAX_SLOTS = 2 ** 27;
const MIN_BLOCK_SIZE = 512;
const MAX_BLOCK_SIZE = 2 * 1024 * 1024;

export function checkBlockSize(bs: number): void {
  if (!Number.isInteger(bs) || bs < MIN_BLOCK_SIZE || bs > MAX_BLOCK_SIZE || (bs & (bs - 1)) !== 0) {
    throw new AgentError(`cache block size ${bs} is not a power of two from ${MIN_BLOCK_SIZE} to ${MAX_BLOCK_SIZE}`);
  }
}

export function slotsFor(capacityBytes: number, blockSize: number): number {
  const slots = Math.floor(capacityBytes / blockSize);
  if (slots < MIN_SLOTS) {
    throw new AgentError(
      `cache size ${capacityBytes} bytes is too small: it must hold at least ${MIN_SLOTS} blocks of ${blockSize} bytes (${MIN_SLOTS * blockSize} bytes)`,
    );
  }
  if (slots > MAX_SLOTS) {
    throw new AgentError(
      `cache size ${capacityBytes} bytes is too large for ${blockSize}-byte blocks (at most ${MAX_SLOTS} blocks); use a larger block size`,
    );
  }
  return slots;
}

/** A journal's salt: records of an older journal at the same offsets never pass as this one's. */
export function randomSalt(): number {
  return randomInt(0, 0xffffffff);
}

/**
 * Writes a snapshot of the index for `epoch`, then an empty journal of the
 * same epoch (each atomically: temp file, fsync, rename, directory fsync),
 * and returns the journal opened for appending. A crash between the two
 * leaves the journal of the previous epoch, which loading recognises as
 * covered by the snapshot.
 */
export async function writeIndexFiles(dir: string, snapshot: Buffer[], journalHeader: JournalHeader): Promise<FileHandle> {
  await writeFileAtomic(join(dir, FILES.snapshot), snapshot);
  const journalPath = join(dir, FILES.journal);
  await writeFileAtomic(journalPath, [encodeJournalHeader(journalHeader)]);
  return open(journalPath, constants.O_RDWR);
}

/** The epoch of the snapshot on disk; undefined when it cannot be read (treated as changed). */
export async function snapshotEpochOnDisk(dir: string): Promise<number | undefined> {
  const head = await readHead(join(dir, FILES.snapshot), SNAPSHOT_HEADER_SIZE + 4).catch(() => undefined);
  const header = head ? decodeSnapshotHeader(head) : undefined;
  return typeof header === 'object' ? header.epoch : undefined;
}

/** Removes temp files a crash left behind while replacing the snapshot or the journal. */
export async function removeStaleTempFiles(dir: string): Promise<void> {
  const names = await readdir(dir).catch(() => [] as string[]);
  const ours = names.filter((n) => isTempName(n) && (n.startsWith(`.${FILES.snapshot}.`) || n.startsWith(`.${FILES.journal}.`)));
  await Promise.all(ours.map((n) => unlink(join(dir, n)).catch(() => undefined)));
}
