// The bootcache agent as a benchmark server: start it, read its status
// straight from the control socket (a CLI process per poll would load the
// host under test), poll until a condition holds, stop it.
import { existsSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { startServer, stopChild } from './process.js';

/** The agent's command line (bin is bin/run.js). */
export function agentArgs({ bin, storage, cache, socket, control, delayMs, cacheSize = '1G', extra = [] }) {
  return [
    bin, 'agent', '--storage', storage, '--cache', cache, '--socket', socket, '--control', control,
    '--storage-delay', String(delayMs), '--cache-size', cacheSize, '--maintenance', 'off', '--log-level', 'warn', ...extra,
  ];
}

/** Starts an agent and waits for both its NBD and its control socket. */
export async function startAgent({ logFile, ...opts }) {
  rmSync(opts.control, { force: true });
  const args = agentArgs(opts);
  const child = await startServer(process.execPath, args, opts.socket, 'agent', logFile);
  // The NBD socket is created before the control socket.
  const deadline = Date.now() + 30_000;
  while (!existsSync(opts.control)) {
    if (Date.now() > deadline) {
      await stopChild(child);
      throw new Error(`agent control socket ${opts.control} missing after 30 s`);
    }
    await sleep(50);
  }
  return {
    kind: 'agent',
    socket: opts.socket,
    control: opts.control,
    uriFor: (exportName) => `nbd+unix:///${exportName}?socket=${opts.socket}`,
    command: `node ${args.join(' ')}`,
    status: () => controlGet(opts.control, '/status'),
    stop: () => stopChild(child),
  };
}

export function exportOf(status, name) {
  return status.exports.find((e) => e.name === name);
}

/** Polls the agent's status until `done(status)` holds. */
export async function pollAgent(agent, done, what, timeoutMs = 300_000) {
  const started = performance.now();
  for (;;) {
    const status = await agent.status();
    if (done(status)) return { status, waitedS: (performance.now() - started) / 1000 };
    if (performance.now() - started > timeoutMs) {
      throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}: ${JSON.stringify(status.exports).slice(0, 2000)}`);
    }
    await sleep(250);
  }
}

function controlGet(socketPath, path) {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path, method: 'GET', timeout: 10_000 }, (res) => {
      const parts = [];
      res.on('data', (d) => parts.push(d));
      res.on('end', () => {
        try {
          resolve(JSON.parse(Buffer.concat(parts).toString('utf8')));
        } catch (err) {
          reject(err);
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error(`agent control ${path}: timeout`)));
    req.on('error', reject);
    req.end();
  });
}
