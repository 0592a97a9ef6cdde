/**
 * TLS credentials for tests, made with GnuTLS's own tools: certtool for an
 * X.509 CA, server and client certificates (QEMU's directory layout), and
 * psktool for pre-shared keys.
 */
import { execFile } from 'node:child_process';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

const exec = promisify(execFile);

async function certtool(cwd: string, args: string[]): Promise<void> {
  await exec('certtool', args, { cwd });
}

/**
 * Writes, under `dir`: `ca/` (ca-cert.pem, ca-key.pem), `server/` (ca-cert.pem,
 * server-cert.pem, server-key.pem) and `client/` (ca-cert.pem, client-cert.pem,
 * client-key.pem), the layouts QEMU's tls-creds-x509 reads. The server
 * certificate names localhost and 127.0.0.1.
 */
export async function makeX509(dir: string): Promise<{ ca: string; server: string; client: string; clientNoCert: string }> {
  const ca = join(dir, 'ca');
  const server = join(dir, 'server');
  const client = join(dir, 'client');
  const clientNoCert = join(dir, 'client-no-cert');
  for (const d of [ca, server, client, clientNoCert]) await mkdir(d, { recursive: true });
  await writeFile(join(ca, 'ca.info'), 'cn = bootcache test CA\nca\ncert_signing_key\nexpiration_days = 30\n');
  await certtool(ca, ['--generate-privkey', '--outfile', 'ca-key.pem']);
  await certtool(ca, ['--generate-self-signed', '--load-privkey', 'ca-key.pem', '--template', 'ca.info', '--outfile', 'ca-cert.pem']);
  const sign = async (where: string, name: string, template: string): Promise<void> => {
    await writeFile(join(where, `${name}.info`), template);
    await certtool(where, ['--generate-privkey', '--outfile', `${name}-key.pem`]);
    await certtool(where, [
      '--generate-certificate', '--load-privkey', `${name}-key.pem`, '--load-ca-certificate', join(ca, 'ca-cert.pem'),
      '--load-ca-privkey', join(ca, 'ca-key.pem'), '--template', `${name}.info`, '--outfile', `${name}-cert.pem`,
    ]);
  };
  await sign(server, 'server', 'organization = bootcache\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 30\n');
  await sign(client, 'client', 'organization = bootcache\ncn = test-client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 30\n');
  const caCert = await readFile(join(ca, 'ca-cert.pem'));
  for (const d of [server, client, clientNoCert]) await writeFile(join(d, 'ca-cert.pem'), caCert);
  return { ca, server, client, clientNoCert };
}

/**
 * A psktool key file for `user` in `dir`/keys.psk (the name QEMU's
 * tls-creds-psk looks for in its dir). Returns the file and the hex key.
 */
export async function makePsk(dir: string, user: string): Promise<{ dir: string; file: string; key: string }> {
  await mkdir(dir, { recursive: true });
  const file = join(dir, 'keys.psk');
  await exec('psktool', ['-u', user, '-p', file]);
  const key = (await readFile(file, 'utf8')).trim().split(':').pop()!;
  return { dir, file, key };
}
