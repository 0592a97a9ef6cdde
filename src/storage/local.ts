import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { mkdir, open, readdir, realpath, rename, rm, stat } from 'node:fs/promises';
import { dirname, isAbsolute, join, posix, relative, sep } from 'node:path';
import { ConflictError, FileNotFoundError, StorageIOError, UsageError, fromSystemError } from '../errors.js';
import { FileByteSource, fileStamp, fileVersion } from '../image/file-source.js';
import type { ByteSource } from '../image/types.js';
import type { ObjectStat, PutOptions, Storage } from './types.js';

/**
 * A local directory (or an NFS mount) as the storage system. Keys are
 * relative paths below the root; nothing outside the root is reachable, not
 * even through symlinks.
 */
export class LocalDirStorage implements Storage {
  readonly description: string;

  private constructor(private readonly root: string) {
    this.description = `dir:${root}`;
  }

  static async open(root: string): Promise<LocalDirStorage> {
    let real: string;
    try {
      real = await realpath(root);
      const st = await stat(real);
      if (!st.isDirectory()) throw new StorageIOError('storage root is not a directory', { file: root });
    } catch (err) {
      throw fromSystemError(err, root, 'opening the storage directory');
    }
    return new LocalDirStorage(real);
  }

  /** Validates a key and maps it to a path inside the root (symlinks resolved). */
  async pathOf(key: string, mustExist = true): Promise<string> {
    validateKey(key);
    const path = join(this.root, ...key.split('/'));
    if (!mustExist) {
      await this.checkInside(dirname(path), key, false);
      return path;
    }
    await this.checkInside(path, key, true);
    return path;
  }

  private async checkInside(path: string, key: string, mustExist: boolean): Promise<void> {
    let real: string;
    try {
      real = await realpath(path);
    } catch (err) {
      if (!mustExist && (err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw fromSystemError(err, key, 'resolving');
    }
    if (outside(this.root, real)) {
      throw new UsageError(`key ${JSON.stringify(key)} resolves outside the storage root`);
    }
  }

  async stat(key: string): Promise<ObjectStat | undefined> {
    let path: string;
    try {
      path = await this.pathOf(key);
    } catch (err) {
      if (err instanceof FileNotFoundError) return undefined;
      throw err;
    }
    const st = await stat(path, { bigint: true }).catch((err: unknown) => {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw fromSystemError(err, key, 'stat');
    });
    if (!st || !st.isFile()) return undefined;
    return { key, size: Number(st.size), stamp: fileStamp(st), version: fileVersion(st), modifiedMs: Number(st.mtimeMs) };
  }

  async read(key: string, offset: number, length: number): Promise<Buffer> {
    const source = await this.openSource(key);
    try {
      return await source.read(offset, length);
    } finally {
      await source.close();
    }
  }

  async get(key: string): Promise<Buffer> {
    const source = await this.openSource(key);
    try {
      return await source.read(0, source.size);
    } finally {
      await source.close();
    }
  }

  async put(key: string, body: Buffer | AsyncIterable<Buffer>, options: PutOptions = {}): Promise<ObjectStat> {
    const path = await this.pathOf(key, false);
    if (options.ifVersion !== undefined && !Buffer.isBuffer(body)) throw new RangeError('a conditional put takes a Buffer');
    await mkdir(dirname(path), { recursive: true });
    // Unique temp name per writer: concurrent writers never share a file, and
    // rename(2) makes the last complete one win.
    const tmp = `${path}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`;
    try {
      const handle = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o644);
      try {
        if (Buffer.isBuffer(body)) {
          await handle.writeFile(body);
        } else {
          for await (const chunk of body) await handle.write(chunk);
        }
        await handle.sync();
      } finally {
        await handle.close();
      }
      if (options.ifVersion !== undefined) {
        // Checked just before the rename: enough for the agents of one host
        // (one event loop each, renames atomic); not atomic across NFS clients.
        const now = (await this.stat(key))?.version ?? null;
        if (now !== options.ifVersion) {
          throw new ConflictError(`changed since it was read (expected ${options.ifVersion ?? 'no object'}, found ${now ?? 'none'})`, { file: key });
        }
      }
      await rename(tmp, path);
      await syncDir(dirname(path));
    } catch (err) {
      await rm(tmp, { force: true });
      throw fromSystemError(err, key, 'publishing');
    }
    const st = await this.stat(key);
    if (!st) throw new StorageIOError('object vanished right after publishing', { file: key });
    return st;
  }

  async list(prefix = ''): Promise<ObjectStat[]> {
    const out: ObjectStat[] = [];
    const walk = async (dir: string, relDir: string): Promise<void> => {
      let entries;
      try {
        entries = await readdir(dir, { withFileTypes: true });
      } catch (err) {
        throw fromSystemError(err, relDir || '.', 'listing');
      }
      for (const entry of entries) {
        const key = relDir ? `${relDir}/${entry.name}` : entry.name;
        if (entry.isDirectory()) {
          if (prefix === '' || key.startsWith(prefix) || prefix.startsWith(`${key}/`)) await walk(join(dir, entry.name), key);
        } else if (entry.isFile() && key.startsWith(prefix) && !entry.name.includes('.tmp-')) {
          // One object that cannot be served (outside the root) leaves it out, not the whole listing.
          const st = await this.stat(key).catch((err: unknown) => {
            if (err instanceof UsageError) return undefined;
            throw err;
          });
          if (st) out.push(st);
        }
      }
    };
    await walk(this.root, '');
    return out.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  }

  async openSource(key: string): Promise<ByteSource> {
    const path = await this.pathOf(key);
    const source = await FileByteSource.open(path);
    return renamedSource(source, key);
  }

  resolveRelative(fromKey: string, name: string): string {
    if (name.startsWith('/')) {
      // An absolute backing path is only usable when it lies inside the root.
      if (outside(this.root, name)) {
        throw new UsageError(`backing file ${JSON.stringify(name)} lies outside the storage root`);
      }
      return relative(this.root, name).split(sep).join('/');
    }
    return posix.normalize(posix.join(posix.dirname(fromKey), name));
  }
}

/**
 * Whether `path` lies outside `root`, by path segments: "..x.raw" is a name
 * inside the root, ".." and "../x" are not.
 */
export function outside(root: string, path: string): boolean {
  const rel = relative(root, path);
  return rel === '..' || rel.startsWith(`..${sep}`) || isAbsolute(rel);
}

/** Keys: relative, '/'-separated, no '.'/'..' segments, no NUL, not empty. */
export function validateKey(key: string): void {
  if (typeof key !== 'string' || key.length === 0) throw new UsageError('empty object key');
  if (key.length > 4096) throw new UsageError('object key longer than 4096 bytes');
  if (key.includes('\0')) throw new UsageError('object key contains a NUL byte');
  if (key.startsWith('/')) throw new UsageError(`object key ${JSON.stringify(key)} is absolute`);
  if (key.includes('\\')) throw new UsageError(`object key ${JSON.stringify(key)} contains a backslash`);
  for (const part of key.split('/')) {
    if (part === '' || part === '.' || part === '..') {
      throw new UsageError(`object key ${JSON.stringify(key)} has an empty, '.' or '..' segment`);
    }
  }
}

async function syncDir(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } catch {
    // Some file systems (and NFS) refuse fsync on directories; rename is still atomic.
  } finally {
    await handle.close();
  }
}

/** The same source under its storage key (error messages name the key). */
function renamedSource(source: ByteSource, key: string): ByteSource {
  return {
    name: key,
    size: source.size,
    stamp: source.stamp,
    version: source.version,
    ...(source.modifiedMs === undefined ? {} : { modifiedMs: source.modifiedMs }),
    read: (offset, length) => source.read(offset, length),
    ...(source.readInto === undefined
      ? {}
      : { readInto: (offset: number, length: number, target: Buffer, targetOffset: number) => source.readInto!(offset, length, target, targetOffset) }),
    close: () => source.close(),
  };
}
