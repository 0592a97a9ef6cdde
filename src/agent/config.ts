/**
 * Agent configuration: from flags, a JSON config file, or both (flags win).
 * Every value is validated here with a one-line error naming the flag or
 * the key it came from.
 */
import { realpathSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { basename, dirname, join, resolve as resolvePath } from 'node:path';
import cron from 'node-cron';
import { UsageError, fromSystemError } from '../errors.js';
import { DEFAULT_MERGE_POLICY, type MergePolicy } from '../format/map.js';
import { DEFAULT_BOOT_POLICY, type BootPolicy } from './boot-recorder.js';
import { DEFAULT_READAHEAD } from './readahead.js';
import { MAX_SOCKET_PATH_BYTES } from '../net/unix-socket-path.js';
import { DEFAULT_RAW_EXTENSIONS } from '../image/disk-names.js';
import type { TlsMode, TlsSettings } from '../nbd/server/tls.js';

export const DEFAULT_NBD_PORT = 10809;
export const DEFAULT_SOCKET = '/run/bootcache/nbd.sock';
export const DEFAULT_CONTROL = '/run/bootcache/control.sock';


export interface AgentConfig {
  storage: string;
  cache: string;
  socket: string;
  listen?: { host: string; port: number };
  control: string;
  cacheSize: number;
  /** Cache blocks read on a miss (not only prefetched ones). */
  cacheMisses: boolean;
  storageDelayMs: number;
  storageErrorRate: number;
  /** A storage read that fails with an I/O error is sent again up to this many times. */
  storageRetries: number;
  /** Delay before the first retry, ms; doubled for each further one (with jitter). */
  storageRetryDelayMs: number;
  /** A read that needs storage gets EIO once this long has passed (its retries included), ms. */
  storageTimeoutMs: number;
  /** S3 endpoint URL (Ceph RGW, MinIO) for s3:// storage; else AWS_ENDPOINT_URL, else AWS. */
  s3Endpoint?: string;
  /** Path-style S3 requests (needed by Ceph RGW and MinIO). */
  s3PathStyle: boolean;
  /** S3 region; else AWS_REGION, AWS_DEFAULT_REGION, else us-east-1. */
  s3Region?: string;
  /** Names of raw images to export (qcow2 images are found by their magic), e.g. ['.raw', '.img']. */
  rawExtensions: string[];
  /** Serve Prometheus metrics at http://HOST:PORT/metrics. */
  metrics?: { host: string; port: number };
  /** TLS on NBD connections (NBD_OPT_STARTTLS); `require` applies to TCP clients. */
  tls: TlsSettings;
  boot: BootPolicy;
  merge: MergePolicy;
  /** Segment bytes per sequential prefetch read. */
  prefetchChunk: number;
  /** Segment chunks in flight at once (the bounded prefetch buffer). */
  prefetchDepth: number;
  /** Pace of the segment stream's chunk reads, bytes per second (0: unlimited); guest reads are not paced. */
  prefetchRate: number;
  /** Largest sequential readahead window on misses, bytes (0: off); see readahead.ts. */
  readahead: number;
  /** Aligned window a guest miss is widened to, bytes (0: off); see miss-window.ts. */
  missWindow: number;
  /** Map block size for recorded boots. */
  blockSize: number;
  /** node-cron schedule for maintenance (reclaiming the cache of images gone from storage, index compaction), or 'off'. */
  maintenance: string;
  /** NBD connections at once (negotiating or not); see NbdServer's dropOldestNegotiating. */
  maxConnections: number;
  /** NBD connections at once from one client (a unix peer's uid, a TCP peer's address); default a quarter of maxConnections. */
  maxConnectionsPerClient: number;
  /** Reply buffers the NBD server holds at most over all connections (see BufferBudget). */
  maxBuffered: number;
  /** Permission bits of the NBD socket (connecting needs write permission). */
  socketMode: number;
  /** Group (name or numeric gid) given both sockets, e.g. the group QEMU runs in. */
  socketGroup?: string;
  /** Where socketGroup came from ("--socket-group", "config: socketGroup"): the group is looked up at start, and its error names this. */
  socketGroupLabel?: string;
  logLevel: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
  /** A segment rebuild waits while a boot on this host started less than this long ago, ms (0: never waits). */
  rebuildQuietMs: number;
  /** Boot a scratch image through a private agent before listening, so the first boot runs on optimised code (warmup.ts). */
  warmup: boolean;
}

/** The per-client default follows --max-connections: half of it: no one client takes every slot, and VMs that share one uid (libvirt) still get most. */
export function defaultMaxConnectionsPerClient(maxConnections: number): number {
  return Math.max(1, Math.floor(maxConnections / 2));
}

export const CONFIG_DEFAULTS: Omit<AgentConfig, 'storage' | 'cache'> = {
  socket: DEFAULT_SOCKET,
  control: DEFAULT_CONTROL,
  cacheSize: 8 * 1024 ** 3,
  cacheMisses: true,
  storageDelayMs: 0,
  storageErrorRate: 0,
  // 4 retries from 50 ms: a read that keeps failing reaches the guest as EIO after at most
  // 750 ms of waits; at one failed request in twenty, one read in 3 million does.
  storageRetries: 4,
  storageRetryDelayMs: 50,
  storageTimeoutMs: 30_000,
  rawExtensions: DEFAULT_RAW_EXTENSIONS,
  s3PathStyle: false,
  boot: DEFAULT_BOOT_POLICY,
  merge: DEFAULT_MERGE_POLICY,
  // 8 MiB ranged reads, as object stores recommend; 4 in flight fill the 32 MiB
  // buffer of 8 x 4 MiB with half the requests (docs/benchmarks-agent.md).
  prefetchChunk: 8 * 1024 * 1024,
  prefetchDepth: 4,
  prefetchRate: 0,
  readahead: DEFAULT_READAHEAD.maxBytes,
  // 1 MiB: the reference boot's misses fall in 189 such windows (miss-window.ts).
  missWindow: 1024 * 1024,
  blockSize: 4096,
  maintenance: '17 3 * * *',
  maxConnections: 128,
  maxConnectionsPerClient: defaultMaxConnectionsPerClient(128),
  maxBuffered: 256 * 1024 * 1024,
  socketMode: 0o660,
  logLevel: 'info',
  warmup: true,
  rebuildQuietMs: 20_000,
  tls: { mode: 'off', verifyPeer: false },
};

/** Parses sizes like 4096, 64K, 512M, 8G, 1.5GiB; `label` names the setting in errors. */
export function parseSize(value: unknown, label: string): number {
  if (typeof value === 'number') {
    if (Number.isSafeInteger(value) && value >= 0) return value;
    throw new UsageError(`${label} must be a whole number of bytes, got ${value}`);
  }
  const m = typeof value === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$/i.exec(value) : null;
  if (!m) throw new UsageError(`${label} must be a size such as 4096, 64K, 512M or 8G, got ${JSON.stringify(value)}`);
  const mult = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  const bytes = Math.round(Number(m[1]) * mult);
  if (!Number.isSafeInteger(bytes)) throw new UsageError(`${label}: size ${String(value)} is too large`);
  return bytes;
}

/** Parses HOST:PORT, [v6]:PORT, HOST (default port) or :PORT. */
export function parseListen(value: string, label = 'listen'): { host: string; port: number } {
  const trimmed = value.trim();
  const m = trimmed === '' ? null : /^(?:\[([^\]]+)\]|([^:]*))(?::(\d+))?$/.exec(trimmed);
  if (!m) throw new UsageError(`${label} must be HOST:PORT, got ${JSON.stringify(value)}`);
  const host = m[1] ?? (m[2] || '127.0.0.1');
  const port = m[3] === undefined ? DEFAULT_NBD_PORT : Number(m[3]);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new UsageError(`${label}: port ${m[3]} is out of range (1-65535)`);
  return { host, port };
}

type Raw = Record<string, unknown>;

const KNOWN_KEYS = new Set([
  'storage', 'cache', 'socket', 'listen', 'control', 'cacheSize', 'cacheMisses', 'storageDelayMs',
  'storageErrorRate', 'storageRetries', 'storageRetryDelayMs', 'boot', 'merge', 'prefetchChunk', 'prefetchDepth', 'prefetchRate', 'readahead', 'missWindow', 'blockSize', 'maintenance',
  'maxConnections', 'socketMode', 'socketGroup', 'logLevel', 'warmup', 'maxConnectionsPerClient', 'maxBuffered',
  'storageTimeoutMs', 's3Endpoint', 's3PathStyle', 's3Region', 'metrics', 'rawExtensions',
  'tls', 'tlsCertificates', 'tlsVerifyPeer', 'tlsPsk', 'rebuildQuietMs',
]);
const KNOWN_BOOT_KEYS = new Set(['idleMs', 'windowMs', 'minReads', 'maxShare', 'maxShareFloor']);
const KNOWN_MERGE_KEYS = new Set(['minSeen', 'window']);

export async function loadConfigFile(path: string): Promise<Raw> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw fromSystemError(err, path, 'reading the config file');
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new UsageError(`config file is not valid JSON: ${(err as Error).message}`, { file: path });
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new UsageError('config file must hold a JSON object', { file: path });
  }
  return parsed as Raw;
}

/**
 * The command-line flag for each setting, so an error names what the user
 * typed. `scale` converts the flag's unit to the setting's (seconds to ms).
 */
export const FLAG_FOR_KEY: Readonly<Record<string, { flag: string; scale?: number; unit?: string }>> = {
  storage: { flag: 'storage' },
  cache: { flag: 'cache' },
  socket: { flag: 'socket' },
  listen: { flag: 'listen' },
  control: { flag: 'control' },
  socketMode: { flag: 'socket-mode' },
  socketGroup: { flag: 'socket-group' },
  maxConnections: { flag: 'max-connections' },
  maxConnectionsPerClient: { flag: 'max-connections-per-client' },
  maxBuffered: { flag: 'max-buffered' },
  cacheSize: { flag: 'cache-size' },
  cacheMisses: { flag: 'cache-misses' },
  storageDelayMs: { flag: 'storage-delay' },
  storageErrorRate: { flag: 'storage-error-rate' },
  storageRetries: { flag: 'storage-retries' },
  storageRetryDelayMs: { flag: 'storage-retry-delay' },
  storageTimeoutMs: { flag: 'storage-timeout', scale: 1000, unit: 'seconds' },
  s3Endpoint: { flag: 's3-endpoint' },
  s3PathStyle: { flag: 's3-path-style' },
  s3Region: { flag: 's3-region' },
  metrics: { flag: 'metrics' },
  tls: { flag: 'tls' },
  tlsCertificates: { flag: 'tls-certificates' },
  tlsVerifyPeer: { flag: 'tls-verify-peer' },
  tlsPsk: { flag: 'tls-psk' },
  rawExtensions: { flag: 'raw-extensions' },
  'boot.idleMs': { flag: 'boot-idle', scale: 1000, unit: 'seconds' },
  'boot.windowMs': { flag: 'boot-window', scale: 1000, unit: 'seconds' },
  'boot.minReads': { flag: 'boot-min-reads' },
  'boot.maxShare': { flag: 'boot-max-share' },
  'boot.maxShareFloor': { flag: 'boot-max-share-floor' },
  'merge.minSeen': { flag: 'merge-min-seen' },
  'merge.window': { flag: 'merge-window' },
  prefetchChunk: { flag: 'prefetch-chunk' },
  prefetchDepth: { flag: 'prefetch-depth' },
  prefetchRate: { flag: 'prefetch-rate' },
  readahead: { flag: 'readahead' },
  missWindow: { flag: 'miss-window' },
  logLevel: { flag: 'log-level' },
  maintenance: { flag: 'maintenance' },
  warmup: { flag: 'warmup' },
};

/** A setting's value and how to name it in an error. */
interface Setting {
  value: unknown;
  /** "--boot-idle" for a flag, "config: boot.idleMs" otherwise. */
  label: string;
  /** Multiplies a flag value into the setting's unit (1 unless the units differ). */
  scale: number;
  /** The flag's unit when it differs from the setting's, for messages. */
  unit?: string;
}

/**
 * Validates and completes a configuration. Sources, strongest first:
 * `fromFlags` (command-line flags by flag name, in the flags' units), then
 * `overrides` (settings by key, as in the file), then the file, then defaults.
 * Errors name the flag or the key the bad value came from.
 */
export function resolveConfig(fromFile: Raw, overrides: Raw = {}, fromFlags: Raw = {}): AgentConfig {
  for (const key of Object.keys(fromFile)) {
    if (!KNOWN_KEYS.has(key)) throw new UsageError(`config: unknown key ${JSON.stringify(key)}`);
  }
  const raw: Raw = { ...fromFile };
  for (const [k, v] of Object.entries(overrides)) if (v !== undefined) raw[k] = v;
  const sub = (key: string, known: Set<string>): Raw => {
    const v = raw[key];
    if (v === undefined) return {};
    if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new UsageError(`config: ${key} must be an object`);
    for (const k of Object.keys(v)) if (!known.has(k)) throw new UsageError(`config: unknown key ${JSON.stringify(`${key}.${k}`)}`);
    return v as Raw;
  };
  const nested: Record<string, Raw> = { boot: sub('boot', KNOWN_BOOT_KEYS), merge: sub('merge', KNOWN_MERGE_KEYS) };

  const d = CONFIG_DEFAULTS;
  const defaults: Raw = { ...d, tls: d.tls.mode, tlsVerifyPeer: d.tls.verifyPeer, 'boot.idleMs': d.boot.idleMs, 'boot.windowMs': d.boot.windowMs, 'boot.minReads': d.boot.minReads,
    'boot.maxShare': d.boot.maxShare, 'boot.maxShareFloor': d.boot.maxShareFloor,
    'merge.minSeen': d.merge.minSeen, 'merge.window': d.merge.window };
  const setting = (key: string): Setting => {
    const spec = FLAG_FOR_KEY[key];
    const flagged = spec === undefined ? undefined : fromFlags[spec.flag];
    if (spec !== undefined && flagged !== undefined) {
      return { value: flagged, label: `--${spec.flag}`, scale: spec.scale ?? 1, ...(spec.unit !== undefined ? { unit: spec.unit } : {}) };
    }
    const [outer, inner] = key.split('.') as [string, string | undefined];
    const configured = inner === undefined ? raw[outer] : nested[outer]![inner];
    return { value: configured ?? defaults[key], label: `config: ${key}`, scale: 1 };
  };

  const str = (key: string): string => {
    const { value, label } = setting(key);
    if (value === undefined) throw new UsageError(`${label} is required (a path)`);
    if (typeof value !== 'string' || value.length === 0) throw new UsageError(`${label} must be a path (a non-empty string), got ${JSON.stringify(value)}`);
    return value;
  };
  const socketPath = (key: string): string => {
    const path = str(key);
    const bytes = Buffer.byteLength(path);
    if (bytes > MAX_SOCKET_PATH_BYTES) {
      throw new UsageError(`${setting(key).label} is ${bytes} bytes long; a unix socket path can have at most ${MAX_SOCKET_PATH_BYTES}`);
    }
    return path;
  };
  const num = (key: string, min: number, max: number): number => {
    const { value, label, scale, unit } = setting(key);
    // Decimal only: Number() would also take "0x10", "0b1" and "Infinity".
    const n = typeof value === 'string' ? (DECIMAL.test(value) ? Number(value) : NaN) : value;
    if (typeof n !== 'number' || !Number.isFinite(n) || n * scale < min || n * scale > max) {
      const what = unit === undefined ? 'a number' : `a number of ${unit}`;
      throw new UsageError(`${label} must be ${what} from ${min / scale} to ${max / scale}, got ${shown(value)}`);
    }
    return n * scale;
  };
  const int = (key: string, min: number, max: number): number => {
    const n = num(key, min, max);
    if (!Number.isInteger(n)) throw new UsageError(`${setting(key).label} must be a whole number, got ${shown(setting(key).value)}`);
    return n;
  };
  const bool = (key: string): boolean => {
    const { value, label } = setting(key);
    if (typeof value !== 'boolean') throw new UsageError(`${label} must be true or false, got ${JSON.stringify(value)}`);
    return value;
  };
  const size = (key: string, min: number, max: number, range: string, allowZero = false): number => {
    const { value, label } = setting(key);
    const bytes = parseSize(value, label);
    if (!(allowZero && bytes === 0) && (bytes < min || bytes > max)) throw new UsageError(`${label} must be ${range}, got ${JSON.stringify(value)}`);
    return bytes;
  };

  const boot: BootPolicy = {
    idleMs: num('boot.idleMs', 100, 3_600_000),
    windowMs: num('boot.windowMs', 1_000, 86_400_000),
    minReads: int('boot.minReads', 0, 1e9),
    maxShare: num('boot.maxShare', 0, 1),
    maxShareFloor: size('boot.maxShareFloor', 0, Number.MAX_SAFE_INTEGER, 'a size such as 256M'),
  };
  const merge: MergePolicy = {
    window: int('merge.window', 1, 8),
    minSeen: int('merge.minSeen', 1, 8),
  };
  if (merge.minSeen > merge.window) {
    throw new UsageError(`${setting('merge.minSeen').label} (${merge.minSeen}) cannot exceed the merge window (${merge.window} boots; --merge-window, config merge.window)`);
  }

  const blockSize = int('blockSize', 512, 2 * 1024 * 1024);
  if ((blockSize & (blockSize - 1)) !== 0) throw new UsageError(`config: blockSize ${blockSize} is not a power of two`);
  const maintenance = setting('maintenance');
  if (typeof maintenance.value !== 'string') {
    throw new UsageError(`${maintenance.label} must be a cron schedule string or "off", got ${JSON.stringify(maintenance.value)}`);
  }
  if (maintenance.value !== 'off' && !cron.validate(maintenance.value)) {
    throw new UsageError(`${maintenance.label} ${JSON.stringify(maintenance.value)} is not a valid cron schedule (or "off")`);
  }
  const logLevel = setting('logLevel');
  if (typeof logLevel.value !== 'string' || !LOG_LEVELS.includes(logLevel.value as AgentConfig['logLevel'])) {
    throw new UsageError(`${logLevel.label} ${JSON.stringify(logLevel.value)} is not a pino level (${LOG_LEVELS.join(', ')})`);
  }

  const maxConnections = int('maxConnections', 1, 65_536);
  // Unset, the per-client limit follows the configured maxConnections, not the default one.
  const perClient = setting('maxConnectionsPerClient');
  const perClientGiven = fromFlags['max-connections-per-client'] !== undefined || raw.maxConnectionsPerClient !== undefined;
  const maxConnectionsPerClient = perClientGiven ? int('maxConnectionsPerClient', 1, 65_536) : defaultMaxConnectionsPerClient(maxConnections);
  if (maxConnectionsPerClient > maxConnections) {
    throw new UsageError(`${perClient.label} (${maxConnectionsPerClient}) cannot exceed the connection limit (${maxConnections}; --max-connections, config maxConnections)`);
  }

  const config: AgentConfig = {
    storage: str('storage'),
    cache: str('cache'),
    socket: socketPath('socket'),
    control: socketPath('control'),
    cacheSize: size('cacheSize', 16 * 1024 * 1024, Number.MAX_SAFE_INTEGER, 'at least 16M'),
    cacheMisses: bool('cacheMisses'),
    storageDelayMs: num('storageDelayMs', 0, 60_000),
    storageErrorRate: num('storageErrorRate', 0, 1),
    storageRetries: int('storageRetries', 0, 10),
    storageRetryDelayMs: num('storageRetryDelayMs', 1, 10_000),
    storageTimeoutMs: num('storageTimeoutMs', 100, 3_600_000),
    s3PathStyle: bool('s3PathStyle'),
    rawExtensions: extensions(setting('rawExtensions')),
    boot,
    merge,
    prefetchChunk: size('prefetchChunk', 64 * 1024, 256 * 1024 * 1024, 'from 64K to 256M'),
    prefetchDepth: int('prefetchDepth', 1, 64),
    // A floor of 64K per second: a bare "25" (bytes) is a missing suffix, not a pace.
    prefetchRate: size('prefetchRate', 64 * 1024, Number.MAX_SAFE_INTEGER, '0 (unlimited) or at least 64K (bytes per second)', true),
    readahead: size('readahead', 64 * 1024, 32 * 1024 * 1024, '0 (off) or from 64K to 32M', true),
    missWindow: size('missWindow', 8 * 1024, 32 * 1024 * 1024, '0 (off) or from 8K to 32M', true),
    blockSize,
    maintenance: maintenance.value,
    maxConnections,
    maxConnectionsPerClient,
    // At least twice the NBD server's largest request (32 MiB): half the budget is shared, and one request must fit it.
    maxBuffered: size('maxBuffered', 64 * 1024 * 1024, Number.MAX_SAFE_INTEGER, 'at least 64M'),
    socketMode: parseMode(setting('socketMode')),
    logLevel: logLevel.value as AgentConfig['logLevel'],
    warmup: bool('warmup'),
    rebuildQuietMs: num('rebuildQuietMs', 0, 600_000),
    tls: tlsSettings(setting),
  };
  if (realLocation(config.socket) === realLocation(config.control)) {
    // One path cannot be both sockets; at start it would read as "in use by another process".
    throw new UsageError(`${setting('socket').label} and ${setting('control').label} name the same path ${config.socket}`);
  }
  const group = setting('socketGroup');
  if (group.value !== undefined) {
    if (typeof group.value !== 'string' || !/^[A-Za-z0-9_][A-Za-z0-9_.-]*\$?$/.test(group.value)) {
      throw new UsageError(`${group.label} must be a group name or a numeric gid, got ${JSON.stringify(group.value)}`);
    }
    config.socketGroup = group.value;
    config.socketGroupLabel = group.label;
  }
  for (const key of ['s3Endpoint', 's3Region'] as const) {
    const { value, label } = setting(key);
    if (value === undefined) continue;
    if (typeof value !== 'string' || value.length === 0) throw new UsageError(`${label} must be a non-empty string, got ${JSON.stringify(value)}`);
    config[key] = value;
  }
  if (config.s3Endpoint !== undefined && !/^https?:\/\/[^/]/.test(config.s3Endpoint)) {
    throw new UsageError(`${setting('s3Endpoint').label} must be an http:// or https:// URL, got ${JSON.stringify(config.s3Endpoint)}`);
  }
  const metrics = setting('metrics');
  if (metrics.value !== undefined) {
    if (typeof metrics.value !== 'string' || !/:\d+$/.test(metrics.value)) throw new UsageError(`${metrics.label} must be HOST:PORT, got ${JSON.stringify(metrics.value)}`);
    config.metrics = parseListen(metrics.value, metrics.label);
  }
  const listen = setting('listen');
  if (listen.value !== undefined) {
    if (typeof listen.value !== 'string') throw new UsageError(`${listen.label} must be a string HOST:PORT`);
    config.listen = parseListen(listen.value, listen.label);
  }
  return config;
}

/** --tls, --tls-certificates, --tls-verify-peer, --tls-psk: one credential kind, and credentials exactly when TLS is on. */
function tlsSettings(setting: (key: string) => Setting): TlsSettings {
  const mode = setting('tls');
  if (!TLS_MODES.includes(mode.value as TlsMode)) throw new UsageError(`${mode.label} must be off, on or require, got ${JSON.stringify(mode.value)}`);
  const verify = setting('tlsVerifyPeer');
  if (typeof verify.value !== 'boolean') throw new UsageError(`${verify.label} must be true or false, got ${JSON.stringify(verify.value)}`);
  const tls: TlsSettings = { mode: mode.value as TlsMode, verifyPeer: verify.value };
  const certificates = setting('tlsCertificates');
  const psk = setting('tlsPsk');
  for (const [s, key] of [[certificates, 'certificates'], [psk, 'psk']] as const) {
    if (s.value === undefined) continue;
    if (typeof s.value !== 'string' || s.value === '') throw new UsageError(`${s.label} must be a path, got ${JSON.stringify(s.value)}`);
    tls[key] = s.value;
  }
  if (tls.certificates !== undefined && tls.psk !== undefined) {
    throw new UsageError(`${certificates.label} and ${psk.label} are two kinds of credentials: give one`);
  }
  if (tls.mode === 'off') {
    const given = tls.certificates !== undefined ? certificates : tls.psk !== undefined ? psk : tls.verifyPeer ? verify : undefined;
    if (given) throw new UsageError(`${given.label} needs TLS on (--tls on or --tls require)`);
  } else if (tls.certificates === undefined && tls.psk === undefined) {
    throw new UsageError(`${mode.label} ${tls.mode} needs credentials: --tls-certificates DIR (X.509) or --tls-psk FILE`);
  }
  if (tls.verifyPeer && tls.psk !== undefined) throw new UsageError(`${verify.label} checks X.509 client certificates; with ${psk.label} the key itself identifies the client`);
  return tls;
}

const TLS_MODES: readonly TlsMode[] = ['off', 'on', 'require'];

/**
 * Where `path` really is: its parent's real path (so a symlinked directory,
 * "." or ".." reach the same answer as the kernel does) plus its basename.
 * Sockets do not exist yet, so the file itself is not resolved.
 */
function realLocation(path: string): string {
  return join(realDirectory(dirname(path)), basename(path));
}

/** A directory's real path; one not created yet (mkdir -p at start) through its nearest existing ancestor. */
function realDirectory(dir: string): string {
  try {
    return realpathSync.native(dir);
  } catch {
    const up = dirname(dir);
    return up === dir ? resolvePath(dir) : join(realDirectory(up), basename(dir));
  }
}

const DECIMAL = /^\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?\s*$/i;

/** A value as the user wrote it, for messages (JSON.stringify would print Infinity as null). */
function shown(value: unknown): string {
  return typeof value === 'number' ? String(value) : JSON.stringify(value);
}

const LOG_LEVELS: ReadonlyArray<AgentConfig['logLevel']> = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

/** Socket permission bits from octal text ("660", "0o660") or a number (0o660 = 432). */
function parseMode({ value, label }: Setting): number {
  const mode = typeof value === 'string' && /^(?:0o?)?[0-7]{3}$/.test(value) ? parseInt(value.replace(/^0o?/, ''), 8) : value;
  if (typeof mode !== 'number' || !Number.isInteger(mode) || mode < 0 || mode > 0o777) {
    throw new UsageError(`${label} must be octal permission bits such as "660", got ${JSON.stringify(value)}`);
  }
  // Connecting to a unix socket needs write permission: a mode nobody can connect with is a mistake.
  if ((mode & 0o222) === 0) throw new UsageError(`${label} ${mode.toString(8)} lets nobody connect (no write bit)`);
  return mode;
}

/** Raw image name endings, from a list or a comma-separated string: each starts with a dot. */
function extensions(s: { value: unknown; label: string }): string[] {
  const list = typeof s.value === 'string' ? s.value.split(',').map((e) => e.trim()).filter((e) => e !== '') : s.value;
  if (!Array.isArray(list) || list.some((e) => typeof e !== 'string' || !/^\.[A-Za-z0-9._-]+$/.test(e))) {
    throw new UsageError(`${s.label} must be name endings such as .raw,.img, got ${JSON.stringify(s.value)}`);
  }
  return list as string[];
}
