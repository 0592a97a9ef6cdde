/**
 * Storage read retries: a read that fails with an I/O error is sent again,
 * a bounded number of times with exponential backoff; a changed image, a
 * read past the end and a missing object are final. End to end: a boot
 * trace replayed through the agent over storage that fails one request in
 * twenty gets no EIO and the right bytes.
 */
import { link, mkdir, open, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../src/agent/agent.js';
import { resolveConfig } from '../../src/agent/config.js';
import { FileNotFoundError, ImageChangedError, StorageIOError, StorageReadError, UsageError } from '../../src/errors.js';
import { readTrace } from '../../src/format/trace.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { NbdServerError } from '../../src/nbd/errors.js';
import { replayTraceFile } from '../../src/replay/replay.js';
import { CountingStorage, FaultyStorage, RetryingStorage, type RetryOptions } from '../../src/storage/filters.js';
import { LocalDirStorage } from '../../src/storage/local.js';
import { exportUri, startTestAgent } from '../helpers/agent.js';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';
import { prng } from '../helpers/random.js';

const TRACE = 'test/data/debian12-minbase-boot-timed.csv';
let root: string;
const agents: Agent[] = [];

beforeAll(async () => {
  root = await tmpDir('bc-retry-');
});

afterEach(async () => {
  while (agents.length) await agents.pop()!.stop();
});

afterAll(async () => {
  await removeTmpDir(root);
});

/**
 * LocalDirStorage over `dir` (holding a.img, 64 KiB), failing the requests
 * for which `fail()` says so, counted, then retried.
 */
async function stack(dir: string, fail: () => boolean, options: Partial<RetryOptions> = {}) {
  await writeFile(join(dir, 'a.img'), Buffer.alloc(65536, 7));
  const local = await LocalDirStorage.open(dir);
  const faulty = new FaultyStorage(local, { errorRate: 0.5, random: () => (fail() ? 0 : 1) });
  const counting = new CountingStorage(faulty);
  const delays: number[] = [];
  const retrying = new RetryingStorage(counting, {
    retries: 3,
    baseDelayMs: 1,
    random: prng(7),
    onRetry: (_key, _attempt, delayMs) => delays.push(delayMs),
    ...options,
  });
  return { retrying, counting, delays };
}

describe('RetryingStorage', () => {
  it('sends a failed read again and returns its bytes', async () => {
    const dir = await tmpDir('bc-retry-unit-');
    let failures = 2;
    const { retrying, counting } = await stack(dir, () => failures-- > 0);
    expect((await retrying.read('a.img', 0, 4096)).equals(Buffer.alloc(4096, 7))).toBe(true);
    expect(counting.counters.readRequests).toBe(3);
    expect(retrying.counters).toEqual({ retries: 2, recovered: 1, failed: 0 });
    // Reads through an open source are retried the same way.
    failures = 1;
    const source = await retrying.openSource('a.img');
    expect((await source.read(4096, 10)).equals(Buffer.alloc(10, 7))).toBe(true);
    await source.close();
    expect(retrying.counters).toEqual({ retries: 3, recovered: 2, failed: 0 });
    await removeTmpDir(dir);
  });

  it('gives up after the last retry, with delays doubling and jittered, bounded', async () => {
    const dir = await tmpDir('bc-retry-unit-');
    const { retrying, counting, delays } = await stack(dir, () => true, { retries: 4, baseDelayMs: 10, maxDelayMs: 40 });
    const err = await retrying.read('a.img', 0, 1).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StorageReadError);
    expect((err as StorageReadError).code).toBe('BC_STORAGE_READ');
    expect(counting.counters.readRequests).toBe(5);
    expect(retrying.counters).toEqual({ retries: 4, recovered: 0, failed: 1 });
    // Steps of 10, 20, 40 and 40 ms (capped), each delay in the upper half of its step.
    const steps = [10, 20, 40, 40];
    expect(delays).toHaveLength(4);
    delays.forEach((d, i) => {
      expect(d).toBeGreaterThanOrEqual(steps[i]! / 2);
      expect(d).toBeLessThanOrEqual(steps[i]!);
    });
    await removeTmpDir(dir);
  });

  it('does not retry a changed file, a read past the end or a missing object', async () => {
    const dir = await tmpDir('bc-retry-unit-');
    const { retrying, counting } = await stack(dir, () => false);
    const source = await retrying.openSource('a.img');
    await expect(source.read(65536 - 10, 11)).rejects.toThrow(StorageIOError);
    await expect(source.read(65536 - 10, 11)).rejects.not.toThrow(StorageReadError);
    await expect(retrying.read('missing.img', 0, 1)).rejects.toThrow(FileNotFoundError);
    // Rewritten in place, same size: the open source refuses to read it.
    const handle = await open(join(dir, 'a.img'), 'r+');
    await handle.write(Buffer.alloc(4096, 9), 0, 4096, 0);
    await handle.close();
    const before = counting.counters.readRequests;
    const err = await source.read(0, 4096).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ImageChangedError);
    expect((err as ImageChangedError).code).toBe('BC_IMAGE_CHANGED');
    expect((err as Error).message).toMatch(/^.*a\.img: changed on storage since it was opened/);
    expect(counting.counters.readRequests).toBe(before + 1);
    // Once changed, every read fails at once, also one that would fit.
    await expect(source.read(0, 1)).rejects.toThrow(ImageChangedError);
    await source.close();
    expect(retrying.counters.retries).toBe(0);
    await removeTmpDir(dir);
  });
});

describe('retry settings', () => {
  const base = { storage: '/srv/images', cache: '/var/cache/bootcache' };
  it('default to 4 retries from 50 ms, and take flags and config keys', () => {
    expect(resolveConfig({}, base)).toMatchObject({ storageRetries: 4, storageRetryDelayMs: 50 });
    expect(resolveConfig({ storageRetries: 0, storageRetryDelayMs: 5 }, base)).toMatchObject({ storageRetries: 0, storageRetryDelayMs: 5 });
    expect(resolveConfig({}, base, { 'storage-retries': 2, 'storage-retry-delay': 100 })).toMatchObject({ storageRetries: 2, storageRetryDelayMs: 100 });
  });

  it('refuse values out of range with the flag named', () => {
    expect(() => resolveConfig({}, base, { 'storage-retries': 11 })).toThrow(/^--storage-retries must be a number from 0 to 10, got 11$/);
    expect(() => resolveConfig({}, base, { 'storage-retries': 1.5 })).toThrow(UsageError);
    expect(() => resolveConfig({ storageRetryDelayMs: 0 }, base)).toThrow(/^config: storageRetryDelayMs must be a number from 1 to 10000, got 0$/);
  });
});

/** A 2 GiB sparse raw image with random bytes wherever the trace reads; returns its path. */
async function traceImage(dir: string): Promise<string> {
  const path = join(dir, 'boot.raw');
  const handle = await open(path, 'w');
  try {
    await handle.truncate(2 ** 31);
    const random = prng(42);
    for await (const event of readTrace(TRACE)) {
      if (event.op !== 'read') continue;
      const data = Buffer.alloc(event.length);
      for (let i = 0; i < data.length; i += 4) data.writeUInt32LE(Math.floor(random() * 2 ** 32), i);
      await handle.write(data, 0, data.length, event.offset);
    }
  } finally {
    await handle.close();
  }
  return path;
}

describe('the agent over storage that fails one read request in twenty', () => {
  it('replays a boot trace with no EIO and the right bytes; with no retries the guest gets EIO', async () => {
    const storage = join(root, 'storage');
    await mkdir(storage, { recursive: true });
    const image = await open(await traceImage(storage), 'r');
    // 6 retries: the default 4 leaves one failed read in 3 million requests, 6 one in 1.3 billion.
    const { agent, config } = await startTestAgent(storage, join(root, 'agent'), {
      storageErrorRate: 0.05,
      storageRetries: 6,
      storageRetryDelayMs: 2,
    });
    agents.push(agent);
    const uri = exportUri(config, 'boot.raw');
    const result = await replayTraceFile(TRACE, { uri, thinkTime: false });
    expect(result.replay.reads).toBe(4060);
    // Every read of the trace again, checked against the image (most are cached now).
    const client = await NbdClient.connect(uri);
    let wrong = 0;
    const reads: Array<Promise<void>> = [];
    for await (const event of readTrace(TRACE)) {
      if (event.op !== 'read') continue;
      const expected = Buffer.alloc(event.length);
      await image.read(expected, 0, event.length, event.offset);
      reads.push(client.read(event.offset, event.length).then((data) => {
        if (!data.equals(expected)) wrong++;
      }));
      if (reads.length >= 8) await reads.shift();
    }
    await Promise.all(reads);
    await client.close();
    await image.close();
    const status = agent.status();
    console.info(`storage retries at --storage-error-rate 0.05: ${JSON.stringify(status.counters.storageRetries)}, ${status.counters.storage.readRequests} requests`);
    expect(wrong).toBe(0);
    expect(status.nbd.readErrors).toBe(0);
    expect(status.counters.storageRetries.retries).toBeGreaterThan(0);
    expect(status.counters.storageRetries.recovered).toBeGreaterThan(0);
    expect(status.counters.storageRetries.failed).toBe(0);

    // The same image without retries, and without the map and segment the first agent published
    // (a prefetch would serve most reads from a few chunk reads): the boot meets an EIO.
    const bareStorage = join(root, 'storage-bare');
    await mkdir(bareStorage, { recursive: true });
    await link(join(storage, 'boot.raw'), join(bareStorage, 'boot.raw'));
    const bare = await startTestAgent(bareStorage, join(root, 'agent-bare'), { storageErrorRate: 0.05, storageRetries: 0 });
    agents.push(bare.agent);
    // Opening the export reads storage too, and fails one time in ten: a client then tries again.
    let err: unknown;
    for (let attempt = 0; attempt < 5 && !(err instanceof NbdServerError); attempt++) {
      err = await replayTraceFile(TRACE, { uri: exportUri(bare.config, 'boot.raw'), thinkTime: false }).catch((e: unknown) => e);
    }
    expect(err).toBeInstanceOf(NbdServerError);
    expect((err as NbdServerError).errno).toBe('EIO');
    expect(bare.agent.status().counters.storageRetries.failed).toBeGreaterThan(0);
  });
});
