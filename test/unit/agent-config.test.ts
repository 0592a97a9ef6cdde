import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CONFIG_DEFAULTS, FLAG_FOR_KEY, resolveConfig } from '../../src/agent/config.js';
import AgentRun from '../../src/commands/agent/index.js';
import { resolveGroup } from '../../src/agent/socket-access.js';
import { UsageError } from '../../src/errors.js';

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

describe('agent configuration: missWindow (--miss-window)', () => {
  it('defaults to 1 MiB, takes sizes from the flag or the key, and 0 turns it off', () => {
    expect(CONFIG_DEFAULTS.missWindow).toBe(1024 * 1024);
    expect(resolveConfig({}, base).missWindow).toBe(1024 * 1024);
    expect(resolveConfig({ missWindow: '256K' }, base).missWindow).toBe(256 * 1024);
    expect(resolveConfig({}, { ...base, missWindow: '0' }).missWindow).toBe(0);
    expect(FLAG_FOR_KEY.missWindow).toEqual({ flag: 'miss-window' });
  });

  it('refuses windows outside 8K..32M and garbage, naming the key', () => {
    for (const bad of ['4K', '64M', 'wide', -1]) expect(() => resolveConfig({ missWindow: bad }, base)).toThrow(/missWindow/);
  });
});

describe('agent configuration: prefetchRate (--prefetch-rate)', () => {
  it('is unlimited (0) by default, takes sizes per second from the flag or the key, and 0 is unlimited', () => {
    expect(resolveConfig({}, base).prefetchRate).toBe(0);
    expect(resolveConfig({}, base, { 'prefetch-rate': '25M' }).prefetchRate).toBe(25 * 1024 * 1024);
    expect(resolveConfig({ prefetchRate: '1.5G' }, base).prefetchRate).toBe(1.5 * 1024 ** 3);
    expect(resolveConfig({ prefetchRate: '25M' }, base, { 'prefetch-rate': '0' }).prefetchRate).toBe(0);
  });

  it('refuses rates that are not sizes or are below 64K per second, in one line naming the flag or the key', () => {
    const fails = (file: Record<string, unknown>, flags: Record<string, unknown>, pattern: RegExp): void => {
      expect(() => resolveConfig(file, base, flags)).toThrow(UsageError);
      expect(() => resolveConfig(file, base, flags)).toThrow(pattern);
    };
    fails({}, { 'prefetch-rate': '25' }, /^--prefetch-rate must be 0 \(unlimited\) or at least 64K \(bytes per second\), got "25"$/);
    fails({}, { 'prefetch-rate': '25MB/s' }, /^--prefetch-rate must be a size such as 4096, 64K, 512M or 8G, got "25MB\/s"$/);
    fails({ prefetchRate: -1 }, {}, /^config: prefetchRate must be a whole number of bytes, got -1$/);
  });
});

describe('agent configuration: boot.maxShare (whole-disk reads are not boots)', () => {
  it('defaults to half the image\'s data above 256 MiB; flags and keys set it, 0 turns it off', () => {
    expect(resolveConfig({}, base).boot).toMatchObject({ maxShare: 0.5, maxShareFloor: 256 * 1024 * 1024 });
    expect(resolveConfig({ boot: { maxShare: 0.25, maxShareFloor: '1G' } }, base).boot).toMatchObject({ maxShare: 0.25, maxShareFloor: 1024 ** 3 });
    const c = resolveConfig({ boot: { maxShare: 0.25 } }, base, { 'boot-max-share': '0', 'boot-max-share-floor': '64M' });
    expect(c.boot).toMatchObject({ maxShare: 0, maxShareFloor: 64 * 1024 * 1024, idleMs: 20_000 });
  });

  it('refuses shares outside 0..1 and floors that are not sizes, naming the flag or the key', () => {
    const fails = (file: Record<string, unknown>, flags: Record<string, unknown>, pattern: RegExp): void => {
      expect(() => resolveConfig(file, base, flags)).toThrow(UsageError);
      expect(() => resolveConfig(file, base, flags)).toThrow(pattern);
    };
    fails({}, { 'boot-max-share': '1.5' }, /^--boot-max-share must be a number from 0 to 1, got "1\.5"$/);
    fails({}, { 'boot-max-share': '50%' }, /^--boot-max-share must be a number from 0 to 1, got "50%"$/);
    fails({ boot: { maxShare: -0.1 } }, {}, /^config: boot\.maxShare must be a number from 0 to 1, got -0\.1$/);
    fails({}, { 'boot-max-share-floor': 'big' }, /^--boot-max-share-floor must be a size such as 4096, 64K, 512M or 8G, got "big"$/);
    fails({ boot: { maxShareFloor: -1 } }, {}, /^config: boot\.maxShareFloor must be a whole number of bytes, got -1$/);
    fails({ boot: { maxshare: 0.5 } }, {}, /unknown key "boot\.maxshare"/);
  });
});

describe('agent configuration: validation', () => {
  const fails = (file: Record<string, unknown>, pattern: RegExp): void => {
    expect(() => resolveConfig(file, base)).toThrow(UsageError);
    expect(() => resolveConfig(file, base)).toThrow(pattern);
  };

  it('refuses unknown keys inside boot and merge, naming them', () => {
    fails({ boot: { idelMs: 5000 } }, /unknown key "boot\.idelMs"/);
    fails({ merge: { minseen: 2 } }, /unknown key "merge\.minseen"/);
  });

  it('refuses fractions where a whole number is meant', () => {
    fails({ prefetchDepth: 1.5 }, /prefetchDepth must be a whole number/);
    fails({ merge: { window: 2.5 } }, /merge\.window must be a whole number/);
    fails({ boot: { minReads: 6.4 } }, /boot\.minReads must be a whole number/);
    fails({ blockSize: 512.5 }, /blockSize must be a whole number/);
    fails({ maxConnections: 0 }, /maxConnections must be a number from 1/);
  });

  it('refuses a maintenance schedule that is not a string, and a path of the wrong type', () => {
    fails({ maintenance: 5 }, /maintenance must be a cron schedule string or "off", got 5/);
    expect(() => resolveConfig({ storage: 5 }, { cache: '/c' })).toThrow(/storage must be a path \(a non-empty string\), got 5/);
    expect(() => resolveConfig({}, { cache: '/c' })).toThrow(/storage is required/);
  });

  it('takes socket access settings: octal mode (660 by default), group name or gid, connection limit', () => {
    const d = resolveConfig({}, base);
    expect(d.socketMode).toBe(0o660);
    expect(d.socketGroup).toBeUndefined();
    expect(d.maxConnections).toBe(128);
    const c = resolveConfig({ socketMode: '0640', socketGroup: 'libvirt-qemu', maxConnections: 512 }, base);
    expect(c).toMatchObject({ socketMode: 0o640, socketGroup: 'libvirt-qemu', maxConnections: 512 });
    expect(resolveConfig({ socketMode: '666', socketGroup: '64055' }, base)).toMatchObject({ socketMode: 0o666, socketGroup: '64055' });
    fails({ socketMode: '999' }, /socketMode must be octal permission bits/);
    fails({ socketMode: '444' }, /lets nobody connect/);
    fails({ socketGroup: 'a b' }, /socketGroup must be a group name or a numeric gid/);
    fails({ socketGroup: 7 }, /socketGroup must be a group name/);
  });
});

describe('agent configuration: flags', () => {
  const flagFails = (flags: Record<string, unknown>, pattern: RegExp, file: Record<string, unknown> = {}): void => {
    expect(() => resolveConfig(file, base, flags)).toThrow(UsageError);
    expect(() => resolveConfig(file, base, flags)).toThrow(pattern);
  };

  it('maps every flag of `bootcache agent` to a setting, so none is silently ignored', () => {
    const mapped = Object.values(FLAG_FOR_KEY).map((spec) => spec.flag).sort();
    const flags = Object.keys(AgentRun.flags).filter((name) => name !== 'config').sort();
    expect(mapped).toEqual(flags);
  });

  it('converts flag units and lets flags win over the file', () => {
    const c = resolveConfig({ boot: { idleMs: 5000, minReads: 10 }, cacheSize: '1G' }, base, { 'boot-idle': '2.5', 'cache-size': '64M', 'merge-window': 6 });
    expect(c.boot).toMatchObject({ idleMs: 2500, minReads: 10 });
    expect(c.cacheSize).toBe(64 * 1024 * 1024);
    expect(c.merge.window).toBe(6);
  });

  it('names the flag, in its own unit, when a flag value is bad', () => {
    flagFails({ 'boot-idle': 'abc' }, /^--boot-idle must be a number of seconds from 0\.1 to 3600, got "abc"$/);
    flagFails({ 'boot-idle': '' }, /^--boot-idle must be a number of seconds/);
    flagFails({ 'boot-window': '-5' }, /^--boot-window must be a number of seconds from 1 to 86400, got "-5"$/);
    flagFails({ 'cache-size': '12Q' }, /^--cache-size must be a size such as 4096, 64K, 512M or 8G, got "12Q"$/);
    flagFails({ 'cache-size': '1M' }, /^--cache-size must be at least 16M, got "1M"$/);
    flagFails({ 'prefetch-chunk': '1K' }, /^--prefetch-chunk must be from 64K to 256M/);
    flagFails({ 'storage-error-rate': 'x' }, /^--storage-error-rate must be a number from 0 to 1/);
    flagFails({ 'socket-mode': '999' }, /^--socket-mode must be octal permission bits/);
    flagFails({ listen: 'host:99999' }, /^--listen: port 99999 is out of range/);
    flagFails({ listen: '' }, /^--listen must be HOST:PORT, got ""$/);
    flagFails({ socket: `/run/${'x'.repeat(110)}.sock` }, /^--socket is 120 bytes long; a unix socket path can have at most 107$/);
    flagFails({ socket: '/tmp/a.sock', control: '/tmp/./a.sock' }, /^--socket and --control name the same path \/tmp\/a\.sock$/);
    flagFails({}, /^config: socket and config: control name the same path \/tmp\/b\.sock$/, { socket: '/tmp/b.sock', control: '/tmp/b.sock' });
    flagFails({ 'boot-idle': '0x10' }, /^--boot-idle must be a number of seconds from 0\.1 to 3600, got "0x10"$/);
    flagFails({ 'storage-error-rate': 'Infinity' }, /^--storage-error-rate must be a number from 0 to 1, got "Infinity"$/);
    flagFails({ 'merge-min-seen': 5 }, /^--merge-min-seen \(5\) cannot exceed the merge window \(4 boots; /);
  });

  it('sees one socket path through a symlinked directory, ".." or a directory not created yet', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'bc-same-socket-'));
    await mkdir(join(dir, 'real'));
    await symlink(join(dir, 'real'), join(dir, 'link'));
    const same = /^--socket and --control name the same path /;
    flagFails({ socket: join(dir, 'real', 'a.sock'), control: join(dir, 'link', 'a.sock') }, same);
    // "sub-link/.." is real/ for the kernel (the target's parent), not dir/ as path.resolve would say.
    await mkdir(join(dir, 'real', 'sub'));
    await symlink(join(dir, 'real', 'sub'), join(dir, 'sub-link'));
    flagFails({ socket: join(dir, 'real', 'a.sock'), control: `${dir}/sub-link/../a.sock` }, same);
    flagFails({ socket: join(dir, 'real', 'new', 'a.sock'), control: join(dir, 'link', 'new', 'a.sock') }, same);
    expect(resolveConfig({}, base, { socket: join(dir, 'real', 'a.sock'), control: join(dir, 'link', 'b.sock') }).control).toBe(join(dir, 'link', 'b.sock'));
    expect(resolveConfig({}, base, { socket: join(dir, 'real', 'a.sock'), control: join(dir, 'a.sock') }).control).toBe(join(dir, 'a.sock'));
    await rm(dir, { recursive: true, force: true });
  });

  it('names the key when the bad value came from the file', () => {
    flagFails({}, /^config: boot\.idleMs must be a number from 100 to 3600000, got "abc"$/, { boot: { idleMs: 'abc' } });
    flagFails({}, /^config: cacheSize must be a size such as/, { cacheSize: '12Q' });
    flagFails({}, /^config: boot\.idleMs must be a number from 100 to 3600000, got Infinity$/, { boot: { idleMs: Infinity } });
    flagFails({}, /^config: maxConnections must be a number from 1 to 65536, got "0x10"$/, { maxConnections: '0x10' });
    expect(resolveConfig({ storageErrorRate: ' 0.25 ', boot: { idleMs: '1.5e3' } }, base)).toMatchObject({ storageErrorRate: 0.25, boot: { idleMs: 1500 } });
    flagFails({ 'boot-window': '30' }, /^config: logLevel "loud" is not a pino level/, { logLevel: 'loud' });
  });
});

describe('socket group lookup', () => {
  it('resolves names from the group file and numbers as they are; an unknown group is a usage error', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'bc-group-'));
    const file = join(dir, 'group');
    await writeFile(file, 'root:x:0:\nkvm:x:993:alice\nlibvirt-qemu:x:64055:libvirt-qemu\n');
    expect(await resolveGroup('libvirt-qemu', file)).toBe(64055);
    expect(await resolveGroup('kvm', file)).toBe(993);
    expect(await resolveGroup('1234', file)).toBe(1234);
    await expect(resolveGroup('qemu', file)).rejects.toThrow(/no group named "qemu"/);
    await expect(resolveGroup('qemu', join(dir, 'missing'))).rejects.toThrow(UsageError);
    // Without a file: getent, so NSS groups resolve too.
    expect(await resolveGroup('root')).toBe(0);
    await expect(resolveGroup('no-such-group-here')).rejects.toThrow(/no group named "no-such-group-here"$/);
    await rm(dir, { recursive: true, force: true });
  });
});
