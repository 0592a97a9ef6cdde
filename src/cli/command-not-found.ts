/**
 * oclif's command_not_found hook: an unknown command is a usage error like
 * any other (exit 2, BC_USAGE, JSON under --json), with "did you mean" when a
 * command is close to what was typed.
 */
import { Errors, type Hook } from '@oclif/core';
import { ExitCode } from '../errors.js';
import type { ErrorJson } from './base-command.js';

/** Edit distance (insertions, deletions, substitutions, adjacent swaps). */
export function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0]![j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let best = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) best = Math.min(best, d[i - 2]![j - 2]! + 1);
      d[i]![j] = best;
    }
  }
  return d[a.length]![b.length]!;
}

/**
 * The command closest to `typed` (its words); undefined when none is within
 * a third of its length (at least 1, at most 3 edits).
 */
export function closestCommand(typed: string[], commands: string[][]): string[] | undefined {
  let best: { words: string[]; distance: number } | undefined;
  const text = typed.join(' ');
  for (const words of commands) {
    const name = words.join(' ');
    const distance = editDistance(text, name);
    const allowed = Math.min(3, Math.max(1, Math.floor(name.length / 3)));
    if (distance <= allowed && (!best || distance < best.distance)) best = { words, distance };
  }
  return best?.words;
}

/**
 * The words naming the command that was not found: oclif joins every word
 * into the id ("verfy x" becomes verfy:x), so keep the known topics and the
 * one word after them.
 */
export function unknownCommandWords(id: string, topics: Set<string>): string[] {
  const words = id.split(':').filter((w) => w.length > 0);
  let n = 1;
  while (n < words.length && topics.has(words.slice(0, n).join(':'))) n++;
  return words.slice(0, n);
}

const hook: Hook.CommandNotFound = async function ({ id, argv, config }) {
  const separator = config.topicSeparator ?? ' ';
  const typed = unknownCommandWords(id, new Set(config.topics.map((t) => t.name)));
  const commands = config.commandIDs.map((c) => c.split(':'));
  const close = closestCommand(typed, commands);
  const shown = typed.join(separator);
  const message =
    `unknown command "${shown}"` +
    (close ? `; did you mean "${config.bin} ${close.join(separator)}"?` : `; see ${config.bin} --help for the commands`);
  const all = [...id.split(':'), ...(argv ?? [])];
  if (all.includes('--json')) {
    const json: ErrorJson = { error: { code: 'BC_USAGE', exitCode: ExitCode.USAGE, message } };
    process.stdout.write(`${JSON.stringify(json, null, 2)}\n`);
  } else {
    process.stderr.write(`${config.bin}: error: ${message} [BC_USAGE]\n`);
  }
  // ExitError is silent in oclif's handler: the line above is the whole message.
  throw new Errors.ExitError(ExitCode.USAGE);
};

export default hook;
