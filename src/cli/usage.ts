/**
 * The usage line of a command, built from its args and flags: shown by
 * --help, under usage errors and in the man pages (scripts/gen-man.js), so
 * the three always agree. A boolean flag that can be negated shows as
 * `[--[no-]NAME]`.
 */

/** What usage needs to know of a flag: the fields oclif's flag definitions and cached commands share. */
export interface UsageFlag {
  type: string;
  required?: boolean | undefined;
  hidden?: boolean | undefined;
  allowNo?: boolean | undefined;
  helpValue?: string | string[] | undefined;
  options?: readonly string[] | undefined;
}

export interface UsageArg {
  required?: boolean | undefined;
  hidden?: boolean | undefined;
}

export interface UsageCommand {
  args?: Record<string, UsageArg> | undefined;
  flags?: Record<string, UsageFlag> | undefined;
  baseFlags?: Record<string, UsageFlag> | undefined;
  enableJsonFlag?: boolean | undefined;
}

/** `--name VALUE`, `--[no-]name` or `--name` (no brackets). */
export function flagLabel(name: string, flag: UsageFlag): string {
  if (flag.type === 'boolean') return flag.allowNo ? `--[no-]${name}` : `--${name}`;
  const helpValue = Array.isArray(flag.helpValue) ? flag.helpValue.join(' ') : flag.helpValue;
  return `--${name} ${helpValue ?? (flag.options ? flag.options.join('|') : name.toUpperCase())}`;
}

/** The words after the command name: ARGS, required flags, then [optional flags], as defined. */
export function usageWords(cmd: UsageCommand): string[] {
  const words: string[] = [];
  for (const [name, arg] of Object.entries(cmd.args ?? {})) {
    if (arg.hidden) continue;
    words.push(arg.required ? name.toUpperCase() : `[${name.toUpperCase()}]`);
  }
  const flags: Record<string, UsageFlag> = {
    ...(cmd.enableJsonFlag ? { json: { type: 'boolean' } } : {}),
    ...cmd.baseFlags,
    ...cmd.flags,
  };
  const entries = Object.entries(flags).filter(([, f]) => !f.hidden);
  for (const [name, flag] of entries) if (flag.required) words.push(flagLabel(name, flag));
  for (const [name, flag] of entries) if (!flag.required) words.push(`[${flagLabel(name, flag)}]`);
  return words;
}
