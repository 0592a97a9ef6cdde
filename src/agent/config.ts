/**
 * Agent configuration: from flags, a JSON config file, or both (flags win).
 * Every value is validated here with a one-line error naming the key.
 */
import { readFile } from 'node:fs/promises';
import cron from 'node-cron';
import { UsageError, fromSystemError } from '../errors.js';
import { DEFAULT_MERGE_POLICY, type MergePolicy } from '../format/map.js';
import { DEFAULT_BOOT_POLICY, type BootPolicy } from './boot-recorder.js';
import { DEFAULT_READAHEAD } from './readahead.js';

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
  boot: BootPolicy;
  merge: MergePolicy;
  /** Segment bytes per sequential prefetch read. */
  prefetchChunk: number;
  /** Segment chunks in flight at once (the bounded prefetch buffer). */
  prefetchDepth: number;
  /** Largest sequential readahead window on misses, bytes (0: off); see readahead.ts. */
  readahead: number;
  /** Map block size for recorded boots. */
  blockSize: number;
  /** node-cron schedule for maintenance (cache index compaction), or 'off'. */
  maintenance: string;
  /** NBD connections at once (negotiating or not); see NbdServer's dropOldestNegotiating. */
  maxConnections: number;
  /** Permission bits of the NBD socket (connecting needs write permission). */
  socketMode: number;
  /** Group (name or numeric gid) given both sockets, e.g. the group QEMU runs in. */
  socketGroup?: string;
  logLevel: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
}

export const CONFIG_DEFAULTS: Omit<AgentConfig, 'storage' | 'cache'> = {
  socket: DEFAULT_SOCKET,
  control: DEFAULT_CONTROL,
  cacheSize: 8 * 1024 ** 3,
  cacheMisses: true,
  storageDelayMs: 0,
  storageErrorRate: 0,
  boot: DEFAULT_BOOT_POLICY,
  merge: DEFAULT_MERGE_POLICY,
  // 8 MiB ranged reads, as object stores recommend; 4 in flight keep the 32 MiB
  // buffer of 8 x 4 MiB with half the requests (bench/results/2026-11-27-agent.md).
  prefetchChunk: 8 * 1024 * 1024,
  prefetchDepth: 4,
  readahead: DEFAULT_READAHEAD.maxBytes,
  blockSize: 4096,
  maintenance: '17 3 * * *',
  maxConnections: 128,
  socketMode: 0o660,
  logLevel: 'info',
};

/** Parses sizes like 4096, 64K, 512M, 8G, 1.5GiB. */
export function parseSize(value: string | number, key: string): number {
  if (typeof value === 'number') {
    if (Number.isSafeInteger(value) && value >= 0) return value;
    throw new UsageError(`${key}: ${value} is not a whole number of bytes`);
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$/i.exec(value);
  if (!m) throw new UsageError(`${key}: cannot parse size ${JSON.stringify(value)} (examples: 4096, 64K, 512M, 8G)`);
  const mult = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  const bytes = Math.round(Number(m[1]) * mult);
  if (!Number.isSafeInteger(bytes)) throw new UsageError(`${key}: size ${value} is too large`);
  return bytes;
}

/** Parses HOST:PORT, [v6]:PORT, HOST (default port) or :PORT. */
export function parseListen(value: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*))(?::(\d+))?$/.exec(value.trim());
  if (!m) throw new UsageError(`listen: cannot parse ${JSON.stringify(value)} (expected HOST:PORT)`);
  const host = m[1] ?? (m[2] || '127.0.0.1');
  const port = m[3] === undefined ? DEFAULT_NBD_PORT : Number(m[3]);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new UsageError(`listen: port ${m[3]} is out of range`);
  return { host, port };
}

type Raw = Record<string, unknown>;

const KNOWN_KEYS = new Set([
  'storage', 'cache', 'socket', 'listen', 'control', 'cacheSize', 'cacheMisses', 'storageDelayMs',
  'storageErrorRate', 'boot', 'merge', 'prefetchChunk', 'prefetchDepth', 'readahead', 'blockSize', 'maintenance',
  'maxConnections', 'socketMode', 'socketGroup', 'logLevel',
]);
const KNOWN_BOOT_KEYS = new Set(['idleMs', 'windowMs', 'minReads']);
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

/** Validates and completes a configuration (file values overlaid by flag values). */
export function resolveConfig(fromFile: Raw, fromFlags: Raw): AgentConfig {
  for (const key of Object.keys(fromFile)) {
    if (!KNOWN_KEYS.has(key)) throw new UsageError(`config: unknown key ${JSON.stringify(key)}`);
  }
  const raw: Raw = { ...fromFile };
  for (const [k, v] of Object.entries(fromFlags)) if (v !== undefined) raw[k] = v;

  const str = (key: string, fallback?: string): string => {
    const v = raw[key] ?? fallback;
    if (v === undefined) throw new UsageError(`config: ${key} is required (a path)`);
    if (typeof v !== 'string' || v.length === 0) throw new UsageError(`config: ${key} must be a path (a non-empty string), got ${JSON.stringify(v)}`);
    return v;
  };
  const num = (key: string, value: unknown, min: number, max: number): number => {
    const n = typeof value === 'string' ? Number(value) : value;
    if (typeof n !== 'number' || !Number.isFinite(n) || n < min || n > max) {
      throw new UsageError(`config: ${key} must be a number from ${min} to ${max}, got ${JSON.stringify(value)}`);
    }
    return n;
  };
  const int = (key: string, value: unknown, min: number, max: number): number => {
    const n = num(key, value, min, max);
    if (!Number.isInteger(n)) throw new UsageError(`config: ${key} must be a whole number, got ${JSON.stringify(value)}`);
    return n;
  };
  const bool = (key: string, value: unknown): boolean => {
    if (typeof value !== 'boolean') throw new UsageError(`config: ${key} must be true or false`);
    return value;
  };
  const sub = (key: string, known: Set<string>): Raw => {
    const v = raw[key];
    if (v === undefined) return {};
    if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new UsageError(`config: ${key} must be an object`);
    for (const k of Object.keys(v)) if (!known.has(k)) throw new UsageError(`config: unknown key ${JSON.stringify(`${key}.${k}`)}`);
    return v as Raw;
  };

  const d = CONFIG_DEFAULTS;
  const bootRaw = sub('boot', KNOWN_BOOT_KEYS);
  const mergeRaw = sub('merge', KNOWN_MERGE_KEYS);
  const boot: BootPolicy = {
    idleMs: num('boot.idleMs', bootRaw.idleMs ?? d.boot.idleMs, 100, 3_600_000),
    windowMs: num('boot.windowMs', bootRaw.windowMs ?? d.boot.windowMs, 1_000, 86_400_000),
    minReads: int('boot.minReads', bootRaw.minReads ?? d.boot.minReads, 0, 1e9),
  };
  const merge: MergePolicy = {
    window: int('merge.window', mergeRaw.window ?? d.merge.window, 1, 8),
    minSeen: int('merge.minSeen', mergeRaw.minSeen ?? d.merge.minSeen, 1, 8),
  };
  if (merge.minSeen > merge.window) throw new UsageError('config: merge.minSeen cannot exceed merge.window');

  const blockSize = int('blockSize', raw.blockSize ?? d.blockSize, 512, 2 * 1024 * 1024);
  if ((blockSize & (blockSize - 1)) !== 0) throw new UsageError(`config: blockSize ${blockSize} is not a power of two`);
  const maintenance = raw.maintenance ?? d.maintenance;
  if (typeof maintenance !== 'string') throw new UsageError(`config: maintenance must be a cron schedule string or "off", got ${JSON.stringify(maintenance)}`);
  if (maintenance !== 'off' && !cron.validate(maintenance)) {
    throw new UsageError(`config: maintenance ${JSON.stringify(maintenance)} is not a valid cron schedule (or "off")`);
  }
  const logLevel = (raw.logLevel ?? d.logLevel) as AgentConfig['logLevel'];
  if (!['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].includes(logLevel)) {
    throw new UsageError(`config: logLevel ${JSON.stringify(logLevel)} is not a pino level`);
  }
  const cacheSize = parseSize(raw.cacheSize as string | number ?? d.cacheSize, 'cacheSize');
  if (cacheSize < 16 * 1024 * 1024) throw new UsageError('config: cacheSize must be at least 16M');
  const prefetchChunk = parseSize(raw.prefetchChunk as string | number ?? d.prefetchChunk, 'prefetchChunk');
  if (prefetchChunk < 64 * 1024 || prefetchChunk > 256 * 1024 * 1024) {
    throw new UsageError('config: prefetchChunk must be from 64K to 256M');
  }
  const readahead = parseSize(raw.readahead as string | number ?? d.readahead, 'readahead');
  if (readahead !== 0 && (readahead < 64 * 1024 || readahead > 32 * 1024 * 1024)) {
    throw new UsageError('config: readahead must be 0 (off) or from 64K to 32M');
  }

  const config: AgentConfig = {
    storage: str('storage'),
    cache: str('cache'),
    socket: str('socket', d.socket),
    control: str('control', d.control),
    cacheSize,
    cacheMisses: bool('cacheMisses', raw.cacheMisses ?? d.cacheMisses),
    storageDelayMs: num('storageDelayMs', raw.storageDelayMs ?? d.storageDelayMs, 0, 60_000),
    storageErrorRate: num('storageErrorRate', raw.storageErrorRate ?? d.storageErrorRate, 0, 1),
    boot,
    merge,
    prefetchChunk,
    prefetchDepth: int('prefetchDepth', raw.prefetchDepth ?? d.prefetchDepth, 1, 64),
    readahead,
    blockSize,
    maintenance,
    maxConnections: int('maxConnections', raw.maxConnections ?? d.maxConnections, 1, 65_536),
    socketMode: parseMode(raw.socketMode ?? d.socketMode),
    logLevel,
  };
  if (raw.socketGroup !== undefined) {
    if (typeof raw.socketGroup !== 'string' || !/^[A-Za-z0-9_][A-Za-z0-9_.-]*\$?$/.test(raw.socketGroup)) {
      throw new UsageError(`config: socketGroup must be a group name or a numeric gid, got ${JSON.stringify(raw.socketGroup)}`);
    }
    config.socketGroup = raw.socketGroup;
  }
  if (raw.listen !== undefined) {
    if (typeof raw.listen !== 'string') throw new UsageError('config: listen must be a string HOST:PORT');
    config.listen = parseListen(raw.listen);
  }
  return config;
}

/** Socket permission bits from octal text ("660", "0o660") or a number (0o660 = 432). */
function parseMode(value: unknown): number {
  const mode = typeof value === 'string' && /^(?:0o?)?[0-7]{3}$/.test(value) ? parseInt(value.replace(/^0o?/, ''), 8) : value;
  if (typeof mode !== 'number' || !Number.isInteger(mode) || mode < 0 || mode > 0o777) {
    throw new UsageError(`config: socketMode must be octal permission bits such as "660", got ${JSON.stringify(value)}`);
  }
  // Connecting to a unix socket needs write permission: a mode nobody can connect with is a mistake.
  if ((mode & 0o222) === 0) throw new UsageError(`config: socketMode ${mode.toString(8)} lets nobody connect (no write bit)`);
  return mode;
}
