/**
 * No ANSI colour in a CI log or a pipe: the CLI (oclif help, listr2) and
 * the test log itself (vitest.config.ts). `script` gives the CLI a real
 * terminal, where colour is on unless CI is set.
 */
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const root = fileURLToPath(new URL('../..', import.meta.url));
const ESC = '\x1b[';

/** Runs a shell command under a pseudo-terminal; its output as the terminal saw it. */
function onTerminal(command: string, env: Record<string, string | undefined>): string {
  return execFileSync('script', ['-qec', command, '/dev/null'], { cwd: root, encoding: 'utf8', env: { ...cleanEnv(), ...env } });
}

/** The environment without the colour variables this test run may carry. */
function cleanEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  delete env.NO_COLOR;
  delete env.FORCE_COLOR;
  delete env.CI;
  return env;
}

describe('colour', () => {
  it('the CLI colours its help on a terminal, but not with CI=true nor in a pipe', () => {
    expect(onTerminal('node bin/run.js verify --help', {})).toContain(ESC);
    expect(onTerminal('node bin/run.js verify --help', { CI: 'true' })).not.toContain(ESC);
    const piped = execFileSync(process.execPath, ['bin/run.js', 'verify', '--help'], { cwd: root, encoding: 'utf8', env: cleanEnv() });
    expect(piped).not.toContain(ESC);
    // FORCE_COLOR, set by the user, still wins.
    expect(onTerminal('node bin/run.js verify --help', { CI: 'true', FORCE_COLOR: '1' })).toContain(ESC);
  });

  it('the test log has no colour codes with CI=true, even on a terminal', () => {
    const run = 'npx vitest run test/unit/profile-fatal-lines.test.ts';
    expect(onTerminal(run, {})).toContain(ESC);
    const ci = onTerminal(run, { CI: 'true' });
    expect(ci).toMatch(/Tests\s+3 passed/);
    expect(ci).not.toMatch(/\x1b\[[0-9;]*m/); // no SGR colour codes (the terminal renderer may still move the cursor)
  });
});
