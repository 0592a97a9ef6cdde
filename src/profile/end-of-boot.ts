/**
 * When is a profiled boot over? A pure state machine, fed with disk reads,
 * console text and the clock (all in ms since QEMU started). The boot ends at
 * the first of:
 * - until:   a console line matches the --until pattern (see console.ts);
 * - idle:    no read of a new block for `idleMs`, once `minReads` reads were
 *            seen (so firmware poking at a disk it cannot boot from is not a
 *            finished boot); the boot ended at its last new block;
 * - fatal:   a console or firmware line says the boot cannot go on
 *            (fatal-lines.ts). A failure for the caller.
 * - timeout: `timeoutMs` passed first. This one is a failure for the caller.
 *
 * The default idle gap comes from real Debian 12 boots under TCG. In the
 * trace in test/data the longest pause between reads of new blocks is 9.1 s
 * (GRUB has loaded the kernel and initramfs; the kernel starts), the next
 * 0.9 s; the agent waits 20 s (about 2x). On a busy host that pause grows: a
 * profile of the reference guest at load 11 on 2 CPUs saw 24.7 s. So profile
 * waits 60 s: the console pattern normally ends the boot long before, and a
 * cut-short boot (a map missing everything after the kernel starts) is worse
 * than a slow profile.
 */
import { ConsoleMatcher } from './console.js';

export type EndReason = 'until' | 'idle' | 'fatal' | 'timeout';

export interface EndOfBootPolicy {
  /** Console line pattern; undefined: the console never ends the boot. */
  until: RegExp | undefined;
  /** Idle gap that ends the boot; 0 disables the rule. */
  idleMs: number;
  /** Give up after this long (a failure). */
  timeoutMs: number;
  /** Reads needed before the idle rule applies. */
  minReads: number;
}

/** Matches agetty's prompt (`debian login: `, printed without a newline) or the reference guest's marker. */
export const DEFAULT_UNTIL = String.raw`login:\s*$|BOOTCACHE-BOOT-COMPLETE`;
export const DEFAULT_IDLE_SECONDS = 60;
export const DEFAULT_TIMEOUT_SECONDS = 300;
/** As the agent's boot recorder (src/agent/boot-recorder.ts). */
export const DEFAULT_MIN_READS = 64;

export interface EndOfBoot {
  reason: EndReason;
  /** When the boot ended: the matching line, the last new block, or the timeout. */
  atMs: number;
  /** When the end was noticed (idle: atMs + idleMs). */
  detectedAtMs: number;
  /** The line that matched (until) or the fatal line (fatal). */
  line?: string;
  /** Where the fatal line came from: the serial console or the firmware's debug console. */
  source?: 'console' | 'firmware';
}

export class EndOfBootDetector {
  readonly console: ConsoleMatcher;
  /** The firmware's debug console: watched for fatal lines only. */
  readonly firmware = new ConsoleMatcher(undefined, true);
  reads = 0;
  /** Time of the last read that touched a block not read before. */
  lastNewBlockAtMs: number | undefined;
  lastReadAtMs: number | undefined;
  private result: EndOfBoot | undefined;

  constructor(readonly policy: EndOfBootPolicy) {
    if (!(policy.timeoutMs > 0)) throw new RangeError(`timeout ${policy.timeoutMs} ms must be positive`);
    if (!(policy.idleMs >= 0)) throw new RangeError(`idle gap ${policy.idleMs} ms must not be negative`);
    this.console = new ConsoleMatcher(policy.until, true);
  }

  /** The end of boot, once decided. Nothing changes after that. */
  get ended(): EndOfBoot | undefined {
    return this.result;
  }

  /** A read at `atMs` that touched `newBlocks` blocks not read before in this boot. */
  onRead(atMs: number, newBlocks: number): EndOfBoot | undefined {
    if (this.check(atMs)) return this.result;
    this.reads++;
    this.lastReadAtMs = atMs;
    if (newBlocks > 0) this.lastNewBlockAtMs = atMs;
    return undefined;
  }

  /** Console text that arrived at `atMs`. */
  onConsole(text: string, atMs: number): EndOfBoot | undefined {
    if (this.check(atMs)) return this.result;
    const line = this.console.feed(text);
    if (line !== undefined) this.result = { reason: 'until', atMs, detectedAtMs: atMs, line };
    else if (this.console.fatal !== undefined) {
      this.result = { reason: 'fatal', atMs, detectedAtMs: atMs, line: this.console.fatal, source: 'console' };
    }
    return this.result;
  }

  /** Firmware debug console text that arrived at `atMs`. */
  onFirmware(text: string, atMs: number): EndOfBoot | undefined {
    if (this.check(atMs)) return this.result;
    this.firmware.feed(text);
    if (this.firmware.fatal !== undefined) {
      this.result = { reason: 'fatal', atMs, detectedAtMs: atMs, line: this.firmware.fatal, source: 'firmware' };
    }
    return this.result;
  }

  /** Ends the boot if a deadline has passed by `nowMs` (the earliest one wins). */
  check(nowMs: number): EndOfBoot | undefined {
    if (this.result) return this.result;
    const idle = this.idleDeadline();
    if (idle !== undefined && idle <= nowMs && idle <= this.policy.timeoutMs) {
      // The boot really ended at its last new block; the gap only confirms it.
      this.result = { reason: 'idle', atMs: this.lastNewBlockAtMs!, detectedAtMs: idle };
    } else if (this.policy.timeoutMs <= nowMs) {
      this.result = { reason: 'timeout', atMs: this.policy.timeoutMs, detectedAtMs: this.policy.timeoutMs };
    }
    return this.result;
  }

  /** When check() should run next so a deadline is not missed (Infinity once ended). */
  nextDeadlineMs(): number {
    if (this.result) return Infinity;
    return Math.min(this.idleDeadline() ?? Infinity, this.policy.timeoutMs);
  }

  private idleDeadline(): number | undefined {
    if (this.policy.idleMs === 0 || this.reads < this.policy.minReads || this.lastNewBlockAtMs === undefined) return undefined;
    return this.lastNewBlockAtMs + this.policy.idleMs;
  }
}
