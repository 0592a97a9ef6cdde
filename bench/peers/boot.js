// One real boot of the reference guest: QEMU from its start to the marker line
// on the serial console (the reference guest prints it from a systemd unit
// once multi-user is reached; docs/reference-guest.md). Same machine model as
// scripts/reference-guest/boot-time.sh, so the figures compare.
import { spawn } from 'node:child_process';
import { readFileSync, existsSync, rmSync } from 'node:fs';
import { loadavg } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { track, stopChild, run } from '../lib/process.js';
import { sampleStorage } from './nbdkit-log.js';
import { corBlockdevs, nbdRemote, socketOf } from './servers.js';

export const MARKER = 'BOOTCACHE-BOOT-COMPLETE';
const CLOCK_TICKS = 100; // USER_HZ on Linux x86-64

/** QEMU's user + system CPU seconds, from /proc/PID/stat (fields 14 and 15). */
function cpuSeconds(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS;
  } catch {
    return null;
  }
}

export function qemuBaseArgs(accel, serial) {
  return ['-accel', accel, '-m', '1024', '-smp', '2', '-display', 'none', '-monitor', 'none', '-no-reboot', '-serial', `file:${serial}`];
}

/**
 * Boots with `diskArgs` (the -drive / -blockdev / -device arguments) and
 * resolves at the marker, or with ok=false after `timeoutS` or when QEMU exits.
 */
export async function bootToMarker({ accel, serial, diskArgs, timeoutS = 600 }) {
  rmSync(serial, { force: true });
  const args = [...qemuBaseArgs(accel, serial), ...diskArgs];
  const load1 = loadavg()[0];
  const started = performance.now();
  const stderr = [];
  const child = track(spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] }), 'qemu');
  child.stderr.on('data', (d) => stderr.push(d));
  let result;
  for (;;) {
    await sleep(100);
    if (existsSync(serial) && readFileSync(serial, 'latin1').includes(MARKER)) {
      result = { ok: true, markerS: (performance.now() - started) / 1000, cpuS: cpuSeconds(child.pid) };
      break;
    }
    if (child.exitCode !== null || child.signalCode !== null) {
      result = { ok: false, error: `QEMU exited before the marker: ${Buffer.concat(stderr).toString().trim().split('\n')[0]}` };
      break;
    }
    if (performance.now() - started > timeoutS * 1000) {
      result = { ok: false, error: `no marker within ${timeoutS} s` };
      break;
    }
  }
  await stopChild(child, 10_000);
  return { ...result, load1, command: `qemu-system-x86_64 ${args.join(' ')}` };
}

/**
 * What a measurement attaches to: the local file, an NBD URI, or the
 * copy-on-read graph over a remote (`remote`: a QEMU protocol blockdev, or
 * the NBD export at `remoteUri`).
 */
function bootDiskArgs(target, dir) {
  switch (target.kind) {
    case 'file':
      return ['-drive', `file=${target.path},format=raw,if=virtio,snapshot=on`];
    case 'uri':
      return ['-drive', `file=${target.uri},format=raw,if=virtio,snapshot=on`];
    case 'cor': {
      // The guest's writes go to a throwaway top overlay, so the copy-on-read
      // overlay holds only what was read from the remote (warm = reused).
      const top = join(dir, 'cor-top.qcow2');
      const args = [];
      for (const b of corBlockdevs(target.overlay, target.remote ?? nbdRemote(socketOf(target.remoteUri)))) args.push('-blockdev', JSON.stringify(b));
      args.push('-blockdev', JSON.stringify({ driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: top }, backing: 'cor' }));
      args.push('-device', 'virtio-blk-pci,drive=top');
      return { args, prepare: () => run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-F', 'qcow2', '-b', target.overlay, top, '2G']) };
    }
    default:
      throw new Error(`unknown target ${target.kind}`);
  }
}

/**
 * One real boot through `target`, the storage counters (`storage.totals()`)
 * sampled during it; records the QEMU command in ctx.commands.
 */
export async function measureBoot(ctx, target, storage) {
  let diskArgs = bootDiskArgs(target, ctx.dir);
  if (!Array.isArray(diskArgs)) {
    await diskArgs.prepare();
    diskArgs = diskArgs.args;
  }
  const sampler = storage ? await sampleStorage(storage) : undefined;
  const boot = await bootToMarker({ accel: ctx.accel, serial: join(ctx.dir, 'serial.log'), diskArgs });
  const io = sampler ? await sampler.stop() : undefined;
  if (!boot.ok) throw new Error(`boot failed: ${boot.error}`);
  ctx.commands.set(`boot ${target.kind}`, boot.command);
  return { seconds: boot.markerS, qemuCpuS: boot.cpuS, load1: boot.load1, storage: io ? { requests: io.requests, bytes: io.bytes } : null, series: io?.series ?? null };
}
