#!/usr/bin/env node
// A TCP proxy that adds a round-trip latency D between its clients and one
// server (netem does not work here): every chunk read from either side is
// written to the other D/2 later, in order, so a request/response pays D and
// a stream keeps its throughput. A new connection pays one more D (the TCP
// handshake's round trip) before its first byte reaches the server.
// Counts connections, bytes per direction and HTTP requests (request lines
// at the start of a chunk from a client: a client sends one request per
// write; bodies of PUTs never start with a request line).
//
//   node bench/fleet/delay-proxy.js --target HOST:PORT --delay-ms D [--port P]
//     prints {"port":P} once listening; SIGUSR2 prints the counters as JSON.
// As a module: startDelayProxy() runs it as a child process (its own event
// loop, so the bench's polling never delays the traffic).
import { createServer, connect } from 'node:net';
import { fileURLToPath } from 'node:url';
import { spawn } from 'node:child_process';
import { track, stopChild } from '../lib/process.js';

/** Queued bytes per direction before the source is paused (bounded memory). */
const HIGH_WATER = 16 * 1024 * 1024;
const REQUEST_LINE = /^(GET|HEAD|PUT|POST|DELETE) \S+ HTTP\/1\.[01]\r\n/;

/**
 * Moves chunks from `from` to `to`, each `halfMs` after it arrived, in order.
 * `ready` resolves when `to` may be written (the upstream is connected).
 */
function delayedPipe(from, to, halfMs, ready, count, inspect) {
  const queue = [];
  let queued = 0;
  let timer = null;
  let ended = false;
  let open = false;
  const drain = () => {
    timer = null;
    const now = performance.now();
    while (queue.length && queue[0].due <= now) {
      const { chunk } = queue.shift();
      if (chunk === null) {
        to.end();
        return;
      }
      queued -= chunk.length;
      count(chunk.length);
      to.write(chunk);
    }
    resumeIfRoom();
    schedule();
  };
  const resumeIfRoom = () => {
    if (from.isPaused() && queued + to.writableLength < HIGH_WATER) from.resume();
  };
  to.on('drain', resumeIfRoom);
  const schedule = () => {
    if (!open || timer || !queue.length) return;
    timer = setTimeout(drain, Math.max(0, queue[0].due - performance.now()));
  };
  from.on('data', (chunk) => {
    inspect?.(chunk);
    queue.push({ chunk, due: performance.now() + halfMs });
    queued += chunk.length;
    if (queued >= HIGH_WATER) from.pause();
    schedule();
  });
  from.on('end', () => {
    if (ended) return;
    ended = true;
    queue.push({ chunk: null, due: performance.now() + halfMs });
    schedule();
  });
  ready.then(() => {
    open = true;
    schedule();
  });
}

export function serveDelayProxy({ targetHost, targetPort, delayMs, port = 0 }) {
  const half = delayMs / 2;
  const counters = { connections: 0, active: 0, bytesToServer: 0, bytesToClient: 0, requests: {} };
  const inspect = (chunk) => {
    const m = REQUEST_LINE.exec(chunk.subarray(0, 4096).toString('latin1'));
    if (m) counters.requests[m[1]] = (counters.requests[m[1]] ?? 0) + 1;
  };
  const server = createServer({ noDelay: true, allowHalfOpen: true }, (client) => {
    counters.connections++;
    counters.active++;
    const upstream = connect({ host: targetHost, port: targetPort, noDelay: true, allowHalfOpen: true });
    upstream.pause();
    // The handshake's round trip: a client can send only once the SYN-ACK is
    // back (D), so its first bytes reach the server at 1.5 D at the earliest.
    const connected = new Promise((resolve) => upstream.once('connect', resolve));
    const handshake = new Promise((resolve) => setTimeout(resolve, 1.5 * delayMs));
    const ready = Promise.all([connected, handshake]).then(() => upstream.resume());
    delayedPipe(client, upstream, half, ready, (n) => { counters.bytesToServer += n; }, inspect);
    delayedPipe(upstream, client, half, ready, (n) => { counters.bytesToClient += n; });
    let closed = false;
    const close = () => {
      if (closed) return;
      closed = true;
      counters.active--;
      client.destroy();
      upstream.destroy();
    };
    client.on('error', close);
    upstream.on('error', close);
    client.on('close', () => setTimeout(close, delayMs));
    upstream.on('close', () => setTimeout(close, delayMs));
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve({ server, port: server.address().port, counters }));
  });
}

/** Runs the proxy as a child process; resolves with its port, its counters() and stop(). */
export async function startDelayProxy({ target, delayMs }) {
  const child = track(spawn(process.execPath, [fileURLToPath(import.meta.url), '--target', target, '--delay-ms', String(delayMs)], { stdio: ['ignore', 'pipe', 'inherit'] }), 'delay-proxy');
  const lines = [];
  let waiting = null;
  let buffered = '';
  child.stdout.on('data', (d) => {
    buffered += d.toString('utf8');
    let nl;
    while ((nl = buffered.indexOf('\n')) >= 0) {
      lines.push(JSON.parse(buffered.slice(0, nl)));
      buffered = buffered.slice(nl + 1);
      waiting?.();
    }
  });
  const next = async () => {
    while (!lines.length) {
      if (child.exitCode !== null) throw new Error('delay proxy exited');
      await new Promise((resolve) => { waiting = resolve; setTimeout(resolve, 1000); });
    }
    return lines.shift();
  };
  const { port } = await next();
  return {
    port,
    delayMs,
    endpoint: `http://127.0.0.1:${port}`,
    command: `node bench/fleet/delay-proxy.js --target ${target} --delay-ms ${delayMs}`,
    async counters() {
      child.kill('SIGUSR2');
      return next();
    },
    stop: () => stopChild(child, 5_000),
  };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const arg = (name) => {
    const i = process.argv.indexOf(name);
    return i > 0 ? process.argv[i + 1] : undefined;
  };
  const target = arg('--target');
  const delayMs = Number(arg('--delay-ms'));
  const m = /^(.+):(\d+)$/.exec(target ?? '');
  if (!m || !(delayMs >= 0)) {
    console.error('usage: delay-proxy.js --target HOST:PORT --delay-ms D [--port P]');
    process.exit(2);
  }
  const { port, counters } = await serveDelayProxy({ targetHost: m[1], targetPort: Number(m[2]), delayMs, port: Number(arg('--port') ?? 0) });
  // Quietly, not with bench/lib/process.js's message for the bench itself.
  process.removeAllListeners('SIGTERM');
  process.on('SIGTERM', () => process.exit(0));
  process.on('SIGUSR2', () => process.stdout.write(`${JSON.stringify(counters)}\n`));
  process.stdout.write(`${JSON.stringify({ port })}\n`);
}
