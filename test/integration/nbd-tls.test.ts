/**
 * TLS on the agent's TCP listener, against GnuTLS clients: QEMU's qemu-img
 * and qemu-io with tls-creds-x509 and tls-creds-psk, and libnbd's nbdinfo
 * with an nbds:// URI. Credentials are made by certtool and psktool. Raw
 * clients check what a client gets without TLS under --tls require, and
 * that a client that breaks off its TLS handshake costs only its connection.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../src/agent/agent.js';
import type { AgentConfig } from '../../src/agent/config.js';
import * as P from '../../src/nbd/protocol.js';
import { TlsCredentials, parsePskFile } from '../../src/nbd/server/tls.js';
import { TlsCredentialsError } from '../../src/errors.js';
import { freePort, startTestAgent, waitUntil } from '../helpers/agent.js';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';
import { makePsk, makeX509 } from '../helpers/tls.js';

const MiB = 1024 * 1024;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a client without blocking the event loop: the agent lives in this process. */
function run(cmd: string, args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: 60_000, maxBuffer: 16 * MiB }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : 1;
      resolve({ code, stdout, stderr });
    });
  });
}

async function ok(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** QEMU block options for the export over TCP with TLS credentials `tls0`. */
const nbdOpts = (port: number, name: string): string => `driver=nbd,host=127.0.0.1,port=${port},export=${name},tls-creds=tls0`;

/** qemu-img compare of the image file against the export, through --object `creds`. */
const compare = (creds: string, image: string, port: number): Promise<Run> =>
  run('qemu-img', ['compare', '--object', creds, '--image-opts', `driver=raw,file.driver=file,file.filename=${image}`, `driver=raw,file.${nbdOpts(port, 'disk.raw').replace(/,/g, ',file.')}`]);

/** A raw newstyle client: greeting read, client flags sent; then options one at a time. */
class RawClient {
  private received = Buffer.alloc(0);
  private waiting: (() => void) | null = null;
  closed = false;
  private constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.received = Buffer.concat([this.received, chunk]);
      this.waiting?.();
    });
    socket.on('close', () => {
      this.closed = true;
      this.waiting?.();
    });
    socket.on('error', () => undefined);
  }

  static async connect(port: number): Promise<RawClient> {
    const socket = net.connect({ host: '127.0.0.1', port });
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const c = new RawClient(socket);
    await c.take(18);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES);
    socket.write(flags);
    return c;
  }

  /** Exactly n bytes, or null when the server closes first. */
  async take(n: number): Promise<Buffer | null> {
    while (this.received.length < n) {
      if (this.closed) return null;
      await new Promise<void>((resolve) => (this.waiting = resolve));
      this.waiting = null;
    }
    const out = this.received.subarray(0, n);
    this.received = this.received.subarray(n);
    return out;
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(P.NBD_OPTS_MAGIC, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([header, data]));
  }

  /** One option reply: its type and payload; null when the server closed instead. */
  async reply(): Promise<{ type: number; payload: Buffer } | null> {
    const header = await this.take(20);
    if (header === null) return null;
    const payload = await this.take(header.readUInt32BE(16));
    return payload === null ? null : { type: header.readUInt32BE(12), payload };
  }

  /** Resolves true once the server has closed the connection (within `ms`). */
  async closedWithin(ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    return this.closed;
  }
}

/** NBD_OPT_GO data for `name` with no information requests. */
function goData(name: string): Buffer {
  const n = Buffer.from(name);
  const data = Buffer.alloc(4 + n.length + 2);
  data.writeUInt32BE(n.length, 0);
  n.copy(data, 4);
  return data;
}

let dir: string;
let image: string;
let x509: Awaited<ReturnType<typeof makeX509>>;
let psk: Awaited<ReturnType<typeof makePsk>>;
let wrongPsk: Awaited<ReturnType<typeof makePsk>>;

beforeAll(async () => {
  dir = await tmpDir('bc-tls-');
  const storage = join(dir, 'storage');
  await mkdir(storage);
  image = join(storage, 'disk.raw');
  const data = randomBytes(8 * MiB);
  data.fill(0xab, 1 * MiB, 2 * MiB);
  await writeFile(image, data);
  x509 = await makeX509(join(dir, 'x509'));
  psk = await makePsk(join(dir, 'psk'), 'alice');
  wrongPsk = await makePsk(join(dir, 'psk-wrong'), 'alice');
}, 60_000);

afterAll(async () => {
  await removeTmpDir(dir);
});

async function agentWith(name: string, tls: Record<string, unknown>): Promise<{ agent: Agent; config: AgentConfig; port: number }> {
  const port = await freePort();
  const { agent, config } = await startTestAgent(join(dir, 'storage'), join(dir, name), { listen: `127.0.0.1:${port}`, ...tls });
  return { agent, config, port };
}

describe('TLS with pre-shared keys (--tls require --tls-psk)', () => {
  let agent: Agent;
  let config: AgentConfig;
  let port: number;
  const pskCreds = (): string => `tls-creds-psk,id=tls0,endpoint=client,dir=${psk.dir},username=alice`;

  beforeAll(async () => {
    ({ agent, config, port } = await agentWith('psk-agent', { tls: 'require', tlsPsk: psk.file }));
  });
  afterAll(async () => {
    await agent?.stop();
  });

  it('nbdinfo reads the export over nbds:// with the PSK file', async () => {
    const out = JSON.parse(await ok('nbdinfo', ['--json', `nbds://alice@127.0.0.1:${port}/disk.raw?tls-psk-file=${psk.file}`])) as {
      TLS: boolean;
      exports: Array<{ 'export-name': string; 'export-size': number }>;
    };
    expect(out.TLS).toBe(true);
    expect(out.exports[0]!['export-name']).toBe('disk.raw');
    expect(out.exports[0]!['export-size']).toBe(8 * MiB);
  });

  it('qemu-img compare (tls-creds-psk) finds the export identical to the image', async () => {
    const r = await compare(pskCreds(), image, port);
    expect(r.stdout + r.stderr).toContain('Images are identical');
    expect(r.code).toBe(0);
  });

  it('qemu-io (tls-creds-psk) reads the pattern the image holds', async () => {
    const out = await ok('qemu-io', ['-r', '--object', pskCreds(), '--image-opts', nbdOpts(port, 'disk.raw'), '-c', 'read -P 0xab 1M 1M']);
    expect(out).toContain('read 1048576/1048576 bytes at offset 1048576');
    expect(out).not.toContain('Pattern verification failed');
  });

  it('a plaintext client gets NBD_REP_ERR_TLS_REQD and no export list or data', async () => {
    const c = await RawClient.connect(port);
    c.sendOption(P.NBD_OPT_LIST);
    expect((await c.reply())!.type).toBe(P.NBD_REP_ERR_TLS_REQD);
    c.sendOption(P.NBD_OPT_INFO, goData('disk.raw'));
    expect((await c.reply())!.type).toBe(P.NBD_REP_ERR_TLS_REQD);
    c.sendOption(P.NBD_OPT_GO, goData('disk.raw'));
    expect((await c.reply())!.type).toBe(P.NBD_REP_ERR_TLS_REQD);
    c.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
    expect((await c.reply())!.type).toBe(P.NBD_REP_ERR_TLS_REQD);
    // NBD_OPT_EXPORT_NAME has no error reply: the server closes, sending nothing.
    c.sendOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk.raw'));
    expect(await c.take(1)).toBeNull();
    // And libnbd's own plaintext client is refused too.
    const r = await run('nbdinfo', ['--list', `nbd://127.0.0.1:${port}`]);
    expect(r.code).not.toBe(0);
  });

  it('a wrong key is refused, by nbdinfo and by QEMU, and the right one still works', async () => {
    const before = agent.status().nbd.tlsFailures;
    const r1 = await run('nbdinfo', ['--json', `nbds://alice@127.0.0.1:${port}/disk.raw?tls-psk-file=${wrongPsk.file}`]);
    expect(r1.code).not.toBe(0);
    const r2 = await run('qemu-img', ['info', '--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${wrongPsk.dir},username=alice`, '--image-opts', nbdOpts(port, 'disk.raw')]);
    expect(r2.code).not.toBe(0);
    expect(r2.stderr).toMatch(/TLS/);
    expect(agent.status().nbd.tlsFailures).toBeGreaterThanOrEqual(before + 2);
    expect((await compare(pskCreds(), image, port)).code).toBe(0);
  });

  it('a client that drops the connection in the middle of the TLS handshake costs only its connection', async () => {
    await waitUntil(() => agent.status().nbd.activeConnections === 0, 'earlier connections to close');
    // Acked STARTTLS, then half a ClientHello and gone.
    const dropper = await RawClient.connect(port);
    dropper.sendOption(P.NBD_OPT_STARTTLS);
    expect((await dropper.reply())!.type).toBe(P.NBD_REP_ACK);
    dropper.socket.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]));
    dropper.socket.destroy();
    // Acked STARTTLS and silence: this one holds its connection while others are served.
    const staller = await RawClient.connect(port);
    staller.sendOption(P.NBD_OPT_STARTTLS);
    expect((await staller.reply())!.type).toBe(P.NBD_REP_ACK);
    expect((await compare(pskCreds(), image, port)).code).toBe(0);
    // The staller's is the one left once the dropped one and qemu-img's have closed.
    await waitUntil(() => agent.status().nbd.activeConnections === 1, 'only the stalled connection to stay open');
    expect(staller.closed).toBe(false);
    staller.socket.destroy();
    await waitUntil(() => agent.status().nbd.activeConnections === 0, 'the broken TLS connections to close');
  });

  it('bytes sent after NBD_OPT_STARTTLS before its reply end that connection', async () => {
    const c = await RawClient.connect(port);
    c.sendOption(P.NBD_OPT_STARTTLS);
    c.sendOption(P.NBD_OPT_LIST);
    expect(await c.closedWithin(5_000)).toBe(true);
    expect((await compare(pskCreds(), image, port)).code).toBe(0);
  });

  it('unix socket clients are local and may connect without TLS', async () => {
    const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, `nbd+unix:///disk.raw?socket=${config.socket}`]);
    expect(r.stdout).toContain('Images are identical');
  });
});

describe('TLS with X.509 certificates (--tls-certificates)', () => {
  const x509Creds = (clientDir: string): string => `tls-creds-x509,id=tls0,endpoint=client,dir=${clientDir}`;

  it('--tls require --tls-verify-peer: QEMU with a client certificate reads the export; without one it is refused', async () => {
    const { agent, port } = await agentWith('x509-verify', { tls: 'require', tlsCertificates: x509.server, tlsVerifyPeer: true });
    try {
      const good = await compare(x509Creds(x509.client), image, port);
      expect(good.stdout + good.stderr).toContain('Images are identical');
      const anonymous = await compare(x509Creds(x509.clientNoCert), image, port);
      expect(anonymous.code).not.toBe(0);
      expect(anonymous.stderr).toMatch(/TLS|certificate/i);
      expect(agent.status().nbd.tlsFailures).toBeGreaterThanOrEqual(1);
      const io = await ok('qemu-io', ['-r', '--object', x509Creds(x509.client), '--image-opts', nbdOpts(port, 'disk.raw'), '-c', 'read -P 0xab 1M 64k']);
      expect(io).toContain('read 65536/65536 bytes');
    } finally {
      await agent.stop();
    }
  });

  it('--tls on: TLS clients and plaintext clients are both served', async () => {
    const { agent, port } = await agentWith('x509-on', { tls: 'on', tlsCertificates: x509.server });
    try {
      expect((await compare(x509Creds(x509.clientNoCert), image, port)).stdout).toContain('Images are identical');
      const plain = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, `nbd://127.0.0.1:${port}/disk.raw`]);
      expect(plain.stdout).toContain('Images are identical');
      expect(agent.status().nbd.tlsSessions).toBeGreaterThanOrEqual(1);
    } finally {
      await agent.stop();
    }
  });
});

describe('TLS configuration errors', () => {
  it('missing or malformed credentials stop the start with one line', async () => {
    await expect(startTestAgent(join(dir, 'storage'), join(dir, 'bad-1'), { tls: 'require', tlsCertificates: join(dir, 'nowhere') })).rejects.toThrow(
      /nowhere\/server-cert\.pem: cannot read the server certificate: no such file/,
    );
    const garbage = join(dir, 'garbage.psk');
    await writeFile(garbage, 'alice:not-hex\n');
    await expect(TlsCredentials.load({ mode: 'on', verifyPeer: false, psk: garbage })).rejects.toBeInstanceOf(TlsCredentialsError);
    expect(() => parsePskFile('\n\n', 'f')).toThrow(/holds no key/);
    expect(parsePskFile('alice:0a0b\nbob:ff\n', 'f').get('bob')).toEqual(Buffer.from([0xff]));
  });

  it('flags that contradict each other are refused by name', async () => {
    await expect(startTestAgent(join(dir, 'storage'), join(dir, 'bad-2'), { tls: 'on' })).rejects.toThrow(/tls on needs credentials/);
    await expect(startTestAgent(join(dir, 'storage'), join(dir, 'bad-3'), { tlsPsk: psk.file })).rejects.toThrow(/tlsPsk needs TLS on/);
    await expect(startTestAgent(join(dir, 'storage'), join(dir, 'bad-4'), { tls: 'on', tlsPsk: psk.file, tlsCertificates: x509.server })).rejects.toThrow(/give one/);
    await expect(startTestAgent(join(dir, 'storage'), join(dir, 'bad-5'), { tls: 'maybe' })).rejects.toThrow(/off, on or require/);
  });

  it('listening beyond loopback without TLS logs a warning', async () => {
    const lines: string[] = [];
    const log = pino({ level: 'warn' }, { write: (line: string) => lines.push(line) });
    const port = await freePort();
    const { agent } = await startTestAgent(join(dir, 'storage'), join(dir, 'open-agent'), { listen: `0.0.0.0:${port}` }, log);
    await agent.stop();
    expect(lines.some((l) => /without TLS/.test(l))).toBe(true);
  });
});
