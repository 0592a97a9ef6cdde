#!/usr/bin/env node
// Under an address-space limit (ulimit -v), WebAssembly's trap handler makes
// each wasm memory reserve 8 GiB, so libzstd (compressed qcow2 clusters)
// could not start: the CLI runs itself again with the trap handler off. The
// flag is process-wide and only takes effect at node's start. glibc's malloc
// arenas (64 MiB of address space per thread) are capped for the same reason.
import { spawn } from 'node:child_process';
import { NO_WASM_TRAP_HANDLER, addressSpaceLimit } from '../dist/process/address-space.js';

const hasFlag = process.execArgv.includes(NO_WASM_TRAP_HANDLER) || (process.env.NODE_OPTIONS ?? '').split(/\s+/).includes(NO_WASM_TRAP_HANDLER);

const limit = addressSpaceLimit();
// Node itself reserves about 700 MiB of address space before any work.
const NODE_FLOOR = 1024 * 1024 * 1024;

if (limit !== undefined && limit < NODE_FLOOR) {
  process.stderr.write(
    `bootcache: error: the address-space limit of ${Math.round(limit / 2 ** 20)} MiB (ulimit -v) is below the 1024 MiB that node needs [BC_RESOURCE_LIMIT]\n`,
  );
  process.exit(4);
} else if (limit !== undefined && !hasFlag) {
  // Sockets passed by systemd (fds 3 and up, LISTEN_FDS) go to the child at the same numbers.
  const passed = process.env.LISTEN_PID === String(process.pid) ? Number(process.env.LISTEN_FDS) || 0 : 0;
  const child = spawn(process.execPath, [...process.execArgv, NO_WASM_TRAP_HANDLER, ...process.argv.slice(1)], {
    stdio: ['inherit', 'inherit', 'inherit', ...Array.from({ length: passed }, (_, i) => 3 + i)],
    env: { MALLOC_ARENA_MAX: '2', ...process.env, BOOTCACHE_REEXEC: '1' },
  });
  const forward = (signal) => child.kill(signal);
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT']) process.on(signal, forward);
  child.on('error', (err) => {
    process.stderr.write(`bootcache: error: cannot start node ${NO_WASM_TRAP_HANDLER}: ${err.message}\n`);
    process.exit(70);
  });
  child.on('exit', (code, signal) => {
    if (signal) {
      process.removeAllListeners(signal);
      process.kill(process.pid, signal);
    } else {
      process.exit(code ?? 70);
    }
  });
} else {
  // Colour is decided before oclif and listr2 load (src/cli/ci.ts).
  const { disableColourUnlessTerminal } = await import('../dist/cli/ci.js');
  disableColourUnlessTerminal();
  const { execute } = await import('@oclif/core');
  await execute({ dir: import.meta.url });
}
