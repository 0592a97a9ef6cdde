/**
 * `bootcache index` end to end: a qcow2 image with a backing file is indexed,
 * its digests compared with SHA-256 of the blocks of `qemu-img convert`'s
 * output, shown by inspect, and checked by `verify --index`.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFile, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ImageIndex } from '../../src/format/image-index.js';
import { cli } from '../helpers/cli.js';

const BLOCK = 4096;
let dir: string;
let base: string;
let top: string;

const qemuIo = (image: string, ...commands: string[]): void => {
  execFileSync('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), image], { stdio: 'ignore' });
};

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bc-index-'));
  base = join(dir, 'base.qcow2');
  top = join(dir, 'top.qcow2');
  // 32 MiB base: patterned data, a data cluster written with zeros, a partial write.
  execFileSync('qemu-img', ['create', '-f', 'qcow2', base, '32M'], { stdio: 'ignore' });
  qemuIo(base, 'write -P 0x11 0 1M', 'write -P 0x00 4M 64k', 'write -P 0x22 8M 6k', 'write -P 0x33 31M 1M');
  // The top overrides part of the base: new data, an explicit zero range over base data, a partial block.
  execFileSync('qemu-img', ['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top], { stdio: 'ignore' });
  qemuIo(top, 'write -P 0x44 512k 8k', 'write -z 31M 128k', 'write -P 0x55 20M 512');
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** SHA-256 of each non-zero 4 KiB block of the guest-visible disk, by qemu-img. */
async function referenceDigests(image: string): Promise<Map<number, string>> {
  const raw = join(dir, 'reference.raw');
  execFileSync('qemu-img', ['convert', '-O', 'raw', image, raw]);
  const bytes = await readFile(raw);
  await rm(raw);
  const zero = Buffer.alloc(BLOCK);
  const digests = new Map<number, string>();
  for (let b = 0; b * BLOCK < bytes.length; b++) {
    const block = bytes.subarray(b * BLOCK, (b + 1) * BLOCK);
    if (!block.equals(zero)) digests.set(b, createHash('sha256').update(block).digest('hex'));
  }
  return digests;
}

describe('bootcache index', () => {
  it('indexes a qcow2 with a backing file: every data block has the SHA-256 of its qemu-img convert bytes, zero blocks none', async () => {
    const r = await cli('index', top, '--previous', './base.qcow2', '--json');
    expect(r.status, r.stderr).toBe(0);
    const expected = await referenceDigests(top);
    expect(r.json).toMatchObject({ index: `${top}.bcidx`, blockSize: 4096, blockCount: 8192, dataBlocks: expected.size, previous: './base.qcow2' });
    const index = await ImageIndex.open(`${top}.bcidx`);
    try {
      for (let b = 0; b < index.blockCount; b++) {
        expect(index.digestOf(b)?.toString('hex'), `block ${b}`).toBe(expected.get(b));
      }
      // The base's zero-filled data cluster, the top's zero range: no digests.
      expect(index.digestOf((4 * 1024 * 1024) / BLOCK)).toBeUndefined();
      expect(index.digestOf((31 * 1024 * 1024) / BLOCK)).toBeUndefined();
    } finally {
      await index.close();
    }

    const human = await cli('index', top, '--out', join(dir, 'human.bcidx'));
    expect(human.status, human.stderr).toBe(0);
    expect(human.stdout).toMatch(new RegExp(`human\\.bcidx: ${expected.size} data blocks of 8192 \\(`));
  });

  it('inspect shows an index, by its magic or with --kind index', async () => {
    const r = await cli('index', top, '--previous', './base.qcow2');
    expect(r.status, r.stderr).toBe(0);
    const json = await cli('inspect', `${top}.bcidx`, '--json');
    expect(json.status, json.stderr).toBe(0);
    expect(json.json).toMatchObject({ kind: 'index', version: 1, blockSize: 4096, blockCount: 8192, blockDigest: 'sha256', previous: './base.qcow2' });
    const x = json.json as { dataBlocks: number; tableBytes: number; fileBytes: number };
    expect(x.tableBytes).toBe(x.dataBlocks * 32);
    // Header 208 + 12 key bytes, padded to 224; bitmap 8192 bits.
    expect(x.fileBytes).toBe(224 + 1024 + x.tableBytes);
    const human = await cli('inspect', `${top}.bcidx`, '--kind', 'index');
    expect(human.stdout).toMatch(/image index v1/);
    expect(human.stdout).toMatch(/previous version \.\/base\.qcow2/);
  });

  it('verify --index passes, then fails naming the block after a digest byte flips or the image changes', async () => {
    const image = join(dir, 'v.qcow2');
    await copyFile(top, image);
    expect((await cli('index', image)).status).toBe(0);
    const ok = await cli('verify', image, '--index', `${image}.bcidx`);
    expect(ok.status, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/OK/);

    // The table is in block order: its last entry is the last data block's.
    const flipped = join(dir, 'flipped.bcidx');
    const bytes = await readFile(`${image}.bcidx`);
    bytes[bytes.length - 1] ^= 0x80;
    await writeFile(flipped, bytes);
    const last = (await referenceDigests(image)).size;
    const index = await ImageIndex.open(`${image}.bcidx`);
    const lastBlock = index.blockAt(last - 1);
    await index.close();
    const bad = await cli('verify', image, '--index', flipped);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/digest table is corrupted/);
    expect(bad.stderr).toContain(`block ${lastBlock} (image offset ${lastBlock * BLOCK}): digest mismatch`);
    const badJson = await cli('verify', image, '--index', flipped, '--json');
    expect(badJson.json).toMatchObject({ ok: false, checks: { table: 'fail', digests: 'fail' }, digestMismatches: 1, mismatches: [{ block: lastBlock, reason: 'digest' }] });

    qemuIo(image, 'write -P 0x66 12k 4k', 'write -P 0x77 16M 4k');
    const changed = await cli('verify', image, '--index', `${image}.bcidx`, '--json');
    expect(changed.status).toBe(1);
    expect(changed.json).toMatchObject({
      ok: false,
      checks: { identity: 'fail', digests: 'fail' },
      digestMismatches: 1,
      missingDigests: 1,
      mismatches: [{ block: 3, reason: 'digest' }, { block: 4096, reason: 'missing' }],
    });
  });

  it('bad input: missing image, not an image, a malformed index, the wrong kind of file: exit codes and one-line errors', async () => {
    const missing = await cli('index', join(dir, 'nope.qcow2'));
    expect(missing.status).toBe(3);
    expect(missing.stderr).toMatch(/^bootcache index: error: .*nope\.qcow2: no such file .*\[BC_NOT_FOUND\]\n$/);

    const text = join(dir, 'notes.txt');
    await writeFile(text, 'not a disk\n');
    const notImage = await cli('index', text, '--json');
    expect(notImage.status).toBe(3);
    expect(notImage.json).toMatchObject({ error: { code: 'BC_UNKNOWN_FILE_TYPE', exitCode: 3 } });

    const qcowGarbage = join(dir, 'garbage.qcow2');
    await writeFile(qcowGarbage, Buffer.concat([Buffer.from('QFI\xfb', 'latin1'), Buffer.alloc(100, 0xff)]));
    const garbage = await cli('index', qcowGarbage);
    expect(garbage.status).toBe(3);
    expect(garbage.stderr.trim().split('\n')).toHaveLength(1);

    expect((await cli('index', top)).status).toBe(0);
    const truncated = join(dir, 'truncated.bcidx');
    await writeFile(truncated, (await readFile(`${top}.bcidx`)).subarray(0, 500));
    for (const args of [['verify', top, '--index', truncated], ['inspect', truncated]]) {
      const r = await cli(...args);
      expect(r.status).toBe(3);
      expect(r.stderr).toMatch(/truncated\.bcidx: file is 500 bytes but its header describes \d+ .*: truncated \[BC_INVALID_INDEX\]\n$/);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }

    const notIndex = await cli('verify', top, '--index', top);
    expect(notIndex.status).toBe(3);
    expect(notIndex.stderr).toMatch(/not a bootcache image index \(bad magic\) \[BC_INVALID_INDEX\]/);
    expect((await cli('index', top, '--out', join(dir, 'map.bcmap'))).status).toBe(0);
    const asSegment = await cli('inspect', join(dir, 'map.bcmap'), '--kind', 'segment');
    expect(asSegment.status).toBe(3);
    expect(asSegment.stderr).toMatch(/is an image index, not a boot segment/);

    const outDir = await cli('index', top, '--out', join(dir, 'no-such-dir', 'x.bcidx'));
    expect(outDir.status).toBe(4);
    const usage = await cli('index', top, '--previous', '/srv/images/base.qcow2');
    expect(usage.status).toBe(2);
    expect(usage.stderr).toMatch(/absolute/);
    const both = await cli('verify', top, '--index', `${top}.bcidx`, '--segment', 'x.bcseg');
    expect(both.status).toBe(2);
  });
});
