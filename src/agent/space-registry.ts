/**
 * Which images the cache's spaces belong to, across restarts: DIR/spaces.json
 * in the cache directory, rewritten atomically (temp file, fsync, rename)
 * whenever an image is opened on a version not recorded yet.
 *
 * A space is an identity hash (src/image/identity.ts): its bytes depend on
 * some layers of a backing chain, at the storage stamps they had when the
 * image was opened. Each way a space was reached is an origin: those layers
 * (key, stamp, version) and the exports opened through them. A space can be
 * asked for again only while one of its origins is live, i.e. every layer of
 * it is on storage with the stamp recorded (the identity hashes the stamp, so
 * a new stamp is a new space; a new version with the same stamp, such as a
 * chmod, is the same space).
 *
 * Bounded: at most MAX_SPACES records (the least recently opened go first),
 * MAX_ORIGINS origins a space and MAX_EXPORTS names an origin. A space whose
 * origins overflowed is marked incomplete: what it depends on is no longer
 * fully known, so maintenance leaves it alone, as it does unknown spaces.
 */
import { readdir, readFile, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { isTempName, writeFileAtomic } from '../format/atomic-write.js';
import { chainSpaceLayers, type ChainImage } from './cache/spaces.js';

export const REGISTRY_FILE = 'spaces.json';
const FORMAT_VERSION = 1;
export const MAX_SPACES = 4096;
export const MAX_ORIGINS = 4;
export const MAX_EXPORTS = 8;

/** One storage object a space depends on, as it was when an image was opened on it. */
export interface LayerRef {
  key: string;
  /** ObjectStat.stamp: what the identity hashes. */
  stamp: string;
  /** ObjectStat.version: this very version (informative; liveness goes by the stamp). */
  version: string;
}

export interface SpaceOrigin {
  /** The layers its bytes depend on, top first. */
  layers: LayerRef[];
  /** Exports opened through these layers (the images the space belongs to). */
  exports: string[];
  /** Last time one of them was opened on these layers, ISO 8601. */
  openedAt: string;
}

export interface SpaceRecord {
  origins: SpaceOrigin[];
  /** Origins were dropped (MAX_ORIGINS): the space may be reachable in ways not recorded. */
  incomplete?: true;
}

interface RegistryFile {
  version: number;
  spaces: Record<string, SpaceRecord>;
}

export interface RegistryLog {
  warn(fields: object, message: string): void;
}

export class SpaceRegistry {
  private readonly records: Map<string, SpaceRecord>;
  private dirty = false;
  private saving: Promise<void> | undefined;

  private constructor(
    readonly path: string,
    records: Map<string, SpaceRecord>,
    private readonly log: RegistryLog,
    private readonly maxSpaces: number,
  ) {
    this.records = records;
  }

  /** Loads DIR/spaces.json; a missing file is an empty registry, a damaged one too (with a warning). */
  static async load(dir: string, log: RegistryLog, options: { maxSpaces?: number } = {}): Promise<SpaceRegistry> {
    const path = join(dir, REGISTRY_FILE);
    // Temp files of a write a crash interrupted.
    const names = await readdir(dir).catch(() => [] as string[]);
    await Promise.all(names.filter((n) => isTempName(n) && n.startsWith(`.${REGISTRY_FILE}.`)).map((n) => unlink(join(dir, n)).catch(() => undefined)));
    const text = await readFile(path, 'utf8').catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') log.warn({ file: path, err: err.message }, 'cannot read the space registry; starting without it');
      return undefined;
    });
    const records = new Map<string, SpaceRecord>();
    if (text !== undefined) {
      const parsed = parseRegistry(text);
      if (parsed === undefined) log.warn({ file: path }, 'the space registry is damaged; starting without it (the spaces it named are of unknown origin)');
      else for (const [space, record] of parsed) records.set(space, record);
    }
    return new SpaceRegistry(path, records, log, options.maxSpaces ?? MAX_SPACES);
  }

  get size(): number {
    return this.records.size;
  }

  get(space: string): SpaceRecord | undefined {
    return this.records.get(space);
  }

  entries(): IterableIterator<[string, SpaceRecord]> {
    return this.records.entries();
  }

  /** Spaces with an origin that export `name` was opened through. */
  spacesOf(name: string): string[] {
    return [...this.records].filter(([, r]) => r.origins.some((o) => o.exports.includes(name))).map(([space]) => space);
  }

  /** Exports known to use `space`. */
  exportsOf(space: string): string[] {
    return [...new Set(this.records.get(space)?.origins.flatMap((o) => o.exports) ?? [])];
  }

  /**
   * Records that export `name` was opened as `image`, on `layers` (one per
   * layer of its chain, top first). Saved in the background.
   */
  record(name: string, image: ChainImage, layers: LayerRef[], now = new Date()): void {
    const openedAt = now.toISOString();
    for (const { space, first, last } of chainSpaceLayers(image)) {
      const refs = layers.slice(first, last + 1);
      if (refs.length !== last - first + 1) continue; // a chain opened without every layer's ref: nothing sound to record
      let record = this.records.get(space);
      if (!record) {
        record = { origins: [] };
        this.records.set(space, record);
      } else {
        // Most recently opened last: the bound drops the oldest.
        this.records.delete(space);
        this.records.set(space, record);
      }
      const signature = layersSignature(refs);
      let origin = record.origins.find((o) => layersSignature(o.layers) === signature);
      if (!origin) {
        origin = { layers: refs.map((r) => ({ ...r })), exports: [], openedAt };
        record.origins.push(origin);
        if (record.origins.length > MAX_ORIGINS) {
          record.origins.sort((a, b) => a.openedAt.localeCompare(b.openedAt)).shift();
          record.incomplete = true;
        }
      }
      origin.openedAt = openedAt;
      // The refs' versions move with the stamp kept (a chmod): the latest are shown.
      origin.layers = refs.map((r) => ({ ...r }));
      origin.exports = [...origin.exports.filter((e) => e !== name), name].slice(-MAX_EXPORTS);
    }
    while (this.records.size > this.maxSpaces) this.records.delete(this.records.keys().next().value!);
    this.save();
  }

  /** Forgets spaces (their images are gone from storage). */
  forget(spaces: Iterable<string>): void {
    let changed = false;
    for (const space of spaces) changed = this.records.delete(space) || changed;
    if (changed) this.save();
  }

  /** Resolves when every change so far is on disk (or its write failed, with a warning). */
  async flush(): Promise<void> {
    while (this.saving) await this.saving;
  }

  /** One write at a time; changes made during a write go in the next one. */
  private save(): void {
    this.dirty = true;
    if (this.saving) return;
    this.saving = (async () => {
      while (this.dirty) {
        this.dirty = false;
        const file: RegistryFile = { version: FORMAT_VERSION, spaces: Object.fromEntries(this.records) };
        await writeFileAtomic(this.path, Buffer.from(`${JSON.stringify(file)}\n`)).catch((err: unknown) =>
          // Not fatal: the cache works without it; maintenance then leaves these spaces alone.
          this.log.warn({ file: this.path, err: (err as Error).message }, 'cannot write the space registry'),
        );
      }
      this.saving = undefined;
    })();
  }
}

function layersSignature(layers: readonly LayerRef[]): string {
  return JSON.stringify(layers.map((l) => [l.key, l.stamp]));
}

/** The records of a registry file, or undefined when it is not one. Records that are not well formed are skipped. */
export function parseRegistry(text: string): Map<string, SpaceRecord> | undefined {
  let file: unknown;
  try {
    file = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (!isObject(file) || file.version !== FORMAT_VERSION || !isObject(file.spaces)) return undefined;
  const records = new Map<string, SpaceRecord>();
  for (const [space, value] of Object.entries(file.spaces)) {
    if (!/^[0-9a-f]{64}$/.test(space) || !isObject(value) || !Array.isArray(value.origins)) continue;
    const origins = (value.origins as unknown[]).filter(isOrigin).slice(0, MAX_ORIGINS).map((o) => ({
      layers: o.layers.map((l) => ({ key: l.key, stamp: l.stamp, version: l.version })),
      exports: o.exports.slice(0, MAX_EXPORTS),
      openedAt: o.openedAt,
    }));
    if (origins.length === 0) continue;
    const record: SpaceRecord = { origins };
    if (value.incomplete === true || origins.length < value.origins.length) record.incomplete = true;
    records.set(space, record);
  }
  return records;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function isOrigin(v: unknown): v is SpaceOrigin {
  if (!isObject(v) || typeof v.openedAt !== 'string' || !Array.isArray(v.exports) || !Array.isArray(v.layers)) return false;
  const layers = v.layers as unknown[];
  if (layers.length === 0 || !(v.exports as unknown[]).every((e) => typeof e === 'string')) return false;
  return layers.every((l) => isObject(l) && typeof l.key === 'string' && typeof l.stamp === 'string' && typeof l.version === 'string');
}
