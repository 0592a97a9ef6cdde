/**
 * Many hosts, one bucket: four agents, each with its own cache, on one real
 * Ceph RGW bucket, finish boots of one image at the same moment. The bucket
 * must end with a map and a segment that belong together and verify
 * against the image; every boot counts in the merge; and the storm uploads
 * at most two segments, not four. A second storm with the same boot set
 * uploads none. A fifth, cold host then boots from the published segment.
 */
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { PutObjectCommand, type S3Client } from '@aws-sdk/client-s3';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../src/agent/agent.js';
import type { AgentConfig } from '../../src/agent/config.js';
import { verifySegmentReader } from '../../src/core/verify.js';
import { parseMap } from '../../src/format/map.js';
import { SegmentReader } from '../../src/format/segment.js';
import { openImageFromSource } from '../../src/image/open.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { createS3Client } from '../../src/storage/open.js';
import { S3Storage, parseS3Url } from '../../src/storage/s3.js';
import { exportUri, startTestAgent, waitUntil } from '../helpers/agent.js';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';
import { createTestBucket, deleteTestBucket, ensureRgw } from '../helpers/rgw.js';

const MiB = 1024 * 1024;
const BLOCK = 4096;
const HOSTS = 4;
const rgw = await ensureRgw();
let bucket: string;
let admin: S3Client;
let dir: string;
let image: Buffer;
const agents: Agent[] = [];

/** The boot: 600 blocks common to every host, plus a few of its own (a shifted service start). */
function bootBlocks(host: number): number[] {
  const blocks: number[] = [];
  for (let i = 0; i < 600; i++) blocks.push((i * 13) % 8192);
  for (let i = 0; i < 3; i++) blocks.push(8192 - 1 - host * 7 - i);
  return blocks;
}

async function boot(config: AgentConfig, host: number): Promise<void> {
  const client = await NbdClient.connect(exportUri(config, 'disk.raw'));
  try {
    await Promise.all(
      bootBlocks(host).map(async (b) => {
        const data = await client.read(b * BLOCK, BLOCK);
        expect(data.equals(image.subarray(b * BLOCK, (b + 1) * BLOCK))).toBe(true);
      }),
    );
  } finally {
    await client.close();
  }
}

async function startHost(id: string): Promise<{ agent: Agent; config: AgentConfig }> {
  const started = await startTestAgent(`s3://${bucket}/fleet`, join(dir, id), {
    s3Endpoint: rgw!.endpoint,
    s3PathStyle: true,
    boot: { idleMs: 60_000, windowMs: 600_000, minReads: 1 },
    readahead: 0,
  }, process.env.BC_TEST_LOG ? pino({ level: 'debug', base: { host: id } }) : undefined);
  agents.push(started.agent);
  return started;
}

/** Every host boots at once and closes: each ends its boot and publishes. */
async function storm(hosts: Array<{ agent: Agent; config: AgentConfig }>): Promise<void> {
  const recordedBefore = hosts.map((h) => h.agent.status().counters.boots.recorded);
  await Promise.all(hosts.map((h, i) => boot(h.config, i)));
  await Promise.all(
    hosts.map((h, i) =>
      waitUntil(() => h.agent.status().counters.boots.recorded > recordedBefore[i]!, `host ${i}'s boot to be published`, 120_000).catch((err: unknown) => {
        throw new Error(`${(err as Error).message}: ${JSON.stringify(h.agent.status().counters)}`);
      }),
    ),
  );
  await Promise.all(hosts.map((h) => h.agent.settled()));
}

const publishCounts = (hosts: Array<{ agent: Agent }>) => {
  const total = { maps: 0, segments: 0, segmentsKept: 0, conflicts: 0, repairs: 0 };
  for (const h of hosts) for (const [k, v] of Object.entries(h.agent.status().counters.publish)) total[k as keyof typeof total] += v;
  return total;
};

/** The bucket's map and segment: they belong together and the segment's blocks are the image's. */
async function expectBucketConsistent(): Promise<ReturnType<typeof parseMap>> {
  const storage = new S3Storage(createS3Client({ endpoint: rgw!.endpoint, pathStyle: true }), parseS3Url(`s3://${bucket}/fleet`));
  const map = parseMap(await storage.get('disk.raw.bcmap'));
  const opened = await openImageFromSource(await storage.openSource('disk.raw'), { openRelative: () => Promise.reject(new Error('no backing')) }, {}, ['disk.raw']);
  const reader = await SegmentReader.fromSource(await storage.openSource('disk.raw.bcseg'), { ownsSource: true });
  try {
    expect(reader.mapDigest).toBe(map.mapDigest());
    const report = await verifySegmentReader(opened, map, reader);
    expect(report.ok, report.problems.join('; ')).toBe(true);
  } finally {
    await reader.close();
    await opened.close();
  }
  return map;
}

describe.skipIf(rgw === undefined)('many hosts publishing to one bucket (Ceph RGW)', () => {
  beforeAll(async () => {
    ({ bucket, client: admin } = await createTestBucket(rgw!, 'bc-fleet'));
    dir = await tmpDir('bc-fleet-');
    image = randomBytes(32 * MiB);
    await admin.send(new PutObjectCommand({ Bucket: bucket, Key: 'fleet/disk.raw', Body: image, ContentLength: image.length }));
  });

  afterEach(async () => {
    while (agents.length) await agents.pop()!.stop();
  });

  afterAll(async () => {
    if (rgw === undefined) return;
    await deleteTestBucket(admin, bucket);
    await removeTmpDir(dir);
  });

  it('a storm of boots on four hosts: one consistent map and segment, every boot merged, at most two segment uploads', async () => {
    const hosts = await Promise.all(Array.from({ length: HOSTS }, (_, i) => startHost(`host${i}`)));
    await storm(hosts);
    const first = publishCounts(hosts);
    expect(first.maps).toBe(HOSTS);
    expect(first.segments).toBeLessThanOrEqual(2);
    const map1 = await expectBucketConsistent();
    // Every host's boot counts: the history holds four boots.
    expect(map1.boots).toBe(HOSTS);
    expect(map1.history?.recorded).toBe(HOSTS);
    // Blocks every host read are in the set. A host's own three blocks (read once) are at most
    // in it for the host that published first (its boot alone made the segment, held since).
    expect(map1.bitmap.get(13)).toBe(true);
    const hostsWithOwnBlocks = Array.from({ length: HOSTS }, (_, h) => h).filter((h) => map1.bitmap.get(8192 - 1 - h * 7));
    expect(hostsWithOwnBlocks.length).toBeLessThanOrEqual(1);

    // The same boots again: the boot set does not change, so no segment is uploaded.
    await storm(hosts);
    const second = publishCounts(hosts);
    expect(second.maps - first.maps).toBe(HOSTS);
    expect(second.segments - first.segments).toBe(0);
    const map2 = await expectBucketConsistent();
    expect(map2.boots).toBe(2 * HOSTS);
    console.log(`fleet storm: ${JSON.stringify({ first, second })}`);

    // A cold host boots from the published segment: no block of the boot set needs storage.
    const cold = await startHost('cold');
    const probe = await NbdClient.connect(exportUri(cold.config, 'disk.raw'));
    await waitUntil(() => cold.agent.status().exports.find((e) => e.name === 'disk.raw')?.prefetch?.state === 'done', 'the cold prefetch', 60_000);
    const before = cold.agent.status().counters.storage.readRequests;
    for (let i = 0; i < 600; i++) {
      const b = (i * 13) % 8192;
      expect((await probe.read(b * BLOCK, BLOCK)).equals(image.subarray(b * BLOCK, (b + 1) * BLOCK))).toBe(true);
    }
    await probe.close();
    expect(cold.agent.status().counters.storage.readRequests - before).toBe(0);
  }, 300_000);
});
