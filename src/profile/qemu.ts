/**
 * Starting and stopping the profiled VM: QEMU headless, the disk attached
 * from our NBD server (snapshot=on: guest writes go to a temporary overlay,
 * the image is never written), the serial console to a file, firmware debug
 * output (ISA debugcon, port 0x402) to another file.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { constants } from 'node:fs';
import { access, copyFile, stat } from 'node:fs/promises';
import { delimiter, join } from 'node:path';
import { BootFailedError } from '../errors.js';
import type { Accel } from './accel.js';

export const DEFAULT_QEMU = 'qemu-system-x86_64';
export type Firmware = 'bios' | 'uefi';

/** OVMF as Debian's ovmf package installs it: a 4 MiB code/vars pair, else the single image. */
const UEFI_PAIRS: Array<{ code: string; vars: string }> = [
  { code: '/usr/share/OVMF/OVMF_CODE_4M.fd', vars: '/usr/share/OVMF/OVMF_VARS_4M.fd' },
  { code: '/usr/share/OVMF/OVMF_CODE.fd', vars: '/usr/share/OVMF/OVMF_VARS.fd' },
];
const UEFI_SINGLE = ['/usr/share/qemu/OVMF.fd', '/usr/share/ovmf/OVMF.fd'];

export type UefiFirmware = { kind: 'pflash'; code: string; vars: string } | { kind: 'bios'; file: string };

export interface QemuLaunch {
  accel: Accel;
  memoryMb: number;
  cpus: number;
  uefi?: UefiFirmware | undefined;
  /** nbd+unix:///NAME?socket=PATH */
  nbdUri: string;
  consoleLog: string;
  debugconLog: string;
  /** --qemu-arg values, appended last. */
  extraArgs: readonly string[];
}

/** QEMU option values are comma-separated: a literal comma is written twice. */
export function escapeOptionValue(value: string): string {
  return value.replaceAll(',', ',,');
}

export function qemuArgs(l: QemuLaunch): string[] {
  const args = [
    '-accel', l.accel,
    '-nodefaults',
    '-display', 'none',
    '-no-reboot',
    '-m', String(l.memoryMb),
    '-smp', String(l.cpus),
    '-chardev', `file,id=bcserial,path=${escapeOptionValue(l.consoleLog)}`,
    '-serial', 'chardev:bcserial',
    '-chardev', `file,id=bcdebugcon,path=${escapeOptionValue(l.debugconLog)}`,
    '-device', 'isa-debugcon,iobase=0x402,chardev=bcdebugcon',
  ];
  if (l.uefi?.kind === 'pflash') {
    args.push(
      '-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${escapeOptionValue(l.uefi.code)}`,
      '-drive', `if=pflash,format=raw,unit=1,file=${escapeOptionValue(l.uefi.vars)}`,
    );
  } else if (l.uefi?.kind === 'bios') {
    args.push('-bios', l.uefi.file);
  }
  args.push('-drive', `file=${escapeOptionValue(l.nbdUri)},format=raw,if=virtio,snapshot=on`);
  args.push(...l.extraArgs);
  return args;
}

async function isExecutableFile(path: string): Promise<boolean> {
  try {
    const s = await stat(path);
    if (!s.isFile()) return false;
    await access(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** The QEMU binary to run: a path (must be an executable file) or a name looked up in PATH. */
export async function resolveQemu(name: string, pathEnv = process.env.PATH ?? ''): Promise<string> {
  if (name.includes('/')) {
    try {
      const s = await stat(name);
      if (!s.isFile()) throw new BootFailedError(`QEMU not found: ${name} is not a file (--qemu)`);
    } catch (err) {
      if (err instanceof BootFailedError) throw err;
      throw new BootFailedError(`QEMU not found: ${name} does not exist (--qemu)`);
    }
    if (!(await isExecutableFile(name))) throw new BootFailedError(`QEMU not found: ${name} is not executable (--qemu)`);
    return name;
  }
  for (const dir of pathEnv.split(delimiter)) {
    if (dir === '') continue;
    const candidate = join(dir, name);
    if (await isExecutableFile(candidate)) return candidate;
  }
  throw new BootFailedError(`QEMU not found: no ${name} in PATH (install qemu-system-x86, or give --qemu PATH)`);
}

/** Finds OVMF; a pflash vars file is copied into `tmpDir` (the guest may write it). */
export async function findUefiFirmware(tmpDir: string): Promise<UefiFirmware> {
  for (const pair of UEFI_PAIRS) {
    if ((await readable(pair.code)) && (await readable(pair.vars))) {
      const vars = join(tmpDir, 'OVMF_VARS.fd');
      await copyFile(pair.vars, vars);
      return { kind: 'pflash', code: pair.code, vars };
    }
  }
  for (const file of UEFI_SINGLE) if (await readable(file)) return { kind: 'bios', file };
  throw new BootFailedError('--firmware uefi: no OVMF firmware found in /usr/share/OVMF or /usr/share/qemu (install the ovmf package)');
}

async function readable(path: string): Promise<boolean> {
  try {
    await access(path, constants.R_OK);
    return true;
  } catch {
    return false;
  }
}

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Set when the process could not be started at all. */
  error?: Error;
}

const STDERR_KEEP = 8192;
/** Processes to kill if Node exits while they run (a crash, process.exit). */
const live = new Set<ChildProcess>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const child of live) child.kill('SIGKILL');
  });
}

/** A running QEMU. */
export class QemuProcess {
  readonly exited: Promise<QemuExit>;
  exit: QemuExit | undefined;
  private stderr = '';

  private constructor(private readonly child: ChildProcess) {
    live.add(child);
    this.exited = new Promise<QemuExit>((resolve) => {
      child.once('error', (error) => {
        // Only a failed spawn (ENOENT, EACCES) leaves the child without a pid.
        if (child.pid !== undefined) return;
        this.exit = { code: null, signal: null, error };
        live.delete(child);
        resolve(this.exit);
      });
      child.once('close', (code, signal) => {
        this.exit ??= { code, signal };
        live.delete(child);
        resolve(this.exit);
      });
    });
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (text: string) => {
      this.stderr = (this.stderr + text).slice(-STDERR_KEEP);
    });
    child.stdout?.resume();
  }

  static start(binary: string, args: string[], env: NodeJS.ProcessEnv): QemuProcess {
    installExitHook();
    const child = spawn(binary, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
    return new QemuProcess(child);
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get running(): boolean {
    return this.exit === undefined;
  }

  /** QEMU's last non-empty stderr line ('' when none). */
  lastStderrLine(): string {
    const lines = this.stderr.split('\n').map((l) => l.trim()).filter((l) => l.length > 0);
    return lines.length > 0 ? lines[lines.length - 1]! : '';
  }

  /**
   * Stops QEMU: SIGTERM (QEMU shuts down cleanly on it), SIGKILL after
   * `graceMs`; waits at most `killWaitMs` more (a process stuck inside KVM
   * may not die at once) and then leaves it to the exit hook.
   */
  async stop(graceMs = 3000, killWaitMs = 2000): Promise<void> {
    if (!this.running) return;
    this.child.kill('SIGTERM');
    if (await this.waitExit(graceMs)) return;
    this.child.kill('SIGKILL');
    await this.waitExit(killWaitMs);
  }

  private async waitExit(ms: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), ms);
    });
    const done = await Promise.race([this.exited.then(() => true as const), timeout]);
    clearTimeout(timer);
    return done;
  }
}

/** How QEMU ended, in words: "exited with status 1", "was killed by SIGKILL". */
export function describeExit(exit: QemuExit): string {
  if (exit.error) return `could not be started (${exit.error.message})`;
  if (exit.signal) return `was killed by ${exit.signal}`;
  return `exited with status ${exit.code ?? '?'}`;
}
