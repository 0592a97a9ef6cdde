/**
 * What `bootcache agent status` reports: the agent's counters and the state
 * of each export it serves (ServiceEntry), in the shapes the control socket
 * sends (times as ISO 8601).
 */
import type { RetryCounters } from '../storage/filters.js';
import type { NbdServerStats } from '../nbd/server/server.js';
import type { PredictionResult } from './boot-prediction.js';
import type { BootSummary } from './boot-recorder.js';
import type { BufferPool } from './buffer-pool.js';
import type { CacheDevice } from './cache/cache-device.js';
import type { CacheManager, ReadCounters } from './cache-manager.js';
import type { ContentCounters } from './content-blocks.js';
import type { ContentBytes } from './content-ledger.js';
import type { PrefetchProgress } from './prefetcher.js';
import type { RebuildQueue, RebuildStatus } from './rebuild-queue.js';
import type { PublishCounters } from './sidecars.js';
import type { WarmupReport } from './warmup.js';

export interface AgentCounters {
  /** Read requests and bytes that reached storage, retries included. */
  storage: { readRequests: number; readBytes: number };
  /** Storage reads sent again after an I/O error (--storage-retries). */
  storageRetries: RetryCounters;
  /** Blocks of guest reads by where they came from: the cache device, a segment chunk in flight, the storage system. */
  guestReads: ReadCounters;
  prefetch: { bytes: number; unusedBytes: number };
  /** recorded: merged and published; skipped: empty or a probe; discarded: a whole-disk read (boot.maxShare). */
  boots: { recorded: number; skipped: number; failed: number; discarded: number };
  /** Maps and segments this host put, and the races with other hosts it lost (see SidecarStore.publishBoot). */
  publish: PublishCounters;
}

/** What `agent warm` reports. */
export interface WarmResult {
  export: string;
  state: PrefetchProgress['state'];
  /** Blocks in the segment. */
  blocks: number;
  /** Blocks this host's stream loaded into the cache (now or in an earlier stream). */
  blocksLoaded: number;
  /** Blocks that were in the cache already. */
  blocksCached: number;
  bytesTotal: number;
  /** Bytes read from storage while warming (other exports' reads included). */
  storageBytes: number;
  seconds: number;
}

/** A boot predicted from the previous version's segment (boot-prediction.ts); storageBytes of every export meanwhile. */
export type ExportPrediction = PredictionResult & { previous: string; state: 'loading' | 'done'; storageBytes: number; seconds: number };

export interface ExportStatus {
  name: string;
  size: number;
  connections: number;
  identity: string;
  /** Cache spaces its blocks may live in: its identity, its layers' (shared with other overlays). */
  spaces: string[];
  /** startedAt: ISO 8601. */
  prefetch?: Omit<PrefetchProgress, 'startedAt'> & { startedAt?: string };
  /** startedAt: ISO 8601. */
  lastBoot?: Omit<BootSummary, 'startedAt'> & { startedAt: string };
  rebuild?: RebuildStatus;
  /** Blocks loaded ahead of its boot as the previous version's segment predicts them. */
  prediction?: ExportPrediction;
  /**
   * The image changed on storage under this service: reads that need
   * storage fail with EIO, cached blocks of the version opened are served.
   */
  stale?: { since: string; error: string };
  /**
   * A newer version of the image is served to new connections; this entry
   * serves the connections still open on the version they opened, until they close.
   */
  retired?: true;
}

export interface AgentStatus {
  pid: number;
  uptimeSeconds: number;
  storage: string;
  socket: string;
  listen?: string;
  exports: ExportStatus[];
  cache: CacheStatus;
  /** The prefetch chunk buffers the agent keeps (see BufferPool). */
  prefetchBuffers: ReturnType<BufferPool['stats']>;
  /** The NBD server: connections (open, refused or dropped when full), requests, errors. */
  nbd: NbdServerStats;
  counters: AgentCounters;
  /** The start-up warm-up (warmup.ts), when it ran to the end. */
  warmup?: WarmupReport;
}

/** One export the agent serves: its cache manager and what goes on around it. */
export interface ServiceEntry {
  service: CacheManager;
  /** Storage versions (ObjectStat.version) of every layer the image was opened on, top first, joined. */
  version: string;
  /** Replaced by a newer version for new connections; closed when its last connection closes. */
  retired: boolean;
  /** Its segment rebuilds, one after the other. */
  rebuilds: RebuildQueue;
  /** Its boot predicted from a previous version (no segment of its own yet), and the prediction running or done. */
  prediction?: ExportPrediction;
  predicting?: Promise<void>;
}

/** An export's status entry. */
export function exportStatus(entry: ServiceEntry): ExportStatus {
  const service = entry.service;
  const s: ExportStatus = {
    name: service.name,
    size: service.virtualSize,
    connections: service.connections,
    identity: service.image.identity,
    spaces: service.spaces,
    rebuild: entry.rebuilds.status(),
  };
  const prefetch = service.prefetch?.progress();
  if (prefetch) {
    const { startedAt, ...rest } = prefetch;
    s.prefetch = startedAt === undefined ? rest : { ...rest, startedAt: isoTime(startedAt) };
  }
  const boot = service.bootSummary();
  if (boot) s.lastBoot = { ...boot, startedAt: isoTime(boot.startedAt) };
  const stale = service.stale;
  if (stale) s.stale = { since: new Date(stale.at).toISOString(), error: stale.error.message };
  if (entry.prediction) s.prediction = { ...entry.prediction };
  if (entry.retired) s.retired = true;
  return s;
}

/** A performance.now() time as ISO 8601. */
export function isoTime(monotonicMs: number): string {
  return new Date(performance.timeOrigin + monotonicMs).toISOString();
}

/** The cache device's stats for `status`: its own lookups named as such, apart from the guest reads. */
export function cacheStatus(stats: ReturnType<CacheDevice['stats']>, content: CacheStatus['content']): CacheStatus {
  const { hits, misses, ...rest } = stats;
  return { ...rest, lookups: { hit: hits, miss: misses }, content };
}

/** `status.cache`: the cache device's state; `lookups` counts its get() calls (hit or miss), whoever made them. */
export type CacheStatus = Omit<ReturnType<CacheDevice['stats']>, 'hits' | 'misses'> & {
  lookups: { hit: number; miss: number };
  /** The content space and what it saves (docs/cache-device.md, "Content-addressed blocks"). */
  content: ContentCounters & ContentBytes;
};
