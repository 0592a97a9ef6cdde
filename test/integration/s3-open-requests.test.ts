/**
 * What opening an export costs on an object store, counted at the wire (a
 * logging proxy in front of a real Ceph RGW): a cold host opening a raw
 * image that has a map and a segment sends no HEAD for it, only one GET
 * each for the image's head and tail samples, the index, the map and the
 * segment's header and tables, then the stream's chunks. Each HEAD saved is
 * a round trip before the prefetch starts.
 */
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { PutObjectCommand, type S3Client } from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client/index.js';
import { exportUri, startTestAgent, waitUntil } from '../helpers/agent.js';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';
import { startRequestLogProxy } from '../helpers/request-log-proxy.js';
import { createTestBucket, deleteTestBucket, ensureRgw } from '../helpers/rgw.js';

const MiB = 1024 * 1024;
const rgw = await ensureRgw();
let client: S3Client;
let bucket: string;
let dir: string;

describe.skipIf(rgw === undefined)('opening an export on an object store', () => {
  beforeAll(async () => {
    ({ bucket, client } = await createTestBucket(rgw!, 'bc-open-req'));
    dir = await tmpDir('bc-s3-open-');
    const body = randomBytes(16 * MiB);
    await client.send(new PutObjectCommand({ Bucket: bucket, Key: 'images/disk.raw', Body: body, ContentLength: body.length }));
  }, 60_000);

  afterAll(async () => {
    if (rgw === undefined) return;
    await deleteTestBucket(client, bucket);
    await removeTmpDir(dir);
  });

  it('a cold host: no HEAD, one GET per sidecar and per image sample, then the segment stream', async () => {
    const overrides = {
      s3Endpoint: rgw!.endpoint,
      s3PathStyle: true,
      s3Region: rgw!.region,
      boot: { idleMs: 60_000, windowMs: 600_000, minReads: 1 },
      merge: { minSeen: 1, window: 4 },
      prefetchChunk: 1 * MiB,
    };
    // A first host records a boot and publishes map and segment.
    const first = await startTestAgent(`s3://${bucket}/images`, join(dir, 'c1'), overrides);
    try {
      const nbd = await NbdClient.connect(exportUri(first.config, 'disk.raw'));
      for (let i = 0; i < 64; i++) await nbd.read(((i * 37) % 256) * 64 * 1024, 4096);
      await nbd.close();
      await waitUntil(() => first.agent.status().exports.find((e) => e.name === 'disk.raw')?.lastBoot?.state === 'complete', 'the end of the boot', 60_000);
      await first.agent.settled();
    } finally {
      await first.agent.stop();
    }

    const proxy = await startRequestLogProxy(rgw!.endpoint);
    const cold = await startTestAgent(`s3://${bucket}/images`, join(dir, 'c2'), { ...overrides, s3Endpoint: proxy.endpoint });
    try {
      const atStart = proxy.requests.length;
      const probe = await NbdClient.connect(exportUri(cold.config, 'disk.raw'));
      await waitUntil(() => cold.agent.status().exports.find((e) => e.name === 'disk.raw')?.prefetch?.state === 'done', 'the cold prefetch', 60_000);
      const opened = proxy.requests.slice(atStart);
      const on = (suffix: string) => opened.filter((r) => r.path === `/${bucket}/images/disk.raw${suffix}`);
      expect(opened.filter((r) => r.method !== 'GET')).toEqual([]);
      expect(on('').map((r) => r.range)).toEqual(['bytes=0-65535', `bytes=${16 * MiB - 65536}-${16 * MiB - 1}`]);
      expect(on('.bcidx')).toHaveLength(1);
      expect(on('.bcmap')).toHaveLength(1);
      const segment = on('.bcseg');
      const status = cold.agent.status().exports.find((e) => e.name === 'disk.raw')!;
      // The header and tables with the open, then the data in chunks of 1 MiB (the last one shorter).
      expect(segment[0]!.range).toBe('bytes=0-1048575');
      expect(segment.length - 1).toBe(Math.ceil(status.prefetch!.bytesRead / MiB));
      expect(opened.length).toBe(2 + 1 + 1 + segment.length);
      await probe.close();
    } finally {
      await cold.agent.stop();
      await proxy.close();
    }
  }, 120_000);
});
