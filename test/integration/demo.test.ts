/**
 * scripts/demo.js: says what it does (all steps, the space it takes), keeps
 * its files only with --keep, and removes them also when a step fails.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const demo = fileURLToPath(new URL('../../scripts/demo.js', import.meta.url));
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bc-demo-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function run(args: string[], env: Record<string, string> = {}): { status: number | null; out: string } {
  const r = spawnSync(process.execPath, [demo, ...args], { encoding: 'utf8', env: { ...process.env, CI: 'true', ...env }, timeout: 600_000 });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

describe('the demo', () => {
  it('--help describes every step, the last one included, and the space it writes', () => {
    const r = run(['--help']);
    expect(r.status).toBe(0);
    expect(r.out).toContain('replays the boot through the agent over storage delayed by 2 ms per');
    expect(r.out).toContain('about 490 MiB');
    expect(r.out).toContain('--keep');
    expect(run(['--frobnicate']).status).toBe(2);
  });

  it('runs to the end; --keep keeps the files; no colour in CI', () => {
    const work = join(dir, 'kept');
    const r = run(['--keep'], { BOOTCACHE_DEMO_DIR: work });
    expect(r.status, r.out).toBe(0);
    expect(r.out).toMatch(/cold host \(segment prefetched\)\s+[\d.]+ s/);
    expect(r.out).toMatch(/Done\. Files \(\d+ MiB\) are in /);
    expect(existsSync(join(work, 'debian12.qcow2.bcseg'))).toBe(true);
    expect(r.out).not.toContain('\x1b[');
  });

  it('removes its files without --keep, also when a step fails', () => {
    const work = join(dir, 'removed');
    // Without qemu-img in PATH, step 1 fails after writing the raw disk.
    const r = run([], { BOOTCACHE_DEMO_DIR: work, PATH: '/nonexistent' });
    expect(r.status).toBe(1);
    expect(r.out).toMatch(/Failed\. Removed .*removed \(\d+ MiB\); --keep keeps it\./);
    expect(existsSync(work)).toBe(false);
  });
});
