/**
 * The agent on s3:// storage, against a real Ceph RGW started by the test:
 * a qcow2 overlay and its raw backing file served byte-exact from the
 * bucket (qemu-img compare), a boot recorded and its map and segment
 * published into the bucket, a cold host prefetching that segment, and an
 * object overwritten while a connection stays open (If-Match: that
 * connection never sees a byte of the new version; a new one sees it whole).
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createServer, connect, type AddressInfo, type Socket } from 'node:net';
import { promisify } from 'node:util';
import { GetObjectCommand, PutObjectCommand, type S3Client } from '@aws-sdk/client-s3';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../src/agent/agent.js';
import { parseMap } from '../../src/format/map.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { NbdServerError } from '../../src/nbd/errors.js';
import { exportUri, startTestAgent, waitUntil } from '../helpers/agent.js';
import { cli } from '../helpers/cli.js';
import { qemuImg, removeTmpDir, tmpDir } from '../helpers/qemu.js';
import { createTestBucket, deleteTestBucket, ensureRgw, type RgwCredentials } from '../helpers/rgw.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const CHUNK = 64 * 1024;

const rgw = await ensureRgw();
let client: S3Client;
let dir: string;
let bucket: string;
const agents: Agent[] = [];
let base: Buffer;

function agentOverrides(creds: RgwCredentials, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    s3Endpoint: creds.endpoint,
    s3PathStyle: true,
    s3Region: creds.region,
    boot: { idleMs: 60_000, windowMs: 600_000, minReads: 1 },
    merge: { minSeen: 1, window: 4 },
    ...extra,
  };
}

async function put(key: string, body: Buffer): Promise<void> {
  await client.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: body, ContentLength: body.length }));
}

async function getObject(key: string): Promise<Buffer | undefined> {
  try {
    const out = await client.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
    return Buffer.from(await out.Body!.transformToByteArray());
  } catch {
    return undefined;
  }
}

describe.skipIf(rgw === undefined)('agent on s3:// storage (Ceph RGW)', () => {
  beforeAll(async () => {
    const creds = rgw!;
    // The SDK's credential chain reads these, as it would on a host.
    ({ bucket, client } = await createTestBucket(creds, 'bc-agent'));
    dir = await tmpDir('bc-agent-s3-');
    base = randomBytes(8 * MiB);
    const basePath = join(dir, 'base.raw');
    await import('node:fs/promises').then((fs) => fs.writeFile(basePath, base));
    // The overlay names its backing file relatively, as images in a bucket do.
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(dir, 'top.qcow2')], { cwd: dir });
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 512K', '-c', 'write -P 0xa5 6M 64K', join(dir, 'top.qcow2')]);
    await put('images/base.raw', base);
    await put('images/top.qcow2', await readFile(join(dir, 'top.qcow2')));
    await put('elsewhere/other.raw', randomBytes(64 * 1024));
  }, 120_000);

  afterEach(async () => {
    while (agents.length) await agents.pop()!.stop();
  });

  afterAll(async () => {
    if (rgw === undefined) return;
    await deleteTestBucket(client, bucket);
    await removeTmpDir(dir);
  });

  it('serves a qcow2 overlay and its backing file from the bucket byte-exact, and lists only the prefix', async () => {
    const { agent, config } = await startTestAgent(`s3://${bucket}/images`, join(dir, 'a1'), agentOverrides(rgw!));
    agents.push(agent);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', exportUri(config, 'top.qcow2'), join(dir, 'top.qcow2')]);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', exportUri(config, 'base.raw'), join(dir, 'base.raw')]);
    const { stdout } = await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${config.socket}`], { encoding: 'utf8' });
    const names = (JSON.parse(stdout) as { exports: Array<{ 'export-name': string }> }).exports.map((e) => e['export-name']);
    expect(names.sort()).toEqual(['base.raw', 'top.qcow2']);
  });

  it('records a boot, publishes map and segment into the bucket, and a cold host prefetches them', async () => {
    const first = await startTestAgent(`s3://${bucket}/images`, join(dir, 'b1'), agentOverrides(rgw!));
    agents.push(first.agent);
    const nbd = await NbdClient.connect(exportUri(first.config, 'top.qcow2'));
    for (let i = 0; i < 64; i++) await nbd.read(((i * 37) % 128) * CHUNK, CHUNK);
    await nbd.close();
    await waitUntil(() => first.agent.status().exports.find((e) => e.name === 'top.qcow2')?.lastBoot?.state === 'complete', 'the end of the boot', 60_000);
    await first.agent.settled();
    const mapBytes = await getObject('images/top.qcow2.bcmap');
    const segment = await getObject('images/top.qcow2.bcseg');
    expect(mapBytes).toBeDefined();
    expect(segment).toBeDefined();
    const map = parseMap(mapBytes!);
    expect(map.blocksSet).toBeGreaterThanOrEqual(64 * (CHUNK / 4096));
    await first.agent.stop();
    agents.splice(agents.indexOf(first.agent), 1);

    // A cold host: its own empty cache, the bucket shared. The boot's reads come from the prefetched segment.
    const cold = await startTestAgent(`s3://${bucket}/images`, join(dir, 'b2'), agentOverrides(rgw!));
    agents.push(cold.agent);
    const probe = await NbdClient.connect(exportUri(cold.config, 'top.qcow2'));
    await waitUntil(() => cold.agent.status().exports.find((e) => e.name === 'top.qcow2')?.prefetch?.state === 'done', 'the cold prefetch', 60_000);
    const before = cold.agent.status().counters.storage.readRequests;
    const local = await readFile(join(dir, 'top.qcow2'));
    expect(local.length).toBeGreaterThan(0);
    for (let i = 0; i < 64; i++) {
      const at = ((i * 37) % 128) * CHUNK;
      const data = await probe.read(at, CHUNK);
      const expected = Buffer.from(base.subarray(at, at + CHUNK));
      if (at >= 1 * MiB && at < 1.5 * MiB) expected.fill(0x5a);
      if (at >= 6 * MiB && at < 6 * MiB + 64 * 1024) expected.fill(0xa5);
      expect(data.equals(expected)).toBe(true);
    }
    await probe.close();
    expect(cold.agent.status().counters.storage.readRequests - before).toBe(0);
  });

  it('agent warm streams a published segment into a new host\'s cache before any VM starts', async () => {
    const { agent, config } = await startTestAgent(`s3://${bucket}/images`, join(dir, 'w1'), agentOverrides(rgw!));
    agents.push(agent);
    const warm = await cli('agent', 'warm', 'top.qcow2', '--control', config.control, '--json');
    expect(warm.stderr).toBe('');
    expect(warm.status).toBe(0);
    const result = warm.json as { state: string; blocks: number; blocksLoaded: number; storageBytes: number };
    expect(result.state).toBe('done');
    expect(result.blocksLoaded).toBe(result.blocks);
    expect(result.storageBytes).toBeGreaterThan(0);
    // The first boot on this host is served from the cache: no guest read misses. (The open
    // reads the map and the segment's first MiB, to look for a newer segment.)
    const before = agent.status().counters.guestReads.storage;
    const nbd = await NbdClient.connect(exportUri(config, 'top.qcow2'));
    for (let i = 0; i < 64; i++) await nbd.read(((i * 37) % 128) * CHUNK, CHUNK);
    expect(agent.status().counters.guestReads.storage - before).toBe(0);
    await nbd.close();
    await agent.settled();
    // Again: everything is cached, nothing is read.
    const again = await cli('agent', 'warm', 'top.qcow2', '--control', config.control, '--json');
    expect(again.status).toBe(0);
    expect((again.json as { storageBytes: number }).storageBytes).toBe(0);

    await put('images/noseg.raw', randomBytes(MiB));
    const none = await cli('agent', 'warm', 'noseg.raw', '--control', config.control);
    expect(none.status).toBe(3);
    expect(none.stderr).toMatch(/no map and segment of "noseg.raw" .* published; nothing to warm/);
    const unknown = await cli('agent', 'warm', 'nothere.raw', '--control', config.control);
    expect(unknown.status).toBe(3);
  });

  it('an object overwritten in the bucket while a connection is open: old bytes or EIO on it, the new object on a new one', async () => {
    await put('images/rewrite.raw', base);
    const { agent, config } = await startTestAgent(`s3://${bucket}/images`, join(dir, 'c1'), agentOverrides(rgw!, { readahead: 0, storageRetries: 1 }));
    agents.push(agent);
    const old = await NbdClient.connect(exportUri(config, 'rewrite.raw'));
    const chunks = base.length / CHUNK;
    // The first half read (and cached) before the rewrite.
    for (let i = 0; i < chunks / 2; i++) expect((await old.read(i * CHUNK, CHUNK)).equals(base.subarray(i * CHUNK, (i + 1) * CHUNK))).toBe(true);
    const after = randomBytes(base.length);
    await put('images/rewrite.raw', after);
    const tally = { old: 0, new: 0, mixed: 0, eio: 0 };
    for (let i = 0; i < chunks; i++) {
      const at = i * CHUNK;
      try {
        const data = await old.read(at, CHUNK);
        if (data.equals(base.subarray(at, at + CHUNK))) tally.old++;
        else if (data.equals(after.subarray(at, at + CHUNK))) tally.new++;
        else tally.mixed++;
      } catch (err) {
        if (!(err instanceof NbdServerError) || err.errno !== 'EIO') throw err;
        tally.eio++;
      }
    }
    await old.close();
    expect(tally.new).toBe(0);
    expect(tally.mixed).toBe(0);
    // The uncached half needed storage, whose version is gone: EIO, not bytes of the new object.
    expect(tally.eio).toBe(chunks / 2);
    expect(tally.old).toBe(chunks / 2);

    await waitUntil(() => agent.status().exports.every((e) => e.name !== 'rewrite.raw' || e.connections === 0), 'the old export to close', 20_000);
    const fresh = await NbdClient.connect(exportUri(config, 'rewrite.raw'));
    for (let i = 0; i < chunks; i++) expect((await fresh.read(i * CHUNK, CHUNK)).equals(after.subarray(i * CHUNK, (i + 1) * CHUNK))).toBe(true);
    await fresh.close();
  });

  it('during an outage of the store, cached blocks are served, reads that need it get EIO by --storage-timeout, and it recovers by itself', async () => {
    await put('images/outage.raw', base);
    // The agent reaches RGW through a proxy the test can cut.
    const target = new URL(rgw!.endpoint);
    const sockets = new Set<Socket>();
    let up = true;
    const proxy = createServer((inbound) => {
      if (!up) {
        inbound.destroy();
        return;
      }
      const outbound = connect(Number(target.port), target.hostname);
      for (const s of [inbound, outbound]) {
        sockets.add(s);
        s.on('close', () => sockets.delete(s));
        s.on('error', () => undefined);
      }
      inbound.pipe(outbound).pipe(inbound);
    });
    await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
    const port = (proxy.address() as AddressInfo).port;
    try {
      const { agent, config } = await startTestAgent(
        `s3://${bucket}/images`,
        join(dir, 'e1'),
        agentOverrides(rgw!, { s3Endpoint: `http://127.0.0.1:${port}`, readahead: 0, storageTimeoutMs: 3000 }),
      );
      agents.push(agent);
      const nbd = await NbdClient.connect(exportUri(config, 'outage.raw'));
      const half = base.length / 2;
      for (let at = 0; at < half; at += CHUNK) await nbd.read(at, CHUNK);
      // The outage: connections refused, open ones cut.
      up = false;
      for (const s of sockets) s.destroy();
      const cached = await nbd.read(0, CHUNK);
      expect(cached.equals(base.subarray(0, CHUNK))).toBe(true);
      const started = Date.now();
      await expect(nbd.read(half, CHUNK)).rejects.toMatchObject({ errno: 'EIO' });
      const waited = Date.now() - started;
      expect(waited).toBeLessThan(3000 + 10_000);
      // The store is back: the same read succeeds, with no restart.
      up = true;
      expect((await nbd.read(half, CHUNK)).equals(base.subarray(half, half + CHUNK))).toBe(true);
      await nbd.close();
    } finally {
      up = false;
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => proxy.close(() => resolve()));
    }
  });

  it('refuses a bucket that does not exist, bad credentials and a store that does not answer, each with one line', async () => {
    await expect(startTestAgent(`s3://no-such-bucket-${process.pid}/x`, join(dir, 'd1'), agentOverrides(rgw!))).rejects.toThrow(
      /^storage: bucket "no-such-bucket-\d+" does not exist at http:\/\/127\.0\.0\.1:\d+$/,
    );
    const key = process.env.AWS_SECRET_ACCESS_KEY;
    process.env.AWS_SECRET_ACCESS_KEY = 'wrong';
    try {
      await expect(startTestAgent(`s3://${bucket}/images`, join(dir, 'd2'), agentOverrides(rgw!))).rejects.toThrow(/access to bucket .* denied: check the credentials/);
    } finally {
      process.env.AWS_SECRET_ACCESS_KEY = key;
    }
    // Nothing listens on port 9: connection refused.
    await expect(
      startTestAgent(`s3://${bucket}/images`, join(dir, 'd3'), agentOverrides(rgw!, { s3Endpoint: 'http://127.0.0.1:9', storageTimeoutMs: 2000 })),
    ).rejects.toThrow(/cannot reach the object store at http:\/\/127\.0\.0\.1:9/);
  });
});
