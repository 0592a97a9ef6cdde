#!/usr/bin/env node
// Longer run of the qcow2 fuzz test (test/integration/qcow2-fuzz.test.ts): mutants of
// generated images, each read by bootcache and converted by qemu-img.
// Usage: node scripts/fuzz.js [--count N] [--seed S|random] [--only i,j] [--verbose]
//   --count N    mutants (default 5000; `npm test` runs 500)
//   --seed S     the run's seed (default: the test's fixed seed); "random" picks one
//   --only i,j   replay these mutants of the seed only
//   --verbose    list every mutant with its outcome, not just the failures
// Exits non-zero when any mutant gives wrong bytes, crashes, hangs or throws an uncoded error.
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const value = (name) => {
  const i = args.indexOf(name);
  if (i === -1) return undefined;
  const v = args[i + 1];
  if (v === undefined || v.startsWith('--')) {
    console.error(`fuzz: ${name} needs a value`);
    process.exit(2);
  }
  return v;
};
for (const a of args) {
  if (a.startsWith('--') && !['--count', '--seed', '--only', '--verbose'].includes(a)) {
    console.error(`fuzz: unknown option ${a}`);
    process.exit(2);
  }
}

const count = value('--count') ?? '5000';
let seed = value('--seed');
if (seed === 'random') seed = String(Math.floor(Math.random() * 2 ** 31));
const only = value('--only');
if (!/^\d+$/.test(count) || (seed !== undefined && !/^\d+$/.test(seed)) || (only !== undefined && !/^\d+(,\d+)*$/.test(only))) {
  console.error('fuzz: --count and --seed take whole numbers, --only a comma-separated list of them');
  process.exit(2);
}

const env = { ...process.env, FUZZ_COUNT: count };
if (seed !== undefined) env.FUZZ_SEED = seed;
if (only !== undefined) env.FUZZ_ONLY = only;
if (args.includes('--verbose')) env.FUZZ_VERBOSE = '1';
console.log(`fuzz: ${only ? `mutants ${only}` : `${count} mutants`}${seed !== undefined ? `, seed ${seed}` : ''}`);
const vitest = join(root, 'node_modules', '.bin', 'vitest');
const child = spawn(vitest, ['run', 'test/integration/qcow2-fuzz.test.ts'], { cwd: root, env, stdio: 'inherit' });
child.on('exit', (code, signal) => process.exit(code ?? (signal ? 1 : 0)));
