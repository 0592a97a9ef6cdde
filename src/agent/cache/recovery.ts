/**
 * Recovery on open: the cache directory checked or created, and the index
 * rebuilt from snapshot, journal and data file. Anything damaged beyond what
 * a crash leaves behind is recovered with a warning: by starting empty, or,
 * when only the journal is damaged, by checking blocks before serving them.
 */
import { constants } from 'node:fs';
import { mkdir, open, stat, type FileHandle } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { AgentError, StorageIOError, fromSystemError } from '../../errors.js';
import { writeFileAtomic } from '../../format/atomic-write.js';
import {
  DEFAULT_BLOCK_SIZE,
  FILES,
  MAX_SLOTS,
  MIN_SLOTS,
  checkBlockSize,
  randomSalt,
  removeStaleTempFiles,
  slotsFor,
  writeIndexFiles,
  type Files,
} from './cache-files.js';
import type { CacheLogger } from './cache-state.js';
import { readHead, readIfExists } from './file-io.js';
import type { JournalPosition } from './group-commit.js';
import {
  JOURNAL_HEADER_SIZE,
  PUT_FLAG_BOOT,
  RecordType,
  decodeJournalHeader,
  encodeJournalHeader,
  scanJournal,
  type JournalRecord,
} from './journal.js';
import { SlotFlag, SlotIndex, SlotState } from './slot-index.js';
import { decodeSnapshotHeader, encodeSnapshot, isSpaceHex, loadSnapshot } from './snapshot.js';

/** Checks or creates the cache directory; true when this call created it (its own mkdir succeeded). */
export async function prepareDir(dir: string): Promise<boolean> {
  try {
    const st = await stat(dir).catch((err: unknown) => {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    });
    if (st && !st.isDirectory()) throw new AgentError(`cache directory ${dir} exists and is not a directory`);
    return st ? false : await makeDir(dir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTDIR' || code === 'ENOENT') {
      throw new AgentError(`cache directory ${dir} cannot be created (${code}: a parent is missing or not a directory)`, { cause: err });
    }
    throw fromSystemError(err, dir, 'creating the cache directory');
  }
}

/**
 * mkdir -p. Not fs.mkdir's recursive mode: that loops forever where mkdir
 * fails with ENOENT under an existing parent (e.g. in /proc).
 */
async function makeDir(dir: string): Promise<boolean> {
  try {
    await mkdir(dir);
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') return false;
    const parent = dirname(dir);
    if (code !== 'ENOENT' || parent === dir) throw err;
    await makeDir(parent);
    // "a/missing/../b" names a directory that may exist once "a/missing" does: created only if this mkdir succeeds.
    return mkdir(dir).then(() => true, (again: unknown) => {
      if ((again as NodeJS.ErrnoException).code !== 'EEXIST') throw again;
      return false;
    });
  }
}

/** The cache as it was found: the files open and sized for `slotCount`, the index with its free list. */
export interface Recovered {
  blockSize: number;
  slotCount: number;
  files: Files;
  index: SlotIndex;
  /** Where appends to the open journal go on. */
  position: JournalPosition;
}

/** Loads the cache in `dir` (locked by the caller) for a capacity of `capacity` bytes. */
export async function recover(dir: string, requested: number | undefined, capacity: number, log: CacheLogger): Promise<Recovered> {
  await removeStaleTempFiles(dir);
  const recovered = await loadPersisted(dir, requested, capacity, log); // closes what it opened if it fails
  recovered.index.rebuildFreeList(recovered.slotCount);
  return recovered;
}

/** Reads snapshot, journal and data file; see the header for what damage does. */
async function loadPersisted(dir: string, requested: number | undefined, capacity: number, log: CacheLogger): Promise<Recovered> {
  const snapPath = join(dir, FILES.snapshot);
  const journalPath = join(dir, FILES.journal);
  const dataPath = join(dir, FILES.data);
  const startEmpty = async (blockSize: number, why?: string): Promise<Recovered> => {
    if (why) log.warn(`${why}; starting with an empty cache`);
    const slotCount = slotsFor(capacity, blockSize);
    return { blockSize, slotCount, ...(await initialize(dir, blockSize, slotCount)) };
  };

  const snapBuf = await readIfExists(snapPath, 'reading the cache snapshot');
  if (!snapBuf) {
    const leftovers = (await readIfExists(journalPath, 'reading the cache journal')) !== undefined;
    return startEmpty(requested ?? DEFAULT_BLOCK_SIZE, leftovers ? `${snapPath}: missing` : undefined);
  }
  const header = decodeSnapshotHeader(snapBuf);
  if (typeof header === 'string') return startEmpty(requested ?? DEFAULT_BLOCK_SIZE, `${snapPath}: ${header}`);
  const blockSize = header.blockSize;
  if (requested !== undefined && requested !== blockSize) {
    throw new AgentError(
      `cache directory ${dir} holds ${blockSize}-byte blocks, not ${requested}: use block size ${blockSize} or another (or emptied) cache directory`,
    );
  }
  try {
    checkBlockSize(blockSize);
  } catch {
    return startEmpty(DEFAULT_BLOCK_SIZE, `${snapPath}: block size ${blockSize} is invalid`);
  }
  if (header.slotCount < MIN_SLOTS || header.slotCount > MAX_SLOTS) {
    return startEmpty(blockSize, `${snapPath}: slot count ${header.slotCount} is invalid`);
  }
  const slotCount = slotsFor(capacity, blockSize);
  const dataSize = await stat(dataPath).then(
    (st) => (st.isFile() ? st.size : -1),
    (err: unknown) => {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return -1;
      throw fromSystemError(err, dataPath, 'checking the cache data file');
    },
  );
  if (dataSize < 0) return startEmpty(blockSize, `${dataPath}: missing`);
  // Shorter than the index's slots: cut when a full disk shrank the cache, and the crash came before the
  // compaction that records it. Blocks in slots past its end are gone; the others are intact.
  const dataSlots = Math.floor(dataSize / blockSize);
  if (dataSlots < header.slotCount) {
    log.warn(`${dataPath}: ${dataSize} bytes, shorter than the ${header.slotCount * blockSize} the index needs; the blocks past its end are dropped`);
  }

  const index = new SlotIndex(Math.max(header.slotCount, slotCount));
  const usable = Math.min(header.slotCount, slotCount, dataSlots);
  const snapError = loadSnapshot(snapBuf, header, index, usable);
  if (snapError) return startEmpty(blockSize, `${snapPath}: ${snapError}`);

  let rewrite = slotCount !== header.slotCount || dataSlots < header.slotCount;
  let suspect = false;
  let journalSize = JOURNAL_HEADER_SIZE;
  let salt = 0;
  const journalBuf = await readIfExists(journalPath, 'reading the cache journal');
  const jh = journalBuf ? decodeJournalHeader(journalBuf) : 'missing';
  if (!journalBuf || typeof jh === 'string') {
    if (journalBuf) return startEmpty(blockSize, `${journalPath}: ${jh}`);
    if (index.mapped > 0) {
      log.warn(`${journalPath}: missing; cached blocks will be checked against their checksums before use`);
      suspect = true;
    }
    rewrite = true;
  } else if (jh.blockSize !== blockSize || jh.slotCount !== header.slotCount) {
    return startEmpty(blockSize, `${journalPath}: block size or slot count differ from the snapshot's`);
  } else if (jh.epoch === ((header.epoch - 1) >>> 0)) {
    // Left by a compaction interrupted after the new snapshot was in place: the snapshot covers it.
    rewrite = true;
  } else if (jh.epoch !== header.epoch) {
    log.warn(
      `${journalPath}: epoch ${jh.epoch} does not follow snapshot epoch ${header.epoch}; ignored, and cached blocks will be checked before use`,
    );
    suspect = rewrite = true;
  } else {
    salt = jh.salt;
    const scan = scanJournal(journalBuf, salt, (rec) => replay(index, rec, header.slotCount, usable));
    journalSize = scan.validEnd;
    if (scan.damagedInMiddle || scan.rejected > 0) {
      log.warn(
        `${journalPath}: ${scan.damagedBytes} damaged bytes and ${scan.rejected} inconsistent records; ` +
          'cached blocks will be checked against their checksums before use',
      );
      suspect = rewrite = true;
    } else if (scan.damagedBytes > 0) {
      log.info?.(`${journalPath}: dropped a torn tail of ${scan.damagedBytes} bytes (an interrupted write)`);
    }
  }
  if (suspect) for (let slot = 0; slot < usable; slot++) index.flags[slot] |= SlotFlag.UNVERIFIED;

  const data = await open(dataPath, constants.O_RDWR);
  let journal: FileHandle | undefined;
  try {
    let epoch = header.epoch;
    if (rewrite) {
      // A new snapshot of what was loaded, with the new size, and an empty journal; the data file
      // grows only after it, so no durable record maps a slot the growth fills with zeros.
      epoch = (epoch + 1) >>> 0;
      salt = randomSalt();
      journalSize = JOURNAL_HEADER_SIZE;
      const snapshot = encodeSnapshot(index, { blockSize, slotCount, epoch });
      journal = await writeIndexFiles(dir, snapshot, { blockSize, slotCount, epoch, salt });
    } else {
      journal = await open(journalPath, constants.O_RDWR);
      if (journalSize < (journalBuf?.length ?? 0)) {
        await journal.truncate(journalSize);
        await journal.sync();
      }
    }
    // A data file longer than the index's slots (an interrupted resize) is cut back; a shorter one grows (sparse).
    if ((await data.stat()).size !== slotCount * blockSize) {
      await data.truncate(slotCount * blockSize);
      await data.sync();
    }
    return { blockSize, slotCount, files: { data, journal }, index, position: { epoch, salt, journalSize } };
  } catch (err) {
    await journal?.close().catch(() => undefined);
    await data.close().catch(() => undefined);
    throw err;
  }
}

/** Applies one journal record to the index; false when it does not fit (it is then ignored). */
function replay(index: SlotIndex, rec: JournalRecord, slotCount: number, usable: number): boolean {
  switch (rec.type) {
    case RecordType.SPACE: {
      const byId = index.spacesById[rec.spaceId];
      if (byId) return byId.hex === rec.hex;
      if (!isSpaceHex(rec.hex) || index.spaces.has(rec.hex) || rec.spaceId > 0xffffff) return false;
      index.space(rec.hex, rec.spaceId);
      return true;
    }
    case RecordType.PUT: {
      const sp = index.spacesById[rec.spaceId];
      if (!sp || rec.slot >= slotCount || !Number.isSafeInteger(rec.block)) return false;
      const current = sp.blocks.get(rec.block);
      if (current !== undefined) unmap(index, current);
      if (rec.slot >= usable) return true; // the cache shrank: the block is gone
      if (index.state[rec.slot] === SlotState.LIVE) unmap(index, rec.slot);
      index.attach(rec.slot, sp, rec.block, (rec.flags & PUT_FLAG_BOOT) !== 0, rec.crc);
      return true;
    }
    case RecordType.INVALIDATE:
      if (rec.slot >= slotCount) return false;
      if (rec.slot < usable && index.state[rec.slot] === SlotState.LIVE) unmap(index, rec.slot);
      return true;
    case RecordType.BOOTED: {
      const sp = index.spacesById[rec.spaceId];
      if (!sp || !Number.isFinite(rec.time)) return false;
      index.markBooted(sp, rec.time);
      return true;
    }
    case RecordType.DROP_SPACE: {
      const sp = index.spacesById[rec.spaceId];
      if (!sp) return false;
      for (const slot of [...sp.blocks.values()]) unmap(index, slot);
      return true;
    }
    default:
      return false;
  }
}

function unmap(index: SlotIndex, slot: number): void {
  index.detach(slot);
  index.state[slot] = SlotState.FREE;
}

/**
 * Creates an empty cache, replacing whatever is there. Order matters: an
 * empty snapshot first (from then on nothing old is trusted; its epoch
 * differs from any journal left behind, so that journal never replays), then
 * the data file is emptied, then the new journal is written. A crash at any
 * point leaves an empty cache or a damaged one that starts empty again.
 */
async function initialize(dir: string, blockSize: number, slotCount: number): Promise<Omit<Recovered, 'blockSize' | 'slotCount'>> {
  const dataPath = join(dir, FILES.data);
  const journalPath = join(dir, FILES.journal);
  const st = await stat(dataPath).catch(() => undefined);
  if (st && !st.isFile()) throw new StorageIOError('cache data file is not a regular file', { file: dataPath });
  const old = await readHead(journalPath, JOURNAL_HEADER_SIZE);
  const oldHeader = old ? decodeJournalHeader(old) : undefined;
  const epoch = typeof oldHeader === 'object' && oldHeader.epoch === 1 ? 2 : 1;
  const salt = randomSalt();
  const index = new SlotIndex(slotCount);
  let data: FileHandle | undefined;
  try {
    await writeFileAtomic(join(dir, FILES.snapshot), encodeSnapshot(index, { blockSize, slotCount, epoch }));
    data = await open(dataPath, constants.O_RDWR | constants.O_CREAT, 0o644);
    await data.truncate(0); // frees the old blocks
    await data.truncate(slotCount * blockSize); // sparse: takes no space until written
    await data.sync();
    await writeFileAtomic(journalPath, [encodeJournalHeader({ blockSize, slotCount, epoch, salt })]);
    const journal = await open(journalPath, constants.O_RDWR);
    return { files: { data, journal }, index, position: { epoch, salt, journalSize: JOURNAL_HEADER_SIZE } };
  } catch (err) {
    await data?.close().catch(() => undefined);
    throw fromSystemError(err, dir, 'creating the cache');
  }
}
