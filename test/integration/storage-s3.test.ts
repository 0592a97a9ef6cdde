/**
 * S3Storage against a real Ceph RGW: the Storage contract as the local
 * directory keeps it (stat, ranged reads, atomic put of a buffer and of a
 * stream, sorted listing across pages, one version per open source,
 * backing names relative to the key), and its errors.
 */
import { randomBytes } from 'node:crypto';
import { DeleteObjectCommand, PutObjectCommand, type S3Client } from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConflictError, FileNotFoundError, ImageChangedError, StorageIOError, UsageError } from '../../src/errors.js';
import { createS3Client } from '../../src/storage/open.js';
import { S3Storage, parseS3Url } from '../../src/storage/s3.js';
import { createTestBucket, deleteTestBucket, ensureRgw } from '../helpers/rgw.js';

const MiB = 1024 * 1024;
const rgw = await ensureRgw();
let bucket: string;
let admin: S3Client;
let storage: S3Storage;

describe.skipIf(rgw === undefined)('S3Storage (Ceph RGW)', () => {
  beforeAll(async () => {
    ({ bucket, client: admin } = await createTestBucket(rgw!, 'bc-storage'));
    const client = createS3Client({ endpoint: rgw!.endpoint, pathStyle: true, region: rgw!.region });
    storage = new S3Storage(client, parseS3Url(`s3://${bucket}/root/`), 3);
  });

  afterAll(async () => {
    if (rgw === undefined) return;
    await deleteTestBucket(admin, bucket);
  });

  it('parses s3:// locations and refuses bad ones', () => {
    expect(parseS3Url('s3://images')).toEqual({ bucket: 'images', prefix: '' });
    expect(parseS3Url('s3://images/a/b/')).toEqual({ bucket: 'images', prefix: 'a/b' });
    expect(() => parseS3Url('s3://')).toThrow(UsageError);
    expect(() => parseS3Url('s3://Bad_Bucket/x')).toThrow(/not a valid bucket name/);
    expect(() => parseS3Url('s3://images/a/../b')).toThrow(UsageError);
  });

  it('puts a buffer, stats it and reads ranges of it', async () => {
    const body = randomBytes(3 * MiB + 17);
    const put = await storage.put('disk.raw', body);
    expect(put).toMatchObject({ key: 'disk.raw', size: body.length });
    // The put's answer names the version written (from its response, no HEAD); the stat adds its date.
    expect(await storage.stat('disk.raw')).toMatchObject(put);
    expect(await storage.stat('missing.raw')).toBeUndefined();
    expect((await storage.read('disk.raw', 12345, 70000)).equals(body.subarray(12345, 82345))).toBe(true);
    expect((await storage.get('disk.raw')).equals(body)).toBe(true);
    await expect(storage.get('missing.raw')).rejects.toBeInstanceOf(FileNotFoundError);
  });

  it('puts a stream as a multipart upload with bounded memory', async () => {
    const total = 256 * MiB;
    const piece = randomBytes(MiB);
    async function* chunks(): AsyncIterable<Buffer> {
      for (let i = 0; i < total / MiB; i++) {
        const c = Buffer.from(piece);
        c.writeUInt32BE(i, 0);
        yield c;
      }
    }
    global.gc?.();
    const rssBefore = process.memoryUsage().rss;
    let peak = rssBefore;
    const timer = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 20);
    const st = await storage.put('big.bcseg', chunks()).finally(() => clearInterval(timer));
    console.log(`streamed ${total / MiB} MiB: RSS grew by at most ${((peak - rssBefore) / MiB).toFixed(0)} MiB`);
    expect(st.size).toBe(total);
    // A multipart object's ETag names its part count.
    expect(st.version).toMatch(/-\d+"$/);
    // 8 MiB parts, two in flight: memory does not follow the size streamed.
    expect(peak - rssBefore).toBeLessThan(total / 2);
    const last = await storage.read('big.bcseg', total - MiB, MiB);
    expect(last.readUInt32BE(0)).toBe(total / MiB - 1);
    expect(last.subarray(4).equals(piece.subarray(4))).toBe(true);
  });

  it('conditional puts: create only when absent, replace only the version read', async () => {
    const first = await storage.put('m.bcmap', Buffer.from('one'), { ifVersion: null });
    await expect(storage.put('m.bcmap', Buffer.from('two'), { ifVersion: null })).rejects.toBeInstanceOf(ConflictError);
    const second = await storage.put('m.bcmap', Buffer.from('two'), { ifVersion: first.version });
    await expect(storage.put('m.bcmap', Buffer.from('three'), { ifVersion: first.version })).rejects.toBeInstanceOf(ConflictError);
    expect((await storage.get('m.bcmap')).toString()).toBe('two');
    // Two writers that read the same version: exactly one wins.
    const results = await Promise.allSettled(['a', 'b', 'c'].map((w) => storage.put('m.bcmap', Buffer.from(w), { ifVersion: second.version })));
    expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
    expect(results.filter((r) => r.status === 'rejected').every((r) => (r as PromiseRejectedResult).reason instanceof ConflictError)).toBe(true);
  });

  it('lists sorted keys under the prefix across pages, and nothing outside it', async () => {
    for (const key of ['pool/b.qcow2', 'pool/a.qcow2', 'pool/c.raw', 'pool/sub/d.raw']) await storage.put(key, Buffer.from(key));
    await admin.send(new PutObjectCommand({ Bucket: bucket, Key: 'outside.raw', Body: 'x' }));
    await admin.send(new PutObjectCommand({ Bucket: bucket, Key: 'root/pool/dir-marker/', Body: '' }));
    const listed = await storage.list('pool/');
    expect(listed.map((o) => o.key)).toEqual(['pool/a.qcow2', 'pool/b.qcow2', 'pool/c.raw', 'pool/sub/d.raw']);
    expect((await storage.list()).map((o) => o.key)).not.toContain('outside.raw');
  });

  it('an open source reads only its version: an overwrite or a delete is ImageChangedError', async () => {
    const v1 = randomBytes(MiB);
    await storage.put('v.raw', v1);
    const source = await storage.openSource('v.raw');
    expect((await source.read(0, 4096)).equals(v1.subarray(0, 4096))).toBe(true);
    await storage.put('v.raw', randomBytes(MiB));
    await expect(source.read(4096, 4096)).rejects.toBeInstanceOf(ImageChangedError);
    // Once changed, always changed: no later read returns the new bytes.
    await expect(source.read(0, 4096)).rejects.toBeInstanceOf(ImageChangedError);
    await source.close();

    const other = await storage.openSource('v.raw');
    await expect(other.read(MiB - 1, 2)).rejects.toBeInstanceOf(StorageIOError);
    await admin.send(new DeleteObjectCommand({ Bucket: bucket, Key: 'root/v.raw' }));
    await expect(other.read(0, 4096)).rejects.toThrow(/now deleted/);
    await expect(storage.openSource('v.raw')).rejects.toBeInstanceOf(FileNotFoundError);
  });

  it('resolves backing names relative to the key, never outside the prefix', async () => {
    expect(storage.resolveRelative('pool/top.qcow2', 'base.raw')).toBe('pool/base.raw');
    expect(storage.resolveRelative('pool/sub/top.qcow2', '../base.raw')).toBe('pool/base.raw');
    expect(() => storage.resolveRelative('pool/top.qcow2', '../../x.raw')).toThrow(/lies outside/);
    expect(() => storage.resolveRelative('pool/top.qcow2', '/srv/base.raw')).toThrow(/only names relative/);
    await expect(storage.stat('a//b')).rejects.toThrow(UsageError);
  });

  it('ready() names a missing bucket', async () => {
    const client = createS3Client({ endpoint: rgw!.endpoint, pathStyle: true });
    await expect(new S3Storage(client, parseS3Url(`s3://no-such-${bucket}`)).ready()).rejects.toThrow(/does not exist at http:\/\/127\.0\.0\.1/);
    await expect(storage.ready()).resolves.toBeUndefined();
  });
});
