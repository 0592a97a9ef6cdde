/**
 * Waits for a line on a VM's serial console log (the file QEMU writes with
 * `-serial file:PATH` or `-chardev file,...`): the host-side way for a
 * guest's "boot complete" to reach the agent (`agent mark-booted --console`).
 * The file is read from where it ends when the watch starts, unless
 * `fromStart`; it may not exist yet (QEMU creates it when it starts).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { BootTimeoutError, fromSystemError } from '../errors.js';
import { ConsoleMatcher } from '../profile/console.js';

const POLL_MS = 200;

export interface ConsoleWatchOptions {
  until: RegExp;
  timeoutMs: number;
  /** Read the log from its start (a log written before the watch began counts). */
  fromStart?: boolean;
}

/** The first console line matching `until`; BootTimeoutError after `timeoutMs`. */
export async function waitForConsoleLine(path: string, options: ConsoleWatchOptions): Promise<string> {
  const deadline = Date.now() + options.timeoutMs;
  const matcher = new ConsoleMatcher(options.until);
  let handle: FileHandle | undefined;
  let position = 0;
  const buf = Buffer.alloc(64 * 1024);
  const decoder = new TextDecoder('utf-8');
  try {
    for (;;) {
      if (handle === undefined) {
        handle = await open(path, 'r').catch((err: NodeJS.ErrnoException) => {
          if (err.code === 'ENOENT') return undefined;
          throw fromSystemError(err, path, 'opening the console log');
        });
        if (handle !== undefined && !options.fromStart) position = (await handle.stat()).size;
      }
      if (handle !== undefined) {
        const size = (await handle.stat()).size;
        if (size < position) position = 0; // truncated: a new VM run writes it again
        while (position < size) {
          const { bytesRead } = await handle.read(buf, 0, Math.min(buf.length, size - position), position);
          if (bytesRead === 0) break;
          position += bytesRead;
          const found = matcher.feed(decoder.decode(buf.subarray(0, bytesRead), { stream: true }));
          if (found !== undefined) return found;
        }
      }
      if (Date.now() >= deadline) {
        const last = matcher.lastLine;
        throw new BootTimeoutError(`no console line matched ${options.until} within ${Math.round(options.timeoutMs / 1000)} s${last ? ` (last line: ${JSON.stringify(last.slice(0, 200))})` : ''}`, { file: path });
      }
      await sleep(POLL_MS);
    }
  } finally {
    await handle?.close();
  }
}
