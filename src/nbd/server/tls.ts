/**
 * TLS for NBD connections. A client upgrades a connection with
 * NBD_OPT_STARTTLS during option haggling (doc/proto.md, "TLS support"):
 * the server acks, and the TLS handshake starts on the same socket. The
 * credentials follow QEMU and nbdkit: a directory of X.509 files in QEMU's
 * layout, or a pre-shared-key file as psktool writes it.
 */
import { readFile } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';
import { TlsCredentialsError, TlsHandshakeError } from '../../errors.js';

/** off: no TLS; on: a client may start TLS; require: a TCP client must, before anything else. */
export type TlsMode = 'off' | 'on' | 'require';

export interface TlsSettings {
  mode: TlsMode;
  /** X.509 directory: server-cert.pem, server-key.pem and (for verifyPeer) ca-cert.pem. */
  certificates?: string;
  /** Ask for a client certificate and refuse one that ca-cert.pem did not sign. */
  verifyPeer: boolean;
  /** PSK file: one `username:hexkey` line per client (psktool -u NAME -p FILE). */
  psk?: string;
}

/** QEMU's file names in a tls-creds-x509 directory (docs/system/tls.rst). */
export const X509_FILES = { ca: 'ca-cert.pem', cert: 'server-cert.pem', key: 'server-key.pem' } as const;

/**
 * TLS 1.2 suites for PSK. TLS 1.3 suites need none of these; GnuTLS clients
 * that stop at TLS 1.2 (QEMU's "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK") pick one.
 */
const PSK_CIPHERS = [
  'ECDHE-PSK-CHACHA20-POLY1305', 'DHE-PSK-AES256-GCM-SHA384', 'DHE-PSK-AES128-GCM-SHA256',
  'PSK-AES256-GCM-SHA384', 'PSK-AES128-GCM-SHA256',
].join(':');

/** Longest PSK file accepted: a key line is under 200 bytes, so this is thousands of clients. */
const MAX_PSK_FILE_BYTES = 1024 * 1024;

/** A psktool file: `username:hexkey` per line; blank lines are skipped. */
export function parsePskFile(text: string, file: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/\r$/, '');
    if (line.trim() === '') return;
    const colon = line.lastIndexOf(':');
    const user = colon > 0 ? line.slice(0, colon) : '';
    const hex = colon > 0 ? line.slice(colon + 1) : '';
    if (user === '' || !/^(?:[0-9a-fA-F]{2})+$/.test(hex)) {
      throw new TlsCredentialsError(`line ${i + 1} is not "username:hexkey" (the psktool format)`, { file });
    }
    if (keys.has(user)) throw new TlsCredentialsError(`line ${i + 1}: user ${JSON.stringify(user)} appears twice`, { file });
    keys.set(user, Buffer.from(hex, 'hex'));
  });
  if (keys.size === 0) throw new TlsCredentialsError('holds no key (expected "username:hexkey" lines, as psktool writes)', { file });
  return keys;
}

async function readCredential(file: string, what: string, limit = MAX_PSK_FILE_BYTES): Promise<Buffer> {
  try {
    const bytes = await readFile(file);
    if (bytes.length > limit) throw new TlsCredentialsError(`${what} is larger than ${limit} bytes`, { file });
    return bytes;
  } catch (err) {
    if (err instanceof TlsCredentialsError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : (err as Error).message;
    throw new TlsCredentialsError(`cannot read the ${what}: ${why}`, { file, cause: err });
  }
}

/** Loaded server credentials: upgrades accepted connections to TLS. */
export class TlsCredentials {
  private constructor(
    readonly kind: 'x509' | 'psk',
    /** createSecureContext options: tls.createServer builds its context from them (it takes no SecureContext). */
    private readonly context: tls.SecureContextOptions,
    private readonly verifyPeer: boolean,
    private readonly pskKeys: Map<string, Buffer> | undefined,
  ) {}

  /** Reads and checks the credentials `settings` names; a one-line TlsCredentialsError when they are unusable. */
  static async load(settings: TlsSettings): Promise<TlsCredentials> {
    if (settings.psk !== undefined) {
      const text = (await readCredential(settings.psk, 'PSK file')).toString('utf8');
      const keys = parsePskFile(text, settings.psk);
      const context: tls.SecureContextOptions = { ciphers: `${tls.DEFAULT_CIPHERS}:${PSK_CIPHERS}`, minVersion: 'TLSv1.2' };
      return new TlsCredentials('psk', context, false, keys);
    }
    const dir = settings.certificates;
    if (dir === undefined) throw new TlsCredentialsError('TLS needs --tls-certificates DIR or --tls-psk FILE');
    const cert = await readCredential(join(dir, X509_FILES.cert), 'server certificate');
    const key = await readCredential(join(dir, X509_FILES.key), 'server key');
    const ca = settings.verifyPeer ? await readCredential(join(dir, X509_FILES.ca), 'CA certificate (needed by --tls-verify-peer)') : undefined;
    try {
      const context: tls.SecureContextOptions = { cert, key, ...(ca ? { ca } : {}), minVersion: 'TLSv1.2' };
      // Built once here so that a key that does not match its certificate fails the start, not each client.
      tls.createSecureContext(context);
      return new TlsCredentials('x509', context, settings.verifyPeer, undefined);
    } catch (err) {
      throw new TlsCredentialsError(`the X.509 files do not form a usable credential: ${(err as Error).message}`, { file: dir, cause: err });
    }
  }

  /**
   * Runs the server side of the TLS handshake on `socket` (right after the
   * NBD_REP_ACK to NBD_OPT_STARTTLS). Rejects with TlsHandshakeError when the
   * handshake fails, the peer goes away, or `timeoutMs` passes; the socket is
   * destroyed then.
   */
  upgrade(socket: Socket, timeoutMs: number): Promise<tls.TLSSocket> {
    // Through a tls.Server (one per upgrade, never listening): Node checks a client
    // certificate (requestCert, rejectUnauthorized) only for sockets a server accepted.
    const server = tls.createServer({
      ...this.context,
      requestCert: this.verifyPeer,
      rejectUnauthorized: this.verifyPeer,
      handshakeTimeout: timeoutMs,
      ...(this.pskKeys ? { pskCallback: (_s: tls.TLSSocket, identity: string) => this.pskKeys!.get(identity) ?? null } : {}),
    });
    return new Promise((resolve, reject) => {
      let settled = false;
      const fail = (why: string): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        socket.destroy();
        reject(new TlsHandshakeError(`TLS handshake failed: ${why}`));
      };
      const timer = setTimeout(() => fail(`no handshake within ${timeoutMs / 1000} s`), timeoutMs);
      timer.unref();
      server.once('secureConnection', (secure: tls.TLSSocket) => {
        if (settled) return secure.destroy();
        settled = true;
        clearTimeout(timer);
        resolve(secure);
      });
      // OpenSSL's message spans lines with its source location; its reason ("binder does not verify") says it.
      server.on('tlsClientError', (err: Error & { reason?: string }) => fail(err.reason ?? err.message.split('\n')[0]!));
      socket.once('close', () => fail('the client closed the connection'));
      // A half-open socket (the NBD listener allows them) hides the peer's EOF from the
      // TLS session: a client that leaves mid-handshake would hold it until the timeout.
      socket.allowHalfOpen = false;
      server.emit('connection', socket);
    });
  }
}

/** Whether a listen address is on this host only (no TLS needed to keep it private). */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  return h === 'localhost' || h === '::1' || /^127\./.test(h) || h === '::ffff:127.0.0.1';
}
