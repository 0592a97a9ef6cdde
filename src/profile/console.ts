/**
 * The guest's serial console as lines: splits the byte stream into lines,
 * cleans them (terminal escape sequences, carriage returns, control
 * characters) and tests each one against the --until pattern. The line being
 * written counts too, so a login prompt (printed without a newline) matches.
 */
import { UsageError } from '../errors.js';
import { isFatalBootLine } from './fatal-lines.js';

/** A line longer than this without a newline is taken as a line of its own. */
export const MAX_CONSOLE_LINE = 4096;

/**
 * ECMA-48 CSI sequences (ESC [ params intermediates final), other two-byte
 * ESC sequences, OSC strings (ESC ] ... BEL/ST), and the C0 controls except
 * tab (\r, BEL, backspace, ...): what GRUB, systemd and agetty send to a
 * serial terminal besides text.
 */
const TERMINAL_CONTROLS = /\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -/]*[0-~]|[\x00-\x08\x0b-\x1f\x7f]/g;

/** The text of a console line as a person would read it. */
export function cleanConsoleLine(raw: string): string {
  return raw.replace(TERMINAL_CONTROLS, '').trimEnd();
}

/**
 * Parses --until: a JavaScript regular expression, either bare
 * (`login:\s*$`) or as `/pattern/flags` (`/kernel panic/i`). It is tested
 * on one cleaned console line at a time, so `^` and `$` are line bounds.
 * The stateful g and y flags are dropped.
 */
export function parseUntil(text: string): RegExp {
  if (text.length === 0) throw new UsageError('--until must not be empty (it would match any console line)');
  const literal = /^\/(.+)\/([a-z]*)$/s.exec(text);
  const source = literal ? literal[1]! : text;
  const flags = literal ? literal[2]!.replace(/[gy]/g, '') : '';
  try {
    return new RegExp(source, flags);
  } catch (err) {
    throw new UsageError(`--until ${JSON.stringify(text)} is not a valid regular expression: ${(err as Error).message}`);
  }
}

/**
 * Splits console output into clean lines and finds the first one matching
 * `until`; with `watchFatal`, also the first fatal line (fatal-lines.ts) that
 * does not match `until`.
 */
export class ConsoleMatcher {
  /** Complete lines seen so far. */
  lines = 0;
  /** Bytes (characters) fed so far. */
  chars = 0;
  private pending = '';
  private lastCompleteLine = '';
  private matchedLine: string | undefined;
  private fatalLine: string | undefined;

  constructor(
    readonly until: RegExp | undefined,
    private readonly watchFatal = false,
  ) {}

  /** The first fatal line, once one has come (watchFatal only). */
  get fatal(): string | undefined {
    return this.fatalLine;
  }

  /** The line that matched, once one has. */
  get matched(): string | undefined {
    return this.matchedLine;
  }

  /** The last non-empty line, including the one being written (cleaned, for messages). */
  get lastLine(): string {
    const partial = cleanConsoleLine(this.pending);
    return partial.trim().length > 0 ? partial : this.lastCompleteLine;
  }

  /**
   * Feeds console text; returns the first matching line (complete, or the
   * line being written) the first time one matches, else undefined.
   */
  feed(text: string): string | undefined {
    if (text.length === 0) return undefined;
    this.chars += text.length;
    this.pending += text;
    let found: string | undefined;
    let start = 0;
    for (;;) {
      const nl = this.pending.indexOf('\n', start);
      if (nl < 0) break;
      found ??= this.completeLine(this.pending.slice(start, nl));
      start = nl + 1;
    }
    this.pending = this.pending.slice(start);
    while (this.pending.length > MAX_CONSOLE_LINE) {
      found ??= this.completeLine(this.pending.slice(0, MAX_CONSOLE_LINE));
      this.pending = this.pending.slice(MAX_CONSOLE_LINE);
    }
    if (found === undefined && this.pending.length > 0) {
      const partial = cleanConsoleLine(this.pending);
      found = this.test(partial);
      if (found === undefined) this.testFatal(partial, false);
    }
    return found;
  }

  private completeLine(raw: string): string | undefined {
    this.lines++;
    const line = cleanConsoleLine(raw);
    if (line.trim().length > 0) this.lastCompleteLine = line;
    const found = this.test(line);
    if (found === undefined) this.testFatal(line, true);
    return found;
  }

  private testFatal(line: string, complete: boolean): void {
    if (!this.watchFatal || this.fatalLine !== undefined || this.matchedLine !== undefined) return;
    if (this.until?.test(line)) return;
    if (isFatalBootLine(line, complete)) this.fatalLine = line.trim();
  }

  private test(line: string): string | undefined {
    if (this.matchedLine !== undefined || this.until === undefined) return undefined;
    if (line.trim().length === 0 || !this.until.test(line)) return undefined;
    this.matchedLine = line;
    return line;
  }
}
