/**
 * One boot attempt: starts QEMU, follows its serial console, its firmware
 * debug console and the reads the NBD server records, feeds them to the
 * end-of-boot detector (and to the KVM stall watch under probation), and
 * stops QEMU when the boot is over, failed or was interrupted, whatever
 * happens.
 */
import { open, writeFile, type FileHandle } from 'node:fs/promises';
import { StringDecoder } from 'node:string_decoder';
import { fromSystemError } from '../errors.js';
import type { KvmProbation } from './accel.js';
import { cleanConsoleLine } from './console.js';
import { EndOfBootDetector, type EndOfBoot, type EndOfBootPolicy } from './end-of-boot.js';
import { QemuProcess, type QemuExit } from './qemu.js';
import type { BootRecording } from './recording.js';

export type BootOutcome =
  | { kind: 'ended'; end: EndOfBoot }
  | { kind: 'fatal'; end: EndOfBoot }
  | { kind: 'timeout'; end: EndOfBoot }
  | { kind: 'exited'; exit: QemuExit; atMs: number; stderr: string }
  | { kind: 'stalled'; atMs: number; reason: string }
  | { kind: 'aborted'; atMs: number };

export interface BootAttemptOptions {
  qemuBinary: string;
  qemuArgs: string[];
  env: NodeJS.ProcessEnv;
  consoleLog: string;
  debugconLog: string;
  policy: EndOfBootPolicy;
  recording: BootRecording;
  probation?: KvmProbation | undefined;
  signal?: AbortSignal | undefined;
  /** Console poll interval (default 50 ms). */
  pollMs?: number;
}

/** Reads what was appended to a file since the last call. */
class FileTail {
  private handle: FileHandle | undefined;
  private position = 0;
  private readonly decoder = new StringDecoder('utf8');
  private readonly buffer = Buffer.alloc(64 * 1024);

  constructor(private readonly path: string) {}

  private queue: Promise<string> = Promise.resolve('');

  /** New text since the last call; calls are serialised so no text is read twice. */
  read(): Promise<string> {
    const next = this.queue.then(
      () => this.readNow(),
      () => this.readNow(),
    );
    this.queue = next;
    return next;
  }

  private async readNow(): Promise<string> {
    if (!this.handle) {
      try {
        this.handle = await open(this.path, 'r');
      } catch {
        return '';
      }
    }
    let text = '';
    for (;;) {
      const { bytesRead } = await this.handle.read(this.buffer, 0, this.buffer.length, this.position);
      if (bytesRead === 0) break;
      this.position += bytesRead;
      text += this.decoder.write(this.buffer.subarray(0, bytesRead));
      if (text.length > 1024 * 1024) break; // the rest next time
    }
    return text;
  }

  async close(): Promise<void> {
    await this.handle?.close().catch(() => undefined);
    this.handle = undefined;
  }
}

export class BootAttempt {
  readonly detector: EndOfBootDetector;
  private qemu: QemuProcess | undefined;

  constructor(private readonly options: BootAttemptOptions) {
    this.detector = new EndOfBootDetector(options.policy);
  }

  get recording(): BootRecording {
    return this.options.recording;
  }

  /** The last line the firmware wrote to the ISA debug console ('' when none). */
  async lastFirmwareLine(): Promise<string> {
    let handle: FileHandle | undefined;
    try {
      handle = await open(this.options.debugconLog, 'r');
      const size = (await handle.stat()).size;
      const length = Math.min(size, 4096);
      const buf = Buffer.alloc(length);
      await handle.read(buf, 0, length, size - length);
      const lines = buf
        .toString('latin1')
        .split('\n')
        .map((l) => cleanConsoleLine(l).trim())
        .filter((l) => l.length > 0);
      return lines.length > 0 ? lines[lines.length - 1]! : '';
    } catch {
      return '';
    } finally {
      await handle?.close().catch(() => undefined);
    }
  }

  /** The last console line so far (cleaned). */
  get lastConsoleLine(): string {
    return this.detector.console.lastLine;
  }

  async run(): Promise<BootOutcome> {
    const o = this.options;
    // Empty the logs first: whatever they hold later comes from this boot.
    for (const path of [o.consoleLog, o.debugconLog]) {
      await writeFile(path, '').catch((err: unknown) => {
        throw fromSystemError(err, path, 'creating the console log');
      });
    }
    const consoleTail = new FileTail(o.consoleLog);
    const firmwareTail = new FileTail(o.debugconLog);
    const pollMs = o.pollMs ?? 50;
    let settle!: (outcome: BootOutcome) => void;
    const done = new Promise<BootOutcome>((resolve) => {
      settle = resolve;
    });
    let outcome: BootOutcome | undefined;
    const finish = (result: BootOutcome): void => {
      if (outcome) return;
      outcome = result;
      o.recording.stop();
      settle(result);
    };
    const now = (): number => o.recording.elapsedMs();
    const fromEnd = (end: EndOfBoot | undefined): void => {
      if (!end) return;
      if (end.reason === 'timeout') finish({ kind: 'timeout', end });
      else if (end.reason === 'fatal') finish({ kind: 'fatal', end });
      else finish({ kind: 'ended', end });
    };

    o.recording.onRead = (atMs, newBlocks) => {
      // QEMU itself reads sector 0 once while it sets up the virtio disk
      // (geometry guess), before the guest runs: only later reads show a live guest.
      if (o.recording.reads > 1) o.probation?.onProgress(atMs);
      fromEnd(this.detector.onRead(atMs, newBlocks));
    };
    const onAbort = (): void => finish({ kind: 'aborted', atMs: now() });
    if (o.signal?.aborted) return { kind: 'aborted', atMs: 0 };
    o.signal?.addEventListener('abort', onAbort, { once: true });

    let timer: NodeJS.Timeout | undefined;
    try {
      o.recording.start();
      const qemu = QemuProcess.start(o.qemuBinary, o.qemuArgs, o.env);
      this.qemu = qemu;
      void qemu.exited.then(async (exit) => {
        // The console may hold the matching line QEMU wrote just before it exited.
        const text = await consoleTail.read().catch(() => '');
        const firmware = await firmwareTail.read().catch(() => '');
        const at = now();
        if (text) fromEnd(this.detector.onConsole(text, at));
        if (firmware) fromEnd(this.detector.onFirmware(firmware, at));
        finish({ kind: 'exited', exit, atMs: at, stderr: qemu.lastStderrLine() });
      });

      const tick = async (): Promise<void> => {
        if (outcome) return;
        const text = await consoleTail.read();
        const at = now();
        if (text.length > 0) {
          o.probation?.onProgress(at);
          fromEnd(this.detector.onConsole(text, at));
        }
        const firmware = await firmwareTail.read();
        if (firmware.length > 0) {
          o.probation?.onProgress(at);
          fromEnd(this.detector.onFirmware(firmware, at));
        }
        fromEnd(this.detector.check(at));
        if (!outcome && o.probation?.hung(at)) finish({ kind: 'stalled', atMs: at, reason: o.probation.describe(at) });
        if (!outcome) timer = setTimeout(() => void tick().catch(onTickError), pollMs);
      };
      const onTickError = (): void => {
        if (!outcome) timer = setTimeout(() => void tick().catch(onTickError), pollMs);
      };
      timer = setTimeout(() => void tick().catch(onTickError), pollMs);
      return await done;
    } finally {
      clearTimeout(timer);
      o.signal?.removeEventListener('abort', onAbort);
      o.recording.onRead = undefined;
      o.recording.stop();
      await this.qemu?.stop();
      await consoleTail.close();
      await firmwareTail.close();
    }
  }
}
