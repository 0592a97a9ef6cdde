import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { BootRecorder, DEFAULT_BOOT_POLICY } from '../../src/agent/boot-recorder.js';

const GiB = 1024 ** 3;

/** The real boot trace: [t_ms, offset, length] per read. */
function realTrace(): Array<[number, number, number]> {
  return readFileSync(new URL('../data/debian12-minbase-boot-timed.csv', import.meta.url), 'utf8')
    .trim()
    .split('\n')
    .slice(1)
    .map((line) => line.split(','))
    .filter((f) => f[1] === 'read')
    .map((f) => [Number(f[0]) / 1000, Number(f[2]), Number(f[3])]);
}

function replay(recorder: BootRecorder, reads: Array<[number, number, number]>): void {
  for (const [t, offset, length] of reads) recorder.recordRead(offset, length, t);
}

describe('BootRecorder on the real Debian 12 boot trace', () => {
  const reads = realTrace();
  const lastT = reads[reads.length - 1]![0];

  it('records the whole boot with the default policy', () => {
    const r = new BootRecorder(2 * GiB, 4096, DEFAULT_BOOT_POLICY, 0);
    replay(r, reads);
    expect(r.recording).toBe(true);
    expect(r.reads).toBe(4060);
    expect(r.blocks).toBe(24039);
    // No new block for 20 s after the last read: the boot is over, ended at its last new block.
    expect(r.checkEnd(lastT + 19_000)).toBeUndefined();
    expect(r.checkEnd(lastT + 20_000)).toBe('idle');
    const s = r.summary(lastT + 30_000);
    expect(s.state).toBe('complete');
    expect(s.durationMs).toBeCloseTo(lastT, 0);
  });

  it('a shorter idle gap would cut the boot at the kernel start pause (why the default is 20 s)', () => {
    const r = new BootRecorder(2 * GiB, 4096, { ...DEFAULT_BOOT_POLICY, idleMs: 5_000 }, 0);
    replay(r, reads);
    expect(r.endReason).toBe('idle');
    // Only the reads before the 9.1 s pause (GRUB loading kernel and initramfs) were kept.
    expect(r.reads).toBe(2836);
    expect(r.summary(lastT).durationMs).toBeLessThan(2_000);
  });

  it('the window ends a boot that never goes idle', () => {
    const r = new BootRecorder(2 * GiB, 4096, { ...DEFAULT_BOOT_POLICY, windowMs: 12_000 }, 0);
    replay(r, reads);
    expect(r.endReason).toBe('window');
    expect(r.reads).toBeLessThan(4060);
    expect(reads.filter(([t]) => t < 12_000).length).toBe(r.reads);
  });

  it('needs a minimum number of reads before an idle gap counts', () => {
    const r = new BootRecorder(2 * GiB, 4096, { idleMs: 1_000, windowMs: 60_000, minReads: 10 }, 0);
    r.recordRead(0, 512, 0);
    expect(r.checkEnd(5_000)).toBeUndefined();
    for (let i = 1; i < 10; i++) r.recordRead(i * 4096, 4096, 5_000 + i);
    expect(r.checkEnd(5_500)).toBeUndefined();
    expect(r.checkEnd(6_100)).toBe('idle');
    // Reads after the end are not recorded.
    r.recordRead(100 * 4096, 4096, 7_000);
    expect(r.blocks).toBe(10);
  });

  it('mark-booted ends the boot at once, and nextDeadline tracks the idle gap', () => {
    const r = new BootRecorder(GiB, 4096, { idleMs: 1_000, windowMs: 60_000, minReads: 1 }, 0);
    expect(r.nextDeadline()).toBe(60_000);
    r.recordRead(8192, 100, 50);
    expect(r.nextDeadline()).toBe(1_050);
    r.end('mark-booted', 70);
    expect(r.summary(500)).toMatchObject({ state: 'complete', endReason: 'mark-booted', durationMs: 70, blocks: 1 });
  });
});

describe('BootRecorder: a whole-disk read is not a boot (maxShare)', () => {
  const reads = realTrace();
  const MiB = 1024 * 1024;
  /** The reference guest's disk holds 784 MB (docs/reference-guest.md). */
  const referenceData = 784_000_000;

  /** Reads [0, bytes) front to back in 1 MiB requests, as nbdcopy or qemu-img convert do; returns the reads made. */
  function copy(r: BootRecorder, bytes: number, t0 = 0): number {
    let n = 0;
    for (let offset = 0; offset < bytes; offset += MiB, n++) r.recordRead(offset, Math.min(MiB, bytes - offset), t0 + n);
    return n;
  }

  it('keeps the real boot, on the reference disk and on a disk holding only what the boot reads', () => {
    for (const data of [referenceData, 24039 * 4096]) {
      const r = new BootRecorder(2 * GiB, 4096, DEFAULT_BOOT_POLICY, 0);
      r.setDataBytes(data, 0);
      replay(r, reads);
      expect(r.recording).toBe(true);
      expect(r.reads).toBe(4060);
      expect(r.checkEnd(reads[reads.length - 1]![0] + 20_000)).toBe('idle');
      expect(r.summary(0)).toMatchObject({ state: 'complete', endReason: 'idle' });
      expect(r.summary(0).discardReason).toBeUndefined();
    }
  });

  it('ends and discards a copy of the image as soon as it passes maxShare of the data', () => {
    const r = new BootRecorder(2 * GiB, 4096, DEFAULT_BOOT_POLICY, 0);
    r.setDataBytes(referenceData, 0);
    const limit = referenceData / 2;
    expect(r.limitBytes()).toBe(limit);
    copy(r, 2 * GiB);
    expect(r.endReason).toBe('max-share');
    // It stopped at the first read past the limit: the rest of the copy was not recorded.
    expect(r.blocks * 4096).toBeGreaterThan(limit);
    expect(r.blocks * 4096).toBeLessThanOrEqual(limit + MiB);
    expect(r.reads).toBe(Math.ceil(limit / MiB) + (limit % MiB === 0 ? 1 : 0));
    const s = r.summary(10_000);
    expect(s.state).toBe('discarded');
    expect(s.discardReason).toMatch(/^read 374\.0 MiB of distinct blocks, more than 0\.5 of the image's 747\.7 MiB of data .*not a boot$/);
  });

  it('never discards below the floor, and maxShare 0 turns the rule off', () => {
    const small = new BootRecorder(GiB, 4096, DEFAULT_BOOT_POLICY, 0);
    small.setDataBytes(200 * MiB, 0); // a small guest: a copy of all its data stays under the 256 MiB floor
    copy(small, 200 * MiB);
    expect(small.recording).toBe(true);
    const off = new BootRecorder(GiB, 4096, { ...DEFAULT_BOOT_POLICY, maxShare: 0 }, 0);
    off.setDataBytes(GiB, 0);
    copy(off, GiB);
    expect(off.recording).toBe(true);
    expect(off.blocks).toBe(GiB / 4096);
  });

  it('takes the share of the virtual size until the data size is known, then of the data', () => {
    const policy = { ...DEFAULT_BOOT_POLICY, maxShareFloor: 16 * MiB };
    const r = new BootRecorder(GiB, 4096, policy, 0);
    expect(r.wantsDataBytes).toBe(false);
    copy(r, 100 * MiB);
    // Past half the floor: time to learn the data size. Under half the virtual size: still recording.
    expect(r.wantsDataBytes).toBe(true);
    expect(r.recording).toBe(true);
    // The image holds 150 MiB of data: 100 MiB read is past half of it; the recording ends now, at its last read.
    r.setDataBytes(150 * MiB, 500);
    expect(r.summary(1_000)).toMatchObject({ state: 'discarded', endReason: 'max-share', durationMs: 500 });
    expect(r.wantsDataBytes).toBe(false);
  });
});
