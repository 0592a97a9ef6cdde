/** Fatal boot lines (src/profile/fatal-lines.ts) through the console matcher and the end-of-boot detector. */
import { describe, expect, it } from 'vitest';
import { ConsoleMatcher, parseUntil } from '../../src/profile/console.js';
import { DEFAULT_UNTIL, EndOfBootDetector } from '../../src/profile/end-of-boot.js';
import { isFatalBootLine } from '../../src/profile/fatal-lines.js';

const policy = { until: parseUntil(DEFAULT_UNTIL), idleMs: 0, timeoutMs: 300_000, minReads: 64 };

describe('fatal boot lines', () => {
  it('knows SeaBIOS, Linux and GRUB fatal lines, and nothing ordinary', () => {
    for (const line of ['No bootable device.', 'Boot failed: not a bootable disk', 'Boot failed: could not read the boot disk',
      '[    2.104] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)', 'grub rescue> ']) {
      expect(isFatalBootLine(line, true), line).toBe(true);
    }
    for (const line of ['Booting from Hard Disk...', 'Welcome to GRUB!', 'error: no such partition.', 'sysctl kernel.panic = 10', 'bootsector login: ']) {
      expect(isFatalBootLine(line, true), line).toBe(false);
    }
    // The line still being written: only a prompt counts, the rest of a line may yet come.
    expect(isFatalBootLine('grub rescue> ', false)).toBe(true);
    expect(isFatalBootLine('Boot failed', false)).toBe(false);
  });

  it('the matcher quotes the whole fatal line, even when it arrives in pieces, and --until wins', () => {
    const m = new ConsoleMatcher(undefined, true);
    for (const piece of ['Boot fa', 'iled: not a boo', 'table disk\r', '\n']) m.feed(piece);
    expect(m.fatal).toBe('Boot failed: not a bootable disk');
    const prompt = new ConsoleMatcher(undefined, true);
    prompt.feed('\x1b[0mgrub rescue> ');
    expect(prompt.fatal).toBe('grub rescue>');
    const claimed = new ConsoleMatcher(parseUntil('Kernel panic'), true);
    expect(claimed.feed('Kernel panic - not syncing: test\n')).toBe('Kernel panic - not syncing: test');
    expect(claimed.fatal).toBeUndefined();
    expect(new ConsoleMatcher(undefined).feed('No bootable device.\n')).toBeUndefined();
  });

  it('the detector ends the boot as fatal from the console or the firmware debug console', () => {
    const d = new EndOfBootDetector(policy);
    expect(d.onFirmware('SeaBIOS (version 1.16.2)\nBooting from Hard Disk...\n', 100)).toBeUndefined();
    expect(d.onFirmware('Boot failed: not a bootable disk\n\n', 120)).toEqual({
      reason: 'fatal', atMs: 120, detectedAtMs: 120, line: 'Boot failed: not a bootable disk', source: 'firmware',
    });
    const c = new EndOfBootDetector(policy);
    expect(c.onConsole('[    1.0] Kernel panic - not syncing: Attempted to kill init!\r\n', 900)).toMatchObject({ reason: 'fatal', source: 'console' });
  });
});
