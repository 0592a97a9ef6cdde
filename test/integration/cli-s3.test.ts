/**
 * The offline commands on s3:// locations, against a real Ceph RGW: the
 * image read in place from the bucket (a qcow2 with a backing file beside
 * it), map and segment written to and read from the bucket, with the same
 * block data as from a local copy; errors are one line naming the s3://
 * location.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { HeadObjectCommand, PutObjectCommand, type S3Client } from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cli } from '../helpers/cli.js';
import { qemuImg, removeTmpDir, tmpDir } from '../helpers/qemu.js';
import { createTestBucket, deleteTestBucket, ensureRgw } from '../helpers/rgw.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const rgw = await ensureRgw();
let bucket: string;
let admin: S3Client;
let dir: string;
let s3: string[];

describe.skipIf(rgw === undefined)('commands on s3:// locations (Ceph RGW)', () => {
  beforeAll(async () => {
    s3 = ['--s3-endpoint', rgw!.endpoint, '--s3-path-style'];
    ({ bucket, client: admin } = await createTestBucket(rgw!, 'bc-cli'));
    dir = await tmpDir('bc-cli-s3-');
    await writeFile(join(dir, 'base.raw'), randomBytes(16 * MiB));
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(dir, 'top.qcow2')], { cwd: dir });
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 2M 1M', join(dir, 'top.qcow2')]);
    const trace = ['t_us,op,offset,length'];
    for (let i = 0; i < 300; i++) trace.push(`${i},read,${((i * 7919) % 4000) * 4096},${4096 * (1 + (i % 4))}`);
    await writeFile(join(dir, 'boot.csv'), `${trace.join('\n')}\n`);
    for (const name of ['base.raw', 'top.qcow2']) {
      const body = await readFile(join(dir, name));
      await admin.send(new PutObjectCommand({ Bucket: bucket, Key: `img/${name}`, Body: body, ContentLength: body.length }));
    }
  }, 120_000);

  afterAll(async () => {
    if (rgw === undefined) return;
    await deleteTestBucket(admin, bucket);
    await removeTmpDir(dir);
  });

  it('build-map, build-segment, verify and inspect on the bucket, with the block data of a local copy', async () => {
    const image = `s3://${bucket}/img/top.qcow2`;
    const map = await cli('build-map', image, '--trace', join(dir, 'boot.csv'), ...s3, '--json');
    expect(map.stderr).toBe('');
    expect(map.status).toBe(0);
    expect(map.json).toMatchObject({ map: `${image}.bcmap` });
    await admin.send(new HeadObjectCommand({ Bucket: bucket, Key: 'img/top.qcow2.bcmap' }));

    const seg = await cli('build-segment', image, ...s3, '--json');
    expect(seg.status).toBe(0);
    expect(seg.json).toMatchObject({ path: `${image}.bcseg` });
    const local = await cli('build-map', join(dir, 'top.qcow2'), '--trace', join(dir, 'boot.csv'));
    expect(local.status).toBe(0);
    const localSeg = await cli('build-segment', join(dir, 'top.qcow2'), '--json');
    // The same blocks of the same guest data: the identity differs (an ETag is not an mtime), the data does not.
    expect((seg.json as { dataSha256: string }).dataSha256).toBe((localSeg.json as { dataSha256: string }).dataSha256);

    const verified = await cli('verify', image, ...s3, '--json');
    expect(verified.status).toBe(0);
    expect(verified.json).toMatchObject({ ok: true });

    const inspected = await cli('inspect', image, ...s3, '--json');
    expect(inspected.status).toBe(0);
    expect(inspected.json).toMatchObject({ format: 'qcow2', backingChain: [{ format: 'raw' }] });
    const inspectedMap = await cli('inspect', `${image}.bcmap`, ...s3, '--json');
    expect(inspectedMap.json).toMatchObject({ blocksSet: (map.json as { blocksSet: number }).blocksSet });
    const inspectedSeg = await cli('inspect', `${image}.bcseg`, ...s3, '--json');
    expect(inspectedSeg.json).toMatchObject({ dataSha256: (seg.json as { dataSha256: string }).dataSha256 });
  });

  it('index writes IMAGE.bcidx into the bucket with the digests of a local copy; inspect and verify --index read it there', async () => {
    const image = `s3://${bucket}/img/top.qcow2`;
    const built = await cli('index', image, '--previous', './base.raw', ...s3, '--json');
    expect(built.stderr).toBe('');
    expect(built.status).toBe(0);
    expect(built.json).toMatchObject({ index: `${image}.bcidx`, previous: './base.raw' });
    await admin.send(new HeadObjectCommand({ Bucket: bucket, Key: 'img/top.qcow2.bcidx' }));
    const local = await cli('index', join(dir, 'top.qcow2'), '--json');
    expect(local.status).toBe(0);
    const table = (r: { json: unknown }): string => (r.json as { digestTableSha256: string }).digestTableSha256;
    expect(table(built)).toBe(table(local));

    const inspected = await cli('inspect', `${image}.bcidx`, ...s3, '--json');
    expect(inspected.json).toMatchObject({ kind: 'index', digestTableSha256: table(local), previous: './base.raw' });
    const verified = await cli('verify', image, '--index', `${image}.bcidx`, ...s3, '--json');
    expect(verified.status).toBe(0);
    expect(verified.json).toMatchObject({ ok: true, index: `${image}.bcidx` });
  });

  it('errors are one line naming the s3:// location', async () => {
    const missing = await cli('inspect', `s3://${bucket}/img/missing.qcow2`, ...s3);
    expect(missing.status).toBe(3);
    expect(missing.stderr.trim().split('\n')).toHaveLength(1);
    expect(missing.stderr).toContain(`s3://${bucket}/img/missing.qcow2: no such object`);

    // A map given as the segment: the fetched file's problem, named by its s3:// location.
    const wrongKind = await cli('verify', `s3://${bucket}/img/top.qcow2`, '--segment', `s3://${bucket}/img/top.qcow2.bcmap`, ...s3);
    expect(wrongKind.status).toBe(3);
    expect(wrongKind.stderr).toContain(`s3://${bucket}/img/top.qcow2.bcmap: is a boot workload map, not a boot segment`);
    expect(wrongKind.stderr).not.toContain('bootcache-s3-');

    const unreachable = await cli('inspect', `s3://${bucket}/img/top.qcow2`, '--s3-endpoint', 'http://127.0.0.1:9', '--s3-path-style');
    expect(unreachable.status).toBe(4);
    expect(unreachable.stderr.trim().split('\n')).toHaveLength(1);

    const adopt = await cli('verify', `s3://${bucket}/img/top.qcow2`, '--adopt', ...s3);
    expect(adopt.status).toBe(2);
    expect(adopt.stderr).toContain('--adopt re-stamps local files only');
  });
});
