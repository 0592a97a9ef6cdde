/**
 * The pure parts of `bootcache profile`: end-of-boot detection (on the real
 * Debian 12 boot trace), the console matcher (on console text as GRUB, the
 * kernel, systemd and agetty write it), the KVM stall watch, the recording
 * and its trace CSV.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { Bitmap } from '../../src/format/bitmap.js';
import { parseTrace } from '../../src/format/trace.js';
import { KvmProbation, chooseAccel, kvmUsable } from '../../src/profile/accel.js';
import { ConsoleMatcher, cleanConsoleLine, parseUntil } from '../../src/profile/console.js';
import {
  DEFAULT_IDLE_SECONDS,
  DEFAULT_MIN_READS,
  DEFAULT_UNTIL,
  EndOfBootDetector,
  type EndOfBootPolicy,
} from '../../src/profile/end-of-boot.js';
import { agreement, runPath } from '../../src/profile/profile.js';
import { escapeOptionValue, qemuArgs } from '../../src/profile/qemu.js';
import { BootRecording } from '../../src/profile/recording.js';

const GiB = 1024 ** 3;
const BLOCK = 4096;

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

/**
 * Feeds the reads to a detector as the boot loop would: before each read the
 * deadlines that passed are checked at their own time. Returns the detector
 * and the time the trace ends.
 */
function replay(policy: EndOfBootPolicy, reads: Array<[number, number, number]>): EndOfBootDetector {
  const detector = new EndOfBootDetector(policy);
  const seen = new Bitmap(Math.ceil((2 * GiB) / BLOCK));
  for (const [t, offset, length] of reads) {
    const deadline = detector.nextDeadlineMs();
    if (deadline <= t && detector.check(deadline)) break;
    let added = 0;
    for (let b = Math.floor(offset / BLOCK); b <= Math.floor((offset + length - 1) / BLOCK); b++) {
      if (!seen.get(b)) {
        seen.set(b);
        added++;
      }
    }
    if (detector.onRead(t, added)) break;
  }
  return detector;
}

const policy = (overrides: Partial<EndOfBootPolicy> = {}): EndOfBootPolicy => ({
  until: parseUntil(DEFAULT_UNTIL),
  idleMs: DEFAULT_IDLE_SECONDS * 1000,
  timeoutMs: 300_000,
  minReads: DEFAULT_MIN_READS,
  ...overrides,
});

describe('EndOfBootDetector on the real Debian 12 boot trace', () => {
  const reads = realTrace();
  const lastT = reads[reads.length - 1]![0];
  // The longest pause between reads of new blocks: 1.77 s -> 10.89 s (9.1 s,
  // GRUB has loaded kernel and initramfs; the kernel starts under TCG).
  const pauseStart = 1773.561;

  it('the default idle gap does not cut the boot short; it ends 60 s after the last new block', () => {
    expect(DEFAULT_IDLE_SECONDS).toBe(60);
    const d = replay(policy(), reads);
    expect(d.ended).toBeUndefined();
    expect(d.reads).toBe(4060);
    expect(d.check(lastT + 59_999)).toBeUndefined();
    const end = d.check(lastT + 60_000);
    expect(end).toMatchObject({ reason: 'idle' });
    // The boot ended at its last new block (the trace's last read reads a new block).
    expect(end!.atMs).toBeCloseTo(lastT, 3);
    expect(end!.detectedAtMs).toBeCloseTo(lastT + 60_000, 3);
  });

  it('the default also survives the kernel pause stretched 2.7x, as on a loaded host (24.7 s)', () => {
    // Everything after the pause comes 15.6 s later: a 24.7 s pause.
    const stretched = reads.map(([t, o, l]): [number, number, number] => [t > pauseStart ? t + 15_600 : t, o, l]);
    expect(replay(policy(), stretched).ended).toBeUndefined();
    // The agent's 20 s would have cut it.
    expect(replay(policy({ idleMs: 20_000 }), stretched).ended?.atMs).toBeCloseTo(pauseStart, 3);
  });

  it('an idle gap of 5 s would end the boot at the 9.1 s kernel pause', () => {
    const d = replay(policy({ idleMs: 5000 }), reads);
    expect(d.ended).toMatchObject({ reason: 'idle' });
    expect(d.ended!.atMs).toBeCloseTo(pauseStart, 3);
    expect(d.ended!.detectedAtMs).toBeCloseTo(pauseStart + 5000, 3);
    // Everything after the pause is missing from such a boot.
    expect(d.reads).toBeLessThan(reads.filter(([t]) => t <= pauseStart).length + 1);
  });

  it('9 s is still too short, 10 s is enough (the pause is 9.12 s)', () => {
    expect(replay(policy({ idleMs: 9000 }), reads).ended?.atMs).toBeCloseTo(pauseStart, 3);
    expect(replay(policy({ idleMs: 10_000 }), reads).ended).toBeUndefined();
  });

  it('idle does not apply before minReads reads (firmware poking at a disk is not a boot)', () => {
    // The trace's 2nd read comes 80 ms after the first; a 50 ms idle gap would end there without minReads.
    const d = replay(policy({ idleMs: 50 }), reads);
    expect(d.ended).toMatchObject({ reason: 'idle' });
    expect(d.reads).toBeGreaterThanOrEqual(DEFAULT_MIN_READS);
    const few = new EndOfBootDetector(policy({ idleMs: 50 }));
    few.onRead(0, 1);
    few.onRead(10, 1);
    expect(few.check(100_000)).toBeUndefined();
    expect(few.nextDeadlineMs()).toBe(300_000);
  });

  it('idle 0 disables the idle rule', () => {
    const d = replay(policy({ idleMs: 0 }), reads);
    expect(d.ended).toBeUndefined();
    expect(d.check(lastT + 200_000)).toBeUndefined();
    expect(d.check(300_000)).toMatchObject({ reason: 'timeout', atMs: 300_000 });
  });

  it('the timeout wins when it comes before the idle deadline, and ends nothing early', () => {
    const d = replay(policy({ idleMs: 5000, timeoutMs: 3000 }), reads);
    expect(d.ended).toMatchObject({ reason: 'timeout', atMs: 3000, detectedAtMs: 3000 });
    // A late check still picks the earlier deadline.
    const late = replay(policy({ idleMs: 5000, timeoutMs: 8000 }), reads.filter(([t]) => t < 2000));
    expect(late.check(60_000)).toMatchObject({ reason: 'idle' });
    expect(late.ended!.detectedAtMs).toBeCloseTo(pauseStart + 5000, 3);
  });

  it('a console match ends the boot at once; nothing changes afterwards', () => {
    const d = new EndOfBootDetector(policy());
    d.onRead(100, 1);
    expect(d.onConsole('Debian GNU/Linux 12 bootcache-ref ttyS0\r\n\r\nbootcache-ref login: ', 34_630)).toEqual({
      reason: 'until',
      atMs: 34_630,
      detectedAtMs: 34_630,
      line: 'bootcache-ref login:',
    });
    expect(d.onRead(40_000, 5)).toMatchObject({ reason: 'until' });
    expect(d.check(400_000)).toMatchObject({ reason: 'until' });
    expect(d.reads).toBe(1);
  });

  it('console text arriving after the timeout does not count', () => {
    const d = new EndOfBootDetector(policy({ timeoutMs: 10_000 }));
    expect(d.onConsole('BOOTCACHE-BOOT-COMPLETE\n', 10_050)).toMatchObject({ reason: 'timeout' });
  });
});

/** Console text of a Debian 12 guest on ttyS0, as it arrives (escape sequences and all). */
const SAMPLE_CONSOLE = [
  '\x1b[2J\x1b[1;1H\x1b[0m\x1b[30m\x1b[47mWelcome to GRUB!\r\n\r\n',
  '\x1b[0m\x1b[37m\x1b[40m\x1b[H\x1b[J  Booting `Debian GNU/Linux\'\r\n\r\n',
  'Loading Linux 6.1.0-50-amd64 ...\r\n',
  'Loading initial ramdisk ...\r\n',
  '[    0.000000] Linux version 6.1.0-50-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0) #1 SMP PREEMPT_DYNAMIC Debian 6.1.176-1\r\n',
  '[    0.000000] Command line: BOOT_IMAGE=/boot/vmlinuz-6.1.0-50-amd64 root=UUID=3ae584ea-b442-4b9f-b78c-97f58848931f ro console=ttyS0,115200n8\r\n',
  '[    2.481234] virtio_blk virtio1: [vda] 4194304 512-byte logical blocks (2.15 GB/2.00 GiB)\r\n',
  '[    2.503322]  vda: vda1\r\n',
  '[    9.877102] EXT4-fs (vda1): mounted filesystem with ordered data mode. Quota mode: none.\r\n',
  '[   11.213811] systemd[1]: systemd 252.39-1~deb12u2 running in system mode (+PAM +AUDIT +SELINUX)\r\n',
  '\r\nWelcome to \x1b[1mDebian GNU/Linux 12 (bookworm)\x1b[0m!\r\n\r\n',
  '[\x1b[0;32m  OK  \x1b[0m] Created slice \x1b[0;1;39msystem-getty.slice\x1b[0m - Slice /system/getty.\r\n',
  '         Starting \x1b[0;1;39msystemd-logind.service\x1b[0m - User Login Management...\r\n',
  '[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39msystemd-logind.service\x1b[0m - User Login Management.\r\n',
  '[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mserial-getty@ttyS0.service\x1b[0m - Serial Getty on ttyS0.\r\n',
  '[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mmulti-user.target\x1b[0m - Multi-User System.\r\n',
  '\r\nDebian GNU/Linux 12 debian ttyS0\r\n\r\n',
  'debian login: ',
].join('');

/** Feeds `text` in pieces of `size` characters; returns the first match and the matcher. */
function feedInPieces(text: string, until: RegExp | undefined, size: number): { match: string | undefined; matcher: ConsoleMatcher; fedUpTo: number } {
  const matcher = new ConsoleMatcher(until);
  for (let i = 0; i < text.length; i += size) {
    const match = matcher.feed(text.slice(i, i + size));
    if (match !== undefined) return { match, matcher, fedUpTo: i + size };
  }
  return { match: undefined, matcher, fedUpTo: text.length };
}

describe('ConsoleMatcher and --until', () => {
  const defaultUntil = parseUntil(DEFAULT_UNTIL);

  it('the default pattern matches the login prompt (no newline after it), and nothing earlier', () => {
    for (const size of [1, 7, 64, SAMPLE_CONSOLE.length]) {
      const { match, fedUpTo } = feedInPieces(SAMPLE_CONSOLE, defaultUntil, size);
      expect(match, `pieces of ${size}`).toBe('debian login:');
      expect(fedUpTo).toBeGreaterThanOrEqual(SAMPLE_CONSOLE.length - 1);
    }
  });

  it('the default pattern matches the reference guest marker line', () => {
    const text = SAMPLE_CONSOLE.replace('debian login: ', '').replace(
      'Multi-User System.\r\n',
      'Multi-User System.\r\n[   33.220000] bootcache-firstboot: BOOTCACHE-BOOT-COMPLETE\r\n',
    );
    expect(feedInPieces(text, defaultUntil, 13).match).toBe('[   33.220000] bootcache-firstboot: BOOTCACHE-BOOT-COMPLETE');
  });

  it('does not match "Login Management", getty or "Last login:" lines', () => {
    const m = new ConsoleMatcher(defaultUntil);
    expect(m.feed(SAMPLE_CONSOLE.replace('debian login: ', ''))).toBeUndefined();
    expect(m.feed('Last login: Wed Nov 26 14:00:00 UTC 2026 on ttyS0\r\n')).toBeUndefined();
    expect(m.matched).toBeUndefined();
  });

  it('custom patterns: kernel lines, /pattern/flags, anchors on cleaned lines', () => {
    expect(feedInPieces(SAMPLE_CONSOLE, parseUntil('vda: vda1'), 5).match).toBe('[    2.503322]  vda: vda1');
    expect(feedInPieces(SAMPLE_CONSOLE, parseUntil('/reached TARGET multi-user/i'), SAMPLE_CONSOLE.length).match).toBe(
      '[  OK  ] Reached target multi-user.target - Multi-User System.',
    );
    // The line being written is tested too: a match comes as soon as its text has arrived.
    expect(feedInPieces(SAMPLE_CONSOLE, parseUntil('/reached TARGET multi-user/i'), 9).match).toMatch(
      /^\[  OK  \] Reached target multi-user/,
    );
    // Escape sequences are gone before matching, so ^ anchors on the text.
    expect(feedInPieces(SAMPLE_CONSOLE, parseUntil('^Welcome to Debian'), SAMPLE_CONSOLE.length).match).toBe('Welcome to Debian GNU/Linux 12 (bookworm)!');
    expect(feedInPieces(SAMPLE_CONSOLE, parseUntil('Kernel panic'), 3).match).toBeUndefined();
    // g/y flags would make test() stateful: dropped.
    expect(parseUntil('/x/gy').flags).toBe('');
  });

  it('keeps the last non-empty line for error messages', () => {
    const { matcher } = feedInPieces(SAMPLE_CONSOLE, parseUntil('never-printed'), 11);
    expect(matcher.lastLine).toBe('debian login:');
    matcher.feed('\r\n\r\n');
    expect(matcher.lastLine).toBe('debian login:');
    expect(matcher.lines).toBeGreaterThan(15);
    expect(new ConsoleMatcher(undefined).lastLine).toBe('');
  });

  it('cleans terminal controls', () => {
    expect(cleanConsoleLine('[\x1b[0;32m  OK  \x1b[0m] Started\r')).toBe('[  OK  ] Started');
    expect(cleanConsoleLine('\x1b]0;title\x07text\x1b(B\x1b[?25l')).toBe('text');
    expect(cleanConsoleLine('a\x08b\x00c\td')).toBe('abc\td');
  });

  it('a very long line without newlines is matched in bounded pieces', () => {
    const m = new ConsoleMatcher(parseUntil('END'));
    expect(m.feed('x'.repeat(10_000))).toBeUndefined();
    // Two 4096-character pieces were taken as lines; the rest is the line being written.
    expect(m.feed('END')).toBe(`${'x'.repeat(10_000 - 2 * 4096)}END`);
    expect(m.lines).toBe(2);
  });

  it('rejects bad patterns with one line', () => {
    expect(() => parseUntil('(')).toThrow(/--until "\(" is not a valid regular expression/);
    expect(() => parseUntil('')).toThrow(/must not be empty/);
    expect(() => parseUntil('/a/q')).toThrow(/not a valid regular expression/);
  });
});

describe('accelerator choice', () => {
  it('forced values and a missing device', async () => {
    expect(await chooseAccel('tcg')).toMatchObject({ accel: 'tcg', probation: false });
    expect(await chooseAccel('kvm')).toMatchObject({ accel: 'kvm', probation: false });
    expect(await chooseAccel('auto', { forced: 'tcg', kvmDevice: '/dev/null' })).toMatchObject({ accel: 'tcg', probation: false, reason: 'forced by BOOTCACHE_ACCEL=tcg' });
    expect(await chooseAccel('auto', { kvmDevice: '/nonexistent/kvm' })).toEqual({
      accel: 'tcg',
      probation: false,
      reason: '/nonexistent/kvm does not exist',
    });
    // A device that opens read-write: KVM, on probation.
    expect(await chooseAccel('auto', { kvmDevice: '/dev/null' })).toMatchObject({ accel: 'kvm', probation: true });
    expect(await kvmUsable('/')).toMatchObject({ usable: false, reason: '/ cannot be opened read-write (EISDIR)' });
  });

  it('KvmProbation: no progress within the deadline, or a stall later, is a hang', () => {
    const p = new KvmProbation(8000);
    expect(p.hung(7999)).toBe(false);
    expect(p.hung(8000)).toBe(true);
    expect(p.describe(8000)).toMatch(/no progress under KVM within 8 s/);
    p.onProgress(500);
    p.onProgress(300); // out of order: keeps the latest
    expect(p.nextDeadlineMs()).toBe(8500);
    expect(p.hung(8499)).toBe(false);
    expect(p.hung(8500)).toBe(true);
    expect(p.describe(8500)).toMatch(/stalled under KVM/);
  });
});

describe('BootRecording and the trace CSV', () => {
  it('records reads in issue order with completion times; the CSV parses with src/format/trace.ts', async () => {
    let now = 1000;
    const r = new BootRecording(1 << 20, 4096, () => now);
    r.start();
    const events: Array<[number, number]> = [];
    r.onRead = (at, added) => events.push([at, added]);
    now = 1000.5;
    const a = r.begin(0, 512);
    now = 1001;
    const b = r.begin(8192, 8192);
    now = 1002;
    r.complete(b);
    now = 1003.25;
    r.complete(a);
    expect(r.begin(100, 100)).toBe(2); // block 0 again: no new block
    expect(events).toEqual([
      [0.5, 1],
      [1, 2],
      [3.25, 0],
    ]);
    r.stop();
    expect(r.begin(4096, 4096)).toBe(-1);
    expect([r.reads, r.bytes, r.blocks]).toEqual([3, 512 + 8192 + 100, 3]);
    expect([...r.bitmap.runs()]).toEqual([
      { start: 0, length: 1 },
      { start: 2, length: 2 },
    ]);
    const csv = [...r.traceCsv(2)].join('');
    expect(csv).toBe('t_us,op,offset,length,done_us\n500,read,0,512,3250\n1000,read,8192,8192,2000\n3250,read,100,100,\n');
    const parsed = [];
    for await (const e of parseTrace([csv])) parsed.push(e);
    expect(parsed.map((e) => [e.tUs, e.offset, e.length, e.doneUs])).toEqual([
      [500, 0, 512, 3250],
      [1000, 8192, 8192, 2000],
      [3250, 100, 100, undefined],
    ]);
  });

  it('clamps a read past the last block to the bitmap', () => {
    const r = new BootRecording(10_000, 4096, () => 0);
    r.begin(8192, 4096); // the last block is partial
    expect(r.blocks).toBe(1);
    expect(r.bitmap.length).toBe(3);
  });
});

describe('helpers', () => {
  it('agreement: blocks in all runs vs in any', () => {
    const a = Bitmap.fromIndices(100, [1, 2, 3, 50]);
    const b = Bitmap.fromIndices(100, [2, 3, 4, 99]);
    expect(agreement([a, b])).toEqual({ runs: 2, blocksInAll: 2, blocksInAny: 6, ratio: 2 / 6 });
    expect(agreement([a])).toEqual({ runs: 1, blocksInAll: 4, blocksInAny: 4, ratio: 1 });
    expect(agreement([new Bitmap(8)])).toMatchObject({ ratio: 1 });
  });

  it('runPath names per-run files only for several runs', () => {
    expect(runPath('/x/d.trace.csv', 1, 1)).toBe('/x/d.trace.csv');
    expect(runPath('/x/d.trace.csv', 2, 3)).toBe('/x/d.trace.run2.csv');
    expect(runPath('/x/console', 1, 2)).toBe('/x/console.run1');
  });

  it('qemuArgs: headless, NBD disk with snapshot=on, commas escaped, extra args last', () => {
    expect(escapeOptionValue('a,b')).toBe('a,,b');
    const args = qemuArgs({
      accel: 'tcg',
      memoryMb: 512,
      cpus: 1,
      nbdUri: 'nbd+unix:///disk?socket=/tmp/x/nbd.sock',
      consoleLog: '/tmp/a,b/console.log',
      debugconLog: '/tmp/x/debugcon.log',
      extraArgs: ['-kernel', 'vmlinuz'],
    });
    expect(args.slice(0, 4)).toEqual(['-accel', 'tcg', '-nodefaults', '-display']);
    expect(args).toContain('-no-reboot');
    expect(args).toContain('file,id=bcserial,path=/tmp/a,,b/console.log');
    expect(args).toContain('file=nbd+unix:///disk?socket=/tmp/x/nbd.sock,format=raw,if=virtio,snapshot=on');
    expect(args.slice(-2)).toEqual(['-kernel', 'vmlinuz']);
  });
});
