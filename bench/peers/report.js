// The peers benchmark's report: medians, ratios, targets, the replay-model
// validation, the Markdown page and the plots, all from the results JSON.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { bootTimePlot, storageOverTimePlot, stormPlot } from './plot.js';

const MiB = 2 ** 20;
const FAMILY = {
  local: 'local image',
  direct: 'direct remote',
  'nbdkit-cache': 'nbdkit cache+readahead',
  cor: 'qcow2 copy-on-read',
  bootcache: 'bootcache',
};
const PHASE_ORDER = ['', 'first', 'cold', 'warm'];
const CONFIG_ORDER = Object.keys(FAMILY);
/** Peers' cold boots: what "the best peer" is chosen from. */
const PEER_COLD = [['direct', ''], ['nbdkit-cache', 'cold'], ['cor', 'cold']];

export function median(xs) {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}
const fmt = (x, d = 2) => (x === null || x === undefined || Number.isNaN(x) ? '-' : x.toFixed(d));
const label = (config, phase) => `${FAMILY[config]}${phase ? `, ${phase}` : ''}`;

/** Rows grouped by (delay, config, phase), in display order. */
export function groups(rows) {
  const byKey = new Map();
  for (const r of rows) {
    const key = `${r.delayMs}|${r.config}|${r.phase}`;
    if (!byKey.has(key)) byKey.set(key, { delayMs: r.delayMs, config: r.config, phase: r.phase, runs: [] });
    byKey.get(key).runs.push(r);
  }
  const out = [...byKey.values()].map((g) => {
    const secs = g.runs.map((r) => r.seconds);
    const withStorage = g.runs.filter((r) => r.storage);
    return {
      ...g,
      seconds: secs,
      median: median(secs),
      min: Math.min(...secs),
      max: Math.max(...secs),
      requests: withStorage.length ? median(withStorage.map((r) => r.storage.requests)) : null,
      bytes: withStorage.length ? median(withStorage.map((r) => r.storage.bytes)) : null,
      cpuS: median(g.runs.map((r) => r.qemuCpuS).filter((x) => typeof x === 'number')),
    };
  });
  out.sort((a, b) => a.delayMs - b.delayMs || CONFIG_ORDER.indexOf(a.config) - CONFIG_ORDER.indexOf(b.config) || PHASE_ORDER.indexOf(a.phase) - PHASE_ORDER.indexOf(b.phase));
  return out;
}

function find(gs, delayMs, config, phase) {
  return gs.find((g) => g.config === config && g.phase === phase && (config === 'local' || g.delayMs === delayMs));
}

function delaysOf(gs) {
  return [...new Set(gs.filter((g) => g.config !== 'local').map((g) => g.delayMs))].sort((a, b) => a - b);
}

/** The table of one workload (boots or replays), one block per delay. */
function timeTable(gs, { unitNote, recorded }) {
  const local = find(gs, 0, 'local', '');
  const lines = [
    `| D | configuration | median (s) | runs (s) | spread (s) | ratio to local | storage requests | storage MiB |${recorded ? ' ratio to recorded |' : ''}`,
    `|---|---|---|---|---|---|---|---|${recorded ? '---|' : ''}`,
  ];
  const row = (d, g) => {
    const ratio = local && g.config !== 'local' ? fmt(g.median / local.median, 3) : g.config === 'local' ? '1' : '-';
    const rec = recorded ? ` ${fmt(g.median / recorded, 3)} |` : '';
    lines.push(`| ${d} | ${label(g.config, g.phase)} | ${fmt(g.median)} | ${g.seconds.map((s) => fmt(s)).join(', ')} | ${fmt(g.max - g.min)} | ${ratio} | ${g.requests ?? '-'} | ${g.bytes === null ? '-' : fmt(g.bytes / MiB, 1)} |${rec}`);
  };
  if (local) row('-', local);
  for (const d of delaysOf(gs)) for (const g of gs.filter((x) => x.delayMs === d && x.config !== 'local')) row(`${d} ms`, g);
  if (unitNote) lines.push('', unitNote);
  return lines.join('\n');
}

function bootTargets(gs) {
  const out = [];
  const local = find(gs, 0, 'local', '');
  const d = 10;
  const cold = find(gs, d, 'bootcache', 'cold');
  const first = find(gs, d, 'bootcache', 'first');
  const direct = find(gs, d, 'direct', '');
  const peers = PEER_COLD.map(([c, p]) => find(gs, d, c, p)).filter(Boolean);
  const best = peers.length ? peers.reduce((a, b) => (a.median <= b.median ? a : b)) : undefined;
  const target = (what, limit, value, vs) => out.push({ what, limit, value, vs, met: value === null ? null : value <= limit });
  if (cold && local) target('bootcache cold host, real boot, D = 10 ms, vs the local image', 1.1, cold.median / local.median, `${fmt(cold.median)} s vs ${fmt(local.median)} s`);
  if (cold && best) target(`bootcache cold host vs the best peer's cold boot (${label(best.config, best.phase)}), D = 10 ms`, 0.75, cold.median / best.median, `${fmt(cold.median)} s vs ${fmt(best.median)} s`);
  if (first && direct) target('bootcache first boot (recording) vs direct remote, D = 10 ms', 1.05, first.median / direct.median, `${fmt(first.median)} s vs ${fmt(direct.median)} s`);
  return out;
}

function validation(bootGs, replayGs) {
  const out = [];
  const bl = find(bootGs, 0, 'local', '');
  const rl = find(replayGs, 0, 'local', '');
  if (!bl || !rl) return out;
  for (const r of replayGs) {
    if (r.config === 'local') continue;
    const b = find(bootGs, r.delayMs, r.config, r.phase);
    if (!b) continue;
    const bootRatio = b.median / bl.median;
    const replayRatio = r.median / rl.median;
    const deviation = replayRatio / bootRatio - 1;
    out.push({ delayMs: r.delayMs, config: r.config, phase: r.phase, bootRatio, replayRatio, deviation, within: Math.abs(deviation) <= 0.15 });
  }
  return out;
}

function stormSummary(section) {
  const single = section.rows.find((r) => r.server === 'bootcache' && r.n === 1);
  const singleMedian = single ? median(single.boots.map((b) => b.completionS)) : null;
  return section.rows.map((r) => {
    const c = r.boots.map((b) => b.completionS);
    return { server: r.server, n: r.n, median: median(c), max: Math.max(...c), min: Math.min(...c), wallS: r.wallS, requests: r.storage.requests, bytes: r.storage.bytes, vsSingle: singleMedian ? Math.max(...c) / singleMedian : null };
  });
}

function stormTargets(section, summary) {
  const out = [];
  const n16 = summary.find((s) => s.server === 'bootcache' && s.n === 16);
  if (!n16) return out;
  const bytesRatio = n16.bytes / section.segmentBytes;
  out.push({ what: 'storm N = 16, bootcache storage bytes vs the segment size', limit: 1.1, value: bytesRatio, vs: `${fmt(n16.bytes / MiB, 1)} MiB vs ${fmt(section.segmentBytes / MiB, 1)} MiB`, met: bytesRatio <= 1.1 });
  if (n16.vsSingle !== null) out.push({ what: 'storm N = 16, slowest boot vs the single cold-host replay (N = 1)', limit: 1.2, value: n16.vsSingle, vs: `${fmt(n16.max)} s vs ${fmt(n16.max / n16.vsSingle)} s`, met: n16.vsSingle <= 1.2 });
  return out;
}

const targetLine = (t) => `| ${t.what} | <= ${t.limit}x | ${fmt(t.value, 3)}x (${t.vs}) | ${t.met ? 'met' : '**missed**'} |`;

export async function writeReport(results, { resultsDir, date }) {
  const s = results.sections ?? {};
  const m = results.machine ?? {};
  const md = [`# Boot benchmark against the peers, ${date}`, ''];
  md.push('Generated by `npm run bench` (bench/peers.js); method in docs/benchmarks-peers.md. Every number here is from one machine and one day, every configuration measured in the same run.', '');
  md.push('## Machine', '');
  md.push(`${m.cpus ?? '?'} CPUs (${m.cpuModel ?? '?'}), ${m.memGiB ?? '?'} GiB RAM, Linux ${m.kernel ?? '?'}, Node ${m.node ?? '?'}, ${m.qemu ?? 'QEMU ?'}, ${m.nbdkit ?? 'nbdkit ?'}; guests run under **${m.accel ?? '?'}**. The machine is shared with other jobs: load averages are in the JSON.`, '');
  const targets = [];
  let bootGs = [];
  if (s.boot) {
    bootGs = groups(s.boot.rows);
    md.push('## Real boots', '');
    md.push(`The reference guest (Debian 12, BIOS, GRUB, systemd to multi-user; docs/reference-guest.md) booted by QEMU from its start to the console marker, ${s.boot.runs} run(s) per configuration, configurations interleaved and rotated per round. Storage requests and MiB: what reached the emulated remote storage during the boot (nbdkit's log filter for the peers, the agent's counters for bootcache). Command: \`${s.boot.command}\`.`, '');
    md.push(timeTable(bootGs, {}), '', '![Boot time per configuration](' + `peers-boot.svg)`, '', '![Storage reads during a boot](' + `peers-storage.svg)`, '');
    targets.push(...bootTargets(bootGs));
  }
  if (s.replay) {
    const gs = groups(s.replay.rows);
    const recorded = s.replay.rows.find((r) => r.recordedS)?.recordedS;
    md.push('## Trace replays', '');
    md.push(`\`bootcache replay\` of \`${s.replay.trace}\` (recorded duration ${fmt(recorded)} s) with its think time, through each configuration (local: qemu-nbd over the image; copy-on-read: qemu-storage-daemon exporting the copy-on-read node). ${s.replay.runs} run(s). Command: \`${s.replay.command}\`.`, '');
    md.push(timeTable(gs, { recorded }), '');
  }
  if (s.validate) {
    const gs = groups(s.validate.rows);
    md.push('## Replay model validation', '');
    md.push(`The reference guest's own boot trace (recorded by \`bootcache profile\` on this machine under ${m.accel ?? '?'}) replayed through each configuration, ${s.validate.runs} run(s). For each configuration the replay's ratio to the local replay should be within ±15% of the real boot's ratio to the local boot.`, '');
    md.push(timeTable(gs, {}), '');
    const v = validation(bootGs, gs);
    if (v.length) {
      md.push('| D | configuration | real boot / local | replay / local | deviation | within ±15% |', '|---|---|---|---|---|---|');
      for (const x of v) md.push(`| ${x.delayMs} ms | ${label(x.config, x.phase)} | ${fmt(x.bootRatio, 3)} | ${fmt(x.replayRatio, 3)} | ${fmt(x.deviation * 100, 1)}% | ${x.within ? 'yes' : '**no**'} |`);
      const peers = v.filter((x) => x.config !== 'bootcache');
      const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
      md.push('', `Peer configurations within ±15%: ${peers.filter((x) => x.within).length} of ${peers.length}; bootcache: ${v.length - peers.length - v.filter((x) => x.config === 'bootcache' && !x.within).length} of ${v.length - peers.length}. Mean deviation: peers ${fmt(mean(peers.map((x) => x.deviation)) * 100, 1)}%, bootcache ${fmt(mean(v.filter((x) => x.config === 'bootcache').map((x) => x.deviation)) * 100, 1)}%.`, '');
    } else {
      md.push('(No real boots in this results file to compare with.)', '');
    }
  }
  let stormRows = [];
  if (s.storm) {
    const summary = stormSummary(s.storm);
    stormRows = summary;
    md.push('## Boot storms', '');
    md.push(`N simultaneous replays of \`${s.storm.trace}\` (one NBD connection each, started together) at D = ${s.storm.delayMs} ms: through one bootcache agent on a cold host (empty cache, segment of ${fmt(s.storm.segmentBytes / MiB, 1)} MiB on storage) and through one nbdkit with cache (cache-on-read) + readahead, cold. Command: \`${s.storm.command}\`.`, '');
    md.push('| server | N | per boot median (s) | fastest / slowest (s) | slowest vs bootcache N=1 | storage requests | storage MiB |', '|---|---|---|---|---|---|---|');
    for (const x of summary) md.push(`| ${x.server} | ${x.n} | ${fmt(x.median)} | ${fmt(x.min)} / ${fmt(x.max)} | ${fmt(x.vsSingle, 3)} | ${x.requests} | ${fmt(x.bytes / MiB, 1)} |`);
    md.push('', `![Boot storms](peers-storm.svg)`, '');
    targets.push(...stormTargets(s.storm, summary));
  }
  if (targets.length) {
    md.push('## Targets', '', '| target | limit | measured | |', '|---|---|---|---|');
    for (const t of targets) md.push(targetLine(t));
    md.push('');
  }
  const commands = { ...(s.boot?.commands ?? {}), ...(s.replay?.commands ?? {}), ...(s.storm?.commands ?? {}) };
  if (Object.keys(commands).length) {
    md.push('## Commands', '', 'Servers as started by the harness (paths are the run directory under BENCH_WORK):', '');
    for (const [k, v] of Object.entries(commands)) md.push(`- ${k}: \`${v}\``);
    md.push('');
  }
  writeFileSync(join(resultsDir, `peers.md`), md.join('\n'));

  if (bootGs.length) {
    const bars = bootGs.map((g) => ({ delay: g.config === 'local' ? 'local (no delay)' : `D = ${g.delayMs} ms`, label: label(g.config, g.phase), family: FAMILY[g.config], median: g.median, min: g.min, max: g.max }));
    // The local bar in every delay panel, as the yardstick.
    const local = bars.find((b) => b.family === FAMILY.local);
    const panels = [...new Set(bars.filter((b) => b !== local).map((b) => b.delay))];
    const withLocal = panels.flatMap((p) => [...(local ? [{ ...local, delay: p }] : []), ...bars.filter((b) => b.delay === p)]);
    writeFileSync(join(resultsDir, `peers-boot.svg`), await bootTimePlot(withLocal, { title: 'Reference guest boot, QEMU start to console marker (lower is better)' }));
    const dMax = Math.max(...delaysOf(bootGs));
    const points = [];
    for (const r of s.boot.rows) {
      if (r.round !== 1 || !r.series || (r.config !== 'local' && r.delayMs !== dMax)) continue;
      for (const p of r.series) points.push({ label: label(r.config, r.phase), family: FAMILY[r.config], t: p.t, mib: p.bytes / MiB, requests: p.requests });
    }
    if (points.length) writeFileSync(join(resultsDir, `peers-storage.svg`), await storageOverTimePlot(points, { title: `Storage reads during one real boot, D = ${dMax} ms (round 1)` }));
  }
  if (stormRows.length) {
    writeFileSync(join(resultsDir, `peers-storm.svg`), await stormPlot(stormRows.map((x) => ({ server: x.server === 'bootcache' ? 'bootcache (cold host)' : 'nbdkit cache+readahead (cold)', n: x.n, median: x.median, max: x.max, storageMiB: x.bytes / MiB })), { title: `Boot storms at D = ${s.storm.delayMs} ms` }));
  }
}
