/**
 * The prefetch manager's start for one export: the segment stream when the
 * image has a map and segment of its version, the content lookup its index
 * or segment names, and, for a new version with an index naming its previous
 * version and no segment yet, the boot predicted from that version
 * (boot-prediction.ts). One stream per image, whatever the number of VMs.
 */
import type { Logger } from 'pino';
import { resolvePreviousKey, type ImageIndex } from '../format/image-index.js';
import type { CountingStorage } from '../storage/filters.js';
import type { Storage } from '../storage/types.js';
import type { ServiceEntry } from './agent-status.js';
import { loadPredicted, predictBlocks } from './boot-prediction.js';
import type { BufferPool } from './buffer-pool.js';
import type { CacheDevice } from './cache/cache-device.js';
import type { AgentConfig } from './config.js';
import type { ContentCounters, SegmentDigests } from './content-blocks.js';
import type { ContentLedger } from './content-ledger.js';
import { Prefetcher } from './prefetcher.js';
import type { SidecarStore } from './sidecars.js';

/** What the prefetch start needs of the agent. */
export interface ExportPrefetchContext {
  config: AgentConfig;
  log: Logger;
  /** The storage every read goes through, and the counter below its retries. */
  storage: Storage;
  counting: CountingStorage;
  sidecars: SidecarStore;
  cache: CacheDevice;
  chunkBuffers: BufferPool;
  contentCounters: ContentCounters;
  contentLedger: ContentLedger;
  prefetchCounters: { bytes: number };
  /** Aborted when the agent stops. */
  stopping: AbortSignal;
  serviceFor(name: string): Promise<ServiceEntry>;
}

export class ExportPrefetch {
  constructor(private readonly ctx: ExportPrefetchContext) {}

  async start(entry: ServiceEntry): Promise<void> {
    const service = entry.service;
    if (service.prefetch && ['streaming', 'done'].includes(service.prefetch.progress().state)) {
      // Another VM already streamed (or streams) this image's segment: one stream per image.
      if (service.prefetch.progress().state === 'streaming') return;
    }
    try {
      // The index names the content of every data block; else the segment names its own blocks'.
      const [index, loaded] = await Promise.all([
        this.ctx.sidecars.loadIndex(service.name, service.image),
        this.ctx.sidecars.loadForPrefetch(service.name, service.image),
      ]);
      const digests = index ? indexDigests(index) : loaded?.map.blockSize === this.ctx.cache.blockSize ? loaded.digests : undefined;
      if (digests && !service.contentKeys) {
        service.setContent(digests, this.ctx.contentCounters);
        if (service.contentKeys) this.ctx.contentLedger.record(service.image.identity, service.contentKeys);
      }
      if (!loaded) {
        if (index?.previous) await (entry.predicting ??= this.predictFromPrevious(entry, index));
        return;
      }
      if (loaded.map.blockSize !== this.ctx.cache.blockSize) {
        // The cache manager places segment blocks by the agent's block size: another size would load the wrong bytes.
        // The next boot's end publishes a map and segment of the agent's block size (a stored map of another size is not merged).
        this.ctx.log.warn(
          { export: service.name, segmentBlockSize: loaded.map.blockSize, blockSize: this.ctx.cache.blockSize },
          `segment of ${service.name} has ${loaded.map.blockSize}-byte blocks, the agent uses ${this.ctx.cache.blockSize}-byte blocks (--block-size); not prefetching`,
        );
        return;
      }
      const prefetcher = new Prefetcher(
        this.ctx.storage,
        loaded.prefetchMap,
        loaded.segment,
        { storeMany: (entries) => service.storeStreamed(entries), has: (block) => service.hasBlock(block) },
        {
          chunkBytes: this.ctx.config.prefetchChunk,
          depth: this.ctx.config.prefetchDepth,
          rateBytesPerS: this.ctx.config.prefetchRate,
          buffers: this.ctx.chunkBuffers,
          onWarning: (message) => this.ctx.log.warn({ export: service.name }, message),
        },
      );
      service.setPrefetcher(prefetcher);
      this.ctx.log.info({ export: service.name, blocks: loaded.segment.blockCount }, 'prefetch started');
      const before = this.ctx.counting.counters.readBytes;
      await prefetcher.start();
      const p = prefetcher.progress();
      this.ctx.prefetchCounters.bytes += p.bytesRead;
      this.ctx.log.info({ export: service.name, ...p, storageBytesDuringPrefetch: this.ctx.counting.counters.readBytes - before }, 'prefetch finished');
    } catch (err) {
      this.ctx.log.warn({ export: service.name, err: (err as Error).message }, 'prefetch skipped');
    }
  }

  /**
   * A new version published with an index naming its previous version and no
   * segment yet: loads the blocks the previous version's segment predicts
   * (boot-prediction.ts). Its boot is recorded as usual.
   */
  private async predictFromPrevious(entry: ServiceEntry, index: ImageIndex): Promise<void> {
    const service = entry.service;
    const previous = resolvePreviousKey(service.name, index.previous!);
    const prior = await this.ctx.serviceFor(previous);
    const priorLoaded = await this.ctx.sidecars.loadForPrefetch(previous, prior.service.image);
    if (!priorLoaded?.digests || priorLoaded.map.blockSize !== this.ctx.cache.blockSize) {
      this.ctx.log.info({ export: service.name, previous }, 'previous version has no segment with block digests: no prediction');
      return;
    }
    const started = performance.now();
    const before = this.ctx.counting.counters.readBytes;
    const { blocks, unmatched } = predictBlocks(index, priorLoaded.digests);
    entry.prediction = { previous, state: 'loading', predicted: blocks.length, cached: 0, fetched: 0, unmatched, storageBytes: 0, seconds: 0 };
    const signal = this.ctx.stopping;
    const { cached, fetched } = await loadPredicted(service, blocks, {
      blockSize: this.ctx.cache.blockSize,
      runBytes: this.ctx.config.prefetchChunk,
      depth: this.ctx.config.prefetchDepth,
      stopped: () => signal.aborted || service.stale !== undefined,
    });
    entry.prediction = {
      previous, state: 'done', predicted: blocks.length, cached, fetched, unmatched,
      storageBytes: this.ctx.counting.counters.readBytes - before, seconds: Math.round(performance.now() - started) / 1000,
    };
    this.ctx.log.info({ export: service.name, ...entry.prediction }, 'boot predicted from the previous version');
  }
}

/** The index's digests as the content lookup takes them: every data block, by its rank among them. */
function indexDigests(index: ImageIndex): SegmentDigests {
  return { isSet: (block) => index.hasData(block), rank: (block) => index.dataRank(block), table: index.digestTable };
}
