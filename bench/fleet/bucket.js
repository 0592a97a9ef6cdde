// The bench's Ceph RGW and its bucket. The gateway is a private instance of
// the test RGW (scripts/ceph/rgw.sh with its own state dir and ports, and a
// larger memstore: the shared one's 2 GiB cannot hold the 2 GiB raw image,
// and filling it stops every writer on it), started only when it is not
// running and then stopped at the end; the bucket has a unique name and is
// emptied and deleted afterwards.
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import {
  S3Client, CreateBucketCommand, DeleteBucketCommand, DeleteObjectsCommand, GetObjectCommand,
  ListObjectsV2Command, PutObjectCommand,
} from '@aws-sdk/client-s3';
import { Upload } from '@aws-sdk/lib-storage';
import { run } from '../lib/process.js';

/** Starts RGW unless it answers; sets the AWS_* credentials in process.env (the children inherit them). */
export const RGW_ENV = {
  BOOTCACHE_CEPH_DIR: process.env.BENCH_FLEET_CEPH_DIR ?? '/var/tmp/bootcache-fleet-ceph',
  BOOTCACHE_RGW_PORT: process.env.BENCH_FLEET_RGW_PORT ?? '7481',
  BOOTCACHE_CEPH_MON_PORT: process.env.BENCH_FLEET_MON_PORT ?? '13301',
  BOOTCACHE_CEPH_MEMSTORE_BYTES: String(6 * 2 ** 30),
};

export async function ensureRgw(root) {
  Object.assign(process.env, RGW_ENV);
  const script = join(root, 'scripts/ceph/rgw.sh');
  const wasRunning = (await run('bash', [script, 'status'], { allowFail: true })).code === 0;
  if (!wasRunning) await run('bash', [script, 'start'], { label: 'rgw.sh start' });
  const { stdout } = await run('bash', [script, 'env']);
  for (const m of stdout.matchAll(/^export (AWS_[A-Z_]+)=(.*)$/gm)) process.env[m[1]] = m[2];
  return {
    endpoint: process.env.AWS_ENDPOINT_URL,
    command: `${Object.entries(RGW_ENV).map(([k, v]) => `${k}=${v}`).join(' ')} bash scripts/ceph/rgw.sh start`,
    startedByUs: !wasRunning,
    /** Stops RGW only when this bench started it. */
    release: async () => {
      if (!wasRunning) await run('bash', [script, 'stop'], { label: 'rgw.sh stop', allowFail: true });
    },
  };
}

export function s3Client(endpoint) {
  return new S3Client({ endpoint, forcePathStyle: true, region: process.env.AWS_REGION ?? 'us-east-1' });
}

/** A new bucket named for this run. */
export async function createBucket(client) {
  const name = `bcfleet-${process.pid}-${Date.now().toString(36)}`;
  await client.send(new CreateBucketCommand({ Bucket: name }));
  return name;
}

export async function uploadFile(client, bucket, key, path) {
  const size = (await stat(path)).size;
  const upload = new Upload({ client, params: { Bucket: bucket, Key: key, Body: createReadStream(path), ContentLength: size }, partSize: 64 * 1024 * 1024, queueSize: 4 });
  await upload.done();
  return size;
}

export async function getObject(client, bucket, key) {
  const r = await client.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
  return Buffer.from(await r.Body.transformToByteArray());
}

export async function putObject(client, bucket, key, body) {
  await client.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: body }));
}

export async function listKeys(client, bucket) {
  const keys = [];
  let token;
  do {
    const r = await client.send(new ListObjectsV2Command({ Bucket: bucket, ContinuationToken: token }));
    for (const o of r.Contents ?? []) keys.push({ key: o.Key, size: o.Size, etag: o.ETag });
    token = r.IsTruncated ? r.NextContinuationToken : undefined;
  } while (token);
  return keys;
}

export async function deleteBucket(client, bucket) {
  const keys = await listKeys(client, bucket);
  for (let i = 0; i < keys.length; i += 1000) {
    await client.send(new DeleteObjectsCommand({ Bucket: bucket, Delete: { Objects: keys.slice(i, i + 1000).map((k) => ({ Key: k.key })) } }));
  }
  await client.send(new DeleteBucketCommand({ Bucket: bucket }));
}

/** A presigned GET URL for `endpoint` (boto3, as the nbdkit S3 plugin uses it). */
export async function presignGet(endpoint, bucket, key, expiresS = 6 * 3600) {
  const py = 'import boto3,sys; from botocore.config import Config; '
    + 'c=boto3.client("s3",endpoint_url=sys.argv[1],config=Config(s3={"addressing_style":"path"},signature_version="s3v4")); '
    + 'print(c.generate_presigned_url("get_object",Params={"Bucket":sys.argv[2],"Key":sys.argv[3]},ExpiresIn=int(sys.argv[4])))';
  return (await run('python3', ['-c', py, endpoint, bucket, key, String(expiresS)], { label: 'presign' })).stdout.trim();
}
