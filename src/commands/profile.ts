import { Args, Flags } from '@oclif/core';
import type { ListrTask } from 'listr2';
import { BaseCommand, commandUsage, exitCodesHelp } from '../cli/base-command.js';
import { copyFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { imageFlags } from '../cli/image-flags.js';
import { s3Flags, withLocations, type Locations } from '../cli/locations.js';
import { formatBytes, runTasks } from '../cli/progress.js';
import { ExitCode, UsageError } from '../errors.js';
import { isValidBlockSize } from '../format/binary.js';
import { isS3Url } from '../storage/s3.js';
import type { Accel } from '../profile/accel.js';
import { parseUntil } from '../profile/console.js';
import {
  DEFAULT_IDLE_SECONDS,
  DEFAULT_MIN_READS,
  DEFAULT_TIMEOUT_SECONDS,
  DEFAULT_UNTIL,
} from '../profile/end-of-boot.js';
import {
  Profiler,
  ProfileInterruptedError,
  defaultPaths,
  type Agreement,
  type ProfileHooks,
  type ProfileRunResult,
} from '../profile/profile.js';
import { DEFAULT_QEMU } from '../profile/qemu.js';


const EXIT_CODES = exitCodesHelp([ExitCode.VERIFY_FAILED, ExitCode.BAD_INPUT, ExitCode.IO, ExitCode.BOOT_TIMEOUT, ExitCode.BOOT_FAILED], {
  [ExitCode.VERIFY_FAILED]: 'the segment built from the boot does not verify against the image',
});

export interface ProfileCommandResult {
  image: string;
  format: string;
  virtualSize: number;
  /** Accelerator of the (last) boot, and why. */
  accel: Accel;
  accelReason: string;
  /** Of the last run; every run is in `runs`. */
  bootSeconds: number;
  endReason: ProfileRunResult['endReason'];
  endLine?: string;
  reads: number;
  bytes: number;
  blocks: number;
  runs: ProfileRunResult[];
  agreement: Agreement;
  map: { path: string; blockSize: number; blocks: number; bytes: number; boots: number };
  segment: { path: string; blocks: number; bytes: number; fileBytes: number; dataSha256: string; verified: boolean } | null;
  /** Console log of the last run. */
  consoleLog: string;
  paths: { map: string; segment: string | null; traces: string[]; consoleLogs: string[] };
  notices: string[];
}

/** Test hooks from the environment (docs/profile.md, "Test hooks"). */
function hooksFromEnv(env: NodeJS.ProcessEnv): ProfileHooks {
  const probeAccel = env.BOOTCACHE_PROFILE_PROBE_ACCEL;
  if (probeAccel !== undefined && probeAccel !== 'kvm' && probeAccel !== 'tcg') {
    throw new UsageError(`BOOTCACHE_PROFILE_PROBE_ACCEL must be kvm or tcg, not ${JSON.stringify(probeAccel)}`);
  }
  const forced = env.BOOTCACHE_ACCEL;
  if (forced !== undefined && forced !== '' && forced !== 'kvm' && forced !== 'tcg') {
    throw new UsageError(`BOOTCACHE_ACCEL must be kvm or tcg, not ${JSON.stringify(forced)}`);
  }
  const stall = env.BOOTCACHE_PROFILE_STALL_MS;
  if (stall !== undefined && !/^[1-9][0-9]*$/.test(stall)) {
    throw new UsageError(`BOOTCACHE_PROFILE_STALL_MS must be a positive integer, not ${JSON.stringify(stall)}`);
  }
  return {
    forcedAccel: forced === '' ? undefined : forced,
    kvmDevice: env.BOOTCACHE_PROFILE_KVM_DEVICE,
    probeAccel,
    probeExtraArgs: env.BOOTCACHE_PROFILE_PROBE_EXTRA?.split(/\s+/).filter((a) => a.length > 0),
    stallMs: stall === undefined ? undefined : Number(stall),
  };
}

export default class Profile extends BaseCommand<typeof Profile> {
  static override summary = 'Boot an image in QEMU and record its boot workload map, trace and segment.';
  static override description = `Boots IMAGE (raw or qcow2) in QEMU, headless, with its disk served by bootcache's own NBD server on a private unix socket (snapshot=on: guest writes go to a temporary overlay; the image is never written). Every read the guest makes is recorded into the map (one bit per block) and into an access-ordered trace (t_us,op,offset,length,done_us, times from QEMU's start). The serial console is saved to --console-log.

The boot ends at the first of: a console line matching --until (default: a login prompt or the reference guest's BOOTCACHE-BOOT-COMPLETE marker); --idle seconds with no read of a new block (after at least ${DEFAULT_MIN_READS} reads; 0 disables it); --timeout, which is a failure (exit 5) saying how far the boot got. The VM is then stopped, also on errors and interrupts.

--accel auto uses KVM only if the guest really runs under it: when /dev/kvm opens read-write, the boot starts under KVM and must show progress (a disk read, serial or firmware console output) within 8 s and never stall that long; otherwise QEMU is killed and the boot restarts under TCG, with a one-line notice on stderr. BOOTCACHE_ACCEL=kvm|tcg skips the probe.

Outputs: the map (IMAGE.bcmap), the trace (IMAGE.trace.csv) and, unless --no-segment, the segment (IMAGE.bcseg), built and verified against the image. --runs N boots N times (traces and console logs get a .runK suffix) and merges the maps as the agent does (a block stays when read in at least 2 of the last 4 boots; while fewer than 2 boots are known, every boot counts) and reports how much the runs agree.

See docs/profile.md.

${EXIT_CODES}`;

  static override examples = [
    '<%= config.bin %> <%= command.id %> debian12.qcow2',
    '<%= config.bin %> <%= command.id %> debian12.qcow2 --runs 3 --json',
    `<%= config.bin %> <%= command.id %> disk.raw --until 'Kernel panic' --qemu-arg=-kernel --qemu-arg=vmlinuz --qemu-arg=-append --qemu-arg='console=ttyS0 root=/dev/vda'`,
  ];

  static override args = {
    image: Args.string({ description: 'Disk image (raw or qcow2).', required: true }),
  };

  static override flags = {
    ...imageFlags,
    ...s3Flags,
    until: Flags.string({
      description: 'End of boot: a console line matching this regular expression (bare, or /pattern/flags).',
      default: DEFAULT_UNTIL,
      helpValue: 'REGEX',
    }),
    idle: Flags.integer({
      description: `End of boot: this many seconds without a read of a new block (after ${DEFAULT_MIN_READS} reads); 0 disables.`,
      default: DEFAULT_IDLE_SECONDS,
      min: 0,
      helpValue: 'SECONDS',
    }),
    timeout: Flags.integer({
      description: 'Fail (exit 5) when the boot has not ended after this many seconds.',
      default: DEFAULT_TIMEOUT_SECONDS,
      min: 1,
      helpValue: 'SECONDS',
    }),
    runs: Flags.integer({ description: 'Boot this many times and merge the maps.', default: 1, min: 1, max: 16, helpValue: 'N' }),
    'out-map': Flags.string({ description: 'Map to write (default: IMAGE.bcmap).', helpValue: 'MAP' }),
    'out-segment': Flags.string({ description: 'Segment to write (default: IMAGE.bcseg).', helpValue: 'SEG' }),
    'out-trace': Flags.string({ description: 'Trace CSV to write (default: IMAGE.trace.csv).', helpValue: 'CSV' }),
    segment: Flags.boolean({ description: 'Build and verify the segment (default on; --no-segment: map and trace only).', default: true, allowNo: true }),
    'console-log': Flags.string({ description: 'Serial console log (default: IMAGE.console.log next to the map).', helpValue: 'FILE' }),
    'block-size': Flags.integer({ description: 'Map block size in bytes (a power of two, 512 B to 2 MiB).', default: 4096, helpValue: 'BYTES' }),
    memory: Flags.integer({ description: 'Guest memory in MiB.', default: 1024, min: 16, helpValue: 'MB' }),
    cpus: Flags.integer({ description: 'Guest CPUs.', default: 2, min: 1, max: 64, helpValue: 'N' }),
    firmware: Flags.option({ description: 'Guest firmware: SeaBIOS or OVMF.', options: ['bios', 'uefi'] as const, default: 'bios' })(),
    accel: Flags.option({
      description: 'Accelerator; auto checks that the guest really runs under KVM.',
      options: ['auto', 'kvm', 'tcg'] as const,
      default: 'auto',
    })(),
    qemu: Flags.string({ description: 'QEMU binary (a path, or a name looked up in PATH).', default: DEFAULT_QEMU, helpValue: 'PATH' }),
    'qemu-arg': Flags.string({
      description: 'Extra QEMU argument, appended last; repeat the flag for each (--qemu-arg -kernel --qemu-arg vmlinuz).',
      multiple: true,
      multipleNonGreedy: true,
      helpValue: 'ARG',
    }),
  };

  static override usage = commandUsage(this);

  async run(): Promise<ProfileCommandResult> {
    const controller = new AbortController();
    let caught: NodeJS.Signals | undefined;
    const onSignal = (signal: NodeJS.Signals): void => {
      caught ??= signal;
      controller.abort();
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    try {
      return await withLocations(this.flags, (loc) => this.profile(controller.signal, loc));
    } catch (err) {
      if (caught && err instanceof ProfileInterruptedError) {
        // Clean-up is done (VM stopped, temp files gone): die of the signal, as the user asked.
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
        process.stderr.write(`bootcache profile: ${err.message}; the VM was stopped\n`);
        process.kill(process.pid, caught);
        await new Promise((resolve) => setTimeout(resolve, 2000));
      }
      throw err;
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
  }

  private async profile(signal: AbortSignal, loc: Locations): Promise<ProfileCommandResult> {
    // An image on an object store: the map and segment are written here first and put next to it
    // (or where --out-map/--out-segment say) once verified; the trace and console log stay local.
    const staging = isS3Url(this.args.image) || isS3Url(this.flags['out-map'] ?? '') || isS3Url(this.flags['out-segment'] ?? '')
      ? await mkdtemp(join(tmpdir(), 'bootcache-profile-'))
      : undefined;
    try {
      return await this.profileStaged(signal, loc, staging);
    } finally {
      if (staging !== undefined) await rm(staging, { recursive: true, force: true });
    }
  }

  private async profileStaged(signal: AbortSignal, loc: Locations, staging: string | undefined): Promise<ProfileCommandResult> {
    const f = this.flags;
    const imagePath = this.args.image;
    if (!isValidBlockSize(f['block-size'])) {
      throw new UsageError(`--block-size ${f['block-size']} is not a power of two between 512 and 2097152`);
    }
    const until = parseUntil(f.until);
    const hooks = hooksFromEnv(process.env);
    const defaults = defaultPaths(imagePath, f['out-map']);
    const outSegment = f.segment ? (f['out-segment'] ?? defaults.segment) : null;
    for (const [flag, value] of [['--out-trace', f['out-trace']], ['--console-log', f['console-log']]] as const) {
      if (value !== undefined && isS3Url(value)) throw new UsageError(`${flag} must be a local path (the map and segment may go to s3://)`);
    }
    const remoteImage = isS3Url(imagePath);
    const localName = (suffix: string): string => `${basename(imagePath)}${suffix}`;
    // Where the profiler writes each output: the location itself, or a staged file for an s3:// one.
    const uploads = new Map<string, string>();
    const staged = (location: string): string => {
      if (!isS3Url(location)) return location;
      const path = join(staging!, `${uploads.size}-${basename(location)}`);
      uploads.set(location, path);
      return path;
    };
    await loc.check(imagePath, 'image');
    const image = await loc.openImage(imagePath, f);
    const interactive = this.interactive;
    const notices: string[] = [];
    const profiler = new Profiler(
      image,
      {
        imagePath,
        policy: { until, idleMs: f.idle * 1000, timeoutMs: f.timeout * 1000, minReads: DEFAULT_MIN_READS },
        runs: f.runs,
        blockSize: f['block-size'],
        outMap: staged(defaults.map),
        outSegment: outSegment === null ? null : staged(outSegment),
        outTrace: f['out-trace'] ?? (remoteImage ? localName('.trace.csv') : defaults.trace),
        consoleLog: f['console-log'] ?? (remoteImage ? localName('.console.log') : defaults.consoleLog),
        memoryMb: f.memory,
        cpus: f.cpus,
        firmware: f.firmware,
        accel: f.accel,
        qemu: f.qemu,
        qemuArgs: f['qemu-arg'] ?? [],
        hooks,
      },
      (notice) => {
        notices.push(notice);
        // On a terminal the task list shows it, and it is repeated after the list.
        if (!interactive) process.stderr.write(`bootcache profile: ${notice}\n`);
      },
    );
    try {
      const tasks: ListrTask<object>[] = [
        {
          title: 'Starting the NBD server',
          task: async (_ctx, task) => {
            await profiler.start();
            task.title = `NBD server on ${profiler.socketPath}; accelerator: ${profiler.accelChoice.accel}${profiler.accelChoice.probation ? ' (on probation)' : ''}`;
          },
        },
      ];
      for (let run = 1; run <= f.runs; run++) {
        tasks.push({
          title: `Booting ${imagePath}${f.runs > 1 ? ` (run ${run} of ${f.runs})` : ''}`,
          task: async (_ctx, task) => {
            const timer = setInterval(() => {
              const p = profiler.progress();
              if (!p) return;
              task.output =
                `${(p.elapsedMs / 1000).toFixed(1)} s under ${p.accel}: ${formatBytes(p.bytes)} read (${p.reads} reads)` +
                (p.lastConsoleLine ? `\nconsole: ${p.lastConsoleLine.trim().slice(0, 100)}` : '');
              if (notices.length > 0) task.title = `Booting ${imagePath} (${notices[notices.length - 1]})`;
            }, 250);
            try {
              const r = await profiler.boot(run, signal);
              task.title =
                `Boot ended after ${r.bootSeconds.toFixed(1)} s under ${r.accel} (${r.endReason === 'until' ? `console: ${JSON.stringify(r.endLine ?? '')}` : `no new block for ${f.idle} s`}): ` +
                `${r.reads} reads, ${formatBytes(r.bytes)}, ${r.blocks} blocks`;
            } finally {
              clearInterval(timer);
            }
          },
        });
      }
      tasks.push({
        title: `Writing the map ${defaults.map}`,
        task: async (_ctx, task) => {
          const map = await profiler.writeMap();
          task.title = `Wrote the map ${defaults.map} (${map.blocksSet} blocks, ${formatBytes(map.blocksSet * map.blockSize)})`;
        },
      });
      if (outSegment !== null) {
        tasks.push(
          {
            title: `Building the segment ${outSegment}`,
            task: async (_ctx, task) => {
              await profiler.buildSegment((done, total) => {
                task.output = `${done}/${total} blocks`;
              });
            },
          },
          {
            title: `Verifying the segment against ${imagePath}`,
            task: async (_ctx, task) => {
              await profiler.verifySegment((done, total) => {
                task.output = `${done}/${total} blocks`;
              });
            },
          },
        );
      }
      if (uploads.size > 0) {
        tasks.push({
          title: `Putting ${[...uploads.keys()].join(' and ')}`,
          // The segment before the map: a reader that finds the new map finds its segment.
          task: async () => {
            for (const [location, path] of [...uploads].reverse()) await loc.output(location, (out) => copyFile(path, out));
          },
        });
      }
      await runTasks(tasks, {}, interactive);
    } finally {
      await profiler.close();
      await image.close().catch(() => undefined);
      if (interactive) for (const n of notices) process.stderr.write(`bootcache profile: ${n}\n`);
    }

    const last = profiler.runs[profiler.runs.length - 1]!;
    const map = profiler.map!;
    const segment = profiler.segment;
    const result: ProfileCommandResult = {
      image: imagePath,
      format: image.format,
      virtualSize: image.virtualSize,
      accel: last.accel,
      accelReason: profiler.accelChoice.reason,
      bootSeconds: last.bootSeconds,
      endReason: last.endReason,
      ...(last.endLine !== undefined ? { endLine: last.endLine } : {}),
      reads: last.reads,
      bytes: last.bytes,
      blocks: last.blocks,
      runs: profiler.runs,
      agreement: profiler.agreement(),
      map: { path: defaults.map, blockSize: map.blockSize, blocks: map.blocksSet, bytes: map.blocksSet * map.blockSize, boots: map.boots },
      segment: segment
        ? { path: outSegment ?? segment.path, blocks: segment.blocks, bytes: segment.bytes, fileBytes: segment.fileBytes, dataSha256: segment.dataSha256, verified: profiler.verify?.ok ?? false }
        : null,
      consoleLog: last.consoleLog,
      paths: {
        map: defaults.map,
        segment: outSegment,
        traces: profiler.runs.map((r) => r.trace),
        consoleLogs: profiler.runs.map((r) => r.consoleLog),
      },
      notices,
    };
    this.report(result);
    return result;
  }

  private report(r: ProfileCommandResult): void {
    for (const run of r.runs) {
      const end = run.endReason === 'until' ? `console matched ${JSON.stringify(run.endLine ?? '')}` : `no new block for ${this.flags.idle} s`;
      this.log(
        `${r.runs.length > 1 ? `run ${run.run}: ` : ''}booted in ${run.bootSeconds.toFixed(1)} s under ${run.accel} (${end}): ` +
          `${run.reads} reads, ${formatBytes(run.bytes)}, ${run.blocks} blocks`,
      );
    }
    this.log(`accelerator: ${r.accel} (${r.accelReason})`);
    if (r.runs.length > 1) {
      const a = r.agreement;
      this.log(`agreement: ${a.blocksInAll} blocks read in all ${a.runs} runs, ${a.blocksInAny} in any (${(a.ratio * 100).toFixed(1)}%)`);
    }
    this.log(`map: ${r.map.path} (${r.map.blocks} blocks, ${formatBytes(r.map.bytes)}, ${r.map.boots} boot${r.map.boots === 1 ? '' : 's'})`);
    if (r.segment) this.log(`segment: ${r.segment.path} (${r.segment.blocks} blocks, ${formatBytes(r.segment.bytes)}, verified)`);
    for (const t of r.paths.traces) this.log(`trace: ${t}`);
    for (const c of r.paths.consoleLogs) this.log(`console log: ${c}`);
  }
}
