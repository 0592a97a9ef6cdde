import { formatBytes } from '../cli/progress.js';
import type { ReplayResult } from './replay.js';

const MiB = 1024 * 1024;

function pad(cells: string[], widths: number[], rightAlign: boolean[]): string {
  return cells
    .map((cell, i) => (rightAlign[i] ? cell.padStart(widths[i]!) : cell.padEnd(widths[i]!)))
    .join('  ')
    .trimEnd();
}

/** Renders rows as aligned columns; columns flagged in rightAlign are right-aligned. */
export function formatTable(header: string[], rows: string[][], rightAlign: boolean[]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  return [pad(header, widths, rightAlign), ...rows.map((r) => pad(r, widths, rightAlign))].join('\n');
}

const seconds = (s: number): string => `${s.toFixed(2)} s`;
const ms = (v: number): string => (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2));
const ratio = (r: number | null): string => (r === null ? '-' : r.toFixed(2));

/** The human summary of a replay: totals, latencies and the phase timeline. */
export function formatReplayReport(result: ReplayResult): string {
  const { replay, trace, model, target, clamp } = result;
  const modelText = model.kind === 'recorded-dependencies'
    ? 'recorded dependencies (done_us)'
    : `serial fallback (no done_us; assumed local service time ${model.assumedServiceUs} µs)`;
  const lines = [
    `Replayed ${replay.reads} reads (${formatBytes(replay.bytes)}) of ${trace.path}`,
    `against ${target.uri} (${formatBytes(target.exportSize)}, ${target.connections} connection${target.connections === 1 ? '' : 's'})`,
    `model: ${modelText}; think time ${model.thinkTime ? 'kept' : 'off (--no-think-time)'}`,
  ];
  if (result.warmup?.error !== undefined) {
    lines.push(`warm-up skipped: ${result.warmup.error}`);
  } else if (result.warmup !== null) {
    lines.push(`warm-up: ${result.warmup.reads} reads against an in-process zero export in ${(result.warmup.ms / 1000).toFixed(2)} s, before the timed run (--no-warmup skips it)`);
  }
  if (clamp.trimmedReads + clamp.skippedReads > 0) {
    lines.push(`clamped: ${clamp.trimmedReads} read(s) trimmed and ${clamp.skippedReads} skipped at the end of the export`);
  }
  const busy = replay.recordedIoBusyS === null ? '' : ` (recorded ${seconds(replay.recordedIoBusyS)})`;
  const inFlight = replay.recordedMaxInFlight === null ? '' : ` (recorded ${replay.recordedMaxInFlight})`;
  const summary: string[][] = [
    ['completion time', seconds(replay.durationS)],
    ['recorded duration', seconds(replay.recordedDurationS)],
    ['replay / recorded', ratio(replay.ratio)],
    ['reads in flight (I/O busy)', `${seconds(replay.ioBusyS)}${busy}`],
    ['no read in flight', seconds(replay.idleS)],
    ['max reads in flight', `${replay.maxInFlight}${inFlight}`],
    ['throughput', `${(replay.throughputMiBs).toFixed(2)} MiB/s`],
    ['latency p50 / p90 / p99 / max', `${ms(replay.latencyMs.p50)} / ${ms(replay.latencyMs.p90)} / ${ms(replay.latencyMs.p99)} / ${ms(replay.latencyMs.max)} ms`],
    ['scheduling lag mean / p99 / max', `${ms(replay.schedulingLagMs.mean)} / ${ms(replay.schedulingLagMs.p99)} / ${ms(replay.schedulingLagMs.max)} ms`],
    ['completion time without lag', `${seconds(replay.lagFreeDurationS)} (model, measured latencies)`],
  ];
  const labelWidth = Math.max(...summary.map(([label]) => label!.length));
  lines.push('', ...summary.map(([label, value]) => `  ${label!.padEnd(labelWidth)}  ${value}`), '');
  const rows = result.phases.map((p) => [
    String(p.phase),
    `${p.windowStartS.toFixed(1)}-${p.windowEndS.toFixed(1)}`,
    String(p.reads),
    (p.bytes / MiB).toFixed(1),
    p.recordedS.toFixed(2),
    p.replayS.toFixed(2),
    ratio(p.ratio),
    p.ioBusyS.toFixed(2),
    p.latencyMs === null ? '-' : ms(p.latencyMs.mean),
  ]);
  lines.push(formatTable(
    ['phase', 'recorded window (s)', 'reads', 'MiB', 'recorded (s)', 'replay (s)', 'ratio', 'I/O busy (s)', 'mean lat (ms)'],
    rows,
    [true, false, true, true, true, true, true, true, true],
  ));
  return lines.join('\n');
}
