/**
 * Checks an input path before a command opens it, so that a missing file, a
 * directory, or a file of the wrong kind (a map given as --segment, a
 * segment given as the image) is one line and exit 3.
 */
import { open, stat } from 'node:fs/promises';
import {
  InvalidIndexError,
  InvalidMapError,
  InvalidSegmentError,
  InvalidTraceError,
  NotAFileError,
  UnknownFileTypeError,
  fromSystemError,
} from '../errors.js';
import { INDEX_MAGIC } from '../format/image-index.js';
import { MAP_MAGIC } from '../format/map.js';
import { SEGMENT_MAGIC } from '../format/segment.js';

export type InputKind = 'image' | 'map' | 'segment' | 'index' | 'trace';

const NAMES: Record<InputKind, string> = {
  image: 'a disk image',
  map: 'a boot workload map',
  segment: 'a boot segment',
  index: 'an image index',
  trace: 'a boot trace',
};

/**
 * Throws a one-line exit-3 error unless `path` is a regular file that may be
 * a `kind` (any kind when omitted).
 */
export async function checkInput(path: string, kind?: InputKind): Promise<void> {
  let isFile: boolean;
  let isDirectory: boolean;
  try {
    const s = await stat(path);
    isFile = s.isFile();
    isDirectory = s.isDirectory();
  } catch (err) {
    throw fromSystemError(err, path, `opening the ${kind ?? 'file'}`);
  }
  const expected = kind === undefined ? 'a file' : NAMES[kind];
  if (isDirectory) throw new NotAFileError(`is a directory, expected ${expected}`, { file: path });
  if (!isFile) throw new NotAFileError(`is not a regular file, expected ${expected}`, { file: path });
  if (kind === undefined) return;
  const found = await magicKind(path);
  if (found === undefined || found === kind) return;
  const message = `is ${NAMES[found]}, not ${NAMES[kind]}`;
  if (kind === 'map') throw new InvalidMapError(message, { file: path });
  if (kind === 'segment') throw new InvalidSegmentError(message, { file: path });
  if (kind === 'index') throw new InvalidIndexError(message, { file: path });
  if (kind === 'trace') throw new InvalidTraceError(message, { file: path });
  throw new UnknownFileTypeError(message, { file: path });
}

/** 'map', 'segment' or 'index' when the file starts with their magic, else undefined. */
async function magicKind(path: string): Promise<'map' | 'segment' | 'index' | undefined> {
  const length = Math.max(MAP_MAGIC.length, SEGMENT_MAGIC.length, INDEX_MAGIC.length);
  const buf = Buffer.alloc(length);
  let bytesRead: number;
  try {
    const handle = await open(path, 'r');
    try {
      ({ bytesRead } = await handle.read(buf, 0, length, 0));
    } finally {
      await handle.close();
    }
  } catch (err) {
    throw fromSystemError(err, path, 'reading its first bytes');
  }
  const head = buf.subarray(0, bytesRead);
  if (head.subarray(0, MAP_MAGIC.length).equals(MAP_MAGIC)) return 'map';
  if (head.subarray(0, SEGMENT_MAGIC.length).equals(SEGMENT_MAGIC)) return 'segment';
  if (head.subarray(0, INDEX_MAGIC.length).equals(INDEX_MAGIC)) return 'index';
  return undefined;
}
