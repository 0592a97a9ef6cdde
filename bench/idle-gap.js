#!/usr/bin/env node
// What an idle gap before a read costs on this host. A boot replay (bootcache
// replay) issues most reads after some think time, and the recorded reads took
// 5-12 µs in the guest; over NBD each read is a round trip between two
// processes. When both sleep between reads, the CPUs idle, and waking them
// costs time that the recording never paid.
//
// One client, queue depth 1, 4 KiB reads at random aligned offsets of a 64 MiB
// file that is in the page cache, against qemu-nbd and against the agent with
// every block cached. Before each read the client waits GAP the way the replay
// waits (src/replay/scheduler.ts: a timer down to 10 ms before, then 50 us
// naps, then event-loop yields for the last 150 us; before 0c1e243, event-loop
// yields for the whole last millisecond). Reports read latency per gap, both
// servers interleaved.
//
// Run after `npm run build`:  node bench/idle-gap.js
// Environment: BENCH_SAMPLES (default 1000 per gap and server),
// BENCH_GAPS_US (default "0,200,1000,5000"), BENCH_WORK (default /var/tmp/bootcache-idle-gap).
import { randomBytes } from 'node:crypto';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startAgent } from './lib/agent.js';
import { startServer, stopChild } from './lib/process.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const { NbdClient } = await import(join(root, 'dist/nbd/client/index.js'));
const { realClock } = await import(join(root, 'dist/replay/scheduler.js'));

const SAMPLES = Number(process.env.BENCH_SAMPLES ?? 1000);
const GAPS_US = (process.env.BENCH_GAPS_US ?? '0,200,1000,5000').split(',').map(Number);
const work = process.env.BENCH_WORK ?? '/var/tmp/bootcache-idle-gap';
const SIZE = 64 * 1024 * 1024;
const READ = 4096;

function stats(us) {
  const s = [...us].sort((a, b) => a - b);
  const q = (p) => Math.round(s[Math.min(s.length - 1, Math.floor(p * s.length))]);
  return { p50: q(0.5), p90: q(0.9), p99: q(0.99), mean: Math.round(s.reduce((a, b) => a + b, 0) / s.length) };
}

/** SAMPLES reads of READ bytes, each after waiting gapUs the replay's way; latencies in µs. */
async function measure(uri, gapUs) {
  const client = await NbdClient.connect(uri);
  const into = Buffer.alloc(READ);
  const lat = [];
  try {
    for (let i = 0; i < SAMPLES; i++) {
      const offset = Math.floor(Math.random() * (SIZE / READ)) * READ;
      if (gapUs > 0) await realClock.sleepUntilUs(realClock.nowUs() + gapUs);
      const t = performance.now();
      await client.read(offset, READ, into);
      lat.push((performance.now() - t) * 1000);
    }
  } finally {
    await client.close();
  }
  return lat;
}

async function main() {
  rmSync(work, { recursive: true, force: true });
  mkdirSync(join(work, 'storage'), { recursive: true });
  const image = join(work, 'storage', 'disk.raw');
  writeFileSync(image, randomBytes(SIZE));
  const log = join(work, 'servers.log');
  const qemuSocket = join(work, 'qemu-nbd.sock');
  const qemuArgs = ['-r', '-f', 'raw', '-t', '--socket', qemuSocket, '-x', 'disk', image];
  const qemu = await startServer('qemu-nbd', qemuArgs, qemuSocket, 'qemu-nbd', log);
  const agent = await startAgent({
    bin: join(root, 'bin/run.js'), storage: join(work, 'storage'), cache: join(work, 'cache'),
    socket: join(work, 'agent.sock'), control: join(work, 'agent.ctl'), delayMs: 0, cacheSize: '256M', logFile: log,
  });
  const servers = [
    { name: 'qemu-nbd', uri: `nbd+unix:///disk?socket=${qemuSocket}`, command: `qemu-nbd ${qemuArgs.join(' ')}` },
    { name: 'agent (all cached)', uri: agent.uriFor('disk.raw'), command: agent.command },
  ];
  try {
    // Page cache and agent cache warm: every block read once.
    for (const s of servers) {
      const client = await NbdClient.connect(s.uri);
      for (let offset = 0; offset < SIZE; offset += 1024 * 1024) await client.read(offset, 1024 * 1024);
      await client.close();
    }
    const rows = [];
    for (const gapUs of GAPS_US) {
      for (const s of servers) {
        const lat = await measure(s.uri, gapUs);
        rows.push({ server: s.name, gapUs, ...stats(lat) });
        console.error(`${s.name} gap ${gapUs} µs: ${JSON.stringify(stats(lat))}`);
      }
    }
    const result = {
      date: new Date().toISOString(),
      command: 'npm run build && node bench/idle-gap.js',
      samples: SAMPLES,
      readBytes: READ,
      servers: servers.map(({ name, command }) => ({ name, command })),
      host: { cpus: cpus().length, model: cpus()[0]?.model, loadavg: loadavg().map((l) => l.toFixed(2)) },
      rows,
    };
    const out = join(root, 'bench/results', 'idle-gap');
    writeFileSync(`${out}.json`, JSON.stringify(result, null, 2) + '\n');
    writeFileSync(`${out}.md`, report(result));
    console.log(report(result));
  } finally {
    await agent.stop();
    await stopChild(qemu);
  }
}

function report(r) {
  const lines = [
    `# Idle gap before a read, ${r.date.slice(0, 10)}`,
    '',
    `Generated by \`${r.command}\`: one client, queue depth 1, ${r.readBytes}-byte reads at random aligned offsets of a 64 MiB file in the page cache, ${r.samples} reads per row; before each read the client waits the gap the way \`bootcache replay\` waits for think time. Host: ${r.host.cpus} CPUs (${r.host.model}), load average ${r.host.loadavg.join(' / ')}.`,
    '',
    '| gap before each read | server | latency p50 (µs) | p90 | p99 | mean |',
    '|---|---|---|---|---|---|',
    ...r.rows.map((x) => `| ${x.gapUs >= 1000 ? `${x.gapUs / 1000} ms` : `${x.gapUs} µs`} | ${x.server} | ${x.p50} | ${x.p90} | ${x.p99} | ${x.mean} |`),
    '',
  ];
  return lines.join('\n');
}

await main();
process.exit(0);
