// The machine a benchmark ran on, for its JSON: CPUs, memory, kernel, Node,
// the accelerator and the versions of QEMU and nbdkit.
import { cpus, totalmem, release } from 'node:os';
import { run } from './process.js';

export async function machine(accel) {
  const version = async (cmd, args) => {
    try {
      return (await run(cmd, args)).stdout.split('\n')[0].trim();
    } catch {
      return null;
    }
  };
  return {
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? null,
    memGiB: Math.round((totalmem() / 2 ** 30) * 10) / 10,
    kernel: release(),
    node: process.version,
    accel,
    qemu: await version('qemu-system-x86_64', ['--version']),
    nbdkit: await version('nbdkit', ['--version']),
  };
}
