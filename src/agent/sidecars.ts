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
import { BootMap, mergeBoots, parseMap, type MergePolicy } from '../format/map.js';
import { SegmentReader } from '../format/segment.js';
import type { DiskImage } from '../image/types.js';
import type { Storage } from '../storage/types.js';
import type { BootRecorder } from './boot-recorder.js';
import type { CacheManager } from './cache-manager.js';
import type { PrefetchMap, PrefetchSegment } from './prefetcher.js';

export const MAP_SUFFIX = '.bcmap';
export const SEGMENT_SUFFIX = '.bcseg';
export const SIDECAR_SUFFIXES = [MAP_SUFFIX, SEGMENT_SUFFIX];

export interface LoadedSidecars {
  map: BootMap;
  prefetchMap: PrefetchMap;
  segment: PrefetchSegment;
}

export class SidecarStore {
  constructor(
    private readonly storage: Storage,
    private readonly blockSize: number,
    private readonly policy: MergePolicy,
    private readonly log: Logger,
  ) {}

  /** The current map of an image, if it exists and belongs to this image version. */
  async currentMap(name: string, image: DiskImage): Promise<BootMap | undefined> {
    const key = name + MAP_SUFFIX;
    if (!(await this.storage.stat(key))) return undefined;
    let map: BootMap;
    try {
      map = parseMap(await this.storage.get(key), key);
    } catch (err) {
      this.log.warn({ export: name, err: (err as Error).message }, 'map unreadable; ignoring it');
      return undefined;
    }
    if (map.identity !== image.identity || map.virtualSize !== image.virtualSize) {
      this.log.warn({ export: name }, 'map is for another version of the image (identity mismatch); ignoring it');
      return undefined;
    }
    return map;
  }

  /**
   * Map and segment ready for prefetch, or undefined (with a warning) when
   * either is missing, stale (identity) or inconsistent (map digest).
   */
  async loadForPrefetch(name: string, image: DiskImage): Promise<LoadedSidecars | undefined> {
    const segKey = name + SEGMENT_SUFFIX;
    if (!(await this.storage.stat(segKey))) return undefined;
    const map = await this.currentMap(name, image);
    if (!map) return undefined;
    const published = await this.publishedSegment(name, image, map);
    if (!('reader' in published)) {
      this.log.warn({ export: name, ...(published.err === undefined ? {} : { err: published.err }) }, published.message);
      return undefined;
    }
    const { reader, version } = published;
    const index = map.index;
    return {
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
  private async publishedSegment(
    name: string,
    image: DiskImage,
    map: BootMap,
  ): Promise<{ reader: SegmentReader; version: string } | { message: string; err?: string }> {
    const source = await this.storage.openSource(name + SEGMENT_SUFFIX);
    const version = source.version;
    let reader: SegmentReader;
    try {
      reader = await SegmentReader.fromSource(source);
    } catch (err) {
      return { message: 'segment unreadable; not prefetching', err: (err as Error).message };
    } finally {
      await source.close();
    }
    if (reader.identity !== image.identity) {
      return { message: 'segment is for another version of the image (identity mismatch); not prefetching' };
    }
    if (reader.mapDigest !== map.mapDigest() || reader.blockCount !== map.blocksSet || reader.blockSize !== map.blockSize) {
      return { message: 'segment was not built from the current map (digest mismatch); not prefetching' };
    }
    return { reader, version };
  }

  /**
   * Merges a finished boot into the image's map and publishes the new map and
   * segment. Returns false (publishing nothing) when the merged map is empty.
   * The segment is built locally from the image (through the cache), checked,
   * then put to storage before the map: a prefetcher that sees the new map
   * with the old segment finds the digest mismatch and skips.
   */
  async publishBoot(service: CacheManager, boot: BootRecorder, tmpDir: string): Promise<boolean> {
    const name = service.name;
    const image = service.image;
    const previous = await this.currentMap(name, image);
    const merged = mergeBoots(
      previous?.blockSize === this.blockSize ? previous : undefined,
      { blockSize: this.blockSize, virtualSize: image.virtualSize, identity: image.identity, bitmap: boot.bitmap },
      this.policy,
    );
    if (merged.blocksSet === 0) {
      this.log.warn({ export: name }, 'merged map is empty; keeping the current map and segment');
      return false;
    }
    // The segment depends only on the bitmap (the map digest); a boot that changed just the
    // history needs the new map alone, when the published segment still matches it.
    if (previous && merged.mapDigest() === previous.mapDigest() && (await this.storage.stat(name + SEGMENT_SUFFIX))) {
      const published = await this.publishedSegment(name, image, merged).catch(() => undefined);
      if (published !== undefined && 'reader' in published) {
        await this.storage.put(name + MAP_SUFFIX, merged.serialize());
        this.log.info({ export: name, boots: merged.boots, blocks: merged.blocksSet, bootBlocks: boot.blocks }, 'published map (segment unchanged)');
        return true;
      }
    }
    await mkdir(tmpDir, { recursive: true });
    const tmpSegment = join(tmpDir, `${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2)}.bcseg`);
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
        identityLayers: () => image.identityLayers(),
        owner: (offset, length) => image.owner(offset, length),
        close: async () => undefined,
      };
      const built = await buildSegment(view, merged, tmpSegment);
      if (built.blocks !== merged.blocksSet) {
        throw new Error(`built segment holds ${built.blocks} blocks, the map ${merged.blocksSet}; not publishing`);
      }
      // Re-open what was written: a truncated or corrupt file never replaces a good segment.
      const check = await SegmentReader.open(tmpSegment);
      try {
        if (check.blockCount !== merged.blocksSet || check.mapDigest !== merged.mapDigest()) {
          throw new Error('built segment does not match its map; not publishing');
        }
      } finally {
        await check.close();
      }
      await this.storage.put(name + SEGMENT_SUFFIX, createReadStream(tmpSegment, { highWaterMark: 4 * 1024 * 1024 }));
      await this.storage.put(name + MAP_SUFFIX, merged.serialize());
      this.log.info(
        { export: name, boots: merged.boots, blocks: merged.blocksSet, bytes: built.bytes, bootBlocks: boot.blocks },
        'published map and segment',
      );
      return true;
    } finally {
      await rm(tmpSegment, { force: true });
    }
  }
}
