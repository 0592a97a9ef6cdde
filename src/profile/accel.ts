/**
 * Choosing the accelerator. /dev/kvm existing is not enough: on some hosts
 * (nested virtualisation) guests hang under KVM. scripts/detect-accel.sh
 * answers that with probe guests; `bootcache profile` instead watches the real
 * boot (docs/profile.md, "Accelerator"):
 *
 * - --accel tcg / kvm: used as given, no probe.
 * - --accel auto: BOOTCACHE_ACCEL=kvm|tcg forces an answer (as for
 *   detect-accel.sh). Else, when /dev/kvm cannot be opened read-write, TCG.
 *   Else the boot starts under KVM "on probation": the guest must show
 *   progress (a disk read, serial console output, or firmware output on the
 *   ISA debug console) within the stall deadline (8 s) of QEMU's start and
 *   then never go that long without any. A stall, or QEMU exiting, under
 *   probation restarts the boot under TCG with a one-line notice.
 */
import { open } from 'node:fs/promises';

export type Accel = 'kvm' | 'tcg';
export type AccelFlag = Accel | 'auto';

export const DEFAULT_KVM_DEVICE = '/dev/kvm';
/** No sign of life under KVM for this long means the guest hangs. */
export const DEFAULT_KVM_STALL_MS = 8000;

export interface AccelChoice {
  accel: Accel;
  /** Boot under KVM watched for stalls, falling back to TCG. */
  probation: boolean;
  reason: string;
}

/** Whether QEMU could use KVM here: the device opens read-write (as QEMU opens it; ACLs and cgroups count). */
export async function kvmUsable(device = DEFAULT_KVM_DEVICE): Promise<{ usable: boolean; reason: string }> {
  try {
    const handle = await open(device, 'r+');
    await handle.close();
    return { usable: true, reason: `${device} opens read-write` };
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return { usable: false, reason: `${device} does not exist` };
    return { usable: false, reason: `${device} cannot be opened read-write (${code ?? (err as Error).message})` };
  }
}

/** Decides what to start with. `forced` is BOOTCACHE_ACCEL, honoured under auto only. */
export async function chooseAccel(flag: AccelFlag, options: { forced?: string | undefined; kvmDevice?: string } = {}): Promise<AccelChoice> {
  if (flag !== 'auto') return { accel: flag, probation: false, reason: `--accel ${flag}` };
  if (options.forced === 'kvm' || options.forced === 'tcg') {
    return { accel: options.forced, probation: false, reason: `forced by BOOTCACHE_ACCEL=${options.forced}` };
  }
  const kvm = await kvmUsable(options.kvmDevice);
  if (!kvm.usable) return { accel: 'tcg', probation: false, reason: kvm.reason };
  return { accel: 'kvm', probation: true, reason: `${kvm.reason}; the guest made progress under KVM` };
}

/**
 * The stall watch of a boot under probation: a pure clock rule. Progress is
 * any sign of life; `hung(now)` is true once the last one (or the start) is
 * `stallMs` old.
 */
export class KvmProbation {
  private lastProgressAtMs = 0;
  progressSeen = false;

  constructor(readonly stallMs: number = DEFAULT_KVM_STALL_MS) {
    if (!(stallMs > 0)) throw new RangeError(`stall deadline ${stallMs} ms must be positive`);
  }

  onProgress(atMs: number): void {
    this.progressSeen = true;
    if (atMs > this.lastProgressAtMs) this.lastProgressAtMs = atMs;
  }

  hung(nowMs: number): boolean {
    return nowMs - this.lastProgressAtMs >= this.stallMs;
  }

  nextDeadlineMs(): number {
    return this.lastProgressAtMs + this.stallMs;
  }

  /** Why the guest counts as hung, for the notice. */
  describe(nowMs: number): string {
    const seconds = (this.stallMs / 1000).toFixed(0);
    return this.progressSeen
      ? `the guest stalled under KVM (no disk read or console output for ${seconds} s, at ${(nowMs / 1000).toFixed(1)} s)`
      : `the guest made no progress under KVM within ${seconds} s (no disk read, no console or firmware output)`;
  }
}
