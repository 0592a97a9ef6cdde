/**
 * Prometheus metrics of the agent (`--metrics HOST:PORT`, GET /metrics),
 * with prom-client. Names follow Prometheus conventions: the `bootcache_`
 * prefix, `_total` for counters, base units (`_seconds`, `_bytes`).
 *
 * Most values already live in the agent's counters (the ones `status`
 * shows); they are read at scrape time. Latencies are observed as they
 * happen. There are no per-image labels: the number of images has no bound
 * here, and a label per image would grow the series without one. `status`
 * has the per-export detail.
 */
import { createServer, type Server } from 'node:http';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import { AgentError } from '../errors.js';

/** Where a guest read was served from. */
export type GuestReadSource = 'cache' | 'prefetch' | 'storage';
export type StorageKind = 'image' | 'segment' | 'map';
export type BootOutcome = 'recorded' | 'skipped' | 'discarded' | 'failed';

/** The agent's numbers, read at every scrape. */
export interface MetricsSources {
  storage(): Record<StorageKind, { requests: number; bytes: number; errors: number }>;
  storageRetries(): { retries: number; failed: number };
  prefetch(): { bytes: number; unusedBytes: number };
  cache(): { usedBytes: number; capacityBytes: number; evictions: number; logicalBytes: number; ratio: number };
  boots(): Record<BootOutcome, number>;
  publish(): { maps: number; segments: number; builds: number; conflicts: number };
  nbd(): { open: number; refused: number; dropped: number; protocolErrors: number; tlsSessions: number; tlsFailures: number } | undefined;
}

/** Latency buckets from 50 µs (a cache hit) to 10 s (a storage read under retries). */
const READ_BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10];
const BOOT_BUCKETS = [5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600];

/** A counter whose value is read from `value` at scrape time, per label set. */
function readCounter<L extends string>(registry: Registry, name: string, help: string, labelNames: L[], value: () => Array<[Record<L, string>, number]>): void {
  new Counter({
    name,
    help,
    labelNames,
    registers: [registry],
    collect(this: Counter<L>) {
      this.reset();
      for (const [labels, v] of value()) this.inc(labels, v);
    },
  });
}

function readGauge(registry: Registry, name: string, help: string, value: () => number | undefined): void {
  new Gauge({
    name,
    help,
    registers: [registry],
    collect(this: Gauge) {
      const v = value();
      if (v !== undefined) this.set(v);
    },
  });
}

export class AgentMetrics {
  readonly registry = new Registry();
  private readonly guestReads: Histogram<'source'>;
  private readonly bootDuration: Histogram;

  constructor(sources: MetricsSources) {
    const r = this.registry;
    const kinds: StorageKind[] = ['image', 'segment', 'map'];
    readCounter(r, 'bootcache_storage_read_requests_total', 'Read requests sent to the storage system, retries included, by kind: image (guest misses, readahead, image metadata), segment (prefetch), map.', ['kind'], () =>
      kinds.map((kind) => [{ kind }, sources.storage()[kind].requests]));
    readCounter(r, 'bootcache_storage_read_bytes_total', 'Bytes read from the storage system, by kind.', ['kind'], () =>
      kinds.map((kind) => [{ kind }, sources.storage()[kind].bytes]));
    readCounter(r, 'bootcache_storage_read_errors_total', 'Storage read requests that failed, by kind (each attempt counts).', ['kind'], () =>
      kinds.map((kind) => [{ kind }, sources.storage()[kind].errors]));
    readCounter(r, 'bootcache_storage_retries_total', 'Storage reads sent again after an I/O error.', [], () => [[{}, sources.storageRetries().retries]]);
    readCounter(r, 'bootcache_storage_read_failures_total', 'Storage reads whose error reached the caller after every retry (a guest read gets EIO).', [], () => [
      [{}, sources.storageRetries().failed],
    ]);
    this.guestReads = new Histogram({
      name: 'bootcache_guest_read_duration_seconds',
      help: 'Guest reads by where they were served from: cache (the cache device), prefetch (a segment chunk in flight), storage (at least one block from the storage system).',
      labelNames: ['source'],
      buckets: READ_BUCKETS,
      registers: [r],
    });
    readCounter(r, 'bootcache_prefetch_bytes_total', 'Segment bytes the prefetch streams read from storage.', [], () => [[{}, sources.prefetch().bytes]]);
    readCounter(r, 'bootcache_prefetch_unused_bytes_total', 'Prefetched bytes that no guest read before the stream\'s recording ended.', [], () => [
      [{}, sources.prefetch().unusedBytes],
    ]);
    readGauge(r, 'bootcache_cache_used_bytes', 'Bytes of blocks the cache device holds.', () => sources.cache().usedBytes);
    readGauge(r, 'bootcache_cache_capacity_bytes', 'The cache device\'s capacity (smaller than --cache-size after a full disk).', () => sources.cache().capacityBytes);
    readGauge(r, 'bootcache_cache_logical_bytes', 'Bytes the cached blocks would take if every image kept its own copy (docs/cache-device.md, "Content-addressed blocks").', () => sources.cache().logicalBytes);
    // The physical bytes are bootcache_cache_used_bytes.
    readGauge(r, 'bootcache_cache_logical_physical_ratio', 'bootcache_cache_logical_bytes / bootcache_cache_used_bytes (1 when the cache is empty).', () => sources.cache().ratio);
    readCounter(r, 'bootcache_cache_evictions_total', 'Blocks evicted from the cache device.', [], () => [[{}, sources.cache().evictions]]);
    const outcomes: BootOutcome[] = ['recorded', 'skipped', 'discarded', 'failed'];
    readCounter(r, 'bootcache_boots_total', 'Recordings ended, by outcome: recorded (merged and published), skipped (a probe, empty, or the image changed), discarded (a whole-disk read), failed (the publish failed).', ['outcome'], () =>
      outcomes.map((outcome) => [{ outcome }, sources.boots()[outcome]]));
    this.bootDuration = new Histogram({
      name: 'bootcache_boot_duration_seconds',
      help: 'Duration of recorded boots, from the first read to the end of the recording.',
      buckets: BOOT_BUCKETS,
      registers: [r],
    });
    readCounter(r, 'bootcache_segment_builds_total', 'Segments built by this host after a boot.', [], () => [[{}, sources.publish().builds]]);
    readCounter(r, 'bootcache_segment_uploads_total', 'Segments this host put to the storage system.', [], () => [[{}, sources.publish().segments]]);
    readCounter(r, 'bootcache_map_uploads_total', 'Maps this host put to the storage system.', [], () => [[{}, sources.publish().maps]]);
    readCounter(r, 'bootcache_publish_conflicts_total', 'Map puts that lost a race with another host and merged again.', [], () => [[{}, sources.publish().conflicts]]);
    readGauge(r, 'bootcache_nbd_connections', 'NBD connections open.', () => sources.nbd()?.open);
    readCounter(r, 'bootcache_nbd_connections_refused_total', 'NBD connections refused (connection limit, per-client limit).', [], () => [[{}, sources.nbd()?.refused ?? 0]]);
    readCounter(r, 'bootcache_nbd_connections_dropped_total', 'NBD connections still negotiating that were dropped to make room.', [], () => [[{}, sources.nbd()?.dropped ?? 0]]);
    readCounter(r, 'bootcache_nbd_protocol_errors_total', 'NBD protocol errors from clients.', [], () => [[{}, sources.nbd()?.protocolErrors ?? 0]]);
    readCounter(r, 'bootcache_nbd_tls_handshakes_total', 'TLS handshakes of NBD clients (NBD_OPT_STARTTLS), by result.', ['result'], () => {
      const n = sources.nbd();
      return [[{ result: 'ok' }, n?.tlsSessions ?? 0], [{ result: 'failed' }, n?.tlsFailures ?? 0]];
    });
  }

  guestRead(source: GuestReadSource, seconds: number): void {
    this.guestReads.observe({ source }, seconds);
  }

  bootRecorded(seconds: number): void {
    this.bootDuration.observe(seconds);
  }

  /** Serves GET /metrics on host:port. */
  async serve(host: string, port: number): Promise<MetricsServer> {
    const server = createServer((req, res) => {
      if (req.method !== 'GET' || (req.url ?? '/').split('?')[0] !== '/metrics') {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('only GET /metrics here\n');
        return;
      }
      this.registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': this.registry.contentType }).end(text),
        (err: unknown) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`${(err as Error).message}\n`),
      );
    });
    server.headersTimeout = 10_000;
    server.requestTimeout = 10_000;
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) => reject(new AgentError(`cannot listen for metrics on ${host}:${port}: ${err.code ?? err.message}`)));
      server.listen(port, host, () => resolve());
    });
    return new MetricsServer(server);
  }
}

export class MetricsServer {
  constructor(private readonly server: Server) {}

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
