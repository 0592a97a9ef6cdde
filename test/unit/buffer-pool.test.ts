import { describe, expect, it } from 'vitest';
import { closeSync, openSync } from 'node:fs';
import { BufferPool, writeFromKernel } from '../../src/agent/buffer-pool.js';

describe('BufferPool', () => {
  it('hands a given buffer out again instead of allocating', () => {
    const pool = new BufferPool(1024, 2);
    const a = pool.take();
    expect(a.length).toBe(1024);
    pool.give(a);
    expect(pool.take()).toBe(a);
    expect(pool.stats()).toEqual({ bufferBytes: 1024, maxIdle: 2, idle: 0, allocated: 1 });
  });

  it('keeps at most maxIdle buffers, and only buffers of its size', () => {
    const pool = new BufferPool(1024, 2);
    const taken = [pool.take(), pool.take(), pool.take()];
    for (const buf of taken) pool.give(buf);
    pool.give(Buffer.alloc(512));
    expect(pool.stats()).toMatchObject({ idle: 2, allocated: 3 });
  });

  it('serves smaller requests from the pool and larger ones with a fresh buffer it does not keep', () => {
    const pool = new BufferPool(1024, 2);
    pool.give(pool.take());
    expect(pool.take(100).length).toBe(1024);
    const big = pool.take(4096);
    expect(big.length).toBe(4096);
    pool.give(big);
    expect(pool.stats()).toMatchObject({ idle: 0, allocated: 1 });
  });

  it('prefaults up to maxIdle zero-filled buffers', async () => {
    const pool = new BufferPool(3 * 1024 * 1024 + 5, 3);
    pool.give(pool.take());
    await pool.prefault();
    expect(pool.stats()).toMatchObject({ idle: 3, allocated: 3 });
    const buf = pool.take();
    expect(buf.length).toBe(3 * 1024 * 1024 + 5);
    expect(buf.subarray(buf.length - 4096).every((b) => b === 0) && buf.subarray(0, 4096).every((b) => b === 0)).toBe(true);
  });

  it('stops a prefault in progress and keeps nothing once closed', async () => {
    const pool = new BufferPool(4 * 1024 * 1024, 8);
    const prefault = pool.prefault();
    pool.close();
    await prefault;
    expect(pool.stats().idle).toBe(0);
    expect(pool.stats().allocated).toBeLessThanOrEqual(1);
    pool.give(pool.take());
    expect(pool.stats().idle).toBe(0);
  });

  it('has the kernel write every byte of the range, and nothing outside it', () => {
    const buf = Buffer.alloc(3 * 1024 * 1024, 0xff);
    const zero = openSync('/dev/zero', 'r');
    try {
      writeFromKernel(zero, buf, 4097, 2 * 1024 * 1024 + 3);
    } finally {
      closeSync(zero);
    }
    expect(buf[4096]).toBe(0xff);
    expect(buf.subarray(4097, 2 * 1024 * 1024 + 3).every((b) => b === 0)).toBe(true);
    expect(buf[2 * 1024 * 1024 + 3]).toBe(0xff);
  });
});
