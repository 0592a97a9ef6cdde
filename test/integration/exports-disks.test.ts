/**
 * Only disk images are exports: qcow2 images by their header, raw images by
 * their name (.raw, .img, or --raw-extensions). A README, a log or a text
 * file named .qcow2 in the storage root is neither listed nor served, and
 * `inspect` does not call a text file a raw image unless --format raw says so.
 */
import { execFile } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../src/agent/agent.js';
import { resolveConfig } from '../../src/agent/config.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { NbdUnknownExportError } from '../../src/nbd/errors.js';
import { exportUri, startTestAgent } from '../helpers/agent.js';
import { cli } from '../helpers/cli.js';
import { qemuImg, removeTmpDir, tmpDir } from '../helpers/qemu.js';

const run = promisify(execFile);
let root: string;
let storage: string;
const agents: Agent[] = [];

beforeAll(async () => {
  root = await tmpDir('bc-disks-');
  storage = join(root, 'storage');
  await mkdir(join(storage, 'pool'), { recursive: true });
  await writeFile(join(storage, 'disk.raw'), Buffer.alloc(1024 * 1024, 1));
  await writeFile(join(storage, 'pool', 'disk.IMG'), Buffer.alloc(1024 * 1024, 2));
  await qemuImg(['create', '-q', '-f', 'qcow2', join(storage, 'pool', 'vm.qcow2'), '1M']);
  // A qcow2 image under any name is found by its header.
  await qemuImg(['create', '-q', '-f', 'qcow2', join(storage, 'golden'), '1M']);
  await writeFile(join(storage, 'notes.txt'), 'remember to rotate the keys\n'.repeat(1000));
  await writeFile(join(storage, 'README.md'), '# images\n');
  await writeFile(join(storage, 'fake.qcow2'), 'not really a qcow2 image\n');
  await writeFile(join(storage, 'disk.bin'), Buffer.alloc(65536, 3));
});
afterEach(async () => {
  while (agents.length) await agents.pop()!.stop();
});
afterAll(async () => {
  await removeTmpDir(root);
});

async function listed(socket: string): Promise<string[]> {
  const { stdout } = await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${socket}`], { encoding: 'utf8' });
  return (JSON.parse(stdout) as { exports: Array<{ 'export-name': string }> }).exports.map((e) => e['export-name']).sort();
}

describe('exports are disk images', () => {
  it('lists and serves qcow2 images by header and raw images by name, nothing else', async () => {
    const { agent, config } = await startTestAgent(storage, join(root, 'a1'));
    agents.push(agent);
    expect(await listed(config.socket)).toEqual(['disk.raw', 'golden', 'pool/disk.IMG', 'pool/vm.qcow2']);
    for (const name of ['notes.txt', 'README.md', 'fake.qcow2', 'disk.bin']) {
      const err = await NbdClient.connect(exportUri(config, name)).then(
        async (c) => {
          await c.close();
          return undefined;
        },
        (e: unknown) => e,
      );
      expect(err, name).toBeInstanceOf(NbdUnknownExportError);
    }
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', exportUri(config, 'disk.raw'), join(storage, 'disk.raw')]);
  });

  it('--raw-extensions chooses the raw names', async () => {
    const { agent, config } = await startTestAgent(storage, join(root, 'a2'), { rawExtensions: '.bin' });
    agents.push(agent);
    expect(await listed(config.socket)).toEqual(['disk.bin', 'golden', 'pool/vm.qcow2']);
    expect(() => resolveConfig({ storage, cache: join(root, 'c') }, { rawExtensions: 'raw' })).toThrow(/name endings such as \.raw,\.img/);
  });

  it('inspect refuses a text file as an image, unless --format raw', async () => {
    const text = await cli('inspect', join(storage, 'README.md'));
    expect(text.status).toBe(3);
    expect(text.stderr.trim().split('\n')).toHaveLength(1);
    expect(text.stderr).toContain('README.md: is not a disk image: not qcow2, and not named *.raw or *.img; pass --format raw');
    const forced = await cli('inspect', join(storage, 'README.md'), '--format', 'raw', '--json');
    expect(forced.status).toBe(0);
    expect(forced.json).toMatchObject({ format: 'raw' });
    expect((await cli('inspect', join(storage, 'golden'), '--json')).json).toMatchObject({ format: 'qcow2' });
    expect((await cli('inspect', join(storage, 'disk.raw'), '--json')).status).toBe(0);
  });
});
