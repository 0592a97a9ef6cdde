/**
 * The agent's reply buffer budget: the BufferBudget's rules on their own,
 * then the real agent process under 120 clients that send large reads and
 * never read the replies, with a boot replayed through it meanwhile: the
 * boot completes with the right bytes, the agent's memory stays within the
 * budget plus a fixed overhead, and it falls back when the clients go.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { mkdir, open, writeFile } from 'node:fs/promises';
import type net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AgentStatus } from '../../src/agent/agent.js';
import { controlRequest } from '../../src/agent/control.js';
import { BufferBudget } from '../../src/nbd/server/buffer-budget.js';
import { DiskImageExportProvider } from '../../src/nbd/server/export.js';
import { NbdServer } from '../../src/nbd/server/server.js';
import { FileByteSource } from '../../src/image/file-source.js';
import { RawImage } from '../../src/image/raw.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { replayTraceFile } from '../../src/replay/replay.js';
import { openRawExport, readRequests } from '../helpers/nbd-raw.js';

const MiB = 1024 * 1024;

describe('BufferBudget', () => {
  it('always gives a connection its guaranteed share, whatever the others hold', async () => {
    const budget = new BufferBudget(64 * MiB, 16); // 2 MiB guaranteed each, 32 MiB shared
    expect(budget.guaranteedBytes).toBe(2 * MiB);
    expect(budget.sharedBytes).toBe(32 * MiB);
    const hog = budget.open();
    expect(hog.take(34 * MiB)).toBe(true); // its 2 MiB and all of the shared half
    const late = hog.take(MiB);
    expect(late).toBeInstanceOf(Promise);
    const light = budget.open();
    expect(light.take(2 * MiB)).toBe(true); // its own share is still there
    const more = light.take(4096);
    expect(more).toBeInstanceOf(Promise);
    expect(budget.usedBytes).toBe(36 * MiB);
    expect(budget.waitingAccounts).toBe(2);
    // What comes back goes to the waiter holding the least first.
    hog.release(4096);
    expect(await more).toBe(true);
    expect(hog.waiting).toBe(true);
    hog.release(2 * MiB);
    expect(await late).toBe(true);
    expect(budget.usedBytes).toBe(35 * MiB);
    expect(budget.peakBytes).toBe(36 * MiB);
    light.release(2 * MiB + 4096);
    hog.release(32 * MiB + MiB - 4096);
    expect(budget.usedBytes).toBe(0);
  });

  it('never holds more than its limit, and a closed account stops waiting', async () => {
    const budget = new BufferBudget(16 * MiB, 4);
    const accounts = Array.from({ length: 4 }, () => budget.open());
    const waits: Array<Promise<boolean>> = [];
    for (let round = 0; round < 8; round++) {
      for (const a of accounts) {
        if (a.waiting) continue;
        const t = a.take(3 * MiB);
        if (t !== true) waits.push(t);
        expect(budget.usedBytes).toBeLessThanOrEqual(16 * MiB);
      }
    }
    expect(budget.waitingAccounts).toBe(4);
    for (const a of accounts) a.close();
    expect(await Promise.all(waits)).toEqual([false, false, false, false]);
    expect(accounts[0]!.take(1)).toBeInstanceOf(Promise);
    expect(() => budget.open().take(16 * MiB + 1)).toThrow(/can never fit/);
  });
});

describe('NBD server: the reply buffer budget', () => {
  it('pauses clients that never read, serves a reading client meanwhile, and never holds more than the budget', async () => {
    const local = mkdtempSync(join(tmpdir(), 'bc-nbd-budget-'));
    const servers: NbdServer[] = [];
    const hogs: net.Socket[] = [];
    try {
      const bytes = randomBytes(16 * MiB);
      const path = join(local, 'disk.raw');
      await writeFile(path, bytes);
      const provider = new DiskImageExportProvider({ disk: async () => RawImage.open(await FileByteSource.open(path)) });
      // 8 MiB over 4 slots: 1 MiB guaranteed each, 4 MiB shared.
      const server = new NbdServer(provider, { maxConnections: 4, maxRequestBytes: 4 * MiB, maxBufferedBytes: 8 * MiB });
      servers.push(server);
      const socket = join(local, 'nbd.sock');
      await server.listenUnix(socket);
      let peak = 0;
      const sample = setInterval(() => (peak = Math.max(peak, server.stats.bufferedBytes)), 1);
      for (let i = 0; i < 2; i++) {
        const { socket: s, size } = await openRawExport({ path: socket }, 'disk');
        hogs.push(s);
        s.write(readRequests(64, MiB, size));
      }
      for (let i = 0; !(server.stats.pausedConnections === 2); i++) {
        if (i > 1000) throw new Error(`the hogs were not paused: ${JSON.stringify(server.stats)}`);
        await new Promise((r) => setTimeout(r, 5));
      }
      // A client that reads its replies is served, each read within its guaranteed share.
      const client = await NbdClient.connect(`nbd+unix:///disk?socket=${socket}`);
      for (let i = 0; i < 64; i++) {
        const offset = ((i * 7919) % 32) * 512 * 1024;
        expect((await client.read(offset, 512 * 1024)).equals(bytes.subarray(offset, offset + 512 * 1024))).toBe(true);
      }
      await client.close();
      clearInterval(sample);
      const stats = server.stats;
      expect(stats.pausedConnections).toBe(2);
      expect(stats.maxBufferedBytes).toBe(8 * MiB);
      expect(Math.max(peak, stats.peakBufferedBytes)).toBeLessThanOrEqual(8 * MiB);
      expect(stats.bufferedBytes).toBeGreaterThan(4 * MiB); // the hogs hold the shared half and their own shares
      for (const s of hogs) s.destroy();
      for (let i = 0; server.stats.activeConnections > 0 || server.stats.bufferedBytes > 0; i++) {
        if (i > 1000) throw new Error(`the hogs' buffers were not released: ${JSON.stringify(server.stats)}`);
        await new Promise((r) => setTimeout(r, 5));
      }
      expect(server.stats.pausedConnections).toBe(0);
    } finally {
      for (const s of hogs) s.destroy();
      await Promise.all(servers.map((s) => s.close()));
      rmSync(local, { recursive: true, force: true });
    }
  });

  it('refuses a budget that cannot hold two of the largest requests', () => {
    const provider = new DiskImageExportProvider({});
    expect(() => new NbdServer(provider, { maxRequestBytes: 32 * MiB, maxBufferedBytes: 63 * MiB })).toThrow(/maxBufferedBytes must be an integer from 67108864/);
  });
});

// ---------------------------------------------------------------------------

const bin = fileURLToPath(new URL('../../bin/run.js', import.meta.url));
const TRACE = 'test/data/debian12-minbase-boot-timed.csv';
const IMAGE_BYTES = 2 * 1024 * MiB;
/** The agent's defaults: --max-buffered 256M over --max-connections 128 (1 MiB guaranteed each). */
const BUDGET = 256 * MiB;
const HOGS = 120;
/** Each hog asks this many 1 MiB reads: 1.9 GiB in all, what an agent without a global bound would hold. */
const READS_PER_HOG = 16;
/**
 * RSS above the idle agent's that is not reply buffers: garbage buffers V8
 * has not collected yet (it collects when external memory grew by about
 * 64 MiB), request buffers (64 KiB per connection plus a socket chunk), the
 * boot's miss path and cache writes, the JS objects of 122 connections.
 */
const OVERHEAD = 128 * MiB;

let dir: string;
let agent: ChildProcess | undefined;
let agentLog = '';
const hogSockets: net.Socket[] = [];

function memory(pid: number): { rss: number; hwm: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (field: string): number => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)![1]) * 1024;
  return { rss: kib('VmRSS'), hwm: kib('VmHWM') };
}

async function until<T>(what: string, probe: () => Promise<T | undefined> | T | undefined, timeoutMs = 60_000): Promise<T> {
  const start = Date.now();
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting for ${what}; agent log: ${agentLog.slice(-2000)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The trace's read ranges. */
function traceReads(): Array<{ offset: number; length: number }> {
  return readFileSync(TRACE, 'utf8').trim().split('\n').slice(1).map((row) => {
    const [, , offset, length] = row.split(',');
    return { offset: Number(offset), length: Number(length) };
  });
}

describe('the agent under 120 clients that never read their replies', () => {
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'bc-agent-memory-'));
    await mkdir(join(dir, 'storage'));
    // A sparse 2 GiB image with random bytes wherever the boot reads.
    const image = await open(join(dir, 'storage', 'boot.raw'), 'w');
    await image.truncate(IMAGE_BYTES);
    for (const { offset, length } of traceReads()) await image.write(randomBytes(length), 0, length, offset);
    await image.close();
  }, 120_000);

  afterAll(async () => {
    for (const s of hogSockets) s.destroy();
    if (agent && agent.exitCode === null) {
      agent.kill('SIGKILL');
      await new Promise((r) => agent!.once('exit', r));
    }
    rmSync(dir, { recursive: true, force: true });
  });

  it('serves a boot with the right bytes, stays within --max-buffered plus a fixed overhead, and gives the memory back', async () => {
    const socket = join(dir, 'nbd.sock');
    const control = join(dir, 'control.sock');
    agent = spawn(process.execPath, [
      bin, 'agent', '--storage', join(dir, 'storage'), '--cache', join(dir, 'cache'), '--socket', socket, '--control', control,
      '--cache-size', '512M', '--prefetch-chunk', '1M', '--maintenance', 'off', '--no-warmup', '--log-level', 'info',
      // Every client here is this test's uid.
      '--max-connections-per-client', '128',
    ], {
      stdio: ['ignore', 'pipe', 'pipe'],
      // As docs/agent.md (Limits) recommends: glibc then hands freed reply buffers back to the system.
      env: { ...process.env, MALLOC_MMAP_THRESHOLD_: '131072' },
    });
    agent.stdout!.on('data', (d: Buffer) => (agentLog = (agentLog + d.toString()).slice(-100_000)));
    agent.stderr!.on('data', (d: Buffer) => (agentLog = (agentLog + d.toString()).slice(-100_000)));
    await until('the agent to start', () => (/"agent started"/.test(agentLog) ? true : undefined));
    const pid = agent.pid!;
    const status = (): Promise<AgentStatus> => controlRequest<AgentStatus>(control, 'GET', '/status');
    const idle = memory(pid);

    // The hogs: past the handshake, a burst of 1 MiB reads each, replies never read.
    for (let i = 0; i < HOGS; i++) {
      const { socket: s, size } = await openRawExport({ path: socket }, 'boot.raw');
      hogSockets.push(s);
      s.write(readRequests(READS_PER_HOG, MiB, size, 1 + i * READS_PER_HOG));
    }
    const full = await until('the budget to be spent', async () => {
      const s = await status();
      return s.nbd.pausedConnections > 0 && s.nbd.bufferedBytes > BUDGET / 2 ? s : undefined;
    });
    expect(full.nbd.maxBufferedBytes).toBe(BUDGET);
    expect(full.nbd.bufferedBytes).toBeLessThanOrEqual(BUDGET);
    expect(full.nbd.activeConnections).toBe(HOGS);

    // A boot through the same agent meanwhile.
    const uri = `nbd+unix:///boot.raw?socket=${socket}`;
    const replay = await replayTraceFile(TRACE, { uri, thinkTime: false });
    expect(replay.replay.reads).toBe(4060);
    expect(replay.replay.bytes).toBe(replay.trace.bytes);
    // Its bytes: every range the boot read, read again and compared with the image.
    const image = await open(join(dir, 'storage', 'boot.raw'), 'r');
    const client = await NbdClient.connect(uri);
    let wrong = 0;
    const reads = traceReads();
    for (let i = 0; i < reads.length; i += 8) {
      await Promise.all(reads.slice(i, i + 8).map(async ({ offset, length }) => {
        const expected = Buffer.alloc(length);
        await image.read(expected, 0, length, offset);
        if (!(await client.read(offset, length)).equals(expected)) wrong++;
      }));
    }
    await client.close();
    await image.close();
    expect(wrong).toBe(0);

    const during = await status();
    expect(during.nbd.bufferedBytes).toBeLessThanOrEqual(BUDGET);
    expect(during.nbd.peakBufferedBytes).toBeLessThanOrEqual(BUDGET);
    const peak = memory(pid);
    console.log(`agent RSS: idle ${Math.round(idle.rss / MiB)} MiB, peak ${Math.round(peak.hwm / MiB)} MiB, reply buffers at most ${Math.round(during.nbd.peakBufferedBytes / MiB)} MiB`);
    expect(peak.hwm - idle.rss).toBeLessThanOrEqual(BUDGET + OVERHEAD);

    // The hogs leave: their buffers go, and so does the memory.
    for (const s of hogSockets.splice(0)) s.destroy();
    await until('the hogs to be gone', async () => {
      const s = await status();
      return s.nbd.activeConnections === 0 && s.nbd.bufferedBytes === 0 ? s : undefined;
    });
    const after = await until('the memory to come back', () => {
      const m = memory(pid);
      return m.rss - idle.rss <= OVERHEAD ? m : undefined;
    }, 30_000);
    console.log(`agent RSS after the clients left: ${Math.round(after.rss / MiB)} MiB`);
    expect(after.rss).toBeLessThan(peak.hwm);
    const exited = new Promise<number | null>((resolve) => agent!.once('exit', resolve));
    agent.kill('SIGTERM');
    expect(await exited).toBe(0);
  }, 300_000);
});
