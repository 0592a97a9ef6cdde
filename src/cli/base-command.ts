import { Command, Flags, type Interfaces } from '@oclif/core';
import { BootcacheError, ExitCode } from '../errors.js';

/** Exit code table shown in every command's --help and in the man pages. */
export const EXIT_CODES_HELP = [
  'EXIT CODES',
  `  ${ExitCode.OK}   success`,
  `  ${ExitCode.VERIFY_FAILED}   verification failed (data, checksum, identity or digest mismatch)`,
  `  ${ExitCode.USAGE}   usage error (bad flags or arguments)`,
  `  ${ExitCode.BAD_INPUT}   input unreadable, malformed or unsupported (image, map, segment, trace)`,
  `  ${ExitCode.IO}   I/O or storage failure (cannot write output, disk full)`,
  `  ${ExitCode.BOOT_TIMEOUT}   profile: the boot did not finish before --timeout`,
  `  ${ExitCode.BOOT_FAILED}   profile: QEMU missing or the guest could not boot`,
  `  ${ExitCode.AGENT}   agent: cannot start, or the control socket is unreachable`,
  `  ${ExitCode.INTERNAL}  internal error (a bug: please report it with --debug output)`,
].join('\n');

export interface ErrorJson {
  error: { code: string; exitCode: number; message: string };
}

interface OclifLikeError {
  message?: string;
  oclif?: { exit?: number };
  code?: string;
}

/** Maps any thrown value to the stable {code, exitCode, message} triple. */
export function classifyError(err: unknown): ErrorJson['error'] {
  if (err instanceof BootcacheError) return { code: err.code, exitCode: err.exitCode, message: err.message };
  const e = (err ?? {}) as OclifLikeError;
  // oclif parse errors (missing/unknown flags, bad values) carry oclif.exit = 2.
  if (e.oclif?.exit !== undefined) {
    return { code: 'BC_USAGE', exitCode: e.oclif.exit === 1 ? ExitCode.USAGE : e.oclif.exit, message: firstLine(e.message) };
  }
  return { code: 'BC_INTERNAL', exitCode: ExitCode.INTERNAL, message: firstLine(e.message ?? String(err)) };
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

  /** True when progress may be drawn: a TTY and no --json. */
  protected get interactive(): boolean {
    return !this.jsonEnabled() && process.stdout.isTTY === true;
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
    }
    if (debug && err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`);
    // An ExitError is silent in oclif's handler and carries our exit code.
    return this.exit(info.exitCode);
  }
}
