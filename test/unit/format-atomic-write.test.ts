import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BootcacheError, StorageIOError } from '../../src/errors.js';
import { AtomicFile, isTempName, withAtomicFile, writeFileAtomic } from '../../src/format/atomic-write.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bootcache-atomic-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const tempFiles = async (d: string) => (await readdir(d)).filter(isTempName);

describe('atomic writes', () => {
  it('replaces the target in one step', async () => {
    const target = join(dir, 'a.bin');
    await writeFile(target, 'old');
    await writeFileAtomic(target, [Buffer.from('new '), Buffer.from('content')]);
    expect(await readFile(target, 'utf8')).toBe('new content');
    expect(await tempFiles(dir)).toEqual([]);
  });

  it('supports positional writes with the header written last', async () => {
    const target = join(dir, 'b.bin');
    await withAtomicFile(target, async (file) => {
      await file.writev([Buffer.from('wor'), Buffer.from('ld')], 6);
      file.startBackgroundSync();
      await file.write(Buffer.from('hello '), 0);
    });
    expect(await readFile(target, 'utf8')).toBe('hello world');
  });

  it('keeps the old target and removes the temp file when the writer fails', async () => {
    const target = join(dir, 'c.bin');
    await writeFile(target, 'keep me');
    let seenTemp = '';
    await expect(
      withAtomicFile(target, async (file) => {
        seenTemp = file.tempPath;
        await file.write(Buffer.alloc(1 << 20, 1), 0);
        expect(await tempFiles(dir)).toHaveLength(1);
        throw new Error('writer failed');
      }),
    ).rejects.toThrow('writer failed');
    expect(isTempName(seenTemp.split('/').pop()!)).toBe(true);
    expect(await readFile(target, 'utf8')).toBe('keep me');
    expect(await tempFiles(dir)).toEqual([]);
  });

  it('removes the temp file when the rename fails', async () => {
    const target = join(dir, 'd-dir');
    await mkdir(target);
    await writeFile(join(target, 'inside'), 'x'); // renaming a file over a non-empty directory fails
    const err = await writeFileAtomic(target, Buffer.from('data')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BootcacheError);
    expect((err as Error).message).toContain(target);
    expect(await tempFiles(dir)).toEqual([]);
  });

  it('fails cleanly when the directory does not exist', async () => {
    const err = await writeFileAtomic(join(dir, 'no', 'such', 'x.bin'), Buffer.from('x')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BootcacheError);
    expect((err as Error).message).toMatch(/directory .* does not exist/);
  });

  it('refuses use after commit or abort', async () => {
    const file = await AtomicFile.create(join(dir, 'e.bin'));
    await file.abort();
    await file.abort(); // idempotent
    await expect(file.write(Buffer.from('x'), 0)).rejects.toThrow(/aborted/);
    expect(await tempFiles(dir)).toEqual([]);
  });

  it('maps a read-only directory to a one-line I/O error', async () => {
    if (process.getuid?.() === 0) return; // root ignores permissions
    const ro = join(dir, 'ro');
    await mkdir(ro, { mode: 0o555 });
    await expect(writeFileAtomic(join(ro, 'x.bin'), Buffer.from('x'))).rejects.toThrow(StorageIOError);
  });
});
