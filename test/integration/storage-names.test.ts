/**
 * Names that begin with ".." ("..x.raw", "..d/y.raw") are ordinary names
 * inside the storage root: the root check compares path segments, not
 * prefixes. Served and listed by the agent (NBD_OPT_LIST via nbdinfo).
 */
import { execFile } from 'node:child_process';
import { mkdir, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UsageError } from '../../src/errors.js';
import { LocalDirStorage, outside } from '../../src/storage/local.js';
import { exportUri, startTestAgent } from '../helpers/agent.js';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';

const run = promisify(execFile);
let root: string;
let storageDir: string;

beforeAll(async () => {
  root = await tmpDir('bc-names-');
  storageDir = join(root, 'storage');
  await mkdir(join(storageDir, '..d'), { recursive: true });
  await writeFile(join(storageDir, '..x.raw'), Buffer.alloc(1024 * 1024, 1));
  await writeFile(join(storageDir, '...raw'), Buffer.alloc(1024 * 1024, 2));
  await writeFile(join(storageDir, '..d', 'y.raw'), Buffer.alloc(1024 * 1024, 3));
  await writeFile(join(storageDir, 'plain.raw'), Buffer.alloc(1024 * 1024, 4));
  await writeFile(join(root, 'secret.raw'), Buffer.alloc(512, 5));
  await symlink(join(root, 'secret.raw'), join(storageDir, '..escape.raw'));
});

afterAll(async () => {
  await removeTmpDir(root);
});

describe('names beginning with ".."', () => {
  it('compares path segments', () => {
    expect(outside('/srv/images', '/srv/images/..x.raw')).toBe(false);
    expect(outside('/srv/images', '/srv/images/..d/y.raw')).toBe(false);
    expect(outside('/srv/images', '/srv/images')).toBe(false);
    expect(outside('/srv/images', '/srv')).toBe(true);
    expect(outside('/srv/images', '/srv/x.raw')).toBe(true);
    expect(outside('/srv/images', '/srv/images/../x.raw')).toBe(true);
    expect(outside('/srv/images', '/srv/images-2/x.raw')).toBe(true);
  });

  it('are read, stat-ed and listed by the storage; escapes are still refused', async () => {
    const storage = await LocalDirStorage.open(storageDir);
    expect((await storage.stat('..x.raw'))?.size).toBe(1024 * 1024);
    expect((await storage.read('..d/y.raw', 0, 4)).equals(Buffer.alloc(4, 3))).toBe(true);
    expect(storage.resolveRelative('vm.qcow2', join(storageDir, '..x.raw'))).toBe('..x.raw');
    expect(() => storage.resolveRelative('vm.qcow2', join(root, 'secret.raw'))).toThrow(/outside the storage root/);
    // A symlink out of the root is refused, and leaves the rest of the listing alone.
    await expect(storage.read('..escape.raw', 0, 1)).rejects.toThrow(UsageError);
    expect((await storage.list()).map((o) => o.key)).toEqual(['...raw', '..d/y.raw', '..x.raw', 'plain.raw']);
  });

  it('are served and listed by the agent over NBD', async () => {
    const { agent, config } = await startTestAgent(storageDir, join(root, 'agent'));
    try {
      const { stdout } = await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${config.socket}`], { encoding: 'utf8' });
      const names = (JSON.parse(stdout) as { exports: Array<{ 'export-name': string }> }).exports.map((e) => e['export-name']);
      expect(names.sort()).toEqual(['...raw', '..d/y.raw', '..x.raw', 'plain.raw']);
      for (const name of ['..x.raw', '..d/y.raw']) {
        await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', exportUri(config, name), join(storageDir, name)]);
      }
    } finally {
      await agent.stop();
    }
  });
});
