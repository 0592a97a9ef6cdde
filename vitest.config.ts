import { defineConfig } from 'vitest/config';

/**
 * No ANSI colour in a CI log or a pipe. vitest's colours (tinyrainbow) turn
 * on whenever CI is set, even when the output is a file; FORCE_COLOR, set by
 * the user, still wins. NO_COLOR reaches the test workers and the CLI they
 * spawn. This process chose its colours (and coloured its ✓ and × marks)
 * before reading the config, so its colour codes (SGR sequences only) are
 * taken out of what it writes.
 */
const ci = process.env.CI !== undefined && !['', '0', 'false'].includes(process.env.CI);
if ((ci || !process.stdout.isTTY) && process.env.FORCE_COLOR === undefined) {
  process.env.NO_COLOR = '1';
  const SGR = /\x1b\[[0-9;]*m/g;
  for (const stream of [process.stdout, process.stderr]) {
    const write = stream.write.bind(stream) as (chunk: unknown, ...rest: unknown[]) => boolean;
    stream.write = ((chunk: unknown, ...rest: unknown[]) =>
      write(typeof chunk === 'string' ? chunk.replace(SGR, '') : chunk, ...rest)) as typeof stream.write;
  }
}

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 300_000,
    pool: 'forks',
  },
});
