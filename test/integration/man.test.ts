import { execFileSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';

describe('man pages', () => {
  it('man/ matches the command metadata (run npm run build to regenerate)', () => {
    // gen-man --check exits 1 and names the stale pages when man/ is out of date.
    const out = execFileSync(process.execPath, ['scripts/gen-man.js', '--check'], { encoding: 'utf8' });
    expect(out).toMatch(/man pages up to date/);
  });
});
