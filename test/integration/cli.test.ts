/**
 * The CLI end to end, as a CI pipeline runs it: build-map -> build-segment ->
 * verify -> inspect, with --json results, exit codes and one-line errors.
 */
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cli } from '../helpers/cli.js';

const MiB = 1024 * 1024;
const trace = new URL('../data/debian12-minbase-boot-timed.csv', import.meta.url).pathname;

let dir: string;
let raw: string;
let qcow2: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bc-cli-'));
  raw = join(dir, 'disk.raw');
  qcow2 = join(dir, 'disk.qcow2');
  // A 2 GiB sparse disk (the trace's guest size) with random data where the boot reads.
  const fh = await open(raw, 'w');
  await fh.truncate(2048 * MiB);
  const lines = (await readFile(trace, 'utf8')).trim().split('\n').slice(1);
  for (const line of lines.slice(0, 1500)) {
    const [, , offset, length] = line.split(',');
    await fh.write(randomBytes(Number(length)), 0, Number(length), Number(offset));
  }
  await fh.close();
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-c', raw, qcow2]);
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('bootcache CLI pipeline', () => {
  it('build-map, build-segment, verify and inspect on raw and qcow2 give the same segment data', async () => {
    const digests: string[] = [];
    for (const image of [raw, qcow2]) {
      const map = await cli('build-map', image, '--trace', trace, '--json');
      expect(map.status, map.stderr).toBe(0);
      expect(map.json).toMatchObject({ map: `${image}.bcmap`, reads: 4060, blockSize: 4096 });

      const seg = await cli('build-segment', image, '--json');
      expect(seg.status, seg.stderr).toBe(0);
      const s = seg.json as { blocks: number; bytes: number; dataSha256: string };
      expect(s.blocks).toBe((map.json as { blocksSet: number }).blocksSet);
      expect(s.bytes).toBe(s.blocks * 4096);
      expect(s.dataSha256).toMatch(/^[0-9a-f]{64}$/);
      digests.push(s.dataSha256);

      const verify = await cli('verify', image, '--json');
      expect(verify.status, verify.stderr).toBe(0);
      expect(verify.json).toMatchObject({ ok: true, blocksChecked: s.blocks });

      const im = await cli('inspect', `${image}.bcmap`, '--json');
      expect(im.json).toMatchObject({ blockSize: 4096, blocksSet: s.blocks, bytes: s.bytes, boots: 1 });
      expect((im.json as { runs: number }).runs).toBeGreaterThan(100);
      const is = await cli('inspect', `${image}.bcseg`, '--json');
      expect(is.json).toMatchObject({ blocks: s.blocks, bytes: s.bytes, dataSha256: s.dataSha256 });
    }
    // Guest-visible data: the qcow2 image and its raw source give the same segment data.
    expect(digests[0]).toBe(digests[1]);

    const ii = await cli('inspect', qcow2, '--json');
    expect(ii.status, ii.stderr).toBe(0);
    expect(ii.json).toMatchObject({ kind: 'image', format: 'qcow2', virtualSize: 2048 * MiB, clusterSize: 65536 });
    const human = await cli('inspect', qcow2);
    expect(human.stdout).toMatch(/qcow2, virtual size 2\.0 GiB/);
  });

  it('verify exits 1 and names the first bad block when segment data differs', async () => {
    const image = raw;
    expect((await cli('build-map', image, '--trace', trace, '--out', join(dir, 'v.bcmap'))).status).toBe(0);
    expect((await cli('build-segment', image, '--map', join(dir, 'v.bcmap'), '--out', join(dir, 'v.bcseg'))).status).toBe(0);
    const seg = await readFile(join(dir, 'v.bcseg'));
    const info = (await cli('inspect', join(dir, 'v.bcseg'), '--json')).json as { bytes: number };
    // Flip one byte in the last block's data.
    seg[seg.length - 100] ^= 0xff;
    await writeFile(join(dir, 'bad.bcseg'), seg);
    const r = await cli('verify', image, '--map', join(dir, 'v.bcmap'), '--segment', join(dir, 'bad.bcseg'));
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/verification FAILED/);
    expect(r.stderr).toMatch(/block rank \d+ \(image offset \d+\)/);
    const j = await cli('verify', image, '--map', join(dir, 'v.bcmap'), '--segment', join(dir, 'bad.bcseg'), '--json');
    expect(j.status).toBe(1);
    const report = j.json as { ok: boolean; mismatches: Array<{ rank: number; imageOffset: number }> };
    expect(report.ok).toBe(false);
    expect(report.mismatches[0]!.rank).toBe(info.bytes / 4096 - 1);
  });

  it('segments carry block digests: inspect shows them, verify names a bad digest (exit 1) and refuses a malformed digest table (exit 3)', async () => {
    const image = raw;
    const mapPath = join(dir, 'd.bcmap');
    const segPath = join(dir, 'd.bcseg');
    expect((await cli('build-map', image, '--trace', trace, '--out', mapPath)).status).toBe(0);
    expect((await cli('build-segment', image, '--map', mapPath, '--out', segPath)).status).toBe(0);
    const human = await cli('inspect', segPath);
    expect(human.status, human.stderr).toBe(0);
    expect(human.stdout).toMatch(/boot segment v2\n/);
    expect(human.stdout).toMatch(/block digests sha256\n/);
    const info = (await cli('inspect', segPath, '--json')).json as { version: number; blockDigest: string | null; blocks: number };
    expect(info).toMatchObject({ version: 2, blockDigest: 'sha256' });
    const seg = await readFile(segPath);
    const verifyWith = (file: Buffer, ...flags: string[]) =>
      writeFile(join(dir, 'x.bcseg'), file).then(() => cli('verify', image, '--map', mapPath, '--segment', join(dir, 'x.bcseg'), ...flags));

    // A flipped byte in the digest entry of rank 3 (the digest table starts at 272, 32 bytes per block).
    const badDigest = Buffer.from(seg);
    badDigest[272 + 3 * 32 + 5] ^= 0x10;
    const r = await verifyWith(badDigest);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/digest table does not match its SHA-256 in the header/);
    expect(r.stderr).toMatch(/block rank 3 \(image offset \d+\): digest mismatch/);
    const j = (await verifyWith(badDigest, '--json')).json as { checks: { digests: string }; digestMismatches: number };
    expect(j).toMatchObject({ checks: { digests: 'fail', checksums: 'pass', data: 'pass' }, digestMismatches: 1 });

    // Malformed: truncated inside the digest table, or an unknown digest algorithm (header resealed).
    const truncated = await verifyWith(seg.subarray(0, 272 + 50));
    expect(truncated.status).toBe(3);
    expect(truncated.stderr.trim()).toMatch(/^bootcache verify: error: .*x\.bcseg: file is 322 bytes but its header describes \d+ .*: truncated \[BC_INVALID_SEGMENT\]$/);
    expect(truncated.stderr.trim().split('\n')).toHaveLength(1);
    const unknown = Buffer.from(seg);
    unknown.writeUInt32LE(7, 236);
    unknown.fill(0, 192, 224);
    createHash('sha256').update(unknown.subarray(0, 272)).digest().copy(unknown, 192);
    const u = await verifyWith(unknown);
    expect(u.status).toBe(3);
    expect(u.stderr.trim()).toMatch(/unsupported block digest \(algorithm 7, 32 bytes\) \[BC_INVALID_SEGMENT\]$/);
    expect(u.stderr.trim().split('\n')).toHaveLength(1);
    expect((await cli('inspect', join(dir, 'x.bcseg'))).status).toBe(3);
  });

  it('a rewritten image no longer matches its map (identity)', async () => {
    const copy = join(dir, 'rewritten.raw');
    execFileSync('cp', ['--sparse=always', raw, copy]);
    expect((await cli('build-map', copy, '--trace', trace)).status).toBe(0);
    expect((await cli('build-segment', copy)).status).toBe(0);
    await new Promise((r) => setTimeout(r, 20));
    const fh = await open(copy, 'r+');
    await fh.write(Buffer.from('rewritten'), 0, 9, 1024 * MiB);
    await fh.close();
    const r = await cli('verify', copy, '--json');
    expect(r.status).toBe(1);
    expect((r.json as { checks: { identity: string } }).checks.identity).toBe('fail');
    const b = await cli('build-segment', copy);
    expect(b.status).toBe(1);
    expect(b.stderr).toMatch(/identity/);
  });

  it('errors are one line naming the file, with stable exit codes', async () => {
    const missing = await cli('inspect', join(dir, 'nope.qcow2'));
    expect(missing.status).toBe(3);
    expect(missing.stderr.trim().split('\n')).toHaveLength(1);
    expect(missing.stderr).toMatch(/nope\.qcow2: no such file.*\[BC_NOT_FOUND\]/);

    const garbage = join(dir, 'garbage.bcmap');
    await writeFile(garbage, Buffer.concat([Buffer.from('BCMAP\0\r\n'), randomBytes(200)]));
    const bad = await cli('inspect', garbage, '--json');
    expect(bad.status).toBe(3);
    expect(bad.json).toMatchObject({ error: { code: 'BC_INVALID_MAP', exitCode: 3 } });
    expect((bad.json as { error: { message: string } }).error.message).toContain('garbage.bcmap');

    const usage = await cli('build-map', raw);
    expect(usage.status).toBe(2);
    expect(usage.stderr).toMatch(/trace/);

    const badTrace = join(dir, 'bad.csv');
    await writeFile(badTrace, 't_us,op,offset,length\n0,read,0,512\n5,read,banana,512\n');
    const t = await cli('build-map', raw, '--trace', badTrace);
    expect(t.status).toBe(3);
    expect(t.stderr).toMatch(/bad\.csv.*line 3/);

    const bs = await cli('build-map', raw, '--trace', trace, '--block-size', '3000');
    expect(bs.status).toBe(2);
    expect(bs.stderr).toMatch(/power of two/);
  });

  it('--help documents the exit codes', async () => {
    const help = await cli('verify', '--help');
    expect(help.stdout).toMatch(/EXIT CODES/);
    expect(help.stdout).toMatch(/1\s+verification failed/);
  });
});
