// One real boot of the reference guest: QEMU from its start to the marker line
// on the serial console (the reference guest prints it from a systemd unit
// once multi-user is reached; docs/reference-guest.md). Same machine model as
// scripts/reference-guest/boot-time.sh, so the figures compare.
import { spawn } from 'node:child_process';
import { readFileSync, existsSync, rmSync } from 'node:fs';
import { loadavg } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { track, stopChild } from '../lib/process.js';

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
