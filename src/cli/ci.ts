/**
 * CI and colour: no ANSI colour and no live task list in a CI log or a pipe.
 * Set once in bin/run.js, before oclif and listr2 load and pick their colours.
 */

/** True when CI is set to anything but '', '0' or 'false' (GitHub Actions, GitLab and most CI systems set CI=true). */
export function isCI(env: NodeJS.ProcessEnv = process.env): boolean {
  return env.CI !== undefined && !['', '0', 'false'].includes(env.CI);
}

/**
 * Turns colour off for this process and the ones it starts when in CI or
 * when stdout is not a terminal, unless the user set FORCE_COLOR. Both
 * variables, as libraries differ: ansis (oclif) and chalk read FORCE_COLOR=0,
 * colorette (listr2) reads NO_COLOR.
 */
export function disableColourUnlessTerminal(env: NodeJS.ProcessEnv = process.env, stdoutIsTTY = process.stdout.isTTY === true): void {
  if (env.FORCE_COLOR !== undefined) return;
  if (!isCI(env) && stdoutIsTTY) return;
  env.NO_COLOR = '1';
  env.FORCE_COLOR = '0';
}
