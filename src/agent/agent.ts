/**
 * The bootcache agent: serves every image under the storage root over NBD,
 * through a per-image cache manager (cache-manager.ts), a shared cache device,
 * and a per-image prefetch stream of the image's boot segment. Boots are
 * recorded; when one ends, the map is merged and a new segment is built and
 * published next to the image (IMAGE.bcmap, IMAGE.bcseg).
 */
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import cron from 'node-cron';
import type { Logger } from 'pino';
import { AgentError, BootcacheError, FileNotFoundError, StorageIOError } from '../errors.js';
import { OPEN_HEAD_BYTES, openImageFromSource } from '../image/open.js';
import type { DiskImage, SourceOpener } from '../image/types.js';
import { CountingStorage, FaultyStorage, RetryingStorage } from '../storage/filters.js';
import { openStorage } from '../storage/open.js';
import type { ObjectStat, Storage } from '../storage/types.js';
import { BufferPool } from './buffer-pool.js';
import { CacheDevice } from './cache/cache-device.js';
import type { BootRecorder, BootSummary } from './boot-recorder.js';
import type { AgentConfig } from './config.js';
import { ControlServer } from './control.js';
import { applySocketAccess, resolveGroup } from './socket-access.js';
import { MissWriter } from './miss-writer.js';
import { CacheManager } from './cache-manager.js';
import { emptyContentCounters } from './content-blocks.js';
import { ContentLedger } from './content-ledger.js';
import { RebuildQueue } from './rebuild-queue.js';
import { ExportNotFoundError } from '../nbd/errors.js';
import type { ExportDescription, ExportProvider, NbdExport } from '../nbd/server/export.js';
import { NbdServer } from '../nbd/server/server.js';
import { isLoopbackHost, TlsCredentials } from '../nbd/server/tls.js';
import { AgentMetrics, type MetricsServer } from './metrics.js';
import type { PassedSocket } from './socket-activation.js';
import type { Prefetcher } from './prefetcher.js';
import { SidecarStore, SIDECAR_SUFFIXES } from './sidecars.js';
import { cacheStatus, exportStatus, isoTime, type AgentCounters, type AgentStatus, type CacheStatus, type ServiceEntry, type WarmResult } from './agent-status.js';
import { ExportPrefetch } from './export-prefetch.js';
import { warmUp, type WarmupReport } from './warmup.js';
import { diskRule, hasRawExtension, isQcow2Head } from '../image/disk-names.js';
import { evictSpaces, listCache, reclaimGone, type CacheListing, type CatalogContext, type EvictResult, type ReclaimReport } from './cache-catalog.js';
import { SpaceRegistry, type LayerRef } from './space-registry.js';

/**
 * Chunk buffers kept between streams, at most: 2 x --prefetch-depth (a
 * stream's window and as many demanded chunks), within this many bytes (or
 * one chunk). The default 8 MiB x 4 keeps 64 MiB.
 */
const CHUNK_BUFFERS_MAX_BYTES = 128 * 1024 * 1024;

export type { AgentCounters, AgentStatus, CacheStatus, ExportPrediction, ExportStatus, WarmResult } from './agent-status.js';

/** A rebuild waits at most this long for boots on this host to be past their first seconds. */
const REBUILD_MAX_WAIT_MS = 120_000;

export class Agent implements ExportProvider {
  private readonly counters: AgentCounters = {
    storage: { readRequests: 0, readBytes: 0 },
    storageRetries: { retries: 0, recovered: 0, failed: 0 },
    guestReads: { cache: 0, prefetch: 0, storage: 0 },
    prefetch: { bytes: 0, unusedBytes: 0 },
    boots: { recorded: 0, skipped: 0, failed: 0, discarded: 0 },
    publish: { maps: 0, segments: 0, segmentsKept: 0, conflicts: 0, repairs: 0, builds: 0 },
  };
  /** Content-space hits and misses of every export (status `cache.content`). */
  private readonly contentCounters = emptyContentCounters();
  /** The image versions with digests seen since start: logical bytes (status, metrics). */
  private readonly contentLedger = new ContentLedger((space, block) => this.cache.has(space, block));
  private readonly services = new Map<string, ServiceEntry>();
  /** Starts each export's segment stream (or its predicted boot); made at start, once the cache is open. */
  private prefetches!: ExportPrefetch;
  /** Services of older versions, kept for the connections still open on them. */
  private readonly retired = new Set<ServiceEntry>();
  /** Blocks being read from storage by any export (see CacheManagerOptions.inFlight). */
  private readonly inFlight = new Map<string, Promise<Buffer>>();
  private missWriter!: MissWriter;
  private readonly opening = new Map<string, Promise<ServiceEntry>>();
  private nbd: NbdServer | undefined;
  private control: ControlServer | undefined;
  /** Prometheus metrics (--metrics); observed whether or not they are served. */
  private readonly metrics = new AgentMetrics({
    storage: () => this.counting?.byKind ?? emptyStorageKinds(),
    storageRetries: () => this.counters.storageRetries,
    prefetch: () => this.counters.prefetch,
    cache: () => {
      const s = this.cache?.stats();
      const { logicalBytes, ratio } = s ? this.contentLedger.bytes(s) : { logicalBytes: 0, ratio: 1 };
      return { usedBytes: s?.usedBytes ?? 0, capacityBytes: s?.capacityBytes ?? 0, evictions: s?.evictions ?? 0, logicalBytes, ratio };
    },
    boots: () => ({ ...this.counters.boots }),
    publish: () => this.counters.publish,
    nbd: () => {
      const s = this.nbd?.stats;
      return s && {
        open: s.activeConnections, refused: s.rejectedConnections + s.rejectedPerClient, dropped: s.droppedConnections,
        protocolErrors: s.protocolErrors, tlsSessions: s.tlsSessions, tlsFailures: s.tlsFailures,
      };
    },
  });
  private metricsServer: MetricsServer | undefined;
  /** Loaded at start when --tls is on or require. */
  private tlsCredentials: TlsCredentials | undefined;
  /** Storage objects found to be qcow2 images or not, by key and version (see isDisk). */
  private readonly diskChecks = new Map<string, boolean>();
  /** Prefetch streams whose unused bytes are counted already (see onBootEnd). */
  private readonly unusedCounted = new WeakSet<Prefetcher>();
  private maintenance: cron.ScheduledTask | undefined;
  /** Set once start() has completed: only a started agent logs "agent stopped". */
  private started = false;
  /** Set by stop(): a start() still in progress gives up instead of listening. */
  private readonly stopping = new AbortController();
  /** The start() in progress or done, settled either way: stop() waits for one that gives up. */
  private starting: Promise<void> | undefined;
  private readonly startedAt = Date.now();
  /** The storage every read goes through: retries over counting over the storage system. */
  private storage!: Storage;
  private counting!: CountingStorage;
  private sidecars!: SidecarStore;
  private cache!: CacheDevice;
  /** Which images the cache's spaces belong to (DIR/spaces.json). */
  private registry!: SpaceRegistry;
  /** Prefetch chunk buffers of every stream: the streams' windows plus their demanded chunks. */
  private chunkBuffers!: BufferPool;
  /** What the start-up warm-up did (undefined: off, stopped or failed). */
  private warmup: WarmupReport | undefined;

  constructor(
    readonly config: AgentConfig,
    private readonly log: Logger,
    /** Sockets systemd passed (socket activation, see socket-activation.ts). */
    private readonly passedSockets: PassedSocket[] = [],
  ) {}

  /**
   * Opens storage and cache and starts listening; clear errors when anything
   * is wrong. A stop() meanwhile makes it give up at its next step (an
   * AgentError), with what it opened closed again.
   */
  async start(): Promise<void> {
    const starting = this.openAndListen();
    this.starting = starting.catch(() => undefined);
    await starting;
  }

  private async openAndListen(): Promise<void> {
    const c = this.config;
    // Before anything is opened or created: an unknown group is a configuration error.
    const gid = c.socketGroup === undefined ? undefined : await resolveGroup(c.socketGroup, undefined, c.socketGroupLabel);
    const passed = this.passedSockets;
    const controlSocket = passed.find((s) => s.name === 'control');
    const nbdSockets = passed.filter((s) => s !== controlSocket);
    if (passed.length > 0 && nbdSockets.length === 0) throw new AgentError('systemd passed only a control socket: the agent needs an NBD socket too');
    let storage: Storage = await openStorage(c.storage, {
      endpoint: c.s3Endpoint,
      pathStyle: c.s3PathStyle,
      region: c.s3Region,
      // Prefetch reads in flight, plus misses and readahead of several VMs.
      maxSockets: c.prefetchDepth + 32,
      requestTimeoutMs: Math.min(c.storageTimeoutMs, 10_000),
      // The S3 client retries each request (5xx, SlowDown, timeouts) with jittered backoff;
      // RetryingStorage below retries reads again, within --storage-timeout.
      maxAttempts: 3,
    }).catch((err: unknown) => {
      throw startupError('storage', err);
    });
    await storage.ready?.().catch((err: unknown) => {
      throw startupError('storage', err);
    });
    if (c.storageDelayMs > 0 || c.storageErrorRate > 0) {
      storage = new FaultyStorage(storage, { delayMs: c.storageDelayMs, errorRate: c.storageErrorRate });
    }
    // Counted below the retries: each attempt is a request to storage.
    this.counting = new CountingStorage(storage);
    this.counters.storage = this.counting.counters;
    const retrying = new RetryingStorage(this.counting, {
      retries: c.storageRetries,
      baseDelayMs: c.storageRetryDelayMs,
      deadlineMs: c.storageTimeoutMs,
      onRetry: (key, attempt, delayMs, err) => this.log.debug({ key, attempt, delayMs: Math.round(delayMs), err: err.message }, 'storage read failed; retrying'),
      onGiveUp: (key, attempts, err) => this.log.warn({ key, attempts, err: err.message }, 'storage read failed after its last retry'),
    });
    this.counters.storageRetries = retrying.counters;
    this.storage = retrying;
    this.sidecars = new SidecarStore(this.storage, c.blockSize, c.merge, this.log, this.counters.publish);
    // Start-up steps; between two of them, a stop() meanwhile ends the start
    // (it must not leave an agent listening on a closed cache).
    const steps: Array<() => Promise<void> | void> = [
      async () => {
        this.cache = await CacheDevice.open(c.cache, { capacityBytes: c.cacheSize, blockSize: c.blockSize, logger: this.log }).catch(
          (err: unknown) => {
            throw startupError('cache', err);
          },
        );
        this.missWriter = new MissWriter(this.cache);
        this.registry = await SpaceRegistry.load(c.cache, this.log);
      },
      // Faulted in before the agent listens, not under the first boot's reads:
      // a boot that starts with the agent would wait behind their page faults.
      async () => {
        const keep = Math.min(2 * c.prefetchDepth, Math.max(1, Math.floor(CHUNK_BUFFERS_MAX_BYTES / c.prefetchChunk)));
        this.chunkBuffers = new BufferPool(c.prefetchChunk, keep);
        const prefaultStart = performance.now();
        await this.chunkBuffers.prefault(); // stop() ends it early
        this.log.debug({ ...this.chunkBuffers.stats(), ms: Math.round(performance.now() - prefaultStart) }, 'prefetch buffers faulted in');
      },
      async () => {
        if (!c.warmup) return;
        const signal = this.stopping.signal;
        this.warmup = await warmUp({ config: c, log: this.log, createAgent: (config, log) => new Agent(config, log), stopped: () => signal.aborted });
      },
      async () => {
        if (c.tls.mode !== 'off') this.tlsCredentials = await TlsCredentials.load(c.tls);
        if (c.listen && c.tls.mode === 'off' && !isLoopbackHost(c.listen.host)) {
          this.log.warn(
            { listen: c.listen },
            `listening on ${c.listen.host}:${c.listen.port} without TLS: any host that reaches it can read every export (see --tls)`,
          );
        }
      },
      () => {
        this.prefetches = new ExportPrefetch({
          config: c,
          log: this.log,
          storage: this.storage,
          counting: this.counting,
          sidecars: this.sidecars,
          cache: this.cache,
          chunkBuffers: this.chunkBuffers,
          contentCounters: this.contentCounters,
          contentLedger: this.contentLedger,
          prefetchCounters: this.counters.prefetch,
          stopping: this.stopping.signal,
          serviceFor: (name) => this.serviceFor(name),
        });
        this.nbd = new NbdServer(this, {
          ...(this.tlsCredentials && c.tls.mode !== 'off' ? { tls: { mode: c.tls.mode, credentials: this.tlsCredentials } } : {}),
          maxConnections: c.maxConnections,
          maxConnectionsPerClient: c.maxConnectionsPerClient,
          maxBufferedBytes: c.maxBuffered,
          logger: (level, msg, fields) => this.log[level === 'warn' ? 'warn' : level === 'error' ? 'error' : 'debug'](fields ?? {}, msg),
        });
      },
      () => mkdir(join(c.socket, '..'), { recursive: true }).then(() => undefined),
      // Sockets passed by systemd replace --socket and --listen (a `control` one, --control).
      async () => {
        for (const s of nbdSockets) await this.nbd!.listenFd(s.fd, s.name);
        if (nbdSockets.length > 0) return;
        await this.nbd!.listenUnix(c.socket);
        await applySocketAccess(c.socket, c.socketMode, gid);
        if (c.listen) await this.nbd!.listenTcp(c.listen.host, c.listen.port);
      },
      async () => {
        if (!controlSocket) await mkdir(join(c.control, '..'), { recursive: true });
        this.control = await ControlServer.start(c.control, {
          status: async () => this.status(),
          markBooted: async (name) => this.markBooted(name),
          warm: (name) => this.warm(name),
          cache: () => this.cacheListing(),
          evict: (name) => this.evict(name),
        }, gid, controlSocket?.fd);
      },
      async () => {
        if (c.metrics) this.metricsServer = await this.metrics.serve(c.metrics.host, c.metrics.port);
      },
    ];
    try {
      for (const step of steps) {
        this.stopping.signal.throwIfAborted();
        await step();
      }
      this.stopping.signal.throwIfAborted();
    } catch (err) {
      // A cache this start created is removed again, under its lock (CacheDevice.closeAndRemoveIfCreated).
      await this.release({ removeNewCache: true });
      throw err;
    }
    if (c.maintenance !== 'off') {
      this.maintenance = cron.schedule(c.maintenance, () => void this.runMaintenance());
    }
    this.log.info(
      { storage: this.storage.description, socket: this.socketDescription(), listen: c.listen, control: c.control, cacheSize: c.cacheSize, warmupMs: this.warmup?.ms },
      'agent started',
    );
    this.started = true;
  }

  /**
   * Stops accepting, drains in-flight requests, finishes rebuilds, flushes
   * the cache. During a start(), waits for it to give up and close what it
   * opened: closing under its feet would miss what it opens next.
   */
  async stop(): Promise<void> {
    this.stopping.abort(new AgentError('the agent was stopped while it was starting'));
    if (this.starting !== undefined && !this.started) {
      this.chunkBuffers?.close(); // ends the prefault early
      await this.starting;
      return;
    }
    await this.release();
  }

  private async release(options: { removeNewCache?: boolean } = {}): Promise<void> {
    this.maintenance?.stop();
    await this.nbd?.close().catch((err: unknown) => this.log.warn({ err }, 'closing NBD server'));
    await this.control?.close().catch(() => undefined);
    await this.metricsServer?.close().catch(() => undefined);
    for (const entry of [...this.services.values(), ...this.retired]) {
      entry.service.markBooted(); // flush a recording in progress into the map
      await entry.rebuilds.settled();
      entry.service.dispose();
      await entry.service.image.close().catch(() => undefined);
    }
    await this.missWriter?.flush();
    await this.registry?.flush();
    this.chunkBuffers?.close();
    const closing = options.removeNewCache === true ? this.cache?.closeAndRemoveIfCreated() : this.cache?.close();
    await closing?.catch((err: unknown) => this.log.warn({ err }, 'closing cache'));
    if (this.started) this.log.info({ counters: this.counters }, 'agent stopped');
    else this.log.debug('agent did not start; what it had opened is closed');
  }

  /**
   * Reclaims the cached blocks of images gone from storage (see
   * reclaimGone), then compacts the cache index. Returns what it reclaimed,
   * or undefined when it failed (logged).
   */
  async runMaintenance(): Promise<ReclaimReport | undefined> {
    try {
      await this.missWriter.flush();
      const r = await reclaimGone(this.catalog(), (key) => this.storage.stat(key));
      this.log.info(
        {
          reclaimedSpaces: r.reclaimed.length,
          reclaimedBytes: r.reclaimedBytes,
          // Bounded in the log line; the counts above are complete.
          reclaimed: r.reclaimed.slice(0, 32),
          keptSpaces: r.kept,
          inUseSpaces: r.inUse,
          undecidedSpaces: r.undecided,
          unknownSpaces: r.unknown,
          unknownBytes: r.unknownBytes,
        },
        'maintenance: cached blocks of images gone from storage reclaimed',
      );
      await this.cache.compact();
      this.log.info({ cache: this.cache.stats() }, 'maintenance: cache index compacted');
      return r;
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, 'maintenance failed');
      return undefined;
    }
  }

  private catalog(): CatalogContext {
    return { cache: this.cache, registry: this.registry, openSpaces: () => this.openSpaces() };
  }

  /**
   * Exports in use now (connections open, or a segment rebuild queued), by
   * the spaces they use. An export loaded without connections (NBD_OPT_INFO,
   * a control call) is not in use: a new connection checks storage again first.
   */
  private openSpaces(): Map<string, string[]> {
    const open = new Map<string, string[]>();
    for (const entry of [...this.services.values(), ...this.retired]) {
      if (entry.service.connections === 0 && !entry.rebuilds.busy) continue;
      for (const space of entry.service.spaces) {
        const names = open.get(space) ?? [];
        if (!names.includes(entry.service.name)) names.push(entry.service.name);
        open.set(space, names);
      }
    }
    return open;
  }

  /** `agent cache`: the cached spaces with their bytes, last boot and the images they belong to. */
  async cacheListing(): Promise<CacheListing> {
    // Misses read so far are counted as cached.
    await this.missWriter.flush();
    return listCache(this.catalog());
  }

  /**
   * `agent evict`: drops the cached blocks of the export's chain (its current
   * version, older versions still open, and those the registry recorded under
   * its name), shared backing layers included. An export gone from storage
   * can still be evicted while the registry knows it.
   */
  async evict(name: string): Promise<EvictResult> {
    const spaces: string[] = [];
    let lookupError: unknown;
    try {
      spaces.push(...(await this.serviceFor(name)).service.spaces);
    } catch (err) {
      lookupError = err;
    }
    for (const entry of this.retired) if (entry.service.name === name) spaces.push(...entry.service.spaces);
    spaces.push(...this.registry.spacesOf(name));
    if (spaces.length === 0) {
      if (lookupError instanceof ExportNotFoundError) {
        throw new ExportNotFoundError(`${lookupError.message}, and the cache knows no image of that name`);
      }
      throw lookupError ?? new ExportNotFoundError(`no export named ${JSON.stringify(name)}`);
    }
    // Misses waiting to be written land first, then go with the rest.
    await this.missWriter.flush();
    const result = await evictSpaces(this.catalog(), name, spaces);
    this.log.info({ export: name, blocks: result.blocks, bytes: result.bytes, spaces: result.spaces }, 'cache of export evicted');
    return result;
  }

  // ExportProvider

  async list(): Promise<string[]> {
    const objects = (await this.storage.list()).filter((o) => isImageKey(o.key));
    const disks: string[] = [];
    // A few first-bytes reads at a time: a bucket may hold many objects.
    for (let i = 0; i < objects.length; i += 16) {
      const batch = objects.slice(i, i + 16);
      const ok = await Promise.all(batch.map((o) => this.isDisk(o)));
      batch.forEach((o, k) => ok[k] && disks.push(o.key));
    }
    return disks;
  }

  /**
   * Whether a storage object is a disk image to export: a raw image by its
   * name (--raw-extensions), a qcow2 image by its magic (remembered per version).
   */
  private async isDisk(object: ObjectStat): Promise<boolean> {
    if (!isImageKey(object.key)) return false;
    if (hasRawExtension(object.key, this.config.rawExtensions)) return true;
    if (object.size < 4) return false;
    const memo = `${object.key}\0${object.version}`;
    const known = this.diskChecks.get(memo);
    if (known !== undefined) return known;
    const head = await this.storage.read(object.key, 0, 4).catch(() => undefined);
    if (head === undefined) return false;
    const disk = isQcow2Head(head);
    if (this.diskChecks.size >= 4096) this.diskChecks.clear();
    this.diskChecks.set(memo, disk);
    return disk;
  }

  async describe(name: string): Promise<ExportDescription> {
    const entry = await this.serviceFor(name);
    return { name, size: entry.service.virtualSize };
  }

  async open(name: string): Promise<NbdExport> {
    const entry = await this.serviceFor(name);
    const service = entry.service;
    service.open();
    if (service.connections === 1) void this.prefetches.start(entry);
    let closed = false;
    const bs = this.cache.blockSize;
    return {
      name,
      size: service.virtualSize,
      read: (offset, length) => service.read(offset, length),
      // The image service reads whole blocks.
      bufferBytes: (offset, length) => (Math.floor((offset + length - 1) / bs) - Math.floor(offset / bs) + 1) * bs,
      extents: (offset, length) => service.extents(offset, length),
      cache: async (offset, length) => {
        await service.readUnrecorded(offset, length);
      },
      close: async () => {
        if (closed) return;
        closed = true;
        service.close();
        if (entry.retired && service.connections === 0) await this.closeEntry(entry);
      },
    };
  }

  private async serviceFor(name: string): Promise<ServiceEntry> {
    if (!isImageKey(name)) throw new ExportNotFoundError(`no export named ${JSON.stringify(name)}`);
    if (!this.services.has(name) && hasRawExtension(name, this.config.rawExtensions)) {
      // A raw image not loaded yet needs no stat first: its open (one GET of its head on an
      // object store) finds it or finds it missing.
      return this.openService(name).catch((err: unknown) => {
        if (err instanceof FileNotFoundError) throw new ExportNotFoundError(`no export named ${JSON.stringify(name)}`);
        if (err instanceof BootcacheError && !(err instanceof ExportNotFoundError)) {
          throw new ExportNotFoundError(`no export named ${JSON.stringify(name)}: ${err.message}`);
        }
        throw err;
      });
    }
    const stat = await this.storage.stat(name).catch((err: unknown) => {
      if (err instanceof BootcacheError) throw new ExportNotFoundError(`no export named ${JSON.stringify(name)}: ${err.message}`);
      throw err;
    });
    if (!stat) throw new ExportNotFoundError(`no export named ${JSON.stringify(name)}`);
    if (!(await this.isDisk(stat))) {
      throw new ExportNotFoundError(`no export named ${JSON.stringify(name)}: exports are disk images, ${diskRule(this.config.rawExtensions)}`);
    }
    const existing = this.services.get(name);
    if (existing && !existing.service.stale && (await this.chainVersion(stat.version, existing.service.image)) === existing.version) {
      return existing;
    }
    if (existing && this.services.get(name) === existing) {
      // The image or a backing file changed: new connections get the new version. Connections
      // still open keep the old service, which serves the old version or EIO, never a mix.
      this.services.delete(name);
      if (existing.service.connections === 0) {
        await this.closeEntry(existing);
      } else {
        existing.retired = true;
        this.retired.add(existing);
        this.log.info({ export: name, connections: existing.service.connections }, 'image changed on storage: new connections open the new version');
      }
    }
    return this.openService(name);
  }

  /** The service being created for `name`, or a new one (one open at a time per name). */
  private openService(name: string): Promise<ServiceEntry> {
    let pending = this.opening.get(name);
    if (!pending) {
      pending = this.createService(name).finally(() => this.opening.delete(name));
      this.opening.set(name, pending);
    }
    return pending;
  }

  /** The versions of `image`'s chain on storage now, top first (`top`: the top's, just read). */
  private async chainVersion(top: string, image: DiskImage): Promise<string> {
    const backing = image.layers().slice(1);
    const versions = await Promise.all(backing.map(async (layer) => (await this.storage.stat(layer.name).catch(() => undefined))?.version ?? 'gone'));
    return [top, ...versions].join('|');
  }

  /** Ends a service no connection uses any more: its rebuild finishes, its image closes. */
  private async closeEntry(entry: ServiceEntry): Promise<void> {
    this.retired.delete(entry);
    entry.service.dispose();
    await entry.rebuilds.settled();
    await entry.service.image.close().catch(() => undefined);
  }

  private async createService(name: string): Promise<ServiceEntry> {
    const { image, version, layers } = await this.openImage(name);
    this.registry.record(name, image, layers);
    const service = new CacheManager(name, image, this.cache, {
      bootPolicy: this.config.boot,
      cacheMisses: this.config.cacheMisses,
      counters: this.counters.guestReads,
      inFlight: this.inFlight,
      missWriter: this.missWriter,
      readaheadBytes: this.config.readahead,
      missWindowBytes: this.config.missWindow,
      onBootEnd: (svc, boot) => this.onBootEnd(svc, boot),
      onGuestRead: (source, seconds) => this.metrics.guestRead(source, seconds),
      onStale: (svc, err) =>
        this.log.warn(
          { export: svc.name, identity: svc.space, connections: svc.connections, err: err.message },
          `export ${svc.name}: the image changed on storage while open; its reads that need storage now fail with EIO (cached blocks of the version opened are still served); new connections open the new version`,
        ),
    });
    const entry: ServiceEntry = { service, version, retired: false, rebuilds: new RebuildQueue() };
    this.services.set(name, entry);
    // Also reached by NBD_OPT_INFO (describe), which opens no connection to the export: "loaded", not "opened".
    this.log.info({ export: name, identity: image.identity, size: image.virtualSize, format: image.format }, 'image loaded');
    return entry;
  }

  /**
   * Opens an image and its chain, with the storage version of each layer
   * opened (top first, joined) and each layer's key, stamp and version.
   */
  private async openImage(key: string): Promise<{ image: DiskImage; version: string; layers: LayerRef[] }> {
    const storage = this.storage;
    const layers: LayerRef[] = [];
    const opener: SourceOpener = {
      async openRelative(from, name) {
        const backingKey = storage.resolveRelative(from.name, name);
        const source = await storage.openSource(backingKey, { head: OPEN_HEAD_BYTES });
        layers.push({ key: backingKey, stamp: source.stamp, version: source.version });
        return { source, key: backingKey };
      },
    };
    // With the head the open reads anyway: one request on an object store, not a HEAD and a GET.
    const source = await storage.openSource(key, { head: OPEN_HEAD_BYTES });
    layers.push({ key, stamp: source.stamp, version: source.version });
    // Backing files open top down, one at a time: `layers` is in chain order.
    const image = await openImageFromSource(source, opener, {}, [key]);
    return { image, version: layers.map((l) => l.version).join('|'), layers };
  }

  private onBootEnd(service: CacheManager, boot: BootRecorder): void {
    const current = this.services.get(service.name);
    const entry = current?.service === service ? current : [...this.retired].find((e) => e.service === service);
    if (!entry) return;
    const summary = boot.summary(performance.now());
    const verdict = boot.verdict(service.stale !== undefined || entry.retired);
    if (verdict.action === 'discard') {
      this.counters.boots.discarded++;
      const { reads, blocks, durationMs } = summary;
      this.log.warn(
        { export: service.name, reads, blocks, durationMs, limitBytes: boot.limitBytes() },
        `export ${service.name}: recording discarded, no new map or segment: ${verdict.reason}`,
      );
      return;
    }
    if (verdict.action === 'skip' && verdict.reason === 'changed') {
      this.counters.boots.skipped++;
      this.log.info({ export: service.name, reads: summary.reads }, 'boot ended on a version of the image that changed: no new map or segment');
      return;
    }
    this.log.info({ export: service.name, ...summary }, 'boot ended');
    if (verdict.action === 'skip') {
      this.counters.boots.skipped++;
      if (verdict.reason === 'empty') this.log.info({ export: service.name }, 'boot read nothing: no new map or segment');
      else {
        this.log.info(
          { export: service.name, reads: boot.reads, minReads: boot.policy.minReads },
          'too few reads for a boot (boot.minReads): no new map or segment',
        );
      }
      return;
    }
    // Prefetched blocks the boot never read, once per stream: the first boot after a stream
    // counts them; later recordings (another boot, a probe) do not count that stream again.
    const prefetcher = service.prefetch;
    if (prefetcher && !this.unusedCounted.has(prefetcher)) {
      this.unusedCounted.add(prefetcher);
      this.counters.prefetch.unusedBytes += prefetcher.unusedBytes(boot.bitmap, boot.blockSize);
    }
    entry.rebuilds.enqueue(
      async () => ({ published: await this.sidecars.publishBoot(service, boot, join(this.config.cache, 'tmp')) }),
      (outcome) => {
        if (outcome instanceof Error) {
          this.counters.boots.failed++;
          this.log.error({ export: service.name, err: outcome.message }, 'segment rebuild failed');
        } else if (outcome.published) {
          this.counters.boots.recorded++;
          this.metrics.bootRecorded(summary.durationMs / 1000);
        }
        else this.counters.boots.skipped++;
      },
      () => this.awayFromBootStarts(),
    );
  }

  /**
   * Waits while a boot on this host is in its first seconds (rebuildQuietMs):
   * a rebuild reads the image through the cache and writes a segment, work
   * that would compete with the reads a starting boot waits for. Gives up
   * waiting after REBUILD_MAX_WAIT_MS, or at once when the agent stops.
   */
  private async awayFromBootStarts(): Promise<void> {
    const quietMs = this.config.rebuildQuietMs;
    if (quietMs <= 0) return;
    const deadline = performance.now() + REBUILD_MAX_WAIT_MS;
    const signal = this.stopping.signal;
    while (!signal.aborted && performance.now() < deadline) {
      const now = performance.now();
      const starting = [...this.services.values()].some((e) => {
        const b = e.service.bootSummary();
        return b?.state === 'recording' && now - b.startedAt < quietMs;
      });
      if (!starting) return;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(500, quietMs));
        signal.addEventListener('abort', () => {
          clearTimeout(timer);
          resolve();
        }, { once: true });
      });
    }
  }

  /**
   * Pre-seeding: streams the export's segment into this host's cache before
   * any VM opens it (or waits for the stream already running), and reports
   * what it read. No boot is recorded.
   */
  async warm(name: string): Promise<WarmResult> {
    const entry = await this.serviceFor(name);
    const service = entry.service;
    const started = performance.now();
    const before = this.counting.counters.readBytes;
    if (service.prefetch?.progress().state === 'streaming') await service.prefetch.start();
    else if (service.prefetch?.progress().state !== 'done') await this.prefetches.start(entry);
    const p = service.prefetch?.progress();
    const predicted = entry.prediction;
    if (!p && predicted) {
      return {
        export: name, state: 'done', blocks: predicted.predicted, blocksLoaded: predicted.fetched, blocksCached: predicted.cached,
        bytesTotal: predicted.predicted * this.cache.blockSize, storageBytes: this.counting.counters.readBytes - before,
        seconds: Math.round(performance.now() - started) / 1000,
      };
    }
    if (!p) throw new FileNotFoundError(`no map and segment of ${JSON.stringify(name)} that belong together are published; nothing to warm`);
    if (p.state === 'failed') throw new StorageIOError(`warming ${name} failed: ${p.error ?? 'the stream failed'}`);
    return {
      export: name,
      state: p.state,
      blocks: p.blocks,
      blocksLoaded: p.blocksLoaded,
      blocksCached: p.blocksCached,
      bytesTotal: p.bytesTotal,
      storageBytes: this.counting.counters.readBytes - before,
      seconds: Math.round(performance.now() - started) / 1000,
    };
  }

  markBooted(name: string): Omit<BootSummary, 'startedAt'> & { startedAt: string } {
    const entry = this.services.get(name);
    if (!entry) throw new ExportNotFoundError(`export ${JSON.stringify(name)} is not open`);
    const summary = entry.service.markBooted();
    if (!summary) throw new ExportNotFoundError(`export ${JSON.stringify(name)} has no boot recorded`);
    return { ...summary, startedAt: isoTime(summary.startedAt) };
  }

  /** The NBD socket: the --socket path, or the sockets systemd passed. */
  private socketDescription(): string {
    const nbd = this.passedSockets.filter((s) => s.name !== 'control');
    return nbd.length === 0 ? this.config.socket : nbd.map((s) => `passed by systemd: ${s.name} (fd ${s.fd})`).join(', ');
  }

  /** Waits for all pending rebuilds (tests, shutdown). */
  async settled(): Promise<void> {
    await Promise.all([...this.services.values()].map((e) => e.rebuilds.settled()));
  }

  /** Counters and uptime, started or not: what `bootcache agent` reports when it stops. */
  summary(): Pick<AgentStatus, 'counters' | 'uptimeSeconds'> {
    return { counters: this.counters, uptimeSeconds: Math.round((Date.now() - this.startedAt) / 1000) };
  }

  status(): AgentStatus {
    const { counters, uptimeSeconds } = this.summary();
    const exports = [...this.services.values(), ...this.retired].map(exportStatus);
    const status: AgentStatus = {
      pid: process.pid,
      uptimeSeconds,
      storage: this.storage.description,
      socket: this.socketDescription(),
      exports,
      cache: this.cacheStatus(),
      prefetchBuffers: this.chunkBuffers.stats(),
      nbd: this.nbd!.stats,
      counters,
    };
    if (this.config.listen) status.listen = `${this.config.listen.host}:${this.config.listen.port}`;
    if (this.warmup) status.warmup = this.warmup;
    return status;
  }

  private cacheStatus(): CacheStatus {
    const stats = this.cache.stats();
    return cacheStatus(stats, { ...this.contentCounters, ...this.contentLedger.bytes(stats) });
  }

  /** Removes leftovers of interrupted rebuilds. */
  static async cleanTmp(cacheDir: string): Promise<void> {
    await rm(join(cacheDir, 'tmp'), { recursive: true, force: true });
  }
}

/** Export names: any storage object but the sidecars and temp files. */
export function isImageKey(key: string): boolean {
  if (SIDECAR_SUFFIXES.some((s) => key.endsWith(s))) return false;
  if (/\.tmp-[^/]*$/.test(key)) return false;
  return true;
}

/**
 * A failure to open the storage or the cache is the agent's (exit 7) when it
 * is about the environment: a coded error or a system call's error. Anything
 * else is a bug and stays what it is (exit 70).
 */
function startupError(what: string, err: unknown): unknown {
  if (err instanceof AgentError) return err;
  const systemError = err instanceof Error && typeof (err as NodeJS.ErrnoException).code === 'string' && (err as NodeJS.ErrnoException).syscall !== undefined;
  if (err instanceof BootcacheError || systemError) return new AgentError(`${what}: ${(err as Error).message}`, { cause: err });
  return err;
}

function emptyStorageKinds(): Record<'image' | 'segment' | 'map', { requests: number; bytes: number; errors: number }> {
  return { image: { requests: 0, bytes: 0, errors: 0 }, segment: { requests: 0, bytes: 0, errors: 0 }, map: { requests: 0, bytes: 0, errors: 0 } };
}
