/**
 * What a new operator trips over, through the real CLI (node bin/run.js):
 * unknown commands, missing arguments, inputs that cannot be used (exit 3,
 * one line), outputs that cannot be written (exit 4), verify after a plain
 * copy and verify --adopt, and the per-command exit codes in --help.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { copyFile, mkdtemp, open, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isTempName } from '../../src/format/atomic-write.js';
import { cli } from '../helpers/cli.js';

const MiB = 1024 * 1024;
let dir: string;
let image: string;
let trace: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bc-cli-errors-'));
  image = join(dir, 'disk.raw');
  trace = join(dir, 'boot.csv');
  const fh = await open(image, 'w');
  await fh.truncate(64 * MiB);
  const rows = ['t_us,op,offset,length'];
  for (let k = 0; k < 64; k++) {
    const offset = k * 997 * 4096;
    await fh.write(randomBytes(8192), 0, 8192, offset);
    rows.push(`${k * 10},read,${offset},8192`);
  }
  await fh.close();
  await writeFile(trace, `${rows.join('\n')}\n`);
  expect((await cli('build-map', image, '--trace', trace)).status).toBe(0);
  expect((await cli('build-segment', image)).status).toBe(0);
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** stderr as lines, without the trailing newline. */
function lines(text: string): string[] {
  return text.replace(/\n$/, '').split('\n');
}

describe('unknown commands and missing arguments', () => {
  it('an unknown command is exit 2, BC_USAGE, with "did you mean" for a close one', async () => {
    const far = await cli('frobnicate');
    expect(far.status).toBe(2);
    expect(far.stderr).toBe('bootcache: error: unknown command "frobnicate"; see bootcache --help for the commands [BC_USAGE]\n');

    const close = await cli('verfy', join(dir, 'x.qcow2'));
    expect(close.status).toBe(2);
    expect(close.stderr).toBe('bootcache: error: unknown command "verfy"; did you mean "bootcache verify"? [BC_USAGE]\n');

    const sub = await cli('agent', 'stauts');
    expect(sub.stderr).toContain('did you mean "bootcache agent status"?');

    const json = await cli('frobnicate', '--json');
    expect(json.status).toBe(2);
    expect(json.stderr).toBe('');
    expect(json.json).toEqual({ error: { code: 'BC_USAGE', exitCode: 2, message: 'unknown command "frobnicate"; see bootcache --help for the commands' } });
  });

  it('a missing argument is one line saying what is missing, then the usage line', async () => {
    const r = await cli('inspect');
    expect(r.status).toBe(2);
    expect(lines(r.stderr)).toEqual([
      'bootcache inspect: error: missing argument FILE [BC_USAGE]',
      'usage: bootcache inspect FILE [--json] [--debug] [--format raw|qcow2] [--force] [--s3-endpoint URL] [--[no-]s3-path-style] [--s3-region REGION] [--kind image|map|segment|index]',
    ]);
    const flag = await cli('build-map', image);
    expect(flag.status).toBe(2);
    expect(lines(flag.stderr)[0]).toBe('bootcache build-map: error: missing required flag --trace [BC_USAGE]');
    expect(lines(flag.stderr)[1]).toMatch(/^usage: bootcache build-map IMAGE --trace FILE \[--json\]/);
    const json = await cli('inspect', '--json');
    expect(json.json).toEqual({ error: { code: 'BC_USAGE', exitCode: 2, message: 'missing argument FILE' } });
  });
});

describe('inputs that cannot be used: exit 3, one line', () => {
  it('verify of a missing image names the image, not its map', async () => {
    const r = await cli('verify', join(dir, 'nonexistent.qcow2'));
    expect(r.status).toBe(3);
    expect(r.stderr).toBe(`bootcache verify: error: ${join(dir, 'nonexistent.qcow2')}: no such file (while opening the image) [BC_NOT_FOUND]\n`);
    const seg = await cli('build-segment', join(dir, 'nonexistent.qcow2'));
    expect(seg.stderr).toContain(`${join(dir, 'nonexistent.qcow2')}: no such file`);
  });

  it('a directory is exit 3 saying it is a directory', async () => {
    for (const args of [['inspect', dir], ['verify', dir], ['build-map', image, '--trace', dir], ['verify', image, '--segment', dir]]) {
      const r = await cli(...args);
      expect(r.status, args.join(' ')).toBe(3);
      expect(lines(r.stderr), args.join(' ')).toHaveLength(1);
      expect(r.stderr).toContain(`${dir}: is a directory`);
      expect(r.stderr).toContain('[BC_NOT_A_FILE]');
    }
  });

  it('verify: a truncated segment or a map given as --segment is exit 3 with one line', async () => {
    const truncated = join(dir, 'truncated.bcseg');
    const seg = await readFile(`${image}.bcseg`);
    await writeFile(truncated, seg.subarray(0, seg.length - 4096));
    const t = await cli('verify', image, '--segment', truncated);
    expect(t.status).toBe(3);
    expect(lines(t.stderr)).toHaveLength(1);
    expect(t.stderr).toMatch(/truncated\.bcseg: file is \d+ bytes but its header describes \d+ .*: truncated \[BC_INVALID_SEGMENT\]/);
    const tj = await cli('verify', image, '--segment', truncated, '--json');
    expect(tj.json).toMatchObject({ error: { code: 'BC_INVALID_SEGMENT', exitCode: 3 } });

    const asSegment = await cli('verify', image, '--segment', `${image}.bcmap`);
    expect(asSegment.status).toBe(3);
    expect(asSegment.stderr).toBe(`bootcache verify: error: ${image}.bcmap: is a boot workload map, not a boot segment [BC_INVALID_SEGMENT]\n`);
    const asMap = await cli('verify', image, '--map', `${image}.bcseg`);
    expect(asMap.status).toBe(3);
    expect(asMap.stderr).toContain('is a boot segment, not a boot workload map [BC_INVALID_MAP]');
    const asImage = await cli('build-segment', `${image}.bcmap`);
    expect(asImage.status).toBe(3);
    expect(asImage.stderr).toContain('is a boot workload map, not a disk image');
  });
});

describe('outputs that cannot be written: exit 4', () => {
  it('build-map and build-segment into a missing directory or onto a directory', async () => {
    const missing = join(dir, 'no-such-dir', 'x.bcmap');
    const m = await cli('build-map', image, '--trace', trace, '--out', missing);
    expect(m.status).toBe(4);
    expect(m.stderr).toBe(`bootcache build-map: error: ${missing}: cannot write: directory ${join(dir, 'no-such-dir')} does not exist (while creating a temporary file next to it) [BC_IO]\n`);
    const s = await cli('build-segment', image, '--out', join(dir, 'no-such-dir', 'x.bcseg'), '--json');
    expect(s.status).toBe(4);
    expect(s.json).toMatchObject({ error: { code: 'BC_IO', exitCode: 4 } });
    const onDir = await cli('build-map', image, '--trace', trace, '--out', dir);
    expect(onDir.status).toBe(4);
    expect(onDir.stderr).toContain(`${dir}: cannot write: is a directory`);
  });
});

describe('verify after a plain copy, and --adopt', () => {
  it('says the data matched and how to keep the identity; --adopt re-stamps map and segment; verify then passes', async () => {
    const copy = join(dir, 'copy.raw');
    // A plain copy: new mtime, same data.
    execFileSync('cp', ['--sparse=always', image, copy]);
    await copyFile(`${image}.bcmap`, `${copy}.bcmap`);
    await copyFile(`${image}.bcseg`, `${copy}.bcseg`);
    expect((await stat(copy)).mtimeMs).not.toBe((await stat(image)).mtimeMs);

    const r = await cli('verify', copy);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/data and checksums of all \d+ blocks matched .*copy\.raw/);
    expect(r.stderr).toContain('cp -p and rsync -a keep it');
    expect(r.stderr).toContain('bootcache verify --adopt');
    const j = await cli('verify', copy, '--json');
    expect(j.json).toMatchObject({ ok: false, adoptable: true, checks: { identity: 'fail', data: 'pass', checksums: 'pass' } });

    const adopt = await cli('verify', copy, '--adopt', '--json');
    expect(adopt.status, adopt.stderr).toBe(0);
    expect((adopt.json as { adopted: { rewritten: string[] } }).adopted.rewritten).toEqual([`${copy}.bcseg`, `${copy}.bcmap`]);
    const after = await cli('verify', copy, '--json');
    expect(after.status, after.stderr).toBe(0);
    expect(after.json).toMatchObject({ ok: true });
    // The original still verifies against its own files, which --adopt left alone.
    expect((await cli('verify', image)).status).toBe(0);
    expect((await readdir(dir)).filter(isTempName)).toEqual([]);
  });

  it('--adopt refuses when the data differs too (exit 1, files unchanged)', async () => {
    const copy = join(dir, 'changed.raw');
    execFileSync('cp', ['--sparse=always', image, copy]);
    await copyFile(`${image}.bcmap`, `${copy}.bcmap`);
    await copyFile(`${image}.bcseg`, `${copy}.bcseg`);
    const fh = await open(copy, 'r+');
    await fh.write(Buffer.from('changed'), 0, 7, 0); // block 0 is in the map (the trace reads at 0)
    await fh.close();
    const before = await readFile(`${copy}.bcseg`);
    const r = await cli('verify', copy, '--adopt');
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/blocks differ from the image/);
    expect(r.stderr).toContain('not adopted');
    expect((await readFile(`${copy}.bcseg`)).equals(before)).toBe(true);
  });
});

describe('--help', () => {
  it('lists the exit codes each command can return, and only those', async () => {
    const codes = async (...command: string[]): Promise<number[]> => {
      const help = (await cli(...command, '--help')).stdout;
      const section = help.slice(help.indexOf('EXIT CODES'), help.indexOf('EXAMPLES'));
      return [...section.matchAll(/^\s+(\d+)\s{2,}/gm)].map((m) => Number(m[1]));
    };
    expect(await codes('inspect')).toEqual([0, 2, 3, 4, 70]);
    expect(await codes('verify')).toEqual([0, 1, 2, 3, 4, 70]);
    expect(await codes('profile')).toEqual([0, 1, 2, 3, 4, 5, 6, 70]);
    expect(await codes('agent', 'status')).toEqual([0, 2, 7, 70]);
    expect(await codes('agent')).toEqual([0, 2, 3, 4, 7, 70]);
  });

  it('flags on by default show as --[no-]NAME with their default; --control shows its default once', async () => {
    const agent = (await cli('agent', '--help')).stdout;
    expect(agent).toContain('[--[no-]cache-misses]');
    expect(agent).toContain('[--[no-]warmup]');
    expect(agent).not.toMatch(/\[--cache-misses\]|\[--warmup\]/);
    expect(agent).toMatch(/--\[no-\]cache-misses\s+Cache blocks read on a miss, not only\s+prefetched ones \(default on\)/);
    const status = (await cli('agent', 'status', '--help')).stdout;
    expect(status.match(/\/run\/bootcache\/control\.sock/g)).toHaveLength(1);
    const profile = (await cli('profile', '--help')).stdout;
    expect(profile).toContain('[--[no-]segment]');
  });
});
