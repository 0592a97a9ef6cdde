/**
 * The agent's control socket: a tiny HTTP/JSON API on a unix socket
 * (curl --unix-socket PATH http://agent/status works too).
 *   GET  /status                      -> AgentStatus
 *   POST /mark-booted?export=NAME      -> the ended boot's summary
 *   POST /warm?export=NAME             -> the segment streamed into the cache (WarmResult)
 *   GET  /cache                       -> the cached spaces and their images (CacheListing)
 *   POST /evict?export=NAME            -> the export's cached blocks dropped (EvictResult)
 */
import { rm } from 'node:fs/promises';
import { createServer, request, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { AgentError, BootcacheError, FileNotFoundError, StorageIOError, UsageError } from '../errors.js';
import { ExportNotFoundError } from '../nbd/errors.js';
import { applySocketAccess } from './socket-access.js';
import { claimSocketPath } from '../net/unix-socket-path.js';

export interface ControlHandlers {
  status(): Promise<unknown>;
  markBooted(exportName: string): Promise<unknown>;
  warm(exportName: string): Promise<unknown>;
  cache(): Promise<unknown>;
  evict(exportName: string): Promise<unknown>;
}

export class ControlServer {
  /** `path`: the socket file this server made (and removes at close); undefined for a passed socket. */
  private constructor(private readonly server: Server, readonly path: string | undefined) {}

  /**
   * Listens on `path`, mode 660, in group `gid` when given; or on `fd`, a
   * socket passed by systemd (its unit sets mode and group).
   */
  static async start(path: string, handlers: ControlHandlers, gid?: number, fd?: number): Promise<ControlServer> {
    if (fd === undefined) await claimSocketPath(path);
    const server = createServer((req, res) => {
      void handle(req, res, handlers);
    });
    server.headersTimeout = 10_000;
    server.requestTimeout = 30_000;
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) =>
        reject(new AgentError(`cannot listen on the control socket: ${err.code ?? err.message}`, { file: path })));
      if (fd === undefined) server.listen(path, () => resolve());
      else server.listen({ fd }, () => resolve());
    });
    if (fd !== undefined) return new ControlServer(server, undefined);
    await applySocketAccess(path, 0o660, gid).catch(async (err: unknown) => {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      throw err;
    });
    return new ControlServer(server, path);
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    if (this.path !== undefined) await rm(this.path, { force: true });
  }
}

function exportParam(url: URL, endpoint: string): string {
  const name = url.searchParams.get('export');
  if (!name) throw new UsageError(`${endpoint} needs ?export=NAME`);
  return name;
}

async function handle(req: IncomingMessage, res: ServerResponse, handlers: ControlHandlers): Promise<void> {
  const url = new URL(req.url ?? '/', 'http://agent');
  try {
    let body: unknown;
    if (req.method === 'GET' && url.pathname === '/status') {
      body = await handlers.status();
    } else if (req.method === 'POST' && url.pathname === '/mark-booted') {
      body = await handlers.markBooted(exportParam(url, 'mark-booted'));
    } else if (req.method === 'POST' && url.pathname === '/warm') {
      body = await handlers.warm(exportParam(url, 'warm'));
    } else if (req.method === 'GET' && url.pathname === '/cache') {
      body = await handlers.cache();
    } else if (req.method === 'POST' && url.pathname === '/evict') {
      body = await handlers.evict(exportParam(url, 'evict'));
    } else {
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { code: 'BC_NOT_FOUND', message: `no such endpoint: ${req.method} ${url.pathname}` } }));
      return;
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  } catch (err) {
    const code = err instanceof BootcacheError ? err.code : 'BC_INTERNAL';
    res.writeHead(err instanceof BootcacheError ? 400 : 500, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: { code, message: (err as Error).message } }));
  }
}

/** Calls the agent's control API; errors name the socket and the cause. */
export async function controlRequest<T>(path: string, method: 'GET' | 'POST', url: string, timeoutMs = 10_000): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const req = request({ socketPath: path, method, path: url, timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        let parsed: { error?: { message?: string } } & Record<string, unknown>;
        try {
          parsed = JSON.parse(Buffer.concat(chunks).toString('utf8')) as typeof parsed;
        } catch {
          reject(new AgentError('the agent sent an answer that is not JSON', { file: path }));
          return;
        }
        if (res.statusCode !== 200) reject(controlError(parsed.error, res.statusCode));
        else resolve(parsed as T);
      });
    });
    req.on('timeout', () => req.destroy(new Error(`timed out after ${timeoutMs / 1000} s`)));
    req.on('error', (err: NodeJS.ErrnoException) => {
      const why = err.code === 'ENOENT' || err.code === 'ECONNREFUSED' ? 'is the agent running?' : err.message;
      reject(new AgentError(`cannot reach the agent's control socket (${err.code ?? 'error'}: ${why})`, { file: path }));
    });
    req.end();
  });
}

/**
 * The agent's error answer as the error the agent raised, so the CLI exits
 * with the same code (an unknown export is bad input, not an unreachable agent).
 */
function controlError(error: { code?: string; message?: string } | undefined, status: number | undefined): BootcacheError {
  const message = error?.message ?? `HTTP ${status}`;
  switch (error?.code) {
    case 'BC_EXPORT_NOT_FOUND':
      return new ExportNotFoundError(message);
    case 'BC_USAGE':
      return new UsageError(message);
    case 'BC_NOT_FOUND':
      return new FileNotFoundError(message);
    case 'BC_IO':
    case 'BC_STORAGE_READ':
      return new StorageIOError(message);
    default:
      return new AgentError(message);
  }
}

