// Child processes for the benchmarks: every one is tracked and ended (by pid)
// on exit or failure, so an interrupted benchmark leaves no server behind.
import { spawn } from 'node:child_process';
import { existsSync, writeFileSync, readFileSync, rmSync, openSync, closeSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';


const children = new Set();

export function track(child, label) {
  child.label = label;
  children.add(child);
  child.exited = new Promise((resolve) => child.once('exit', (code, signal) => {
    children.delete(child);
    resolve({ code, signal });
  }));
  return child;
}

export async function stopChild(child, timeoutMs = 60_000) {
  if (child.exitCode !== null || child.signalCode !== null) return child.exited;
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  const result = await child.exited;
  clearTimeout(timer);
  return result;
}

export function killAllSync() {
  for (const child of children) {
    try { process.kill(child.pid, 'SIGKILL'); } catch { /* already gone */ }
  }
}

process.on('exit', killAllSync);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    console.error(`bench: ${sig}, stopping children`);
    killAllSync();
    process.exit(130);
  });
}

/** Runs a command to completion; resolves with stdout (rejects on a non-zero exit). */
export function run(cmd, args, { label = cmd, log, allowFail = false } = {}) {
  return new Promise((resolve, reject) => {
    const child = track(spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] }), label);
    const out = [];
    const err = [];
    child.stdout.on('data', (d) => out.push(d));
    child.stderr.on('data', (d) => err.push(d));
    child.once('error', reject);
    child.exited.then(({ code, signal }) => {
      const stdout = Buffer.concat(out).toString('utf8');
      const stderr = Buffer.concat(err).toString('utf8');
      if (log) writeFileSync(log, `$ ${cmd} ${args.join(' ')}\n${stderr}\n${stdout}`, { flag: 'a' });
      if (code !== 0 && !allowFail) {
        reject(new Error(`${label} exited with ${code ?? signal}: ${(stderr || stdout).trim().split('\n').slice(-3).join(' | ')}`));
      } else {
        resolve({ stdout, stderr, code });
      }
    });
  });
}

/** Starts a long-running server; resolves once `socketPath` exists. */
export async function startServer(cmd, args, socketPath, label, logFile) {
  rmSync(socketPath, { force: true });
  const fd = openSync(logFile, 'a');
  writeFileSync(logFile, `$ ${cmd} ${args.join(' ')}\n`, { flag: 'a' });
  const child = track(spawn(cmd, args, { stdio: ['ignore', fd, fd] }), label);
  closeSync(fd);
  const deadline = Date.now() + 30_000;
  while (!existsSync(socketPath)) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`${label} exited before listening (see ${logFile}): ${readFileSync(logFile, 'utf8').trim().split('\n').slice(-3).join(' | ')}`);
    }
    if (Date.now() > deadline) {
      await stopChild(child);
      throw new Error(`${label} did not create ${socketPath} within 30 s (see ${logFile})`);
    }
    await sleep(50);
  }
  return child;
}

