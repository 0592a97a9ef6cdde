/**
 * An in-process agent for end-to-end tests: its own cache, sockets and
 * silent log under `dir`, serving `storage`; stop it with agent.stop().
 */
import { mkdir } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { pino, type Logger } from 'pino';
import { Agent } from '../../src/agent/agent.js';
import { resolveConfig, type AgentConfig } from '../../src/agent/config.js';

export async function startTestAgent(
  storage: string,
  dir: string,
  overrides: Record<string, unknown> = {},
  log: Logger = pino({ level: 'silent' }),
): Promise<{ agent: Agent; config: AgentConfig }> {
  await mkdir(dir, { recursive: true });
  const config = resolveConfig(
    {},
    {
      storage,
      cache: join(dir, 'cache'),
      socket: join(dir, 'nbd.sock'),
      control: join(dir, 'control.sock'),
      cacheSize: '256M',
      prefetchChunk: '1M',
      maintenance: 'off',
      logLevel: 'silent',
      warmup: false,
      ...overrides,
    },
  );
  const agent = new Agent(config, log);
  await agent.start();
  return { agent, config };
}

export const exportUri = (config: AgentConfig, name: string): string => `nbd+unix:///${name}?socket=${config.socket}`;

/** Polls until `check` holds (the server closes exports asynchronously after a client leaves). */
export async function waitUntil(check: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const start = Date.now();
  while (!check()) {
    if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A TCP port nothing listens on now. */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}
