/**
 * The per-client connection limit of the NBD server, with real sockets: TCP
 * clients counted by address, unix clients by the peer process's uid (found
 * through ss and /proc), refusals told to the client and logged, idle
 * connections past the handshake counted, slots given back on close.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { resolveConfig } from '../../src/agent/config.js';
import { parseUnixSockets } from '../../src/nbd/server/client-identity.js';
import { DiskImageExportProvider } from '../../src/nbd/server/export.js';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server/server.js';
import { FileByteSource } from '../../src/image/file-source.js';
import { RawImage } from '../../src/image/raw.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { openRawExport } from '../helpers/nbd-raw.js';

// Async: the server runs in this process.
const run = promisify(execFile);
const dir = mkdtempSync(join(tmpdir(), 'bc-nbd-limit-'));
const imagePath = join(dir, 'disk.raw');
const data = randomBytes(1024 * 1024);
writeFileSync(imagePath, data);
const servers: NbdServer[] = [];
const sockets: net.Socket[] = [];
let seq = 0;

async function startServer(options: NbdServerOptions): Promise<{ server: NbdServer; path: string; port: number; logs: string[] }> {
  const provider = new DiskImageExportProvider({ disk: async () => RawImage.open(await FileByteSource.open(imagePath)) });
  const logs: string[] = [];
  const server = new NbdServer(provider, { logger: (level, msg, fields) => logs.push(`${level} ${msg} ${JSON.stringify(fields ?? {})}`), ...options });
  servers.push(server);
  const path = join(dir, `s${seq++}.sock`);
  await server.listenUnix(path);
  const { port } = await server.listenTcp('127.0.0.1', 0);
  return { server, path, port, logs };
}

async function raw(connect: net.NetConnectOpts): Promise<net.Socket> {
  const { socket } = await openRawExport(connect, 'disk');
  sockets.push(socket);
  return socket;
}

async function waitFor(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; !cond(); i++) {
    if (i > 500) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

afterEach(async () => {
  for (const s of sockets.splice(0)) s.destroy();
  await Promise.all(servers.splice(0).map((s) => s.close()));
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('NBD server: connections per client', () => {
  it('counts TCP clients by address: the third idle connection from 127.0.0.1 is refused with a reason, 127.0.0.2 still gets in', async () => {
    const { server, port, logs } = await startServer({ maxConnections: 8, maxConnectionsPerClient: 2 });
    await raw({ host: '127.0.0.1', port });
    const second = await raw({ host: '127.0.0.1', port });
    // NBD_OPT_GO gets NBD_REP_ERR_POLICY with the reason.
    await expect(NbdClient.connect(`nbd://127.0.0.1:${port}/disk`)).rejects.toThrow(/NBD_REP_ERR_POLICY.*too many connections from 127\.0\.0\.1 \(2 open; the server allows 2 per client\)/);
    // NBD_OPT_EXPORT_NAME has no error reply: a close.
    await expect(openRawExport({ host: '127.0.0.1', port }, 'disk')).rejects.toThrow(/closed/);
    const elsewhere = await raw({ host: '127.0.0.1', port, localAddress: '127.0.0.2' });
    expect(elsewhere.destroyed).toBe(false);
    expect(server.stats.rejectedPerClient).toBe(2);
    expect(logs.filter((l) => l.includes('too many connections from one client'))).toHaveLength(2);
    expect(logs.find((l) => l.includes('too many connections from one client'))).toMatch(/"client":"127\.0\.0\.1".*"maxConnectionsPerClient":2/);
    // A slot comes back when a connection goes.
    second.destroy();
    await waitFor(() => server.stats.activeConnections === 2, 'the close');
    const again = await NbdClient.connect(`nbd://127.0.0.1:${port}/disk`);
    expect((await again.read(4096, 4096)).equals(data.subarray(4096, 8192))).toBe(true);
    await again.close();
  });

  it('counts an IPv4 client on a dual-stack listener by its IPv4 address', async () => {
    const provider = new DiskImageExportProvider({ disk: async () => RawImage.open(await FileByteSource.open(imagePath)) });
    const server = new NbdServer(provider, { maxConnections: 8, maxConnectionsPerClient: 1 });
    servers.push(server);
    const { port } = await server.listenTcp('::', 0);
    await raw({ host: '127.0.0.1', port }); // seen as ::ffff:127.0.0.1
    await expect(NbdClient.connect(`nbd://127.0.0.1:${port}/disk`)).rejects.toThrow(/too many connections from 127\.0\.0\.1 \(1 open/);
    const v6 = await NbdClient.connect(`nbd://[::1]:${port}/disk`); // another client
    await v6.close();
  });

  it('counts unix clients by uid, apart from TCP clients', async () => {
    const { server, path, port } = await startServer({ maxConnections: 8, maxConnectionsPerClient: 2 });
    const uid = process.getuid!();
    await raw({ path });
    await raw({ path });
    await expect(NbdClient.connect(`nbd+unix:///disk?socket=${path}`)).rejects.toThrow(new RegExp(`too many connections from uid ${uid} \\(2 open`));
    // QEMU tries optional options first, then NBD_OPT_GO: every one is refused, and the user sees the reason.
    const qemu = await run('qemu-img', ['info', `nbd+unix:///disk?socket=${path}`]).then(() => '', (err: { stderr: string }) => err.stderr);
    expect(qemu).toMatch(new RegExp(`server reported: too many connections from uid ${uid} \\(2 open; the server allows 2 per client\\)`));
    // The same user over TCP is another client (an address, not a uid).
    const tcp = await NbdClient.connect(`nbd://127.0.0.1:${port}/disk`);
    expect((await tcp.read(0, 512)).equals(data.subarray(0, 512))).toBe(true);
    await tcp.close();
    expect(server.stats.rejectedPerClient).toBe(2);
  });

  it('refuses nothing by default (the library leaves the limit to its user) and at the limit equal to maxConnections', async () => {
    const { server, path } = await startServer({ maxConnections: 4 });
    for (let i = 0; i < 4; i++) await raw({ path });
    expect(server.stats).toMatchObject({ activeConnections: 4, rejectedPerClient: 0 });
  });

  it('rejects a per-client limit above maxConnections', () => {
    const provider = new DiskImageExportProvider({});
    expect(() => new NbdServer(provider, { maxConnections: 4, maxConnectionsPerClient: 5 })).toThrow(/maxConnectionsPerClient must be an integer from 1 to 4/);
  });
});

describe('parseUnixSockets (ss -xpH)', () => {
  it('maps each socket inode to its peer and the pids holding it', () => {
    const text = [
      'u_str ESTAB 0      0      /run/bootcache/nbd.sock 139749 * 139748 users:(("node",pid=15238,fd=21)) ',
      'u_str ESTAB 0      0                               * 139748 * 139749 users:(("qemu",pid=900,fd=20),("qemu",pid=901,fd=20))',
      'u_str ESTAB 0      0      * 5000 * 5001',
      'garbage',
    ].join('\n');
    const sockets = parseUnixSockets(text);
    expect(sockets.get(139749)).toEqual({ peer: 139748, pids: [15238] });
    expect(sockets.get(139748)).toEqual({ peer: 139749, pids: [900, 901] });
    expect(sockets.get(5000)).toEqual({ peer: 5001, pids: [] });
    expect(sockets.size).toBe(3);
  });
});

describe('agent configuration: --max-connections-per-client and --max-buffered', () => {
  const base = { storage: '/srv/images', cache: '/var/cache/bootcache' };

  it('default to half of --max-connections and 256 MiB; flags and keys set them', () => {
    expect(resolveConfig({}, base)).toMatchObject({ maxConnections: 128, maxConnectionsPerClient: 64, maxBuffered: 256 * 1024 * 1024 });
    expect(resolveConfig({ maxConnections: 40 }, base).maxConnectionsPerClient).toBe(20);
    expect(resolveConfig({}, base, { 'max-connections': 2 }).maxConnectionsPerClient).toBe(1);
    expect(resolveConfig({ maxConnectionsPerClient: 5, maxBuffered: '1G' }, base)).toMatchObject({ maxConnectionsPerClient: 5, maxBuffered: 1024 ** 3 });
    expect(resolveConfig({ maxConnectionsPerClient: 5 }, base, { 'max-connections-per-client': 128, 'max-buffered': '512M' }))
      .toMatchObject({ maxConnectionsPerClient: 128, maxBuffered: 512 * 1024 * 1024 });
  });

  it('refuse a per-client limit above the connection limit and a budget under 64M, naming the flag or the key', () => {
    expect(() => resolveConfig({}, base, { 'max-connections-per-client': 129 })).toThrow(/^--max-connections-per-client \(129\) cannot exceed the connection limit \(128/);
    expect(() => resolveConfig({ maxConnectionsPerClient: 0 }, base)).toThrow(/config: maxConnectionsPerClient must be a number from 1/);
    expect(() => resolveConfig({}, base, { 'max-buffered': '32M' })).toThrow(/^--max-buffered must be at least 64M, got "32M"$/);
    expect(() => resolveConfig({ maxBuffered: 'lots' }, base)).toThrow(/config: maxBuffered must be a size/);
  });
});
