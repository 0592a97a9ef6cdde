import { describe, expect, it } from 'vitest';
import { CONFIG_DEFAULTS, resolveConfig } from '../src/agent/config.js';
import { UsageError } from '../src/errors.js';

const base = { storage: '/srv/images', cache: '/var/cache/bootcache' };

describe('agent configuration: readahead', () => {
  it('defaults to 2 MiB, takes sizes, and 0 turns it off', () => {
    expect(resolveConfig({}, base).readahead).toBe(CONFIG_DEFAULTS.readahead);
    expect(CONFIG_DEFAULTS.readahead).toBe(2 * 1024 * 1024);
    expect(resolveConfig({ readahead: '512K' }, base).readahead).toBe(512 * 1024);
    expect(resolveConfig({}, { ...base, readahead: '0' }).readahead).toBe(0);
  });

  it('refuses windows outside 64K..32M and garbage, naming the key', () => {
    for (const bad of ['4K', '64M', 'lots', -1]) {
      expect(() => resolveConfig({ readahead: bad }, base)).toThrow(UsageError);
      expect(() => resolveConfig({ readahead: bad }, base)).toThrow(/readahead/);
    }
  });
});
