/**
 * An image rewritten in place while a connection stays open: that
 * connection gets the version it opened (cached blocks) or EIO, never a
 * byte of the new version; a connection opened after the change gets the
 * new version whole. Raw, qcow2, and a qcow2 overlay whose backing file is
 * rewritten, through the real agent over NBD.
 */
import { randomBytes } from 'node:crypto';
import { chmod, mkdir, open, readFile, rename, stat, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../src/agent/agent.js';
import type { AgentConfig } from '../../src/agent/config.js';
import { ImageChangedError } from '../../src/errors.js';
import { FileByteSource } from '../../src/image/file-source.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { NbdServerError } from '../../src/nbd/errors.js';
import { exportUri, startTestAgent, waitUntil } from '../helpers/agent.js';
import { convertToRaw, qemuImg, qemuIo, removeTmpDir, tmpDir } from '../helpers/qemu.js';
import { prng } from '../helpers/random.js';

const MiB = 1024 * 1024;
const CHUNK = 64 * 1024;
let root: string;
const agents: Agent[] = [];

beforeAll(async () => {
  root = await tmpDir('bc-rewrite-');
});

afterEach(async () => {
  while (agents.length) await agents.pop()!.stop();
});

afterAll(async () => {
  await removeTmpDir(root);
});

interface Tally {
  /** Chunks equal to the version the connection opened. */
  old: number;
  /** Chunks equal to the new version only: must stay 0 on an old connection. */
  new: number;
  /** Chunks equal to neither: bytes of both versions in one chunk. */
  mixed: number;
  /** Chunks answered with EIO. */
  eio: number;
}

const emptyTally = (): Tally => ({ old: 0, new: 0, mixed: 0, eio: 0 });

/** Reads chunk `i` and counts which version it is. */
async function classify(client: NbdClient, i: number, before: Buffer, after: Buffer, tally: Tally): Promise<void> {
  const at = i * CHUNK;
  let data: Buffer;
  try {
    data = await client.read(at, CHUNK);
  } catch (err) {
    if (err instanceof NbdServerError && err.errno === 'EIO') {
      tally.eio++;
      return;
    }
    throw err;
  }
  if (data.equals(before.subarray(at, at + CHUNK))) tally.old++;
  else if (data.equals(after.subarray(at, at + CHUNK))) tally.new++;
  else tally.mixed++;
}

/** Every chunk of the disk, `parallel` reads at a time, in `order`; `onRead` after each with the count done. */
async function readChunks(
  client: NbdClient,
  order: number[],
  before: Buffer,
  after: Buffer,
  parallel = 4,
  onRead?: (done: number) => void,
): Promise<Tally> {
  const tally = emptyTally();
  let next = 0;
  let done = 0;
  const worker = async (): Promise<void> => {
    while (next < order.length) {
      await classify(client, order[next++]!, before, after, tally);
      onRead?.(++done);
    }
  };
  await Promise.all(Array.from({ length: parallel }, worker));
  return tally;
}

const range = (n: number): number[] => Array.from({ length: n }, (_, i) => i);

/** Writes `data` over the file at `path` from offset 0, in place (same inode, same size), `piece` bytes per write, `pauseMs` between writes. */
async function rewriteInPlace(path: string, data: Buffer, piece = MiB, pauseMs = 0): Promise<void> {
  expect((await stat(path)).size).toBe(data.length);
  const handle = await open(path, 'r+');
  try {
    for (let at = 0; at < data.length; at += piece) {
      await handle.write(data, at, Math.min(piece, data.length - at), at);
      if (pauseMs > 0) await new Promise((r) => setTimeout(r, pauseMs));
    }
  } finally {
    await handle.close();
  }
}

/** A qcow2 file of `guest` (qemu-img convert), as bytes. */
async function qcow2Of(dir: string, name: string, guest: Buffer): Promise<Buffer> {
  const raw = join(dir, `${name}.src.raw`);
  await writeFile(raw, guest);
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', raw, join(dir, name)]);
  return readFile(join(dir, name));
}

interface Case {
  storage: string;
  /** The export read. */
  name: string;
  /** The file rewritten in place. */
  rewritten: string;
  /** Its new bytes, of the same size. */
  replacement: Buffer;
  /** Guest bytes before and after the rewrite. */
  before: Buffer;
  after: () => Promise<Buffer>;
}

async function rawCase(dir: string, size: number): Promise<Case> {
  const storage = join(dir, 'storage');
  await mkdir(storage, { recursive: true });
  const before = randomBytes(size);
  const after = randomBytes(size);
  await writeFile(join(storage, 'disk.raw'), before);
  return { storage, name: 'disk.raw', rewritten: join(storage, 'disk.raw'), replacement: after, before, after: async () => after };
}

async function qcow2Case(dir: string, size: number): Promise<Case> {
  const storage = join(dir, 'storage');
  const work = join(dir, 'work');
  await mkdir(storage, { recursive: true });
  await mkdir(work, { recursive: true });
  const before = randomBytes(size);
  const after = randomBytes(size);
  await writeFile(join(storage, 'disk.qcow2'), await qcow2Of(work, 'old.qcow2', before));
  const replacement = await qcow2Of(work, 'new.qcow2', after);
  return { storage, name: 'disk.qcow2', rewritten: join(storage, 'disk.qcow2'), replacement, before, after: async () => after };
}

/** vm.qcow2 over base.qcow2; the overlay holds the first MiB itself, the base is rewritten. */
async function backingCase(dir: string, size: number): Promise<Case> {
  const storage = join(dir, 'storage');
  const work = join(dir, 'work');
  await mkdir(storage, { recursive: true });
  await mkdir(work, { recursive: true });
  await writeFile(join(storage, 'base.qcow2'), await qcow2Of(work, 'old-base.qcow2', randomBytes(size)));
  const replacement = await qcow2Of(work, 'new-base.qcow2', randomBytes(size));
  await qemuImg(['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', 'base.qcow2', join(storage, 'vm.qcow2')]);
  await qemuIo(join(storage, 'vm.qcow2'), 'qcow2', ['write -P 0x11 0 1M']);
  const before = await convertToRaw(join(storage, 'vm.qcow2'), { out: join(work, 'before.raw') });
  return {
    storage,
    name: 'vm.qcow2',
    rewritten: join(storage, 'base.qcow2'),
    replacement,
    before,
    after: () => convertToRaw(join(storage, 'vm.qcow2'), { out: join(work, 'after.raw') }),
  };
}

async function agentFor(c: Case, dir: string): Promise<AgentConfig> {
  // No boot recording ends while a test runs: the idle gap and window are long.
  const { agent, config } = await startTestAgent(c.storage, join(dir, 'agent'), { boot: { idleMs: 600_000, windowMs: 3_600_000 } });
  agents.push(agent);
  return config;
}

const exportStatus = (name: string) => agents[0]!.status().exports.filter((e) => e.name === name);

describe.each([
  ['raw', rawCase],
  ['qcow2', qcow2Case],
  ['qcow2 with its backing file rewritten', backingCase],
] as const)('an image rewritten in place under an open connection: %s', (label, makeCase) => {
  it('serves the old version or EIO on that connection, and the new version to a new one', async () => {
    const dir = join(root, label.replace(/\W+/g, '-'));
    const size = 16 * MiB;
    const c = await makeCase(dir, size);
    const config = await agentFor(c, dir);
    const chunks = size / CHUNK;

    const client = await NbdClient.connect(exportUri(config, c.name));
    const warm = await readChunks(client, range(chunks / 4), c.before, c.before);
    expect(warm).toEqual({ old: chunks / 4, new: 0, mixed: 0, eio: 0 });

    await rewriteInPlace(c.rewritten, c.replacement);
    const after = await c.after();
    const changed = range(chunks).filter((i) => !after.subarray(i * CHUNK, (i + 1) * CHUNK).equals(c.before.subarray(i * CHUNK, (i + 1) * CHUNK)));
    expect(changed.length).toBeGreaterThan(chunks / 2);

    const open = await readChunks(client, range(chunks), c.before, after);
    console.info(`${label}: the open connection read ${JSON.stringify(open)} of ${chunks} chunks after the rewrite`);
    expect(open.new).toBe(0);
    expect(open.mixed).toBe(0);
    expect(open.old).toBeGreaterThanOrEqual(chunks / 4); // the cached quarter, and the unchanged overlay clusters
    expect(open.eio).toBeGreaterThan(0);
    const [stale] = exportStatus(c.name);
    expect(stale?.stale?.error).toMatch(/changed on storage/);

    // A second connection while the first is open gets the new version whole.
    const second = await NbdClient.connect(exportUri(config, c.name));
    const fresh = await readChunks(second, range(chunks), c.before, after);
    expect(fresh.eio + fresh.mixed).toBe(0);
    expect(fresh.new).toBe(changed.length);
    const both = exportStatus(c.name);
    expect(both.map((e) => ({ retired: e.retired === true, stale: e.stale !== undefined, connections: e.connections }))).toEqual([
      { retired: false, stale: false, connections: 1 },
      { retired: true, stale: true, connections: 1 },
    ]);

    // The old connection still gets the old version or EIO.
    expect((await readChunks(client, range(chunks), c.before, after)).new).toBe(0);
    await client.close();
    await second.close();
    await waitUntil(() => exportStatus(c.name).length === 1 && exportStatus(c.name)[0]!.connections === 0, 'the exports to close');

    // After all close: a new connection reopens on the new version.
    const third = await NbdClient.connect(exportUri(config, c.name));
    const reopened = await readChunks(third, range(chunks), c.before, after);
    await third.close();
    expect(reopened.eio + reopened.mixed).toBe(0);
    expect(reopened.new).toBe(changed.length);
  });
});

describe('the version check of a file source', () => {
  it('sees a rewrite that restored the mtime (by the ctime), and a chmod, but not a replacement by rename', async () => {
    const dir = join(root, 'source');
    await mkdir(dir, { recursive: true });
    const path = join(dir, 'f.raw');
    const open1 = async (): Promise<FileByteSource> => {
      await writeFile(path, Buffer.alloc(MiB, 1));
      return FileByteSource.open(path);
    };
    let source = await open1();
    const { atime, mtime } = await stat(path);
    await rewriteInPlace(path, Buffer.alloc(MiB, 2));
    await utimes(path, atime, mtime);
    expect(Math.round((await stat(path)).mtimeMs)).toBe(mtime.getTime()); // mtimeMs is a float of the ns stamp
    await expect(source.read(0, 4096)).rejects.toThrow(ImageChangedError);
    await source.close();

    source = await open1();
    await chmod(path, 0o600);
    await expect(source.read(0, 4096)).rejects.toThrow(ImageChangedError);
    await source.close();

    source = await open1();
    await writeFile(`${path}.new`, Buffer.alloc(MiB, 3));
    await rename(`${path}.new`, path);
    expect((await source.read(0, 4096)).equals(Buffer.alloc(4096, 1))).toBe(true);
    await source.close();
  });
});

describe('an image replaced by rename under an open connection', () => {
  it('keeps serving the old file whole to that connection, and the new one to new connections', async () => {
    const dir = join(root, 'rename');
    const size = 8 * MiB;
    const c = await rawCase(dir, size);
    const config = await agentFor(c, dir);
    const chunks = size / CHUNK;
    const client = await NbdClient.connect(exportUri(config, c.name));
    expect((await readChunks(client, range(chunks / 4), c.before, c.before)).old).toBe(chunks / 4);
    await writeFile(join(c.storage, 'disk.raw.new'), c.replacement);
    await rename(join(c.storage, 'disk.raw.new'), c.rewritten);
    // The open descriptor still reads the old file: no change to see, no EIO.
    expect(await readChunks(client, range(chunks), c.before, c.replacement)).toEqual({ old: chunks, new: 0, mixed: 0, eio: 0 });
    const second = await NbdClient.connect(exportUri(config, c.name));
    expect(await readChunks(second, range(chunks), c.before, c.replacement)).toEqual({ old: 0, new: chunks, mixed: 0, eio: 0 });
    await second.close();
    await client.close();
  });
});

describe('a rewrite racing the reads of an open connection', () => {
  it('never serves a chunk of the new version or a mix, wherever the rewrite lands among the reads', async () => {
    const dir = join(root, 'race');
    const storage = join(dir, 'storage');
    await mkdir(storage, { recursive: true });
    const images = 8;
    const size = 8 * MiB;
    const chunks = size / CHUNK;
    const versions = Array.from({ length: images }, () => ({ before: randomBytes(size), after: randomBytes(size) }));
    await Promise.all(versions.map((v, k) => writeFile(join(storage, `disk${k}.raw`), v.before)));
    const { agent, config } = await startTestAgent(storage, join(dir, 'agent'), { boot: { idleMs: 600_000, windowMs: 3_600_000 } });
    agents.push(agent);
    const random = prng(18);
    const total = emptyTally();
    for (let k = 0; k < images; k++) {
      const { before, after } = versions[k]!;
      const client = await NbdClient.connect(exportUri(config, `disk${k}.raw`));
      const order = range(chunks).sort(() => random() - 0.5);
      // The rewrite starts after a different number of reads each time, with 8 reads in flight.
      const startAfter = Math.floor((k / images) * chunks * 0.75);
      let startWrite!: () => void;
      const writing = new Promise<void>((resolve) => (startWrite = resolve)).then(() =>
        rewriteInPlace(join(storage, `disk${k}.raw`), after, 256 * 1024, 1),
      );
      if (startAfter === 0) startWrite();
      const during = await readChunks(client, order, before, after, 8, (done) => {
        if (done === startAfter) startWrite();
      });
      await writing;
      const afterwards = await readChunks(client, range(chunks), before, after, 8);
      await client.close();
      for (const tally of [during, afterwards]) for (const key of ['old', 'new', 'mixed', 'eio'] as const) total[key] += tally[key];
      expect(afterwards.old + afterwards.eio).toBe(chunks);
    }
    console.info(`race: ${JSON.stringify(total)} of ${2 * images * chunks} chunk reads over ${images} rewrites`);
    expect(total.new).toBe(0);
    expect(total.mixed).toBe(0);
    expect(total.old).toBeGreaterThan(0);
    expect(total.eio).toBeGreaterThan(0);
  });
});
