/**
 * Start-up warm-up: before the agent listens, it boots a small scratch image
 * through a second, private agent three times (first boot, cold host, warm
 * host), so that the first real boot runs on optimised code.
 *
 * Why: a freshly started Node process runs the request path in the
 * interpreter and tiers it up while the first boot reads, so the first boot
 * after a start is slower than the next (docs/benchmarks-agent.md has the
 * figures; V8 flags that tier up sooner did not help). Optimised code is shared by every
 * instance of a class, so the private agent's boots warm the real agent's
 * paths: the NBD connection, image service, cache reads and writes, miss
 * path, boot recording, segment build, prefetch stream and block checks.
 *
 * The scratch image, its sidecars and the private cache live in a temporary
 * directory removed afterwards. A failure is a warning, never fatal.
 */
import { randomFillSync } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { NbdPool } from '../nbd/client/pool.js';
import { DEFAULT_BOOT_POLICY } from './boot-recorder.js';
import { removeDeadProcessDirs } from './cache/file-io.js';
import type { AgentConfig } from './config.js';

/** Scratch image size: small enough to write in a few ms, larger than a few prefetch chunks' worth of reads. */
const IMAGE_BYTES = 32 * 1024 * 1024;
/** Reads per boot: the hot paths reach optimised code within a few hundred calls; this leaves a margin. */
const READS_PER_BOOT = 2500;
/** Reads in flight at once, as in a real boot (the reference boot has at most 3). */
const CONCURRENCY = 2;
const READ_SIZES = [512, 2048, 4096, 8192, 16384, 32768];
const IMAGE_NAME = 'warmup.raw';
/** Scratch directories are named PREFIX<pid>- so a later start can remove those of a process killed mid-way. */
const DIR_PREFIX = 'bootcache-warmup-';

export interface WarmupReport {
  ms: number;
  boots: number;
  reads: number;
  /** Blocks the cold-host boot's prefetch loaded from the first boot's segment (0: that path was not warmed). */
  prefetchedBlocks: number;
}

/** The part of Agent the warm-up drives (Agent itself; an interface to avoid an import cycle). */
export interface WarmupAgent {
  start(): Promise<void>;
  stop(): Promise<void>;
  status(): { exports: Array<{ prefetch?: { blocksLoaded: number } }> };
}

export interface WarmupOptions {
  config: AgentConfig;
  log: Logger;
  /** Creates the private agent (the Agent constructor). */
  createAgent(config: AgentConfig, log: Logger): WarmupAgent;
  /** True once the real agent is being stopped: the warm-up ends at its next step. */
  stopped(): boolean;
}

/** Deterministic xorshift32: the same reads on every start. */
function random(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 0x1_0000_0000;
  };
}

/** A boot-like pattern: runs of 1-8 sequential reads of mixed sizes at 512-byte aligned offsets. */
export function warmupReads(count: number, imageBytes: number, seed = 0x5eed): Array<{ offset: number; length: number }> {
  const next = random(seed);
  const reads: Array<{ offset: number; length: number }> = [];
  while (reads.length < count) {
    let offset = Math.floor(next() * (imageBytes / 512)) * 512;
    const run = 1 + Math.floor(next() * 8);
    for (let i = 0; i < run && reads.length < count; i++) {
      const length = Math.min(READ_SIZES[Math.floor(next() * READ_SIZES.length)]!, imageBytes - offset);
      if (length <= 0) break;
      reads.push({ offset, length });
      offset += length;
    }
  }
  return reads;
}

async function bootOnce(socket: string, reads: Array<{ offset: number; length: number }>, stopped: () => boolean): Promise<void> {
  const pool = await NbdPool.connect(`nbd+unix:///${IMAGE_NAME}?socket=${encodeURIComponent(socket)}`);
  try {
    let nextRead = 0;
    const lane = async (): Promise<void> => {
      while (nextRead < reads.length && !stopped()) {
        const { offset, length } = reads[nextRead++]!;
        await pool.read(offset, length);
      }
    };
    await Promise.all(Array.from({ length: CONCURRENCY }, lane));
  } finally {
    await pool.close();
  }
}

/** Removes scratch directories left by warm-ups whose process died (SIGKILL, a second signal, OOM). */
export function removeStaleWarmupDirs(parent: string): Promise<void> {
  return removeDeadProcessDirs(parent, DIR_PREFIX);
}

/**
 * Runs the warm-up; resolves with what it did, or undefined when it was
 * stopped or failed (logged as a warning).
 */
export async function warmUp(options: WarmupOptions): Promise<WarmupReport | undefined> {
  const { config, log } = options;
  const started = performance.now();
  let dir: string | undefined;
  let agent: WarmupAgent | undefined;
  let boots = 0;
  log.debug('warm-up started');
  try {
    await removeStaleWarmupDirs(tmpdir());
    dir = await mkdtemp(join(tmpdir(), `${DIR_PREFIX}${process.pid}-`));
    const storage = join(dir, 'storage');
    await mkdir(storage);
    // Random bytes, not a sparse file: holes would take the raw reader's zero path, not the data path.
    await writeFile(join(storage, IMAGE_NAME), randomFillSync(Buffer.allocUnsafe(IMAGE_BYTES)));
    const reads = warmupReads(READS_PER_BOOT, IMAGE_BYTES);
    const privateConfig = (cache: string): AgentConfig => ({
      ...config,
      storage,
      cache: join(dir!, cache),
      socket: join(dir!, 'nbd.sock'),
      control: join(dir!, 'control.sock'),
      cacheSize: 2 * IMAGE_BYTES,
      storageDelayMs: 0,
      storageErrorRate: 0,
      // Every boot is recorded and published as it is (the defaults, not the operator's limits: a
      // small --boot-max-share-floor would discard the first boot as a copy), and the second boot
      // prefetches the first one's segment.
      boot: { ...DEFAULT_BOOT_POLICY, minReads: 1, maxShare: 0 },
      cacheMisses: true,
      merge: { minSeen: 1, window: 1 },
      // Small buffers: the real agent has faulted in its own; the code paths are the same.
      prefetchChunk: Math.min(config.prefetchChunk, 4 * 1024 * 1024),
      prefetchDepth: 1,
      maintenance: 'off',
      socketGroup: undefined,
      socketGroupLabel: undefined,
      listen: undefined,
      // Private: no metrics port, no TLS, no pacing of its tiny stream.
      metrics: undefined,
      tls: { mode: 'off', verifyPeer: false },
      prefetchRate: 0,
      warmup: false,
    });
    const quiet = log.child({ warmup: true }, { level: 'silent' });
    // Boot 1: first boot (misses, recording, segment build). Boot 2: cold host (a fresh
    // cache, the segment streamed in). Boot 3: warm host (hits).
    let prefetchedBlocks = 0;
    for (const [cache, bootsHere] of [['cache-1', 1], ['cache-2', 2]] as const) {
      if (options.stopped()) return undefined;
      agent = options.createAgent(privateConfig(cache), quiet);
      await agent.start();
      for (let i = 0; i < bootsHere; i++) {
        if (options.stopped()) return undefined;
        await bootOnce(join(dir, 'nbd.sock'), reads, options.stopped);
        if (options.stopped()) return undefined;
        boots++;
        // After the cold-host boot: the warm one's open finds every block cached and loads none.
        if (cache === 'cache-2' && i === 0) prefetchedBlocks = agent.status().exports[0]?.prefetch?.blocksLoaded ?? 0;
      }
      // Stopping ends the recording and waits for the segment to be published.
      const stopping = agent;
      agent = undefined;
      await stopping.stop();
    }
    const report = { ms: Math.round(performance.now() - started), boots, reads: boots * reads.length, prefetchedBlocks };
    log.debug(report, 'warm-up done');
    return report;
  } catch (err) {
    log.warn({ err: (err as Error).message }, `warm-up skipped: ${(err as Error).message}`);
    return undefined;
  } finally {
    await agent?.stop().catch(() => undefined);
    if (dir !== undefined) await rm(dir, { recursive: true, force: true }).catch(() => undefined);
  }
}
