/**
 * Under an address-space limit (`ulimit -v`, as some hosts and CI runners
 * set), V8 dies with an uncatchable fatal error when a thread cannot reserve
 * its code range, and libzstd's WebAssembly memory cannot reserve its guard
 * pages. The CLI must still read compressed images, giving the same bytes
 * as without a limit, or refuse with one coded line; never a V8 fatal error.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cli } from '../helpers/cli.js';
import { qemuImg, removeTmpDir, tmpDir } from '../helpers/qemu.js';

const repo = fileURLToPath(new URL('../..', import.meta.url));
const KiB = 1024;
const MiB = 1024 * KiB;

/** Runs `script` in bash under `ulimit -v limitKiB`, in the repository. */
function limited(limitKiB: number, script: string): Promise<{ status: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile('bash', ['-c', `ulimit -v ${limitKiB} && ${script}`], { cwd: repo, encoding: 'utf8', env: { ...process.env, NO_COLOR: '1' }, timeout: 120_000 }, (error, stdout, stderr) => {
      resolve({ status: error ? (typeof error.code === 'number' ? error.code : -1) : 0, stdout, stderr });
    });
  });
}

let dir: string;
const images: Record<'zstd' | 'zlib', string> = { zstd: '', zlib: '' };
const expected: Record<'zstd' | 'zlib', Buffer> = { zstd: Buffer.alloc(0), zlib: Buffer.alloc(0) };

beforeAll(async () => {
  dir = await tmpDir('bootcache-ulimit-');
  // 32 MiB: compressible text with random runs, so that most clusters are compressed.
  const raw = Buffer.alloc(32 * MiB);
  for (let at = 0; at < raw.length; at += 4 * KiB) {
    raw.write(`block ${at} of a compressible guest disk; `.repeat(40), at);
    randomBytes(256).copy(raw, at + 3 * KiB);
  }
  await writeFile(join(dir, 'disk.raw'), raw);
  const trace = ['t_us,op,offset,length'];
  for (let i = 0; i < 400; i++) trace.push(`${i},read,${((i * 37) % 512) * 64 * KiB},${64 * KiB}`);
  await writeFile(join(dir, 'boot.csv'), `${trace.join('\n')}\n`);
  for (const type of ['zstd', 'zlib'] as const) {
    images[type] = join(dir, `${type}.qcow2`);
    await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, join(dir, 'disk.raw'), images[type]]);
    expect((await cli('build-map', images[type], '--trace', join(dir, 'boot.csv'))).status).toBe(0);
    // Without a limit: the reference segment.
    const seg = join(dir, `${type}-free.bcseg`);
    expect((await cli('build-segment', images[type], '--out', seg)).status).toBe(0);
    expected[type] = await readFile(seg);
  }
}, 120_000);
afterAll(async () => {
  await removeTmpDir(dir);
});

describe('the CLI under ulimit -v', () => {
  for (const limitMiB of [1024, 1536, 2048]) {
    for (const type of ['zstd', 'zlib'] as const) {
      it(`build-segment and verify on a ${type} qcow2 under ${limitMiB} MiB: same bytes as without a limit`, async () => {
        const seg = join(dir, `${type}-${limitMiB}.bcseg`);
        const built = await limited(limitMiB * KiB, `node bin/run.js build-segment ${images[type]} --out ${seg}`);
        expect(built.stderr).not.toMatch(/Fatal|FATAL|V8/);
        expect(built.status).toBe(0);
        expect((await readFile(seg)).equals(expected[type])).toBe(true);
        const verified = await limited(limitMiB * KiB, `node bin/run.js verify ${images[type]} --segment ${seg} --json`);
        expect(verified.stderr).not.toMatch(/Fatal|FATAL|V8/);
        expect(verified.status).toBe(0);
      });
    }
  }

  it('refuses a limit below what node needs with one coded line', async () => {
    const r = await limited(768 * KiB, `node bin/run.js build-segment ${images.zstd} --out ${join(dir, 'low.bcseg')}`);
    expect(r.status).toBe(4);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/address-space limit of 768 MiB.*\[BC_RESOURCE_LIMIT\]/);
  });

  it('the library without the flag refuses zstd with a coded error instead of hanging', async () => {
    const script = join(dir, 'read.mjs');
    await writeFile(
      script,
      `import { openImage } from ${JSON.stringify(join(repo, 'dist/image/open.js'))};
const image = await openImage(${JSON.stringify(images.zstd)});
try { await image.read(0, 1024 * 1024); console.log('read'); }
catch (err) { console.log(err.code, err.message); }
await image.close();
`,
    );
    const r = await limited(1536 * KiB, `node ${script}`);
    expect(r.stderr).not.toMatch(/Fatal|FATAL/);
    expect(r.stdout).toMatch(/^BC_RESOURCE_LIMIT .*--disable-wasm-trap-handler/);
  });
});
