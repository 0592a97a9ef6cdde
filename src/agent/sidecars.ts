/**
 * An image's sidecars in the storage system: IMAGE.bcmap and IMAGE.bcseg.
 * Loading them for prefetch (with every consistency check), and publishing a
 * new pair after a boot (merge, build, check, atomic put).
 */
import { createReadStream } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { buildSegment } from '../core/build-segment.js';
import { setTimeout as sleep } from 'node:timers/promises';
import { ConflictError, FileNotFoundError, ImageChangedError, StorageIOError } from '../errors.js';
import type { Bitmap } from '../format/bitmap.js';
import { BootMap, mergeBoots, parseMap, type MergePolicy } from '../format/map.js';
import { SEGMENT_HEAD_READ, SegmentReader } from '../format/segment.js';
import { INDEX_HEAD_READ, ImageIndex } from '../format/image-index.js';
import type { ByteSource, DiskImage } from '../image/types.js';
import type { ObjectStat, Storage } from '../storage/types.js';
import type { BootRecorder } from './boot-recorder.js';
import type { CacheManager } from './cache-manager.js';
import type { PrefetchMap, PrefetchSegment } from './prefetcher.js';
import type { SegmentDigests } from './content-blocks.js';

export const MAP_SUFFIX = '.bcmap';
export const SEGMENT_SUFFIX = '.bcseg';
export const INDEX_SUFFIX = '.bcidx';
export const SIDECAR_SUFFIXES = [MAP_SUFFIX, SEGMENT_SUFFIX, INDEX_SUFFIX];

export interface LoadedSidecars {
  map: BootMap;
  prefetchMap: PrefetchMap;
  segment: PrefetchSegment;
  /** The segment's block digests (version 2), found by image block; undefined for version 1. */
  digests?: SegmentDigests;
}

export class SidecarStore {
  constructor(
    private readonly storage: Storage,
    private readonly blockSize: number,
    private readonly policy: MergePolicy,
    private readonly log: Logger,
    /** What this host published, and the races it lost (status `counters.publish`). */
    readonly counters: PublishCounters = { maps: 0, segments: 0, segmentsKept: 0, conflicts: 0, repairs: 0, builds: 0 },
  ) {}

  /** The current map of an image, if it exists and belongs to this image version. */
  async currentMap(name: string, image: DiskImage): Promise<BootMap | undefined> {
    return (await this.readMap(name, image)).map;
  }

  /**
   * The map on storage with the version read (null: there is none). `map` is
   * undefined when it is unreadable or for another image version: the version
   * still lets a publisher replace it conditionally.
   */
  private async readMap(name: string, image: DiskImage): Promise<{ map: BootMap | undefined; version: string | null; ageMs: number }> {
    // Another host may replace the map between its stat and its read: read the new one.
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.readMapOnce(name, image);
      } catch (err) {
        if (!(err instanceof ImageChangedError) || attempt >= PUBLISH_ATTEMPTS) throw err;
      }
    }
  }

  private async readMapOnce(name: string, image: DiskImage): Promise<{ map: BootMap | undefined; version: string | null; ageMs: number }> {
    const key = name + MAP_SUFFIX;
    // No stat first, and the map's bytes with the open: one request on an object store.
    const source = await this.openIfPresent(key, MAP_HEAD_READ);
    if (!source) return { map: undefined, version: null, ageMs: Infinity };
    const ageMs = source.modifiedMs === undefined ? 0 : Math.max(0, Date.now() - source.modifiedMs);
    let map: BootMap;
    try {
      map = parseMap(await source.read(0, source.size), key);
    } catch (err) {
      if (err instanceof StorageIOError || err instanceof ImageChangedError) throw err;
      this.log.warn({ export: name, err: (err as Error).message }, 'map unreadable; ignoring it');
      return { map: undefined, version: source.version, ageMs };
    } finally {
      await source.close();
    }
    if (map.identity !== image.identity || map.virtualSize !== image.virtualSize) {
      this.log.warn({ export: name }, 'map is for another version of the image (identity mismatch); ignoring it');
      return { map: undefined, version: source.version, ageMs };
    }
    return { map, version: source.version, ageMs };
  }

  /**
   * The image's digest index (IMAGE.bcidx), table loaded, or undefined when
   * there is none, or (with a warning) when it is for another version, of
   * another block size, or unreadable: a wrong index must not name content.
   */
  async loadIndex(name: string, image: DiskImage): Promise<ImageIndex | undefined> {
    const key = name + INDEX_SUFFIX;
    const source = await this.openIfPresent(key, INDEX_HEAD_READ);
    if (!source) return undefined;
    try {
      const index = await ImageIndex.open(source);
      if (!index.matches(image)) {
        this.log.warn({ export: name }, 'index is for another version of the image (identity mismatch); ignoring it');
        return undefined;
      }
      if (index.blockSize !== this.blockSize) {
        this.log.warn({ export: name, indexBlockSize: index.blockSize, blockSize: this.blockSize }, 'index has another block size than the agent; ignoring it');
        return undefined;
      }
      return index;
    } catch (err) {
      if (err instanceof StorageIOError || err instanceof ImageChangedError) throw err;
      this.log.warn({ export: name, err: (err as Error).message }, 'index unreadable; ignoring it');
      return undefined;
    } finally {
      await source.close();
    }
  }

  /**
   * Map and segment ready for prefetch, or undefined (with a warning) when
   * either is missing, stale (identity) or inconsistent (map digest).
   */
  async loadForPrefetch(name: string, image: DiskImage): Promise<LoadedSidecars | undefined> {
    const segKey = name + SEGMENT_SUFFIX;
    // Map and segment header together: two requests in one round trip; each open reads its head.
    const [map, segment] = await Promise.all([this.currentMap(name, image), this.openSegment(name)]);
    if (!map || !segment) return undefined;
    const published = checkSegment(segment, image, map);
    if (!('reader' in published)) {
      this.log.warn({ export: name, ...(published.err === undefined ? {} : { err: published.err }) }, published.message);
      return undefined;
    }
    const { reader, version, stat } = published;
    const index = map.index;
    const digests: SegmentDigests | undefined = reader.hasDigests
      ? { isSet: (block) => map.bitmap.get(block), rank: (block) => index.rank(block), table: reader.blockDigests(0, reader.blockCount) }
      : undefined;
    return {
      ...(digests ? { digests } : {}),
      map,
      prefetchMap: {
        blockSize: map.blockSize,
        blockCount: map.blockCount,
        blocksSet: map.blocksSet,
        isSet: (block) => map.bitmap.get(block),
        rank: (block) => index.rank(block),
        select: (rank) => index.select(rank),
      },
      segment: {
        key: segKey,
        blockSize: reader.blockSize,
        blockCount: reader.blockCount,
        dataOffset: reader.dataOffset,
        version,
        stat,
        checkBlock: (rank, data) => reader.verifyBlock(rank, data),
        storedCrc32: (rank) => reader.storedCrc32(rank),
      },
    };
  }

  /**
   * The image's published segment when it was built from `map` for this image
   * version (header, table and size checked; block data is checked as it is
   * read), else why not.
   */
  private async publishedSegment(name: string, image: DiskImage, map: BootMap): Promise<CheckedSegment | { message: string; err?: string }> {
    const segment = await this.openSegment(name);
    return segment ? checkSegment(segment, image, map) : { message: 'no segment' };
  }

  /**
   * A sidecar opened with its first `head` bytes, or undefined when there is
   * none. No stat first: opening finds out, in one request on an object store.
   */
  private async openIfPresent(key: string, head: number): Promise<ByteSource | undefined> {
    try {
      return await this.storage.openSource(key, { head });
    } catch (err) {
      if (err instanceof FileNotFoundError) return undefined;
      throw err;
    }
  }

  /** The published segment's header and tables with the version they belong to (one request on an object store), or undefined when there is none. */
  private async openSegment(name: string): Promise<OpenedSegment | undefined> {
    const key = name + SEGMENT_SUFFIX;
    const source = await this.openIfPresent(key, SEGMENT_HEAD_READ);
    if (!source) return undefined;
    const stat: ObjectStat = { key, size: source.size, stamp: source.stamp, version: source.version };
    try {
      return { reader: await SegmentReader.fromSource(source), stat };
    } catch (err) {
      return { unreadable: (err as Error).message, stat };
    } finally {
      await source.close();
    }
  }

  /**
   * Merges a finished boot into the image's map and publishes the new map
   * and, when the boot set changed materially, a new segment. Returns false
   * (publishing nothing) when the merged map is empty. The protocol, for
   * many hosts on one bucket (docs/agent.md, "Publishing from many hosts"):
   * - the map is put only if it is still the version this boot was merged
   *   into (a conditional put); a host that loses the race re-reads the map,
   *   merges its boot into the winner's and tries again, so no boot is lost;
   * - the map goes first, then its segment: a reader that sees the new map
   *   with the old segment finds the digest mismatch and does not prefetch;
   * - a host that finds the published segment not (yet) matching the map
   *   waits for the map's writer to put it before deciding whether its own
   *   boot needs a new segment, so a storm of boots uploads one segment;
   * - at the end, the host checks that the bucket's map and segment belong
   *   together, and puts the right segment when another host's upload
   *   replaced it (or its writer never finished).
   */
  async publishBoot(service: CacheManager, boot: BootRecorder, tmpDir: string): Promise<boolean> {
    const name = service.name;
    const image = service.image;
    const built = new Map<string, string>();
    try {
      for (let attempt = 1; ; attempt++) {
        const current = await this.readMap(name, image);
        const previous = current.map?.blockSize === this.blockSize ? current.map : undefined;
        const merged = mergeBoots(
          previous,
          { blockSize: this.blockSize, virtualSize: image.virtualSize, identity: image.identity, bitmap: boot.bitmap },
          this.policy,
        );
        if (merged.blocksSet === 0) {
          this.log.warn({ export: name }, 'merged map is empty; keeping the current map and segment');
          return false;
        }
        // A map written moments ago may still be waiting for its writer's segment.
        const waitMs = Math.max(0, SEGMENT_WAIT_MS - current.ageMs);
        const kept = previous === undefined ? undefined : await this.keepSegment(name, image, previous, merged, waitMs);
        const toPublish = kept ?? merged;
        // Built before the map goes in: a map whose segment cannot be built is not published.
        if (!kept && !built.has(merged.mapDigest())) built.set(merged.mapDigest(), await this.buildChecked(service, merged, tmpDir));
        try {
          await this.storage.put(name + MAP_SUFFIX, toPublish.serialize(), { ifVersion: current.version });
        } catch (err) {
          if (!(err instanceof ConflictError) || attempt >= PUBLISH_ATTEMPTS) throw err;
          this.counters.conflicts++;
          this.log.debug({ export: name, attempt }, 'the map changed while this boot was merged into it; merging again');
          await sleep(PUBLISH_RETRY_MS * attempt * (0.5 + Math.random()));
          continue;
        }
        this.counters.maps++;
        if (kept) {
          this.counters.segmentsKept++;
          this.log.info({ export: name, boots: toPublish.boots, blocks: toPublish.blocksSet, bootBlocks: boot.blocks }, 'published map (segment unchanged)');
          return true;
        }
        await this.putSegment(name, built.get(merged.mapDigest())!);
        this.log.info({ export: name, boots: merged.boots, blocks: merged.blocksSet, bootBlocks: boot.blocks }, 'published map and segment');
        await this.settle(service, built, tmpDir);
        return true;
      }
    } finally {
      for (const path of built.values()) await rm(path, { force: true });
    }
  }

  private async putSegment(name: string, path: string): Promise<void> {
    await this.storage.put(name + SEGMENT_SUFFIX, createReadStream(path, { highWaterMark: 4 * 1024 * 1024 }));
    this.counters.segments++;
  }

  /**
   * Waits until the bucket's map and segment belong together. While they do
   * not, another host is between its map put and its segment put; when that
   * lasts past SEGMENT_WAIT_MS (the host died, or this host's upload replaced
   * its segment), this host puts the segment of the current map itself.
   */
  private async settle(service: CacheManager, built: Map<string, string>, tmpDir: string): Promise<void> {
    const name = service.name;
    const image = service.image;
    for (let round = 0; round < PUBLISH_ATTEMPTS; round++) {
      const { map, ageMs } = await this.readMap(name, image);
      if (!map || map.blockSize !== this.blockSize) return;
      if (await this.segmentMatches(name, image, map)) return;
      const mine = built.get(map.mapDigest());
      if (mine === undefined && ageMs < SEGMENT_WAIT_MS) {
        await this.waitForSegment(name, image, map, SEGMENT_WAIT_MS - ageMs);
        continue;
      }
      this.counters.repairs++;
      this.log.info({ export: name }, 'the published segment does not belong to the published map; putting the right one');
      if (mine !== undefined) await this.putSegment(name, mine);
      else {
        const path = await this.buildChecked(service, map, tmpDir);
        built.set(map.mapDigest(), path);
        await this.putSegment(name, path);
      }
    }
  }

  /** Whether the published segment was built from `map` for this image version. */
  private async segmentMatches(name: string, image: DiskImage, map: BootMap): Promise<boolean> {
    const published = await this.publishedSegment(name, image, map).catch(() => undefined);
    return published !== undefined && 'reader' in published;
  }

  /** Polls until the segment of `map` is published or `ms` passed (or the map changed); true when it is. */
  private async waitForSegment(name: string, image: DiskImage, map: BootMap, ms: number): Promise<boolean> {
    const until = Date.now() + ms;
    while (Date.now() < until) {
      if (await this.segmentMatches(name, image, map)) return true;
      const now = await this.currentMap(name, image);
      if (!now || now.mapDigest() !== map.mapDigest()) return false;
      await sleep(SEGMENT_POLL_MS);
    }
    return false;
  }

  /**
   * The map to publish without a new segment, when the published segment
   * belongs to `previous` and `merged` does not differ from it materially:
   * `merged`'s boot history with `previous`'s block set (so the segment
   * still matches it). Undefined when a new segment is needed.
   */
  private async keepSegment(name: string, image: DiskImage, previous: BootMap, merged: BootMap, waitMs: number): Promise<BootMap | undefined> {
    // Another host may be between its map put and its segment put: wait up to `waitMs` for its segment.
    if (!(await this.segmentMatches(name, image, previous)) && !(await this.waitForSegment(name, image, previous, waitMs))) return undefined;
    if (merged.mapDigest() === previous.mapDigest()) return merged;
    if (materialChange(previous.bitmap, merged.bitmap)) return undefined;
    return new BootMap({
      blockSize: merged.blockSize,
      virtualSize: merged.virtualSize,
      identity: merged.identity,
      boots: merged.boots,
      bitmap: previous.bitmap,
      ...(merged.history === undefined ? {} : { history: merged.history }),
      heldSet: true,
    });
  }

  /** Builds `map`'s segment into a file under tmpDir through the cache manager, and checks what was written. */
  private async buildChecked(service: CacheManager, map: BootMap, tmpDir: string): Promise<string> {
    const image = service.image;
    await mkdir(tmpDir, { recursive: true });
    const path = join(tmpDir, `${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2)}.bcseg`);
    try {
      // Build through the cache manager's read path: the boot's blocks are mostly cached.
      const view: DiskImage = {
        format: image.format,
        name: image.name,
        virtualSize: image.virtualSize,
        identity: image.identity,
        read: (offset, length) => service.readUnrecorded(offset, length),
        extents: (offset, length) => image.extents(offset, length),
        layers: () => image.layers(),
        close: async () => undefined,
      };
      this.counters.builds++;
      const built = await buildSegment(view, map, path);
      if (built.blocks !== map.blocksSet) {
        throw new Error(`built segment holds ${built.blocks} blocks, the map ${map.blocksSet}; not publishing`);
      }
      // Re-open what was written: a truncated or corrupt file never replaces a good segment.
      const check = await SegmentReader.open(path);
      try {
        if (check.blockCount !== map.blocksSet || check.mapDigest !== map.mapDigest()) {
          throw new Error('built segment does not match its map; not publishing');
        }
      } finally {
        await check.close();
      }
      return path;
    } catch (err) {
      await rm(path, { force: true });
      throw err;
    }
  }

}

/** A segment's header and tables as read, or why they could not be; `stat`: the version read. */
type OpenedSegment = { reader: SegmentReader; stat: ObjectStat } | { unreadable: string; stat: ObjectStat };

interface CheckedSegment {
  reader: SegmentReader;
  version: string;
  stat: ObjectStat;
}

/** The segment when it was built from `map` for this image version (header, table and size checked; block data is checked as it is read), else why not. */
function checkSegment(segment: OpenedSegment, image: DiskImage, map: BootMap): CheckedSegment | { message: string; err?: string } {
  if (!('reader' in segment)) return { message: 'segment unreadable; not prefetching', err: segment.unreadable };
  const { reader, stat } = segment;
  if (reader.identity !== image.identity) {
    return { message: 'segment is for another version of the image (identity mismatch); not prefetching' };
  }
  if (reader.mapDigest !== map.mapDigest() || reader.blockCount !== map.blocksSet || reader.blockSize !== map.blockSize) {
    return { message: 'segment was not built from the current map (digest mismatch); not prefetching' };
  }
  return { reader, version: stat.version, stat };
}

/**
 * Bytes read with a map's open: the whole map of an image up to 32 GiB at
 * 4 KiB blocks (a 1 MiB bitmap); a larger map's rest is one more read.
 */
const MAP_HEAD_READ = 1024 * 1024 + 64 * 1024;

/** Publish counters of one agent. */
export interface PublishCounters {
  /** Maps put. */
  maps: number;
  /** Segments built (from the cache and the image) to be published. */
  builds: number;
  /** Segments uploaded (repairs included). */
  segments: number;
  /** Maps put without a new segment: the boot set did not change materially. */
  segmentsKept: number;
  /** Map puts that lost a race with another host, then merged again. */
  conflicts: number;
  /** Segments put because the bucket's segment did not belong to its map (another host's upload replaced it, or its writer never put it). */
  repairs: number;
}

/** A map put that lost a race is merged and tried again this many times in all. */
const PUBLISH_ATTEMPTS = 8;
/** Base wait before merging again after a lost race; it grows with the attempt, with jitter. */
const PUBLISH_RETRY_MS = 200;
/** How long a host waits for another host's segment to follow its map before putting one itself. */
const SEGMENT_WAIT_MS = 30_000;
const SEGMENT_POLL_MS = 250;

/**
 * Material change of a boot set, which needs a new segment: more than 0.5%
 * of the new set's blocks (at least 16) are missing from the published
 * segment (each one a storage read on a cold host), or more than 5% of the
 * segment's blocks are no longer in the set (prefetched for nothing).
 * Smaller drifts keep the segment and publish the map's history alone.
 */
export function materialChange(segment: Bitmap, next: Bitmap): boolean {
  let missing = 0;
  let nextCount = 0;
  for (const run of next.runs()) {
    for (let b = run.start; b < run.start + run.length; b++) if (!segment.get(b)) missing++;
    nextCount += run.length;
  }
  let waste = 0;
  let segmentCount = 0;
  for (const run of segment.runs()) {
    for (let b = run.start; b < run.start + run.length; b++) if (!next.get(b)) waste++;
    segmentCount += run.length;
  }
  return missing > Math.max(16, 0.005 * nextCount) || waste > 0.05 * segmentCount;
}
