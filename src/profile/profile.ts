/**
 * `bootcache profile`: boot an image in QEMU with its disk served by our own
 * NBD server, record the boot's reads, and turn them into the map, the trace
 * and the segment (docs/profile.md). The steps are methods of Profiler so the
 * command can show each as a task.
 */
import { constants, rmSync } from 'node:fs';
import { access, mkdtemp, rename, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, extname, join, resolve } from 'node:path';
import { buildSegment, type BuildSegmentResult } from '../core/build-segment.js';
import { verifySegment, type VerifyReport } from '../core/verify.js';
import {
  BootFailedError,
  BootTimeoutError,
  OutputError,
  UsageError,
  VerificationError,
  fromSystemError,
} from '../errors.js';
import { withAtomicFile } from '../format/atomic-write.js';
import { Bitmap } from '../format/bitmap.js';
import { DEFAULT_MERGE_POLICY, mergeBoots, saveMap, type BootMap, type MergePolicy } from '../format/map.js';
import { NbdServer } from '../nbd/server/index.js';
import type { DiskImage } from '../image/types.js';
import { DEFAULT_KVM_STALL_MS, KvmProbation, chooseAccel, type Accel, type AccelChoice, type AccelFlag } from './accel.js';
import { BootAttempt, type BootOutcome } from './boot.js';
import type { EndOfBootPolicy, EndReason } from './end-of-boot.js';
import { describeExit, findUefiFirmware, qemuArgs, resolveQemu, type Firmware, type UefiFirmware } from './qemu.js';
import { BootRecording, RecordingExportProvider } from './recording.js';

const MiB = 1024 * 1024;

export interface ProfileOptions {
  imagePath: string;
  policy: EndOfBootPolicy;
  runs: number;
  blockSize: number;
  outMap: string;
  /** null: --no-segment. */
  outSegment: string | null;
  outTrace: string;
  consoleLog: string;
  memoryMb: number;
  cpus: number;
  firmware: Firmware;
  accel: AccelFlag;
  qemu: string;
  qemuArgs: string[];
  mergePolicy?: MergePolicy;
  /** Test hooks and overrides (docs/profile.md, "Test hooks"). */
  hooks?: ProfileHooks;
}

export interface ProfileHooks {
  /** BOOTCACHE_ACCEL: kvm|tcg, used under --accel auto without a probe. */
  forcedAccel?: string | undefined;
  /** Device checked for KVM (default /dev/kvm). */
  kvmDevice?: string | undefined;
  /** Accelerator QEMU gets while KVM is on probation (default kvm). */
  probeAccel?: Accel | undefined;
  /** Extra QEMU arguments while on probation (e.g. -S, to freeze the guest). */
  probeExtraArgs?: string[] | undefined;
  /** Stall deadline under probation (default 8000 ms). */
  stallMs?: number | undefined;
}

export interface ProfileRunResult {
  run: number;
  accel: Accel;
  /** Seconds from QEMU's start to the end of boot (the matching line, or the last new block). */
  bootSeconds: number;
  endReason: Exclude<EndReason, 'timeout' | 'fatal'>;
  /** The console line that ended the boot (until). */
  endLine?: string;
  reads: number;
  bytes: number;
  blocks: number;
  trace: string;
  consoleLog: string;
}

export interface Agreement {
  runs: number;
  /** Blocks read in every run. */
  blocksInAll: number;
  /** Blocks read in at least one run. */
  blocksInAny: number;
  /** blocksInAll / blocksInAny (1 when both are 0). */
  ratio: number;
}

/** Progress of the boot in flight, for the task list. */
export interface BootProgress {
  run: number;
  accel: Accel;
  elapsedMs: number;
  reads: number;
  bytes: number;
  blocks: number;
  lastConsoleLine: string;
}

/** Path for run `run` of `runs`: unchanged for a single run, else `name.runK.ext`. */
export function runPath(path: string, run: number, runs: number): string {
  if (runs === 1) return path;
  const ext = extname(path);
  return ext ? `${path.slice(0, -ext.length)}.run${run}${ext}` : `${path}.run${run}`;
}

/**
 * Console logs of one run: QEMU writes `live` while the VM runs; at the end
 * it becomes `ok` (the boot ended well) or `failed`, so a failed run never
 * replaces the log of the last good one, and the last failure is kept too.
 */
export function consoleLogPaths(path: string): { live: string; ok: string; failed: string } {
  const ext = extname(path);
  const failed = ext ? `${path.slice(0, -ext.length)}.failed${ext}` : `${path}.failed`;
  return { live: `${path}.partial`, ok: path, failed };
}

/** Blocks in all and in any of the bitmaps. */
export function agreement(bitmaps: readonly Bitmap[]): Agreement {
  if (bitmaps.length === 0) return { runs: 0, blocksInAll: 0, blocksInAny: 0, ratio: 1 };
  const all = new Bitmap(bitmaps[0]!.length);
  const any = new Bitmap(bitmaps[0]!.length);
  all.words.set(bitmaps[0]!.words);
  for (const b of bitmaps) {
    for (let i = 0; i < b.words.length; i++) {
      all.words[i] = all.words[i]! & b.words[i]!;
      any.words[i] = any.words[i]! | b.words[i]!;
    }
  }
  const blocksInAll = all.popcount();
  const blocksInAny = any.popcount();
  return { runs: bitmaps.length, blocksInAll, blocksInAny, ratio: blocksInAny === 0 ? 1 : blocksInAll / blocksInAny };
}

function seconds(ms: number): number {
  return Math.round(ms) / 1000;
}

function mib(bytes: number): string {
  return `${(bytes / MiB).toFixed(1)} MiB`;
}

/**
 * Checks that `path` can be written (its directory exists and is writable,
 * it is not a directory) and is not the image; an output that cannot be
 * written is exit 4.
 */
async function checkOutput(path: string, imagePath: string, what: string): Promise<void> {
  if (resolve(path) === resolve(imagePath)) throw new UsageError(`${what} ${path} is the image itself`);
  const dir = dirname(resolve(path));
  const doing = `checking where to write the ${what}`;
  try {
    const s = await stat(dir);
    if (!s.isDirectory()) throw new OutputError(`cannot write: ${dir} is not a directory (while ${doing})`, { file: path });
    await access(dir, constants.W_OK);
  } catch (err) {
    throw OutputError.from(err, path, doing);
  }
  const target = await stat(path).catch(() => undefined);
  if (target?.isDirectory()) throw new OutputError(`cannot write: is a directory (while ${doing})`, { file: path });
}

export class Profiler {
  readonly runs: ProfileRunResult[] = [];
  readonly bitmaps: Bitmap[] = [];
  readonly notices: string[] = [];
  accelChoice!: AccelChoice;
  map: BootMap | undefined;
  segment: BuildSegmentResult | undefined;
  verify: VerifyReport | undefined;
  private tmpDir: string | undefined;
  private server: NbdServer | undefined;
  private provider: RecordingExportProvider | undefined;
  private qemuBinary = '';
  private uefi: UefiFirmware | undefined;
  private current: BootAttempt | undefined;
  private currentRun = 0;
  private currentAccel: Accel = 'tcg';
  private socket = '';
  /** Removes the temp dir if Node exits without close() (e.g. listr2's exit on SIGINT). */
  private readonly exitHook = (): void => {
    if (this.tmpDir) rmSync(this.tmpDir, { recursive: true, force: true });
  };

  constructor(
    readonly image: DiskImage,
    readonly options: ProfileOptions,
    /** Called with each notice (a KVM fallback) as it happens. */
    private readonly onNotice: (message: string) => void = () => undefined,
  ) {}

  /** Checks outputs and QEMU, chooses the accelerator, starts the NBD server. */
  async start(): Promise<void> {
    const o = this.options;
    await checkOutput(o.outMap, o.imagePath, 'map');
    await checkOutput(o.outTrace, o.imagePath, 'trace');
    await checkOutput(o.consoleLog, o.imagePath, 'console log');
    if (o.outSegment !== null) await checkOutput(o.outSegment, o.imagePath, 'segment');
    this.qemuBinary = await resolveQemu(o.qemu);
    this.accelChoice = await chooseAccel(o.accel, { forced: o.hooks?.forcedAccel, kvmDevice: o.hooks?.kvmDevice });
    this.currentAccel = this.accelChoice.accel;
    this.tmpDir = await mkdtemp(join(tmpdir(), 'bootcache-profile-'));
    process.on('exit', this.exitHook);
    if (o.firmware === 'uefi') this.uefi = await findUefiFirmware(this.tmpDir);
    this.provider = new RecordingExportProvider(this.image);
    this.server = new NbdServer(this.provider, { maxConnections: 8, closeTimeoutMs: 2000 });
    this.socket = join(this.tmpDir, 'nbd.sock');
    try {
      await this.server.listenUnix(this.socket);
    } catch (err) {
      throw new BootFailedError(`cannot start the NBD server on ${this.socket}: ${(err as Error).message}`, { cause: err });
    }
  }

  get socketPath(): string {
    return this.socket;
  }

  /** The boot in flight, for progress display. */
  progress(): BootProgress | undefined {
    const attempt = this.current;
    if (!attempt) return undefined;
    const r = attempt.recording;
    return {
      run: this.currentRun,
      accel: this.currentAccel,
      elapsedMs: r.elapsedMs(),
      reads: r.reads,
      bytes: r.bytes,
      blocks: r.blocks,
      lastConsoleLine: attempt.lastConsoleLine,
    };
  }

  /** Boots once (run `run`, 1-based), falling back from KVM to TCG under probation; writes its trace. */
  async boot(run: number, signal?: AbortSignal): Promise<ProfileRunResult> {
    const o = this.options;
    this.currentRun = run;
    const logs = consoleLogPaths(runPath(o.consoleLog, run, o.runs));
    const trace = runPath(o.outTrace, run, o.runs);
    for (;;) {
      const probation = this.accelChoice.probation && this.currentAccel === 'kvm';
      const recording = new BootRecording(this.image.virtualSize, o.blockSize);
      this.provider!.recording = recording;
      const args = qemuArgs({
        accel: probation ? (o.hooks?.probeAccel ?? 'kvm') : this.currentAccel,
        memoryMb: o.memoryMb,
        cpus: o.cpus,
        uefi: this.uefi,
        nbdUri: `nbd+unix:///${this.provider!.name}?socket=${this.socket.split('/').map(encodeURIComponent).join('/')}`,
        consoleLog: logs.live,
        debugconLog: join(this.tmpDir!, 'debugcon.log'),
        extraArgs: probation ? [...o.qemuArgs, ...(o.hooks?.probeExtraArgs ?? [])] : o.qemuArgs,
      });
      const attempt = new BootAttempt({
        qemuBinary: this.qemuBinary,
        qemuArgs: args,
        // snapshot=on puts its overlay in TMPDIR: keep it in our temp dir.
        env: { ...process.env, TMPDIR: this.tmpDir! },
        consoleLog: logs.live,
        debugconLog: join(this.tmpDir!, 'debugcon.log'),
        policy: o.policy,
        recording,
        probation: probation ? new KvmProbation(o.hooks?.stallMs ?? DEFAULT_KVM_STALL_MS) : undefined,
        signal,
      });
      this.current = attempt;
      let outcome: BootOutcome;
      try {
        outcome = await attempt.run();
      } finally {
        this.current = undefined;
        this.provider!.recording = undefined;
      }
      if (probation && (outcome.kind === 'stalled' || outcome.kind === 'exited')) {
        const why =
          outcome.kind === 'stalled'
            ? outcome.reason
            : `QEMU ${describeExit(outcome.exit)} under KVM after ${seconds(outcome.atMs)} s${outcome.stderr ? ` (${outcome.stderr})` : ''}`;
        this.currentAccel = 'tcg';
        this.accelChoice = { accel: 'tcg', probation: false, reason: `fell back to TCG: ${why}` };
        const notice = `${why}; restarting the boot under TCG`;
        this.notices.push(notice);
        this.onNotice(notice);
        continue;
      }
      const kept = outcome.kind === 'ended' ? logs.ok : logs.failed;
      await rename(logs.live, kept).catch((err: unknown) => {
        throw OutputError.from(err, kept, 'keeping the console log');
      });
      const result = await this.outcomeToResult(outcome, attempt, run, kept, trace);
      await this.writeTrace(recording, trace);
      this.runs.push(result);
      this.bitmaps.push(recording.bitmap);
      return result;
    }
  }

  private async howFar(attempt: BootAttempt, consoleLog: string): Promise<string> {
    const r = attempt.recording;
    const last = attempt.lastConsoleLine.trim();
    const lastRead = attempt.detector.lastReadAtMs;
    const firmware = await attempt.lastFirmwareLine();
    return (
      `${r.reads} reads (${mib(r.bytes)}, ${r.blocks} blocks)` +
      (lastRead !== undefined ? `, last read at ${seconds(lastRead)} s` : '') +
      `; last console line: ${last ? JSON.stringify(last.slice(0, 160)) : 'none (no console output)'}` +
      (firmware ? `; last firmware line: ${JSON.stringify(firmware.slice(0, 160))}` : '') +
      `; console log: ${consoleLog}`
    );
  }

  private async outcomeToResult(
    outcome: BootOutcome,
    attempt: BootAttempt,
    run: number,
    consoleLog: string,
    trace: string,
  ): Promise<ProfileRunResult> {
    const o = this.options;
    const r = attempt.recording;
    switch (outcome.kind) {
      case 'ended':
        return {
          run,
          accel: this.currentAccel,
          bootSeconds: seconds(outcome.end.atMs),
          endReason: outcome.end.reason === 'idle' ? 'idle' : 'until',
          ...(outcome.end.line !== undefined ? { endLine: outcome.end.line.trim() } : {}),
          reads: r.reads,
          bytes: r.bytes,
          blocks: r.blocks,
          trace,
          consoleLog,
        };
      case 'fatal': {
        const where = outcome.end.source === 'firmware' ? 'the firmware printed' : 'the console printed';
        throw new BootFailedError(
          `${o.imagePath}: the boot failed after ${seconds(outcome.end.atMs)} s under ${this.currentAccel}` +
            `${o.runs > 1 ? ` (run ${run} of ${o.runs})` : ''}: ${where} ${JSON.stringify((outcome.end.line ?? '').slice(0, 160))}: ` +
            (await this.howFar(attempt, consoleLog)),
        );
      }
      case 'timeout':
        throw new BootTimeoutError(
          `${o.imagePath}: the boot did not finish within ${seconds(o.policy.timeoutMs)} s (--timeout) under ${this.currentAccel}` +
            `${o.runs > 1 ? ` (run ${run} of ${o.runs})` : ''}: ${await this.howFar(attempt, consoleLog)}`,
        );
      case 'exited': {
        const guestEnded = outcome.exit.code === 0 && !outcome.exit.signal && !outcome.exit.error;
        throw new BootFailedError(
          `${o.imagePath}: QEMU ${describeExit(outcome.exit)} after ${seconds(outcome.atMs)} s, before the end of boot` +
            `${guestEnded ? ' (the guest reset or powered off; QEMU runs with -no-reboot)' : ''}` +
            `${outcome.stderr ? `; QEMU said: ${JSON.stringify(outcome.stderr.slice(0, 200))}` : ''}: ${await this.howFar(attempt, consoleLog)}`,
        );
      }
      case 'stalled':
        // Only under probation, handled by the caller.
        throw new BootFailedError(`${o.imagePath}: ${outcome.reason}: ${await this.howFar(attempt, consoleLog)}`);
      case 'aborted':
        throw new ProfileInterruptedError(`${o.imagePath}: interrupted after ${seconds(outcome.atMs)} s; console log: ${consoleLog}`);
    }
  }

  private async writeTrace(recording: BootRecording, path: string): Promise<void> {
    try {
      await withAtomicFile(path, async (file) => {
        let offset = 0;
        for (const chunk of recording.traceCsv()) {
          const buf = Buffer.from(chunk, 'latin1');
          await file.write(buf, offset);
          offset += buf.length;
        }
      });
    } catch (err) {
      throw fromSystemError(err, path, 'writing the trace');
    }
  }

  /** Merges the runs into the map (mergeBoots, the agent's policy) and saves it. */
  async writeMap(): Promise<BootMap> {
    let map: BootMap | undefined;
    for (const bitmap of this.bitmaps) {
      map = mergeBoots(
        map,
        { blockSize: this.options.blockSize, virtualSize: this.image.virtualSize, identity: this.image.identity, bitmap },
        this.options.mergePolicy ?? DEFAULT_MERGE_POLICY,
      );
    }
    if (!map) throw new BootFailedError('no boot was recorded');
    try {
      await saveMap(this.options.outMap, map);
    } catch (err) {
      throw fromSystemError(err, this.options.outMap, 'writing the map');
    }
    this.map = map;
    return map;
  }

  async buildSegment(onProgress?: (done: number, total: number) => void): Promise<BuildSegmentResult> {
    const out = this.options.outSegment!;
    try {
      this.segment = await buildSegment(this.image, this.map!, out, onProgress ? { onProgress } : {});
    } catch (err) {
      throw fromSystemError(err, out, 'writing the segment');
    }
    return this.segment;
  }

  /** Verifies the segment against the image; a failure is a VerificationError (exit 1). */
  async verifySegment(onProgress?: (done: number, total: number) => void): Promise<VerifyReport> {
    const out = this.options.outSegment!;
    this.verify = await verifySegment(this.image, this.map!, out, onProgress ? { onProgress } : {});
    if (!this.verify.ok) {
      throw new VerificationError(`segment verification failed: ${this.verify.problems[0] ?? 'mismatching blocks'}`, { file: out });
    }
    return this.verify;
  }

  agreement(): Agreement {
    return agreement(this.bitmaps);
  }

  async close(): Promise<void> {
    await this.server?.close().catch(() => undefined);
    this.server = undefined;
    if (this.tmpDir) await rm(this.tmpDir, { recursive: true, force: true }).catch(() => undefined);
    this.tmpDir = undefined;
    process.off('exit', this.exitHook);
  }
}

/** The profile was interrupted (SIGINT/SIGTERM); the command re-raises the signal after clean-up. */
export class ProfileInterruptedError extends BootFailedError {}

/** Default outputs for IMAGE: IMAGE.bcmap, IMAGE.bcseg, IMAGE.trace.csv, and the console log next to the map. */
export function defaultPaths(imagePath: string, outMap?: string): { map: string; segment: string; trace: string; consoleLog: string } {
  const map = outMap ?? `${imagePath}.bcmap`;
  return {
    map,
    segment: `${imagePath}.bcseg`,
    trace: `${imagePath}.trace.csv`,
    consoleLog: join(dirname(map), `${basename(imagePath)}.console.log`),
  };
}
