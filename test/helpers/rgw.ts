/**
 * A real Ceph RGW (S3) for tests: scripts/ceph/rgw.sh starts a single-node
 * cluster (idempotent, shared by every test file and run), and its `env`
 * command gives the endpoint and credentials.
 */
import { execFile } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { CreateBucketCommand, DeleteBucketCommand, DeleteObjectCommand, ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';

const execFileAsync = promisify(execFile);
const script = fileURLToPath(new URL('../../scripts/ceph/rgw.sh', import.meta.url));
const CEPH_BINARIES = ['ceph', 'ceph-mon', 'ceph-osd', 'radosgw', 'radosgw-admin', 'ceph-authtool', 'monmaptool'];

export interface RgwCredentials {
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  region: string;
}

function onPath(name: string): boolean {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (!dir) continue;
    try {
      accessSync(join(dir, name), constants.X_OK);
      return true;
    } catch {
      // not in this directory
    }
  }
  return false;
}

/** CI, or BOOTCACHE_E2E=1, demands a real RGW: a missing one is a failure, not a skip. */
function demanded(): boolean {
  const ci = process.env.CI;
  return (ci !== undefined && !['', '0', 'false'].includes(ci)) || process.env.BOOTCACHE_E2E === '1';
}

async function rgwScript(command: 'start' | 'env'): Promise<string> {
  try {
    const { stdout } = await execFileAsync('bash', [script, command], { encoding: 'utf8', timeout: 300_000, maxBuffer: 16 * 1024 * 1024 });
    return stdout;
  } catch (err) {
    const e = err as { stderr?: string; message?: string };
    throw new Error(`scripts/ceph/rgw.sh ${command} failed: ${(e.stderr || e.message || '').trim()}`);
  }
}

/**
 * Starts the test RGW (or finds it running) and returns its credentials.
 * Undefined when Ceph is not installed, unless CI or BOOTCACHE_E2E=1 is set:
 * then it throws.
 */
export async function ensureRgw(): Promise<RgwCredentials | undefined> {
  const missing = CEPH_BINARIES.filter((b) => !onPath(b));
  if (missing.length > 0) {
    if (demanded()) {
      throw new Error(`Ceph RGW is required (CI or BOOTCACHE_E2E=1) but ${missing.join(', ')} not installed: run scripts/install-deps.sh`);
    }
    return undefined;
  }
  await rgwScript('start');
  const vars = new Map<string, string>();
  for (const m of (await rgwScript('env')).matchAll(/^export (\w+)=(.*)$/gm)) vars.set(m[1]!, m[2]!);
  const get = (name: string): string => {
    const v = vars.get(name);
    if (!v) throw new Error(`scripts/ceph/rgw.sh env did not print ${name}`);
    return v;
  };
  return {
    endpoint: get('AWS_ENDPOINT_URL'),
    accessKeyId: get('AWS_ACCESS_KEY_ID'),
    secretAccessKey: get('AWS_SECRET_ACCESS_KEY'),
    region: get('AWS_REGION'),
  };
}

/**
 * An S3 client for the test RGW: path-style addressing (no bucket DNS), and
 * checksums only where S3 requires them, since Ceph 16 answers the SDK's
 * default streaming (aws-chunked) checksums with 411 MissingContentLength.
 */
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

/**
 * A fresh bucket for one test file, with the SDK's credential environment
 * set (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) as a host would have it.
 */
export async function createTestBucket(creds: RgwCredentials, prefix: string): Promise<{ bucket: string; client: S3Client }> {
  process.env.AWS_ACCESS_KEY_ID = creds.accessKeyId;
  process.env.AWS_SECRET_ACCESS_KEY = creds.secretAccessKey;
  const client = s3Client(creds);
  const bucket = `${prefix}-${process.pid}-${Date.now().toString(36)}`;
  await client.send(new CreateBucketCommand({ Bucket: bucket }));
  return { bucket, client };
}

/** Deletes every object of the bucket, then the bucket. */
export async function deleteTestBucket(client: S3Client, bucket: string): Promise<void> {
  let token: string | undefined;
  do {
    const page = await client.send(new ListObjectsV2Command({ Bucket: bucket, ContinuationToken: token }));
    for (const o of page.Contents ?? []) await client.send(new DeleteObjectCommand({ Bucket: bucket, Key: o.Key! }));
    token = page.IsTruncated ? page.NextContinuationToken : undefined;
  } while (token !== undefined);
  await client.send(new DeleteBucketCommand({ Bucket: bucket }));
}
