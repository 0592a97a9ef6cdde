/**
 * The qcow2 decode workers never keep a process alive: a process that has
 * decoded compressed clusters exits by itself once its work is done, even
 * when some of the pool's workers were started but never sent a batch (an
 * agent that did not exit after SIGTERM once a 1 MiB compressed read had
 * started two workers and used one).
 */
import { spawnSync } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const repo = resolve(__dirname, '../..');
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bc-decode-exit-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('decode pool', () => {
  it('lets the process exit after a batch that used one of its two workers', async () => {
    const script = join(dir, 'decode.mjs');
    // 4 clusters of 64 KiB: above the inline limit, one message (below 2 x 256 KiB), so one worker is idle.
    await writeFile(
      script,
      `import { deflateRawSync } from 'node:zlib';
import { DecodePool } from ${JSON.stringify(join(repo, 'dist/image/qcow2/decode-pool.js'))};
const cluster = 65536;
const sources = [1, 2, 3, 4].map((i) => deflateRawSync(Buffer.alloc(cluster, i)));
const out = await new DecodePool(2).decodeMany('zlib', sources, cluster);
console.log(out.every((b, i) => Buffer.isBuffer(b) && b.every((x) => x === i + 1)) ? 'decoded' : 'wrong');
`,
    );
    const r = spawnSync(process.execPath, [script], { encoding: 'utf8', timeout: 20_000 });
    expect(r.stdout.trim()).toBe('decoded');
    expect(r.signal).toBeNull();
    expect(r.status).toBe(0);
  });
});
