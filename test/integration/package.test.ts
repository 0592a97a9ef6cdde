/**
 * The package as users install it: `npm pack` (its prepack builds), then
 * `npm install -g` of the tarball into a fresh prefix, from the tarball and
 * the npm registry, not from the work tree. The installed command runs, and
 * its man pages are where man finds them.
 */
import { execFile } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';

const run = promisify(execFile);
const repo = fileURLToPath(new URL('../..', import.meta.url));
let dir: string;

beforeAll(async () => {
  dir = await tmpDir('bc-package-');
});
afterAll(async () => {
  await removeTmpDir(dir);
});

describe('the npm package', () => {
  it('lists every man page in package.json "man"', async () => {
    const pkg = JSON.parse(await readFile(join(repo, 'package.json'), 'utf8')) as { man: string[] };
    const pages = (await readdir(join(repo, 'man'))).filter((f) => f.endsWith('.1')).map((f) => `./man/${f}`).sort();
    expect(pkg.man).toEqual(pages);
  });

  it('packs, installs globally into a fresh prefix, and runs with its man pages', async () => {
    // --ignore-scripts: dist/ is built already (npm test builds it); a prepack build would rewrite it under the other tests.
    const { stdout: packed } = await run('npm', ['pack', '--ignore-scripts', '--pack-destination', dir, '--silent'], { cwd: repo, maxBuffer: 16 << 20 });
    const tarball = join(dir, packed.trim().split('\n').pop()!);
    const prefix = join(dir, 'prefix');
    await run('npm', ['install', '-g', '--prefix', prefix, tarball, '--no-audit', '--no-fund', '--silent'], { cwd: dir, maxBuffer: 16 << 20 });
    const bin = join(prefix, 'bin', 'bootcache');
    const { stdout: version } = await run(bin, ['--version'], { cwd: dir });
    expect(version).toMatch(/^bootcache\/\d+\.\d+\.\d+ /);
    const { stdout: help } = await run(bin, ['agent', '--help'], { cwd: dir });
    expect(help).toContain('--storage');
    const { stdout: inspect } = await run(bin, ['inspect', '--help'], { cwd: dir });
    expect(inspect).toContain('USAGE');
    const man = join(prefix, 'share', 'man');
    expect((await readdir(join(man, 'man1'))).sort()).toEqual((await readdir(join(repo, 'man'))).filter((f) => f.endsWith('.1')).sort());
    const { stdout: page } = await run('man', ['-P', 'cat', 'bootcache-agent'], { env: { ...process.env, MANPATH: man, MANWIDTH: '80' } });
    expect(page).toMatch(/BOOTCACHE-AGENT\(1\)/);
    // The systemd units ship too.
    expect(await readdir(join(prefix, 'lib', 'node_modules', 'bootcache', 'contrib', 'systemd'))).toContain('bootcache-agent.service');
  }, 300_000);
});
