import { describe, expect, it } from 'vitest';
import { THREAD_ADDRESS_SPACE, helperThreadsThatFit, parseAddressSpaceLimit } from '../../src/process/address-space.js';

const GiB = 2 ** 30;
const limits = (soft: string, hard: string): string =>
  [
    'Limit                     Soft Limit           Hard Limit           Units     ',
    'Max stack size            8388608              unlimited            bytes     ',
    `Max address space         ${soft.padEnd(20)} ${hard.padEnd(20)} bytes     `,
    'Max open files            1048576              1048576              files     ',
  ].join('\n');

describe('address-space limit', () => {
  it('reads the soft limit of /proc/PID/limits', () => {
    expect(parseAddressSpaceLimit(limits('unlimited', 'unlimited'))).toBeUndefined();
    expect(parseAddressSpaceLimit(limits('1610612736', 'unlimited'))).toBe(1.5 * GiB);
    expect(parseAddressSpaceLimit(limits('unlimited', '1610612736'))).toBeUndefined();
    expect(parseAddressSpaceLimit('garbage')).toBeUndefined();
    expect(parseAddressSpaceLimit(limits('-1', 'unlimited'))).toBeUndefined();
  });

  it('starts only the helper threads the limit has room for', () => {
    expect(helperThreadsThatFit(4, undefined, 700 * 2 ** 20)).toBe(4);
    // 1 GiB with 700 MiB used leaves less than the main thread's headroom: none.
    expect(helperThreadsThatFit(4, GiB, 700 * 2 ** 20)).toBe(0);
    const some = helperThreadsThatFit(4, 1.5 * GiB, 700 * 2 ** 20);
    expect(some).toBeGreaterThan(0);
    expect(some).toBeLessThan(4);
    expect(700 * 2 ** 20 + 512 * 2 ** 20 + some * THREAD_ADDRESS_SPACE).toBeLessThanOrEqual(1.5 * GiB);
    expect(helperThreadsThatFit(4, 16 * GiB, 700 * 2 ** 20)).toBe(4);
  });
});
