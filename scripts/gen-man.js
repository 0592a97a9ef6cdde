#!/usr/bin/env node
// Generates man/bootcache-<command>.1 from the oclif command metadata.
// Usage: node scripts/gen-man.js [--check]
//   --check  exit 1 (listing the pages) when a committed page is out of date.
import { Config } from '@oclif/core';
import { readFile, writeFile, mkdir, readdir, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
// Built by tsc before this script runs (npm run build): the usage line --help shows.
import { flagLabel, usageWords } from '../dist/cli/usage.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const manDir = join(root, 'man');
const check = process.argv.includes('--check');

/** Escapes text for roff: backslashes, leading dots/quotes, hyphens. */
function roff(text) {
  return String(text ?? '')
    .replace(/\\/g, '\\e')
    .replace(/-/g, '\\-')
    .split('\n')
    .map((line) => (/^[.']/.test(line) ? `\\&${line}` : line))
    .join('\n');
}

/** One word of the usage line (src/cli/usage.ts) in roff: flag names bold, values italic. */
function synopsisWord(word) {
  const optional = word.startsWith('[') && word.endsWith(']');
  const inner = optional ? word.slice(1, -1) : word;
  const m = inner.match(/^(--\S+)(?: (.+))?$/);
  const text = m ? `\\fB${roff(m[1])}\\fR${m[2] ? ` \\fI${roff(m[2])}\\fR` : ''}` : `\\fI${roff(inner)}\\fR`;
  return optional ? `[${text}]` : text;
}

function page(cmd, version) {
  const name = `bootcache ${cmd.id.replaceAll(':', ' ')}`;
  const title = `BOOTCACHE\\-${cmd.id.replaceAll(':', '\\-').toUpperCase()}`;
  const flags = Object.entries(cmd.flags ?? {}).filter(([, f]) => !f.hidden);
  const args = Object.entries(cmd.args ?? {});
  const out = [];
  out.push(`.TH ${title} 1 "" "bootcache ${version}" "bootcache manual"`);
  out.push('.SH NAME');
  out.push(`${roff(name)} \\- ${roff(cmd.summary ?? (cmd.description ?? '').split('\n')[0])}`);
  out.push('.SH SYNOPSIS');
  // The cached command's flags include --json and the base flags.
  out.push([`\\fB${roff(name)}\\fR`, ...usageWords({ args: cmd.args, flags: cmd.flags }).map(synopsisWord)].join(' '));
  if (cmd.description) {
    out.push('.SH DESCRIPTION');
    for (const para of cmd.description.split(/\n\s*\n/)) {
      if (/^EXIT CODES/.test(para)) continue; // rendered in its own section
      out.push('.PP', roff(para.trim()));
    }
  }
  if (args.length) {
    out.push('.SH ARGUMENTS');
    for (const [argName, arg] of args) out.push('.TP', `\\fI${roff(argName.toUpperCase())}\\fR`, roff(arg.description ?? ''));
  }
  if (flags.length) {
    out.push('.SH OPTIONS');
    for (const [flagName, flag] of flags.sort(([a], [b]) => a.localeCompare(b))) {
      const short = flag.char ? `\\fB\\-${flag.char}\\fR, ` : '';
      const [dashName, value] = flagLabel(flagName, flag).split(/ (.*)/);
      let text = roff(flag.description ?? '');
      // A boolean's default is in its description ("default on").
      if (flag.default !== undefined && typeof flag.default !== 'function' && flag.type !== 'boolean') text += ` (default: ${roff(flag.default)})`;
      out.push('.TP', `${short}\\fB${roff(dashName)}\\fR${value ? ` \\fI${roff(value)}\\fR` : ''}`, text);
    }
  }
  const exitCodes = (cmd.description ?? '').split(/\n\s*\n/).find((p) => /^EXIT CODES/.test(p));
  if (exitCodes) {
    out.push('.SH EXIT STATUS');
    for (const line of exitCodes.split('\n').slice(1)) {
      const m = line.trim().match(/^(\d+)\s+(.*)$/);
      if (m) out.push('.TP', `\\fB${m[1]}\\fR`, roff(m[2]));
    }
  }
  const examples = (cmd.examples ?? []).map((e) => (typeof e === 'string' ? e : e.command));
  if (examples.length) {
    out.push('.SH EXAMPLES');
    for (const ex of examples) {
      out.push('.PP', '.nf', roff(ex.replaceAll('<%= config.bin %>', 'bootcache').replaceAll('<%= command.id %>', cmd.id.replaceAll(':', ' '))), '.fi');
    }
  }
  out.push('.SH SEE ALSO');
  out.push('bootcache(1), qemu\\-img(1), nbdkit(1)');
  return `${out.join('\n')}\n`;
}

const config = await Config.load(root);
const pages = new Map();
for (const cmd of [...config.commands].sort((a, b) => a.id.localeCompare(b.id))) {
  if (cmd.hidden) continue;
  pages.set(`bootcache-${cmd.id.replaceAll(':', '-')}.1`, page(cmd, config.version));
}

if (check) {
  const stale = [];
  for (const [file, text] of pages) {
    const current = await readFile(join(manDir, file), 'utf8').catch(() => null);
    if (current !== text) stale.push(file);
  }
  const present = (await readdir(manDir).catch(() => [])).filter((f) => f.endsWith('.1'));
  for (const f of present) if (!pages.has(f)) stale.push(`${f} (no such command)`);
  if (stale.length) {
    console.error(`man pages out of date (run npm run build): ${stale.join(', ')}`);
    process.exit(1);
  }
  console.log(`${pages.size} man pages up to date`);
} else {
  await mkdir(manDir, { recursive: true });
  for (const f of (await readdir(manDir)).filter((f) => f.endsWith('.1') && !pages.has(f))) await rm(join(manDir, f));
  for (const [file, text] of pages) await writeFile(join(manDir, file), text);
  console.log(`wrote ${pages.size} man pages to man/`);
}
