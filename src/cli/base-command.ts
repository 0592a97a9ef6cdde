import { Command, Flags, type Interfaces } from '@oclif/core';
import { BootcacheError, ExitCode, type ExitCodeValue } from '../errors.js';
import { isCI } from './ci.js';
import { usageWords, type UsageCommand } from './usage.js';

/** The usage line (without `bootcache COMMAND`) of a command class: `static override usage = commandUsage(this)`, after its flags. */
export function commandUsage(cmd: UsageCommand): string {
  return usageWords(cmd).join(' ');
}

/** What each exit code means, for the EXIT CODES section of --help and the man pages. */
const EXIT_CODE_MEANINGS: Record<ExitCodeValue, string> = {
  [ExitCode.OK]: 'success',
  [ExitCode.VERIFY_FAILED]: 'verification failed: the files are well formed and disagree (data, checksum, identity or digest)',
  [ExitCode.USAGE]: 'usage error (bad flags or arguments, unknown command)',
  [ExitCode.BAD_INPUT]: 'input unusable: missing, a directory, malformed or unsupported (image, map, segment, trace)',
  [ExitCode.IO]: 'I/O or storage failure (an output cannot be written, disk full, a read failed)',
  [ExitCode.BOOT_TIMEOUT]: 'the boot did not finish before --timeout',
  [ExitCode.BOOT_FAILED]: 'QEMU missing or the guest could not boot (QEMU exited, or a fatal firmware, GRUB or kernel line)',
  [ExitCode.AGENT]: 'the agent cannot start, or its control socket is unreachable',
  [ExitCode.INTERNAL]: 'internal error (a bug: please report it with --debug output)',
};

/**
 * The EXIT CODES section listing the codes one command can return (0, 2 and
 * 70 always), with command-specific wording where given.
 */
export function exitCodesHelp(codes: ExitCodeValue[], wording: Partial<Record<ExitCodeValue, string>> = {}): string {
  const all = [...new Set<ExitCodeValue>([ExitCode.OK, ExitCode.USAGE, ...codes, ExitCode.INTERNAL])].sort((a, b) => a - b);
  return ['EXIT CODES', ...all.map((code) => `  ${String(code).padEnd(3)} ${wording[code] ?? EXIT_CODE_MEANINGS[code]}`)].join('\n');
}

export interface ErrorJson {
  error: { code: string; exitCode: number; message: string };
}

interface OclifLikeError {
  message?: string;
  oclif?: { exit?: number };
  code?: string;
  /** Set on oclif's parse errors (CLIParseError). */
  parse?: unknown;
  /** RequiredArgsError: the missing arguments. */
  args?: Array<{ name?: string }>;
}

/** Maps any thrown value to the stable {code, exitCode, message} triple. */
export function classifyError(err: unknown): ErrorJson['error'] {
  if (err instanceof BootcacheError) return { code: err.code, exitCode: err.exitCode, message: err.message };
  const e = (err ?? {}) as OclifLikeError;
  // oclif parse errors (missing/unknown flags, bad values) carry oclif.exit = 2.
  if (e.oclif?.exit !== undefined) {
    return { code: 'BC_USAGE', exitCode: e.oclif.exit === 1 ? ExitCode.USAGE : e.oclif.exit, message: usageMessage(e) };
  }
  return { code: 'BC_INTERNAL', exitCode: ExitCode.INTERNAL, message: firstLine(e.message ?? String(err)) };
}

/** True for oclif's argument and flag parse errors, under which the usage line helps. */
export function isParseError(err: unknown): boolean {
  return !(err instanceof BootcacheError) && typeof err === 'object' && err !== null && 'parse' in err;
}

/** One line saying what is wrong; oclif's own lists the missing arguments with their descriptions. */
function usageMessage(e: OclifLikeError): string {
  const missingArgs = Array.isArray(e.args) && /^Missing \d+ required arg/.test(e.message ?? '')
    ? e.args.map((a) => (a.name ?? '?').toUpperCase())
    : [];
  if (missingArgs.length > 0) return `missing argument${missingArgs.length === 1 ? '' : 's'} ${missingArgs.join(', ')}`;
  const missingFlags = [...(e.message ?? '').matchAll(/Missing required flag ([\w-]+)/g)].map((m) => `--${m[1]}`);
  if (missingFlags.length > 0) return `missing required flag${missingFlags.length === 1 ? '' : 's'} ${missingFlags.join(', ')}`;
  return firstLine(e.message);
}

/** Folds a (possibly multi-line) message into one line. */
function firstLine(message: string | undefined): string {
  const text = (message ?? '')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.length > 0 && !/^The following errors? occurred:?$/i.test(l) && !/^See more help with/.test(l))
    .join(' ');
  return text.length > 0 ? text : 'unknown error';
}

/**
 * Base of every bootcache command: --json (oclif enableJsonFlag), --debug,
 * and one-line errors mapped to stable exit codes.
 */
export abstract class BaseCommand<T extends typeof Command> extends Command {
  static override enableJsonFlag = true;
  static override baseFlags = {
    debug: Flags.boolean({
      description: 'Print stack traces on errors (also enabled by the DEBUG environment variable).',
      helpGroup: 'GLOBAL',
    }),
  };

  protected flags!: Interfaces.InferredFlags<(typeof BaseCommand)['baseFlags'] & T['flags']>;
  protected args!: Interfaces.InferredArgs<T['args']>;

  public override async init(): Promise<void> {
    await super.init();
    const { args, flags } = await this.parse({
      flags: this.ctor.flags,
      baseFlags: (super.ctor as typeof BaseCommand).baseFlags,
      enableJsonFlag: this.ctor.enableJsonFlag,
      args: this.ctor.args,
      strict: this.ctor.strict,
    });
    this.flags = flags as typeof this.flags;
    this.args = args as typeof this.args;
  }

  /** True when progress may be drawn: a TTY, not in CI, and no --json. */
  protected get interactive(): boolean {
    return !this.jsonEnabled() && process.stdout.isTTY === true && !isCI();
  }

  public override async catch(err: Error & { exitCode?: number }): Promise<unknown> {
    const info = classifyError(err);
    const debug = this.argv.includes('--debug') || Boolean(process.env.DEBUG);
    process.exitCode = info.exitCode;
    if (this.jsonEnabled()) {
      this.logJson({ error: info } satisfies ErrorJson);
    } else {
      // The command as typed: oclif ids join topics with ':', the CLI with its topicSeparator (' ').
      const command = (this.id ?? '').replaceAll(':', this.config.topicSeparator ?? ' ');
      process.stderr.write(`bootcache ${command}: error: ${info.message} [${info.code}]\n`);
      if (isParseError(err)) process.stderr.write(`usage: bootcache ${command} ${usageWords(this.ctor as UsageCommand).join(' ')}\n`);
    }
    if (debug && err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`);
    // An ExitError is silent in oclif's handler and carries our exit code.
    return this.exit(info.exitCode);
  }
}

