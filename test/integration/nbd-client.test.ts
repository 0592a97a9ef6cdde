import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ByteQueue } from '../../src/nbd/client/byte-queue.js';
import {
  NbdClient,
  NbdConnectError,
  NbdDisconnectedError,
  NbdHandshakeError,
  NbdPool,
  NbdServerError,
  NbdUnknownExportError,
  NbdUriError,
  parseNbdUri,
} from '../../src/nbd/client/index.js';

const dir = mkdtempSync(path.join(tmpdir(), 'bc-nbd-cli-'));
const children: ChildProcess[] = [];
const DATA_SIZE = 8 * 1024 * 1024;
const data = randomBytes(DATA_SIZE);
const dataFile = path.join(dir, 'data.img');
let socketSeq = 0;

function accepts(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.createConnection({ path: socket });
    probe.once('connect', () => { probe.destroy(); resolve(true); });
    probe.once('error', () => resolve(false));
  });
}

/** Starts a server command that listens on a fresh Unix socket; resolves once it accepts connections. */
async function startServer(command: string, args: (socket: string) => string[]): Promise<string> {
  const socket = path.join(dir, `s${socketSeq++}.sock`);
  const child = spawn(command, args(socket), { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => { stderr += chunk.toString(); });
  children.push(child);
  for (let i = 0; i < 200; i++) {
    if (child.exitCode !== null) throw new Error(`${command} exited: ${stderr}`);
    // The socket file appears at bind(), a moment before listen(): probe until it accepts.
    if (existsSync(socket) && (await accepts(socket))) return socket;
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  throw new Error(`${command} did not create ${socket}: ${stderr}`);
}

const qemuNbd = (file: string, name: string, extra: string[] = []): Promise<string> =>
  startServer('qemu-nbd', (socket) => ['-r', '-f', 'raw', '-t', '--socket', socket, '-x', name, ...extra, file]);
const nbdkit = (args: string[]): Promise<string> =>
  startServer('nbdkit', (socket) => ['-f', '--exit-with-parent', '-U', socket, ...args]);

/** A hand-written server for protocol failures real servers will not produce. */
async function fakeServer(onConnection: (socket: net.Socket) => void): Promise<string> {
  const socketPath = path.join(dir, `f${socketSeq++}.sock`);
  const server = net.createServer((socket) => {
    socket.on('error', () => { /* the client may hang up first */ });
    onConnection(socket);
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  afterAll(() => { server.close(); });
  return socketPath;
}

/** S: NBDMAGIC, IHAVEOPT, handshake flags (fixed newstyle + no zeroes). */
function greeting(): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(0x4e42444d41474943n, 0);
  b.writeBigUInt64BE(0x49484156454f5054n, 8);
  b.writeUInt16BE(3, 16);
  return b;
}

/** Calls `handle` with the option numbers the client has sent in full so far, after each chunk. */
function onOptions(s: net.Socket, handle: (options: number[]) => void): void {
  let seen = Buffer.alloc(0);
  s.on('data', (chunk: Buffer) => {
    seen = Buffer.concat([seen, chunk]);
    // Client flags (4), then options of a 16-byte header + data.
    let at = 4;
    const options: number[] = [];
    while (seen.length >= at + 16) {
      const len = seen.readUInt32BE(at + 12);
      if (seen.length < at + 16 + len) break;
      options.push(seen.readUInt32BE(at + 8));
      at += 16 + len;
    }
    handle(options);
  });
}

function optionReply(option: number, type: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(20);
  b.writeBigUInt64BE(0x3e889045565a9n, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(payload.length, 16);
  return Buffer.concat([b, payload]);
}

function infoExport(size: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(0, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(1 | 2, 10);
  return b;
}

/** Answers the greeting and accepts NBD_OPT_GO; then hands every later byte to `afterGo`. */
function acceptingServer(afterGo: (socket: net.Socket, bytes: Buffer) => void): (socket: net.Socket) => void {
  return (socket) => {
    socket.write(greeting());
    let buffered = Buffer.alloc(0);
    let inTransmission = false;
    socket.on('data', (chunk: Buffer) => {
      if (inTransmission) return afterGo(socket, chunk);
      buffered = Buffer.concat([buffered, chunk]);
      // 4 bytes client flags + 16-byte option header + data
      if (buffered.length < 20) return;
      const length = buffered.readUInt32BE(16);
      if (buffered.length < 20 + length) return;
      socket.write(optionReply(7, 3, infoExport(1 << 20)));
      socket.write(optionReply(7, 1));
      inTransmission = true;
      const rest = buffered.subarray(20 + length);
      if (rest.length > 0) afterGo(socket, rest);
    });
  };
}

beforeAll(() => {
  writeFileSync(dataFile, data);
});

afterAll(() => {
  for (const child of children) child.kill('SIGTERM');
  rmSync(dir, { recursive: true, force: true });
});

describe('parseNbdUri', () => {
  it('parses TCP URIs with and without a port', () => {
    expect(parseNbdUri('nbd://example.com/disk')).toEqual({ transport: 'tcp', host: 'example.com', port: 10809, exportName: 'disk' });
    expect(parseNbdUri('nbd://127.0.0.1:10900/a%20b')).toEqual({ transport: 'tcp', host: '127.0.0.1', port: 10900, exportName: 'a b' });
    expect(parseNbdUri('nbd://[::1]:7000/')).toEqual({ transport: 'tcp', host: '::1', port: 7000, exportName: '' });
  });

  it('parses Unix socket URIs', () => {
    expect(parseNbdUri('nbd+unix:///boot?socket=/run/nbd.sock')).toEqual({ transport: 'unix', socket: '/run/nbd.sock', exportName: 'boot' });
    expect(parseNbdUri('nbd+unix://?socket=/s')).toEqual({ transport: 'unix', socket: '/s', exportName: '' });
  });

  it('rejects bad URIs with one-line usage errors', () => {
    for (const bad of ['disk.img', 'http://host/x', 'nbd+unix:///x', 'nbd+unix:///x?socket=/s&tls=1', 'nbds://h/x', 'nbd:///x']) {
      const err = (() => { try { parseNbdUri(bad); } catch (e) { return e; } return undefined; })();
      expect(err, bad).toBeInstanceOf(NbdUriError);
      expect((err as NbdUriError).exitCode).toBe(2);
      expect((err as Error).message).not.toContain('\n');
    }
  });
});

describe('ByteQueue', () => {
  it('takes exact pieces across chunk boundaries', () => {
    const q = new ByteQueue();
    q.push(Buffer.from([1, 2, 3]));
    q.push(Buffer.from([4]));
    q.push(Buffer.from([5, 6, 7, 8]));
    expect(q.take(9)).toBeUndefined();
    expect([...q.take(2)!]).toEqual([1, 2]);
    expect([...q.take(3)!]).toEqual([3, 4, 5]);
    expect(q.length).toBe(3);
    expect([...q.take(3)!]).toEqual([6, 7, 8]);
    expect(q.length).toBe(0);
  });
});

describe('ByteQueue into memory of the caller', () => {
  it('moves what is queued, up to a limit, into a target', () => {
    const q = new ByteQueue();
    q.push(Buffer.from([1, 2, 3]));
    q.push(Buffer.from([4, 5]));
    const target = Buffer.alloc(6);
    expect(q.takeInto(target, 1, 4)).toBe(4);
    expect([...target]).toEqual([0, 1, 2, 3, 4, 0]);
    expect(q.takeInto(target, 5, 10)).toBe(1);
    expect(q.length).toBe(0);
    expect(q.takeInto(target, 0, 3)).toBe(0);
  });

  it('detaches what is left from chunks whose memory is reused', () => {
    const q = new ByteQueue();
    const reused = Buffer.from([1, 2, 3, 4, 5]);
    q.push(reused);
    expect([...q.take(2)!]).toEqual([1, 2]);
    q.detach();
    reused.fill(9);
    expect(q.length).toBe(3);
    expect([...q.take(3)!]).toEqual([3, 4, 5]);
    q.detach();
    expect(q.length).toBe(0);
  });
});

describe('NbdClient against qemu-nbd', () => {
  let socket: string;
  beforeAll(async () => {
    socket = await qemuNbd(dataFile, 'disk');
  });

  it('negotiates with NBD_OPT_GO and reads the file bytes with many reads in flight', async () => {
    const client = await NbdClient.connect(`nbd+unix:///disk?socket=${socket}`);
    try {
      expect(client.info.negotiation).toBe('NBD_OPT_GO');
      expect(client.size).toBe(DATA_SIZE);
      expect(client.info.readOnly).toBe(true);
      const ranges = Array.from({ length: 300 }, (_, i) => {
        const length = 1 + ((i * 7919) % 200_000);
        const offset = (i * 104_729 * 13) % (DATA_SIZE - length);
        return { offset, length };
      });
      ranges.push({ offset: DATA_SIZE - 4096, length: 4096 }, { offset: 0, length: 0 });
      const reads = ranges.map(({ offset, length }) => client.read(offset, length));
      expect(client.inFlight).toBe(ranges.length - 1); // the empty read is never sent
      const results = await Promise.all(reads);
      results.forEach((buf, i) => {
        const { offset, length } = ranges[i]!;
        expect(buf.equals(data.subarray(offset, offset + length)), `read ${i}`).toBe(true);
      });
      expect(client.inFlight).toBe(0);
    } finally {
      await client.close();
    }
  });

  it('reads into a buffer of the caller, and keeps every other result its own', async () => {
    const client = await NbdClient.connect(`nbd+unix:///disk?socket=${socket}`);
    try {
      const into = Buffer.alloc(300_000);
      const a = await client.read(4096, 200_000, into);
      expect(a.buffer).toBe(into.buffer);
      expect(a.equals(data.subarray(4096, 204_096))).toBe(true);
      const b = await client.read(123, 10, into);
      expect(b.equals(data.subarray(123, 133))).toBe(true);
      await expect(client.read(0, 4096, Buffer.alloc(100))).rejects.toThrow(/into a buffer of 100/);
      // Results without `into` survive later reads (the socket's receive buffer is reused).
      const kept = await Promise.all([client.read(0, 70_000), client.read(1_000_000, 300_000)]);
      for (let i = 0; i < 20; i++) await client.read(i * 333_333, 250_000);
      expect(kept[0]!.equals(data.subarray(0, 70_000))).toBe(true);
      expect(kept[1]!.equals(data.subarray(1_000_000, 1_300_000))).toBe(true);
    } finally {
      await client.close();
    }
  });

  it('rejects reads past the end of the export before sending them', async () => {
    const client = await NbdClient.connect(`nbd+unix:///disk?socket=${socket}`);
    try {
      await expect(client.read(DATA_SIZE - 10, 11)).rejects.toThrow(/past the end of the export/);
      expect((await client.read(0, 16)).equals(data.subarray(0, 16))).toBe(true);
    } finally {
      await client.close();
    }
  });

  it('asks about an export with NBD_OPT_INFO without entering transmission', async () => {
    const info = await NbdClient.probe(`nbd+unix:///disk?socket=${socket}`);
    expect(info).toMatchObject({ exportName: 'disk', size: DATA_SIZE, readOnly: true, negotiation: 'NBD_OPT_INFO' });
    await expect(NbdClient.probe(`nbd+unix:///nope?socket=${socket}`)).rejects.toBeInstanceOf(NbdUnknownExportError);
    // qemu-nbd (one client at a time) took the NBD_OPT_ABORT and serves the next client.
    const client = await NbdClient.connect(`nbd+unix:///disk?socket=${socket}`);
    expect((await client.read(0, 16)).equals(data.subarray(0, 16))).toBe(true);
    await client.close();
  });

  it('reports an unknown export by name', async () => {
    const err = await NbdClient.connect(`nbd+unix:///nope?socket=${socket}`).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdUnknownExportError);
    expect((err as NbdUnknownExportError).code).toBe('BC_NBD_UNKNOWN_EXPORT');
    expect((err as Error).message).toMatch(/no export named "nope"/);
    expect((err as Error).message).not.toContain('\n');
  });

  it('works over TCP', async () => {
    const port = await new Promise<number>((resolve) => {
      const probe = net.createServer().listen(0, '127.0.0.1', () => {
        const { port: p } = probe.address() as net.AddressInfo;
        probe.close(() => resolve(p));
      });
    });
    const child = spawn('qemu-nbd', ['-r', '-f', 'raw', '-t', '-b', '127.0.0.1', '-p', String(port), '-x', 'tcpdisk', dataFile], { stdio: 'ignore' });
    children.push(child);
    let client: NbdClient | undefined;
    for (let i = 0; i < 200 && client === undefined; i++) {
      client = await NbdClient.connect(`nbd://127.0.0.1:${port}/tcpdisk`).catch(() => undefined);
      if (client === undefined) await new Promise((resolve) => setTimeout(resolve, 25));
    }
    expect(client).toBeDefined();
    const buf = await client!.read(12345, 65536);
    expect(buf.equals(data.subarray(12345, 12345 + 65536))).toBe(true);
    await client!.close();
    child.kill();
  });
});

describe('NbdClient connection failures', () => {
  it('reports a refused TCP connection', async () => {
    const port = await new Promise<number>((resolve) => {
      const probe = net.createServer().listen(0, '127.0.0.1', () => {
        const { port: p } = probe.address() as net.AddressInfo;
        probe.close(() => resolve(p));
      });
    });
    const err = await NbdClient.connect(`nbd://127.0.0.1:${port}/x`).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdConnectError);
    expect((err as Error).message).toMatch(/cannot connect to nbd:\/\/127\.0\.0\.1:\d+\/x: connection refused/);
    expect((err as NbdConnectError).exitCode).toBe(4);
  });

  it('reports a missing socket', async () => {
    const err = await NbdClient.connect(`nbd+unix:///x?socket=${dir}/missing.sock`).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdConnectError);
    expect((err as Error).message).toMatch(/no such socket/);
  });

  it('rejects a server that is not NBD', async () => {
    const socket = await fakeServer((s) => s.end('SSH-2.0-OpenSSH_9.2\r\n'));
    const err = await NbdClient.connect(`nbd+unix:///x?socket=${socket}`).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdHandshakeError);
    expect((err as Error).message).toMatch(/not an NBD server|closed the connection while sending the greeting/);
  });

  it('reports a refused handshake with the reply name and server message', async () => {
    const socket = await fakeServer((s) => {
      s.write(greeting());
      s.once('data', () => s.write(optionReply(7, 0x8000_0002, Buffer.from('exports are\nlocked'))));
    });
    const err = await NbdClient.connect(`nbd+unix:///x?socket=${socket}`).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdHandshakeError);
    expect((err as Error).message).toMatch(/refused export "x" \(NBD_REP_ERR_POLICY\): exports are locked/);
  });

  it('times out a server that never greets', async () => {
    const socket = await fakeServer(() => { /* silent */ });
    const err = await NbdClient.connect(`nbd+unix:///x?socket=${socket}`, { connectTimeoutMs: 1000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdHandshakeError);
    expect((err as Error).message).toMatch(/no NBD handshake from the server within 1 s/);
  });

  it('refuses an oversized option reply', async () => {
    const socket = await fakeServer((s) => {
      s.write(greeting());
      s.on('data', () => {
        const header = optionReply(7, 3);
        header.writeUInt32BE(0xffff_ff00, 16);
        s.write(header);
      });
    });
    const err = await NbdClient.connect(`nbd+unix:///x?socket=${socket}`).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdHandshakeError);
    expect((err as Error).message).toMatch(/too large/);
  });

  it('probes without an early answer when the server refuses NBD_OPT_INFO by policy', async () => {
    const socket = await fakeServer((s) => {
      s.write(greeting());
      onOptions(s, (options) => {
        // NBD_OPT_INFO (6): refuse it with NBD_REP_ERR_POLICY (2^31 + 2).
        if (options[0] === 6 && !s.destroyed) {
          s.write(optionReply(6, 0x8000_0002));
          s.removeAllListeners('data');
        }
      });
    });
    expect(await NbdClient.probe(`nbd+unix:///x?socket=${socket}`)).toBeUndefined();
  });

  it('falls back to NBD_OPT_EXPORT_NAME when NBD_OPT_GO is unsupported', async () => {
    const socket = await fakeServer((s) => {
      s.write(greeting());
      onOptions(s, (options) => {
        if (options.length === 1 && options[0] === 7 && !s.destroyed) s.write(optionReply(7, 0x8000_0001));
        if (options.length === 2 && options[1] === 1) {
          const reply = Buffer.alloc(10);
          reply.writeBigUInt64BE(4096n, 0);
          reply.writeUInt16BE(1, 8);
          s.write(reply);
          s.removeAllListeners('data');
        }
      });
    });
    const client = await NbdClient.connect(`nbd+unix:///x?socket=${socket}`);
    expect(client.info.negotiation).toBe('NBD_OPT_EXPORT_NAME');
    expect(client.size).toBe(4096);
    await client.close();
  });

  it('fails reads in flight when the server disconnects', async () => {
    const socket = await fakeServer(acceptingServer((s) => s.destroy()));
    const client = await NbdClient.connect(`nbd+unix:///x?socket=${socket}`);
    const reads = [client.read(0, 512), client.read(4096, 512)];
    const results = await Promise.allSettled(reads);
    for (const result of results) {
      expect(result.status).toBe('rejected');
      const reason = (result as PromiseRejectedResult).reason as Error;
      expect(reason).toBeInstanceOf(NbdDisconnectedError);
      expect(reason.message).toMatch(/closed the connection with 2 read\(s\) in flight/);
    }
    await client.close();
  });

  it('fails the connection on a reply with a bad magic', async () => {
    const socket = await fakeServer(acceptingServer((s) => s.write(Buffer.alloc(16, 0xab))));
    const client = await NbdClient.connect(`nbd+unix:///x?socket=${socket}`);
    await expect(client.read(0, 512)).rejects.toThrow(/protocol error: server sent bad reply magic 0xabababab/);
    await client.close();
  });

  it('fails a read the server never answers after the request timeout', async () => {
    const socket = await fakeServer(acceptingServer(() => { /* ignore requests */ }));
    const client = await NbdClient.connect(`nbd+unix:///x?socket=${socket}`, { requestTimeoutMs: 200 });
    await expect(client.read(0, 512)).rejects.toThrow(/no reply to a read of 512 bytes at offset 0 within 0.2 s/);
    await client.close();
  });
});

describe('NbdClient against nbdkit', () => {
  it('reports server error replies by errno name', async () => {
    const socket = await nbdkit(['--filter=error', 'memory', '1M', 'error-pread-rate=100%', 'error-pread=EIO']);
    const client = await NbdClient.connect(`nbd+unix:///?socket=${socket}`);
    const err = await client.read(4096, 512).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdServerError);
    expect((err as NbdServerError).errno).toBe('EIO');
    expect((err as Error).message).toMatch(/server error EIO reading 512 bytes at offset 4096/);
    // The connection survives an error reply.
    await expect(client.read(0, 512)).rejects.toBeInstanceOf(NbdServerError);
    await client.close();
  });

  it('uses NBD_OPT_EXPORT_NAME with a server that is not fixed-newstyle', async () => {
    const socket = await nbdkit(['--mask-handshake=0', 'file', dataFile]);
    const client = await NbdClient.connect(`nbd+unix:///?socket=${socket}`);
    expect(client.info.negotiation).toBe('NBD_OPT_EXPORT_NAME');
    // No NBD_OPT_INFO without fixed newstyle: a probe learns nothing and says so.
    expect(await NbdClient.probe(`nbd+unix:///?socket=${socket}`)).toBeUndefined();
    expect((await client.read(1000, 3000)).equals(data.subarray(1000, 4000))).toBe(true);
    await client.close();
  });

  it('obeys advertised block sizes (aligns small reads, splits large ones)', async () => {
    const socket = await nbdkit([
      '--filter=blocksize-policy', 'file', dataFile,
      'blocksize-minimum=4096', 'blocksize-maximum=65536', 'blocksize-error-policy=error',
    ]);
    const client = await NbdClient.connect(`nbd+unix:///?socket=${socket}`);
    expect(client.info.blockSize).toEqual({ minimum: 4096, preferred: 4096, maximum: 65536 });
    const small = await client.read(5000, 100);
    expect(small.equals(data.subarray(5000, 5100))).toBe(true);
    const large = await client.read(777, 1_000_000);
    expect(large.equals(data.subarray(777, 1_000_777))).toBe(true);
    // Into the caller's buffer: split (aligned) and widened (unaligned) alike.
    const into = Buffer.alloc(1_000_000);
    const aligned = await client.read(8192, 244 * 4096, into);
    expect(aligned.buffer).toBe(into.buffer);
    expect(aligned.equals(data.subarray(8192, 8192 + 244 * 4096))).toBe(true);
    expect((await client.read(777, 1_000_000, into)).equals(data.subarray(777, 1_000_777))).toBe(true);
    await client.close();
  });

  it('spreads reads over several connections when the server allows multi-conn', async () => {
    const socket = await nbdkit(['file', dataFile]);
    const pool = await NbdPool.connect(`nbd+unix:///?socket=${socket}`, { connections: 4 });
    expect(pool.info.canMultiConn).toBe(true);
    expect(pool.connections).toBe(4);
    const reads = Array.from({ length: 64 }, (_, i) => pool.read(i * 65536, 65536));
    const results = await Promise.all(reads);
    results.forEach((buf, i) => expect(buf.equals(data.subarray(i * 65536, (i + 1) * 65536))).toBe(true));
    await pool.close();
  });

  it('keeps one connection when the server does not allow multi-conn', async () => {
    const socket = await qemuNbd(dataFile, 'single');
    const pool = await NbdPool.connect(`nbd+unix:///single?socket=${socket}`, { connections: 4 });
    expect(pool.info.canMultiConn).toBe(false);
    expect(pool.connections).toBe(1);
    await pool.close();
  });
});
