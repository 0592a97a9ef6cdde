/**
 * The process's address-space limit (RLIMIT_AS, `ulimit -v`) and what it
 * leaves room for. V8 reserves address space it never touches: each isolate
 * a code range, and each WebAssembly memory 8 GiB of guard pages unless the
 * trap handler is off. Under a limit, a worker thread that cannot reserve
 * its code range kills the whole process with a V8 fatal error, which no
 * JavaScript can catch. So threads are only started where the limit leaves
 * room for them, and the CLI turns the trap handler off under a limit.
 */
import { readFileSync } from 'node:fs';

const MiB = 1024 * 1024;

/** The flag that makes WebAssembly reserve only the memory it declares. */
export const NO_WASM_TRAP_HANDLER = '--disable-wasm-trap-handler';

/** Parses /proc/PID/limits: the soft "Max address space" in bytes, or undefined when unlimited. */
export function parseAddressSpaceLimit(limits: string): number | undefined {
  const line = limits.split('\n').find((l) => l.startsWith('Max address space'));
  const soft = line?.slice('Max address space'.length).trim().split(/\s+/)[0];
  if (soft === undefined || soft === 'unlimited') return undefined;
  const bytes = Number(soft);
  return Number.isSafeInteger(bytes) && bytes > 0 ? bytes : undefined;
}

/** This process's address-space limit in bytes; undefined when there is none (or no /proc). */
export function addressSpaceLimit(): number | undefined {
  try {
    return parseAddressSpaceLimit(readFileSync('/proc/self/limits', 'utf8'));
  } catch {
    return undefined;
  }
}

/** The address space this process has reserved now (VmSize), in bytes; 0 when unknown. */
export function addressSpaceUsed(): number {
  try {
    const kib = /^VmSize:\s+(\d+) kB/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1];
    return kib === undefined ? 0 : Number(kib) * 1024;
  } catch {
    return 0;
  }
}

/** What a helper thread reserves at most: a 16 MiB code range, a small heap, glibc's arena (64 MiB), its stack. */
export const THREAD_ADDRESS_SPACE = 192 * MiB;
/** Kept free for the main thread's own growth (heap, buffers, libzstd's memory). */
const MAIN_THREAD_HEADROOM = 512 * MiB;

/** V8 limits for a helper thread, so that it reserves at most THREAD_ADDRESS_SPACE. */
export const HELPER_RESOURCE_LIMITS = { codeRangeSizeMb: 16, maxYoungGenerationSizeMb: 8, maxOldGenerationSizeMb: 64, stackSizeMb: 2 };

/**
 * How many of `wanted` helper threads fit under the limit, after what the
 * process holds now and room for the main thread; `wanted` without a limit.
 */
export function helperThreadsThatFit(wanted: number, limit = addressSpaceLimit(), used = addressSpaceUsed()): number {
  if (limit === undefined) return wanted;
  const room = limit - used - MAIN_THREAD_HEADROOM;
  return Math.max(0, Math.min(wanted, Math.floor(room / THREAD_ADDRESS_SPACE)));
}
