import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { BootRecorder, DEFAULT_BOOT_POLICY } from '../src/agent/boot-recorder.js';

const GiB = 1024 ** 3;

/** The real boot trace: [t_ms, offset, length] per read. */
function realTrace(): Array<[number, number, number]> {
  return readFileSync(new URL('./data/debian12-minbase-boot-timed.csv', import.meta.url), 'utf8')
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
