/**
 * libzstd itself, as WebAssembly (@bokuweb/zstd-wasm, libzstd compiled with
 * emscripten and shipped in the package): the same decoder as QEMU's, so a
 * corrupt compressed cluster is refused exactly when QEMU refuses it. No
 * JavaScript zstd decoder checks as much (fzstd decodes many corrupt frames
 * to wrong bytes without an error).
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { ResourceLimitError } from '../../errors.js';
import { NO_WASM_TRAP_HANDLER, addressSpaceLimit } from '../../process/address-space.js';
import type { LibzstdModule } from './zstd.js';

const require = createRequire(import.meta.url);

/** The package's emscripten module and its wasm, for require() in a worker thread. */
export function libzstdPaths(): { module: string; wasm: string } {
  const dir = dirname(require.resolve('@bokuweb/zstd-wasm'));
  return { module: join(dir, 'module.js'), wasm: join(dir, 'zstd.wasm') };
}

/** Whether node runs with WebAssembly's trap handler off (a process-wide start-up flag). */
function trapHandlerOff(): boolean {
  const nodeOptions = (process.env.NODE_OPTIONS ?? '').split(/\s+/);
  return process.execArgv.includes(NO_WASM_TRAP_HANDLER) || nodeOptions.includes(NO_WASM_TRAP_HANDLER);
}

/**
 * Why libzstd cannot be instantiated in this process, or undefined when it
 * can. With the trap handler on, each WebAssembly memory reserves 8 GiB of
 * address space, which an address-space limit refuses; emscripten then never
 * settles its start-up promise, so this is checked first.
 */
export function libzstdUnavailable(): string | undefined {
  const limit = addressSpaceLimit();
  if (limit === undefined || trapHandlerOff()) return undefined;
  return (
    `zstd: cannot start libzstd under an address-space limit of ${Math.round(limit / 2 ** 20)} MiB (ulimit -v) ` +
    `with WebAssembly's trap handler on; run node with ${NO_WASM_TRAP_HANDLER} (bin/run.js does)`
  );
}

/** The emscripten module of the package (module.js), before start-up. */
export interface LibzstdPackage {
  Module: LibzstdModule & {
    init(wasm: Uint8Array): void;
    instantiateWasm?: (imports: object, receive: (instance: object) => void) => object;
  };
  waitInitialized(): Promise<void>;
}

/**
 * Starts libzstd from its wasm bytes. The instantiation is ours (emscripten's
 * `instantiateWasm` hook): emscripten's own only logs a failure and never
 * settles, which would hang every read. Serialised into the decoder worker
 * threads, so it stays self-contained.
 */
export async function startLibzstd(pkg: LibzstdPackage, wasm: Uint8Array): Promise<LibzstdModule> {
  const module = pkg.Module;
  // Node's global; its types are not in this project's lib.
  const wasmApi = (globalThis as unknown as { WebAssembly: { instantiate(bytes: Uint8Array, imports: object): Promise<{ instance: object }> } }).WebAssembly;
  await new Promise<void>((resolve, reject) => {
    module.instantiateWasm = (imports, receive) => {
      wasmApi.instantiate(wasm, imports).then(
        (result) => {
          receive(result.instance);
          resolve();
        },
        (err: unknown) => reject(new Error(`zstd: libzstd failed to start: ${err instanceof Error ? err.message : String(err)}`)),
      );
      return {};
    };
    module.init(wasm);
  });
  await pkg.waitInitialized();
  return module;
}

let loading: Promise<LibzstdModule> | undefined;

/** libzstd, instantiated once per thread. */
export function loadLibzstd(): Promise<LibzstdModule> {
  loading ??= (async () => {
    const unavailable = libzstdUnavailable();
    if (unavailable !== undefined) throw new ResourceLimitError(unavailable);
    const paths = libzstdPaths();
    try {
      return await startLibzstd(require(paths.module) as LibzstdPackage, readFileSync(paths.wasm));
    } catch (err) {
      throw new ResourceLimitError(err instanceof Error ? err.message : String(err), { cause: err });
    }
  })();
  loading.catch(() => {
    loading = undefined;
  });
  return loading;
}
