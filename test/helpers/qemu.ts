/**
 * Test fixture helpers: run qemu-img / qemu-io, make and remove temp dirs,
 * convert images to raw for byte comparisons, patch bytes in files.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const execFileAsync = promisify(execFile);
const MAX_OUTPUT = 64 * 1024 * 1024;

export interface RunResult {
  stdout: string;
  stderr: string;
}

async function run(cmd: string, args: string[], cwd?: string): Promise<RunResult> {
  try {
    const { stdout, stderr } = await execFileAsync(cmd, args, { maxBuffer: MAX_OUTPUT, cwd });
    return { stdout, stderr };
  } catch (err) {
    const e = err as { stderr?: string; stdout?: string; message?: string };
    throw new Error(`${cmd} ${args.join(' ')} failed: ${(e.stderr || e.stdout || e.message || '').trim()}`);
  }
}

/** Runs qemu-img with `args`; throws with its stderr on failure. */
export async function qemuImg(args: string[], options: { cwd?: string } = {}): Promise<RunResult> {
  return run('qemu-img', args, options.cwd);
}

/**
 * Runs qemu-io commands (e.g. 'write -P 0x11 0 64k') on `image`, opened
 * with format `fmt`. Throws when a command reports a failure.
 */
export async function qemuIo(image: string, fmt: 'qcow2' | 'raw', cmds: string[], options: { cwd?: string } = {}): Promise<string> {
  const args = ['-f', fmt];
  for (const c of cmds) args.push('-c', c);
  args.push(image);
  const { stdout, stderr } = await run('qemu-io', args, options.cwd);
  const out = stdout + stderr;
  if (/\bfailed\b|\berror\b|\binvalid\b|\bcan't\b/i.test(out)) {
    throw new Error(`qemu-io ${args.join(' ')} reported a failure: ${out.trim()}`);
  }
  return out;
}

/** A fresh temporary directory; remove it with removeTmpDir. */
export async function tmpDir(prefix = 'bootcache-test-'): Promise<string> {
  return mkdtemp(join(tmpdir(), prefix));
}

export async function removeTmpDir(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
}

/**
 * The guest bytes of `image` as qemu-img sees them (`qemu-img convert -O raw`).
 * Writes `<image>.conv.raw` (or `out`) and returns its contents.
 */
export async function convertToRaw(image: string, options: { format?: string; out?: string } = {}): Promise<Buffer> {
  const out = options.out ?? `${image}.conv.raw`;
  const args = ['convert'];
  if (options.format) args.push('-f', options.format);
  args.push('-O', 'raw', image, out);
  await qemuImg(args);
  const data = await readFile(out);
  if (!options.out) await rm(out, { force: true });
  return data;
}

export interface QemuMapEntry {
  start: number;
  length: number;
  depth: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** `qemu-img map --output=json`. */
export async function qemuImgMap(image: string, format?: string): Promise<QemuMapEntry[]> {
  const args = ['map', '--output=json'];
  if (format) args.push('-f', format);
  args.push(image);
  const { stdout } = await qemuImg(args);
  return JSON.parse(stdout) as QemuMapEntry[];
}

/** `qemu-img info --output=json`. */
export async function qemuImgInfo(image: string): Promise<Record<string, unknown>> {
  const { stdout } = await qemuImg(['info', '--output=json', image]);
  return JSON.parse(stdout) as Record<string, unknown>;
}

/** Overwrites bytes of `file` at `offset` (for building malformed images). */
export async function patchFile(file: string, offset: number, bytes: Buffer | number[]): Promise<void> {
  const handle = await open(file, 'r+');
  try {
    const buf = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes);
    await handle.write(buf, 0, buf.length, offset);
  } finally {
    await handle.close();
  }
}

/** Reads `length` bytes of `file` at `offset`. */
export async function readFileRange(file: string, offset: number, length: number): Promise<Buffer> {
  const handle = await open(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await handle.read(buf, 0, length, offset);
    return buf.subarray(0, bytesRead);
  } finally {
    await handle.close();
  }
}

/** Big-endian encoders for patching headers. */
export const be32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
};
export const be64 = (n: bigint | number): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
};
