#!/usr/bin/env node
// A boot storm: N replays of one trace started at the same instant, each on
// its own NBD connection, from one process (N node processes would load the
// 2-core host more than the servers under test).
// Usage: storm-client.js TRACE URI N   -> JSON on stdout
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '../..');
const { ReplaySession } = await import(join(root, 'dist/replay/replay.js'));
const { readTraceFile } = await import(join(root, 'dist/replay/trace.js'));

const [tracePath, uri, nText] = process.argv.slice(2);
const n = Number(nText);
if (!tracePath || !uri || !Number.isInteger(n) || n < 1) {
  console.error('usage: storm-client.js TRACE URI N');
  process.exit(2);
}
const trace = await readTraceFile(tracePath);
const sessions = [];
try {
  for (let i = 0; i < n; i++) sessions.push(await ReplaySession.open(trace, { uri }));
  const started = performance.now();
  const results = await Promise.all(sessions.map((s) => s.run()));
  const wallS = (performance.now() - started) / 1000;
  const boots = results.map((r) => ({
    completionS: r.replay.durationS,
    latencyMs: { mean: r.replay.latencyMs.mean, p99: r.replay.latencyMs.p99, max: r.replay.latencyMs.max },
  }));
  process.stdout.write(`${JSON.stringify({ n, wallS, recordedS: results[0].replay.recordedDurationS, boots })}\n`);
} finally {
  await Promise.all(sessions.map((s) => s.close()));
}
