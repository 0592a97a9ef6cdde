/**
 * The NBD server against real clients: qemu-img, qemu-io, QEMU itself,
 * nbdinfo, nbdcopy and fio's nbd engine. Fixtures are made here; every
 * external tool runs asynchronously because the server lives in this process.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DiskImageExport, DiskImageExportProvider, type NbdExport } from '../../src/nbd/server/export.js';
import { NbdServer } from '../../src/nbd/server/server.js';
import { FileByteSource } from '../../src/image/file-source.js';
import { RawImage } from '../../src/image/raw.js';
import type { Extent } from '../../src/image/types.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a command without blocking the event loop (the server is in this process). */
function run(cmd: string, args: string[], input?: string, timeoutMs = 60_000): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    if (input !== undefined) child.stdin.end(input);
    else child.stdin.end();
  });
}

async function runOk(cmd: string, args: string[], input?: string): Promise<string> {
  const r = await run(cmd, args, input);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

const dir = mkdtempSync(join(tmpdir(), 'bc-nbd-tools-'));
const imagePath = join(dir, 'disk.raw');
const sparsePath = join(dir, 'sparse.raw');
const socketPath = join(dir, 'nbd.sock');
const uri = (name: string): string => `nbd+unix:///${name}?socket=${socketPath}`;

/** sparse.raw reads as zeros in [8M, 17M): extents say so (unallocated then explicit zero). */
const SPARSE_LAYOUT: Extent[] = [
  { offset: 0, length: 8 * MiB, kind: 'data' },
  { offset: 8 * MiB, length: 8 * MiB, kind: 'unallocated' },
  { offset: 16 * MiB, length: 1 * MiB, kind: 'zero' },
  { offset: 17 * MiB, length: SIZE - 17 * MiB, kind: 'data' },
];

/** A disk image export whose allocation map comes from SPARSE_LAYOUT. */
class SparseExport extends DiskImageExport {
  override async extents(offset: number, length: number): Promise<Extent[]> {
    const end = offset + length;
    return SPARSE_LAYOUT.filter((e) => e.offset < end && e.offset + e.length > offset).map((e) => {
      const s = Math.max(e.offset, offset);
      return { offset: s, length: Math.min(e.offset + e.length, end) - s, kind: e.kind };
    });
  }
}

const openRaw = async (path: string): Promise<RawImage> => RawImage.open(await FileByteSource.open(path));
let closedExports = 0;

const provider = new DiskImageExportProvider(
  {
    disk: { open: () => openRaw(imagePath), description: 'random test disk' },
  },
  { defaultExport: 'disk' },
);
const combined = {
  list: async () => [...(await provider.list()), 'sparse'],
  open: async (name: string): Promise<NbdExport> => {
    const exp = name === 'sparse' ? new SparseExport('sparse', await openRaw(sparsePath)) : await provider.open(name);
    const close = exp.close.bind(exp);
    exp.close = async () => {
      closedExports++;
      await close();
    };
    return exp;
  },
};

let server: NbdServer;
let data: Buffer;

beforeAll(async () => {
  data = randomBytes(SIZE);
  data.fill(0xab, 4 * MiB, 5 * MiB);
  data.fill(0xcd, 60 * MiB, 60 * MiB + 64 * 1024);
  writeFileSync(imagePath, data);
  const sparse = Buffer.from(data);
  sparse.fill(0, 8 * MiB, 17 * MiB);
  writeFileSync(sparsePath, sparse);
  server = new NbdServer(combined);
  await server.listenUnix(socketPath);
});

afterAll(async () => {
  await server?.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('NBD server with real clients', () => {
  it('qemu-img compare finds the export identical to the image', async () => {
    const out = await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imagePath, uri('disk')]);
    expect(out).toContain('Images are identical');
    // The sparse export, whose zero regions qemu learns from block status.
    const sparse = await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', sparsePath, uri('sparse')]);
    expect(sparse).toContain('Images are identical');
    // And a real difference is seen.
    const diff = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imagePath, uri('sparse')]);
    expect(diff.code).toBe(1);
    expect(diff.stdout).toContain('Content mismatch at offset 8388608');
  });

  it('nbdinfo reports size, read-only, block sizes and capabilities', async () => {
    const info = JSON.parse(await runOk('nbdinfo', ['--json', uri('disk')])) as {
      exports: Array<Record<string, unknown>>;
      protocol: string;
    };
    expect(info.protocol).toBe('newstyle-fixed');
    const e = info.exports[0]!;
    expect(e['export-size']).toBe(SIZE);
    expect(e['is_read_only']).toBe(true);
    expect(e['can_multi_conn']).toBe(true);
    expect(e['can_cache']).toBe(true);
    expect(e['can_flush']).toBe(true);
    expect(e['can_trim']).toBe(false);
    expect(e['can_zero']).toBe(false);
    expect(e['can_df']).toBe(true);
    expect(e['description']).toBe('random test disk');
    expect(e['block_size_minimum']).toBe(512);
    expect(e['block_size_preferred']).toBe(4096);
    expect(e['block_size_maximum']).toBe(32 * MiB);
    expect(e['contexts']).toEqual(['base:allocation']);
  });

  it('nbdinfo --list lists every export, and the default export resolves', async () => {
    const list = JSON.parse(await runOk('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${socketPath}`])) as {
      exports: Array<{ 'export-name': string; 'export-size': number }>;
    };
    expect(list.exports.map((e) => e['export-name']).sort()).toEqual(['disk', 'sparse']);
    expect(list.exports.find((e) => e['export-name'] === 'disk')?.['export-size']).toBe(SIZE);
    const size = await runOk('nbdinfo', ['--size', `nbd+unix://?socket=${socketPath}`]);
    expect(size.trim()).toBe(String(SIZE));
  });

  it('nbdinfo --map shows the holes and zeros the export reports', async () => {
    const map = JSON.parse(await runOk('nbdinfo', ['--map', '--json', uri('sparse')])) as Array<{
      offset: number;
      length: number;
      type: number;
      description: string;
    }>;
    expect(map).toEqual([
      { offset: 0, length: 8 * MiB, type: 0, description: 'data' },
      { offset: 8 * MiB, length: 9 * MiB, type: 3, description: 'hole,zero' },
      { offset: 17 * MiB, length: SIZE - 17 * MiB, type: 0, description: 'data' },
    ]);
    const plain = await runOk('nbdinfo', ['--map', uri('disk')]);
    expect(plain.trim().split(/\s+/)).toEqual(['0', String(SIZE), '0', 'data']);
  });

  it('nbdcopy copies the export byte for byte, also over several connections', async () => {
    const out = join(dir, 'copy.raw');
    await runOk('nbdcopy', [uri('disk'), out]);
    expect(readFileSync(out).equals(data)).toBe(true);
    rmSync(out);
    await runOk('nbdcopy', ['--connections=4', '--requests=64', '--request-size=65536', uri('sparse'), out]);
    expect(readFileSync(out).equals(readFileSync(sparsePath))).toBe(true);
    rmSync(out);
  });

  it('qemu-io reads the patterns written into the image', async () => {
    const out = await runOk('qemu-io', [
      '-f', 'raw', '-r', uri('disk'),
      '-c', 'read -P 0xab 4M 1M',
      '-c', 'read -P 0xab 4194816 4096',
      '-c', 'read -P 0xcd 60M 64k',
      '-c', 'aio_read -P 0xab 4M 64k',
      '-c', 'aio_flush',
    ]);
    expect(out).not.toMatch(/Pattern verification failed|error|failed/i);
    expect(out.match(/read \d+\/\d+ bytes/g)).toHaveLength(4);
    const zero = await runOk('qemu-io', ['-f', 'raw', '-r', uri('sparse'), '-c', 'read -P 0 8M 9M', '-c', 'read -P 0xab 4M 1M']);
    expect(zero).not.toMatch(/Pattern verification failed/);
    // A wrong pattern is reported: the check above can fail.
    const wrong = await run('qemu-io', ['-f', 'raw', '-r', uri('disk'), '-c', 'read -P 0xac 4M 4k']);
    expect(wrong.stdout + wrong.stderr).toMatch(/Pattern verification failed/);
  });

  it('fio with the nbd engine runs 4k random reads without errors', async () => {
    const out = await runOk('fio', [
      '--name=randread',
      '--ioengine=nbd',
      `--uri=${uri('disk')}`,
      '--rw=randread',
      '--bs=4k',
      '--iodepth=64',
      '--numjobs=2',
      '--time_based',
      '--runtime=2',
      '--output-format=json',
    ]);
    const result = JSON.parse(out.slice(out.indexOf('{'))) as {
      jobs: Array<{ error: number; read: { io_bytes: number; iops: number } }>;
    };
    expect(result.jobs).toHaveLength(2);
    for (const job of result.jobs) {
      expect(job.error).toBe(0);
      expect(job.read.io_bytes).toBeGreaterThan(0);
    }
  });

  it('QEMU attaches the export as a read-only drive and reads through it', async () => {
    const qmp = [
      { execute: 'qmp_capabilities' },
      { execute: 'query-block' },
      { execute: 'human-monitor-command', arguments: { 'command-line': 'qemu-io d0 "read -P 0xab 4M 64k"' } },
      { execute: 'human-monitor-command', arguments: { 'command-line': 'qemu-io d0 "read -P 0xcd 60M 64k"' } },
      { execute: 'quit' },
    ]
      .map((c) => JSON.stringify(c))
      .join('\n');
    const out = await runOk(
      'qemu-system-x86_64',
      [
        '-machine', 'none',
        '-nographic',
        '-nodefaults',
        '-S',
        '-monitor', 'none',
        '-qmp', 'stdio',
        '-drive', `file=${uri('disk')},format=raw,readonly=on,if=none,id=d0`,
      ],
      qmp + '\n',
    );
    const messages = out
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as { return?: unknown; error?: unknown });
    expect(messages.filter((m) => m.error !== undefined)).toEqual([]);
    const block = messages.find((m) => Array.isArray(m.return))?.return as Array<{
      device: string;
      inserted: { ro: boolean; file: string; image: { 'virtual-size': number } };
    }>;
    const d0 = block.find((b) => b.device === 'd0')!;
    expect(d0.inserted.ro).toBe(true);
    expect(d0.inserted.file).toContain('nbd');
    expect(d0.inserted.image['virtual-size']).toBe(SIZE);
    // HMP qemu-io prints to QEMU's stdout, between the QMP replies.
    expect(out.match(/read 65536\/65536 bytes at offset/g)).toHaveLength(2);
    expect(out).not.toMatch(/Pattern verification failed/);
  });

  it('closed every export it opened and served without protocol errors', async () => {
    // Tools have disconnected; give the server a moment to finish their connections.
    for (let i = 0; i < 50 && server.stats.activeConnections > 0; i++) await new Promise((r) => setTimeout(r, 20));
    const stats = server.stats;
    expect(stats.activeConnections).toBe(0);
    expect(stats.protocolErrors).toBe(0);
    expect(stats.readErrors).toBe(0);
    expect(stats.handshakes).toBeGreaterThan(10);
    expect(closedExports).toBeGreaterThanOrEqual(stats.handshakes);
  });
});
