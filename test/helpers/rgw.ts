/**
 * The real Ceph RGW the object-store tests run against, started by
 * scripts/ceph/rgw.sh (idempotent: the first test file starts it, the others
 * find it answering). Without Ceph installed the tests skip, except under CI
 * or BOOTCACHE_E2E=1, where a missing RGW fails them.
 */
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { S3Client } from '@aws-sdk/client-s3';

export interface RgwCredentials {
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  region: string;
}

const script = fileURLToPath(new URL('../../scripts/ceph/rgw.sh', import.meta.url));

function sh(args: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile('bash', [script, ...args], { encoding: 'utf8', timeout: 300_000 }, (error, stdout, stderr) => {
      resolve({ status: error ? (typeof error.code === 'number' ? error.code : -1) : 0, stdout, stderr });
    });
  });
}

const required = (): boolean => (process.env.CI !== undefined && !['', '0', 'false'].includes(process.env.CI)) || process.env.BOOTCACHE_E2E === '1';

async function cephInstalled(): Promise<boolean> {
  return new Promise((resolve) => execFile('sh', ['-c', 'command -v radosgw && command -v ceph-mon && command -v ceph-osd'], (err) => resolve(!err)));
}

/** Starts (or finds) the RGW; undefined when Ceph is not installed and not required. */
export async function ensureRgw(): Promise<RgwCredentials | undefined> {
  if (!(await cephInstalled())) {
    if (required()) throw new Error('Ceph (ceph-mon, ceph-osd, radosgw) is not installed: run bash scripts/install-deps.sh');
    return undefined;
  }
  const started = await sh(['start']);
  if (started.status !== 0) throw new Error(`scripts/ceph/rgw.sh start failed:\n${started.stderr}`);
  const env = await sh(['env']);
  const vars = Object.fromEntries([...env.stdout.matchAll(/^export (\w+)=(.*)$/gm)].map((m) => [m[1]!, m[2]!]));
  return {
    endpoint: vars.AWS_ENDPOINT_URL!,
    accessKeyId: vars.AWS_ACCESS_KEY_ID!,
    secretAccessKey: vars.AWS_SECRET_ACCESS_KEY!,
    region: vars.AWS_REGION!,
  };
}

/** An SDK client for the RGW, configured as RGW needs (path style; checksums only where required). */
export function s3Client(creds: RgwCredentials): S3Client {
  return new S3Client({
    endpoint: creds.endpoint,
    region: creds.region,
    forcePathStyle: true,
    credentials: { accessKeyId: creds.accessKeyId, secretAccessKey: creds.secretAccessKey },
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
  });
}
