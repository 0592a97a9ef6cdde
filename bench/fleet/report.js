// bench/results/fleet.md from fleet.json: tables, the targets beside them
// (met or not), the commands and the machine.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

const MiB = 2 ** 20;
const f = (x, d = 2) => (x === null || x === undefined || Number.isNaN(x) ? '-' : Number(x).toFixed(d));
const mib = (b) => f(b / MiB, 1);
const ratio = (x) => `${f(x, 2)}x`;
const max = (xs) => Math.max(...xs);
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

function target(list, what, measured, value, limit, cmp = '<=') {
  const met = value !== null && value !== undefined && !Number.isNaN(value) && (cmp === '<=' ? value <= limit : value >= limit);
  list.push({ what, measured, met });
}

export function stormTargets(s) {
  const out = [];
  if (!s) return out;
  const single = s.runs.find((r) => r.hosts === 1 && r.perHost === 1);
  const h8 = s.runs.find((r) => r.hosts === 8);
  if (single && h8) {
    const slowest = max(h8.rows.flatMap((r) => r.boots.map((b) => b.completionS)));
    const one = single.rows[0].boots[0].completionS;
    target(out, 'H = 8: each boot <= 1.15x a single cold host (one replay, one host)', `${ratio(slowest / one)} (slowest ${f(slowest)} s vs ${f(one)} s)`, slowest / one, 1.15);
    const limit = 1.05 * 8 * s.segmentBytes;
    target(out, 'H = 8: total storage bytes <= 1.05 x H x segment size', `${ratio(h8.total.readBytes / (8 * s.segmentBytes))} of H x segment (${mib(h8.total.readBytes)} MiB vs ${mib(limit)} MiB allowed)`, h8.total.readBytes, limit);
    target(out, '<= 2 segment uploads per image after an 8-host storm', `${h8.total.segmentUploads} (maps ${h8.total.mapUploads}, conflicts ${h8.total.conflicts})`, h8.total.segmentUploads, 2);
  }
  return out;
}

function stormSection(s) {
  const L = [];
  L.push(`## Boot storm: H hosts, N = ${s.perHost} cold replays each (D = ${s.delayMs} ms)`, '');
  L.push(`\`${s.command}\`, started ${s.startedAt}, load average at start ${s.loadAtStart.map((x) => f(x)).join(' / ')}, at end ${s.loadAtEnd.map((x) => f(x)).join(' / ')}.`, '');
  L.push(`Trace \`${s.trace}\` (recorded ${f(s.runs[0]?.recordedS)} s). Segment ${mib(s.segmentBytes)} MiB (${s.segmentBytes} bytes), published by a first boot (one replay, new host, no map): ` +
    `${f(s.first.boots[0].completionS)} s, ${s.first.agentStorage.readRequests} storage requests / ${mib(s.first.agentStorage.readBytes)} MiB, published ${f(s.first.publishedAfterS, 1)} s after the replay. ` +
    'Before each storm the first boot\'s map and segment are put back, so every H starts from the same bucket state.', '');
  L.push('| H x N | boots: median / slowest | slowest / single cold host | storage requests (per host) | storage MiB total (per host) | / (H x segment) | segment uploads | map uploads | conflicts | load1 at start |');
  L.push('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
  const single = s.runs.find((r) => r.hosts === 1 && r.perHost === 1);
  const one = single?.rows[0].boots[0].completionS;
  for (const r of s.runs) {
    const c = r.rows.flatMap((x) => x.boots.map((b) => b.completionS));
    L.push(`| ${r.hosts} x ${r.perHost} | ${f(median(c))} / ${f(max(c))} s | ${one ? ratio(max(c) / one) : '-'} | ${r.total.readRequests} (${r.rows.map((x) => x.storage.readRequests).join(', ')}) | ` +
      `${mib(r.total.readBytes)} (${r.rows.map((x) => mib(x.storage.readBytes)).join(', ')}) | ${ratio(r.total.readBytes / (r.hosts * s.segmentBytes))} | ${r.total.segmentUploads} | ${r.total.mapUploads} | ${r.total.conflicts} | ${f(r.load1)} |`);
  }
  L.push('');
  L.push('Storage requests and bytes are the deltas of each agent\'s `counters.storage` from its start to the end of its replays (reads only: image ranges, segment chunks, map and segment gets); uploads are `counters.publish` after every host has published. Every boot:', '');
  for (const r of s.runs) {
    L.push(`- H = ${r.hosts}, N = ${r.perHost}: ${r.rows.map((x) => `${x.host} ${x.boots.map((b) => f(b.completionS)).join(' ')}`).join('; ')} s (proxy: ${r.proxy.connections} TCP connections, ${JSON.stringify(r.proxy.requests)} HTTP requests, ${mib(r.proxy.bytesToClient)} MiB to the hosts, ${mib(r.proxy.bytesToServer)} MiB to RGW)`);
  }
  L.push('');
  return L;
}

export function throughputTargets(t) {
  const out = [];
  if (!t) return out;
  target(out, 'segment stream >= 0.8x curl GETs of the segment object, same requests in flight', `${ratio(t.ratio)} (${f(t.agentMiBs, 1)} vs ${f(t.curlMiBs, 1)} MiB/s, medians)`, t.ratio, 0.8, '>=');
  return out;
}

function throughputSection(t) {
  const L = [];
  L.push(`## Segment stream against curl (D = ${t.delayMs} ms)`, '');
  L.push(`\`${t.command}\`, started ${t.startedAt}, load average at start ${t.loadAtStart.map((x) => f(x)).join(' / ')}.`, '');
  L.push(`The segment object (${mib(t.segmentBytes)} MiB), read ${t.rounds} times each way, alternating: by a new agent's prefetch (one idle NBD connection, empty cache; ` +
    `${t.chunkBytes / MiB} MiB ranges, ${t.depth} in flight) and by \`curl --parallel --parallel-max ${t.depth}\` GETs of the same ${t.chunkBytes / MiB} MiB ranges on a presigned URL, both through the delay proxy.`, '');
  L.push('| reader | MiB/s (median) | runs (MiB/s) |', '| --- | ---: | --- |');
  L.push(`| agent prefetch | ${f(t.agentMiBs, 1)} | ${t.agent.map((r) => f(r.MiBs, 1)).join(', ')} |`);
  L.push(`| curl | ${f(t.curlMiBs, 1)} | ${t.curl.map((r) => f(r.MiBs, 1)).join(', ')} |`);
  L.push('');
  return L;
}

/** The local image's boot time for a delay's block: the mean of its local boots (a run of the old layout: the one local boot). */
function localFor(b, d) {
  const l = b.rows.filter((r) => r.config === 'local' && r.delayMs === d && r.seconds);
  if (l.length) return l.reduce((a, r) => a + r.seconds, 0) / l.length;
  return b.local?.seconds;
}

export function bootTargets(b) {
  const out = [];
  if (!b) return out;
  for (const d of b.delays) {
    const local = localFor(b, d);
    const rows = b.rows.filter((r) => r.delayMs === d);
    const get = (config, phase) => rows.find((r) => r.config === config && r.phase === phase);
    const cold = get('bootcache', 'cold');
    const first = get('bootcache', 'first');
    const limit = d <= 10 ? 1.05 : 1.10;
    if (cold && local) target(out, `D = ${d} ms: cold host <= ${f(limit)}x the local image`, `${ratio(cold.seconds / local)} (${f(cold.seconds)} s vs ${f(local)} s)`, cold.seconds / local, limit);
    if (cold && first) {
      const share = cold.storage.requests / first.storage.requests;
      const agentShare = cold.agentStorage && first.agentStorage ? cold.agentStorage.readRequests / first.agentStorage.readRequests : null;
      target(out, `D = ${d} ms: cold-host storage requests <= 2% of the first boot's (HTTP requests at the proxy)`,
        `${f(share * 100, 1)}% (${cold.storage.requests} vs ${first.storage.requests}; the agents' own counters.storage.readRequests: ${agentShare === null ? '-' : `${f(agentShare * 100, 1)}%, ${cold.agentStorage.readRequests} vs ${first.agentStorage.readRequests}`})`, share, 0.02);
    }
    const peers = rows.filter((r) => r.config !== 'bootcache' && r.phase === 'cold' && r.seconds);
    if (first && peers.length) {
      const best = peers.reduce((a, r) => (r.seconds < a.seconds ? r : a));
      target(out, `D = ${d} ms: first boot <= 0.75x the best peer's cold boot`, `${ratio(first.seconds / best.seconds)} (${f(first.seconds)} s vs ${best.config} ${f(best.seconds)} s)`, first.seconds / best.seconds, 0.75);
    }
  }
  return out;
}

function bootSection(b) {
  const L = [];
  L.push('## Real boots of the reference guest', '');
  L.push(`\`${b.command}\`, started ${b.startedAt}, load average at start ${b.loadAtStart.map((x) => f(x)).join(' / ')}; ${b.runs} run per configuration (one round).`, '');
  L.push('Boot: QEMU start to the console marker. Storage: HTTP requests and bytes that crossed the delay proxy to RGW during the boot (the agent\'s own `counters.storage` are in the JSON).', '');
  L.push('Ratios are to the mean of the local image\'s boots in the same block (booted at its start and at its end, under the same load).', '');
  L.push('| D | configuration | boot | ratio to local | storage requests / MiB | QEMU CPU s | load1 |', '| ---: | --- | ---: | ---: | ---: | ---: | ---: |');
  if (b.local) L.push(`| - | local image | ${f(b.local.seconds)} s | 1 | - | ${f(b.local.qemuCpuS, 1)} | ${f(b.local.load1)} |`);
  for (const r of b.rows) {
    const local = localFor(b, r.delayMs);
    L.push(`| ${r.delayMs} ms | ${r.label} | ${r.seconds === null ? `failed: ${r.error}` : `${f(r.seconds)} s`} | ${local && r.seconds ? ratio(r.seconds / local) : '-'} | ` +
      `${r.storage ? `${r.storage.requests} / ${mib(r.storage.bytes)}` : '-'} | ${f(r.qemuCpuS, 1)} | ${f(r.load1)} |`);
  }
  L.push('');
  const presigned = b.notes?.find((n) => n.kind === 'presigned');
  if (presigned) {
    const e = presigned.evidence;
    L.push(`The curl peers could not open the presigned URL (RGW answers its HEAD with ${e.curlHead}, a ranged GET with ${e.curlRangedGet}), so they read the image unsigned after a public-read ACL on it:`, '');
    L.push(`- \`qemu-img info\` (QEMU curl driver): ${e.qemuImgInfo.replace(/json:\{.*\}/, 'json:{...}')}`);
    L.push(`- nbdkit curl plugin: ${e.nbdkitCurl.replace(/URL \[[^\]]*\]/, 'URL [...]')}`, '');
  }
  return L;
}

export function markdown(results) {
  const s = results.sections ?? {};
  const L = ['# Fleet benchmark: hosts on one bucket (Ceph RGW)', ''];
  L.push('Generated by `node bench/fleet.js` (method: docs/benchmarks-fleet.md). The storage is the test Ceph RGW (`scripts/ceph/rgw.sh`, memstore) behind ' +
    'a TCP proxy adding a round trip of D to every request (bench/fleet/delay-proxy.js); every contender reads the same object through it.', '');
  const m = results.machine;
  if (m) L.push(`Machine: ${m.cpus} x ${m.cpuModel}, ${m.memGiB} GiB, Linux ${m.kernel}, Node ${m.node}, accel ${m.accel}, ${m.qemu}, ${m.nbdkit}. The host is shared with other jobs: read the load averages.`, '');
  const targets = [...stormTargets(s.storm), ...throughputTargets(s.throughput), ...bootTargets(s.boot)];
  if (targets.length) {
    L.push('## Targets', '', '| target | measured | met |', '| --- | --- | --- |');
    for (const t of targets) L.push(`| ${t.what} | ${t.measured} | ${t.met ? 'yes' : '**no**'} |`);
    L.push('');
  }
  if (s.storm) L.push(...stormSection(s.storm));
  if (s.throughput) L.push(...throughputSection(s.throughput));
  if (s.boot) L.push(...bootSection(s.boot));
  const commands = Object.entries(s).flatMap(([part, sec]) => Object.entries(sec.commands ?? {}).map(([k, v]) => `# ${part}: ${k}\n${v}`));
  if (commands.length) L.push('## Commands', '', '```', ...commands, '```', '');
  return L.join('\n');
}

export function writeReport(results, resultsDir) {
  writeFileSync(join(resultsDir, 'fleet.md'), markdown(results));
}
