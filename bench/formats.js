// Image format benchmark (npm run bench:formats): bootcache's qcow2 reader
// and build-segment against QEMU's tools on the same fixtures, as ratios
// measured in the same run. Writes bench/results/formats.{json,md}.
//
//   (a) read a whole 2 GiB qcow2 (uncompressed, 64 KiB clusters) as guest data
//       vs `qemu-img convert` to QEMU's null-co driver (reads, discards writes)
//   (b) the same for a zlib-compressed qcow2
//   (bz) the same for a zstd-compressed qcow2
//   (c) build-segment for the boot trace's map (~94 MiB) vs qemu-io reading
//       the same block runs (one `read` command per run, one invocation)
//   (c4) the same with a map about 4x larger (peak RSS must not grow)
//   (cd) (c) with the segment written to disk instead of tmpfs (informational)
//   (cz) (c) on the compressed image (informational)
//
// Each contender runs once untimed first (warms the page cache; our read also
// checks the data's SHA-256), then BENCH_ROUNDS (default 3) timed runs,
// alternating with its peer (the order flips every round); medians reported.
//
// Environment: BOOTCACHE_BENCH_DIR (fixture cache, default
// /var/tmp/bootcache-bench/formats), BENCH_ROUNDS.
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DISK_SIZE, MiB, ensureFixtures } from './formats/fixtures.js';

const repo = fileURLToPath(new URL('..', import.meta.url));
const dist = new URL('../dist/', import.meta.url);
const benchDir = process.env.BOOTCACHE_BENCH_DIR ?? '/var/tmp/bootcache-bench/formats';
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
const TRACE = join(repo, 'test/data/debian12-minbase-boot.csv');
const OURS = join(repo, 'bench/formats/ours.js');
const TIME = '/usr/bin/time';

const log = (line) => process.stderr.write(`bench:formats: ${line}\n`);
const sh = (cmd, args) => execFileSync(cmd, args, { encoding: 'utf8' }).trim();
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const mib = (bytes) => bytes / MiB;

/** The machine, as the run starts. */
function machine() {
  const meminfo = Object.fromEntries(
    readFileSync('/proc/meminfo', 'utf8')
      .split('\n')
      .map((l) => l.split(/:\s+/))
      .map(([k, v]) => [k, Number.parseInt(v, 10) * 1024]),
  );
  return {
    hostname: os.hostname(),
    nproc: Number(sh('nproc', [])),
    cpuModel: os.cpus()[0]?.model ?? 'unknown',
    memTotalBytes: meminfo.MemTotal,
    memAvailableBytes: meminfo.MemAvailable,
    loadAverage: os.loadavg(),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    qemu: sh('qemu-img', ['--version']).split('\n')[0],
  };
}

/**
 * Runs a command under /usr/bin/time; returns wall ms (measured here), user
 * and system CPU seconds, peak RSS (KiB) and stdout.
 */
let timedRuns = 0;
function runTimed(cmd, args) {
  const timeFile = join(benchDir, `.time-${process.pid}-${timedRuns++}`);
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint();
    const child = spawn(TIME, ['-o', timeFile, '-f', '%U %S %M', cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', async (code) => {
      const wallMs = Number(process.hrtime.bigint() - started) / 1e6;
      if (process.env.BENCH_DEBUG) log(`ran ${cmd} ${args.slice(0, 3).join(' ')}: code ${code}, stderr ${stderr.slice(0, 300)}`);
      try {
        if (code !== 0) throw new Error(`${cmd} exited with ${code}: ${stderr.trim().slice(0, 2000)}`);
        if (/\bfailed\b|\berror\b/i.test(stderr)) throw new Error(`${cmd} reported: ${stderr.trim().slice(0, 2000)}`);
        const [user, sys, rss] = (await readFile(timeFile, 'utf8')).trim().split('\n').pop().split(' ').map(Number);
        await rm(timeFile, { force: true });
        resolve({ wallMs, userS: user, sysS: sys, maxRssKiB: rss, stdout });
      } catch (err) {
        await rm(timeFile, { force: true });
        reject(err);
      }
    });
  });
}

/** qemu-io arguments reading every run of set blocks of `map`, one `read` per run. */
function qemuIoArgs(image, map) {
  const args = ['-f', 'qcow2', '-r'];
  for (const run of map.bitmap.runs()) {
    const offset = run.start * map.blockSize;
    const length = Math.min(run.length * map.blockSize, map.virtualSize - offset);
    args.push('-c', `read -q ${offset} ${length}`);
  }
  args.push(image);
  return args;
}

/** A map with the trace's blocks plus shifted copies, until it has at least 4x the blocks. */
function widenMap(BootMap, Bitmap, map) {
  const blocks = map.bitmap.length;
  const bitmap = new Bitmap(blocks);
  let set = 0;
  for (let k = 0; set < 4 * map.blocksSet && k < 64; k++) {
    const shift = Math.floor((blocks * k) / 7) + k * 4099;
    for (const run of map.bitmap.runs()) {
      for (let b = run.start; b < run.start + run.length; b++) {
        const i = (b + shift) % blocks;
        if (!bitmap.get(i)) {
          bitmap.set(i);
          set++;
        }
      }
    }
  }
  return new BootMap({ blockSize: map.blockSize, virtualSize: map.virtualSize, identity: map.identity, boots: 1, bitmap });
}

async function main() {
  const startedAt = new Date();
  const before = machine();
  log(`machine: ${before.nproc} CPUs, load ${before.loadAverage.map((l) => l.toFixed(2)).join(' ')}`);
  await mkdir(benchDir, { recursive: true });
  const fx = await ensureFixtures(benchDir, log);

  const { openImage } = await import(new URL('image/open.js', dist).href);
  const { buildMapFromTraceFile } = await import(new URL('core/build-map.js', dist).href);
  const { BootMap, saveMap } = await import(new URL('format/map.js', dist).href);
  const { Bitmap } = await import(new URL('format/bitmap.js', dist).href);

  // Maps carry the image identity, so each image gets its own.
  const maps = {};
  for (const [name, image] of [['plain', fx.plain], ['zlib', fx.zlib]]) {
    const img = await openImage(image);
    const { map } = await buildMapFromTraceFile(img, TRACE);
    await img.close();
    maps[name] = map;
    await saveMap(join(benchDir, `trace-${name}.bcmap`), map);
  }
  maps.plain4x = widenMap(BootMap, Bitmap, maps.plain);
  await saveMap(join(benchDir, 'trace-plain4x.bcmap'), maps.plain4x);
  const describeMap = (m) => ({ blocks: m.blocksSet, bytes: m.blocksSet * m.blockSize, runs: m.bitmap.countRuns() });

  // A tiny image for qemu-img's start-up cost.
  const tiny = join(benchDir, 'tiny.qcow2');
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', tiny, '64K']);
  const nullTarget = (size) => `json:{"driver":"raw","file":{"driver":"null-co","size":${size}}}`;
  // Segments go to tmpfs, so that neither side touches the disk (qemu-io
  // writes nothing); (cd) repeats (c) with the segment on disk.
  const tmpfsOut = existsSync('/dev/shm') ? join('/dev/shm', `bootcache-bench-${process.pid}.bcseg`) : join(benchDir, 'out.bcseg');
  const diskOut = join(benchDir, 'out.bcseg');

  /**
   * Each measurement: a peer and our side. `baseline` is the peer tool's
   * start-up (start, open the image, exit), subtracted from its wall time.
   */
  const readWhole = (id, title, target, image) => ({
    id, title, target, bytes: DISK_SIZE,
    peer: { label: 'qemu-img convert -n -O raw IMG null-co', cmd: 'qemu-img', args: ['convert', '-n', '-f', 'qcow2', '-O', 'raw', image, nullTarget(DISK_SIZE)] },
    baseline: { cmd: 'qemu-img', args: ['convert', '-n', '-f', 'qcow2', '-O', 'raw', tiny, nullTarget(65536)] },
    ours: { label: 'Qcow2Image.readInto, 4 x 4 MiB in flight', cmd: process.execPath, args: [OURS, 'read', image] },
  });
  const buildSegment = (id, title, target, image, mapName, out = tmpfsOut) => ({
    id, title, target, bytes: maps[mapName].blocksSet * maps[mapName].blockSize, map: describeMap(maps[mapName]),
    peer: { label: 'qemu-io -r, one read per run of blocks', cmd: 'qemu-io', args: qemuIoArgs(image, maps[mapName]) },
    baseline: { cmd: 'qemu-io', args: ['-f', 'qcow2', '-r', '-c', 'read -q 0 4096', image] },
    ours: {
      label: `buildSegment (CLI defaults), segment ${out.startsWith('/dev/shm/') ? 'on tmpfs' : 'in the bench dir'}`,
      cmd: process.execPath,
      args: [OURS, 'build-segment', image, join(benchDir, `trace-${mapName}.bcmap`), out],
    },
  });
  const traceMiB = mib(maps.plain.blocksSet * maps.plain.blockSize).toFixed(0);
  const measurements = [
    readWhole('a', 'read whole 2 GiB qcow2, uncompressed, 64 KiB clusters', 0.8, fx.plain),
    readWhole('b', 'read whole 2 GiB qcow2, zlib-compressed, 64 KiB clusters', 0.5, fx.zlib),
    readWhole('bz', 'read whole 2 GiB qcow2, zstd-compressed, 64 KiB clusters', 0.5, fx.zstd),
    buildSegment('c', `build-segment, boot trace map (${traceMiB} MiB), uncompressed image`, 0.8, fx.plain, 'plain'),
    buildSegment('cd', '(c) with the segment written to disk (informational: includes flushing it)', undefined, fx.plain, 'plain', diskOut),
    buildSegment(
      'c4',
      `build-segment, ${(maps.plain4x.blocksSet / maps.plain.blocksSet).toFixed(1)}x map (${mib(maps.plain4x.blocksSet * 4096).toFixed(0)} MiB), uncompressed image`,
      0.8,
      fx.plain,
      'plain4x',
    ),
    buildSegment('cz', 'build-segment, boot trace map, zlib-compressed image (informational)', undefined, fx.zlib, 'zlib'),
  ];

  // Warm-up: every contender once, untimed, so both read from a warm page cache.
  for (const m of measurements) {
    log(`warm-up ${m.id}`);
    await runTimed(m.peer.cmd, m.peer.args);
    const warm = await runTimed(m.ours.cmd, ['a', 'b', 'bz'].includes(m.id) ? [...m.ours.args, '--sha256'] : m.ours.args);
    const out = JSON.parse(warm.stdout);
    if (out.sha256 !== undefined && out.sha256 !== fx.sha256) {
      throw new Error(`${m.id}: guest data SHA-256 ${out.sha256} differs from the fixture's ${fx.sha256}`);
    }
    m.dataCheck = out.sha256 !== undefined ? 'guest data SHA-256 matched the generated data' : undefined;
  }

  for (const m of measurements) m.runs = { peer: [], ours: [], baseline: [] };
  for (let round = 0; round < rounds; round++) {
    for (const m of measurements) {
      const order = round % 2 === 0 ? ['peer', 'ours'] : ['ours', 'peer'];
      for (const side of order) {
        const r = await runTimed(m[side].cmd, m[side].args);
        if (side === 'ours') r.child = JSON.parse(r.stdout);
        delete r.stdout;
        m.runs[side].push(r);
        log(`round ${round + 1} ${m.id} ${side}: ${r.wallMs.toFixed(0)} ms wall${r.child ? `, ${r.child.ms.toFixed(0)} ms in-process` : ''}`);
      }
      const b = await runTimed(m.baseline.cmd, m.baseline.args);
      delete b.stdout;
      m.runs.baseline.push(b);
    }
  }
  await rm(tmpfsOut, { force: true });
  await rm(diskOut, { force: true });

  const results = measurements.map((m) => {
    const baselineMs = median(m.runs.baseline.map((r) => r.wallMs));
    const peerWall = median(m.runs.peer.map((r) => r.wallMs));
    const peerWork = median(m.runs.peer.map((r) => Math.max(1, r.wallMs - baselineMs)));
    const oursWall = median(m.runs.ours.map((r) => r.wallMs));
    const oursWork = median(m.runs.ours.map((r) => r.child.ms));
    const ratio = peerWork / oursWork;
    return {
      id: m.id,
      title: m.title,
      bytes: m.bytes,
      map: m.map,
      peer: m.peer.label,
      peerCommand: shortCommand(m.peer.cmd, m.peer.args),
      ours: m.ours.label,
      oursCommand: ['node', ...m.ours.args.map((a) => a.replace(repo, ''))].join(' '),
      target: m.target,
      ratio,
      met: m.target === undefined ? undefined : ratio >= m.target,
      wallRatio: peerWall / oursWall,
      peerWorkMs: peerWork,
      peerWallMs: peerWall,
      peerStartupMs: baselineMs,
      oursWorkMs: oursWork,
      oursWallMs: oursWall,
      peerMiBps: mib(m.bytes) / (peerWork / 1000),
      oursMiBps: mib(m.bytes) / (oursWork / 1000),
      peerCpuS: median(m.runs.peer.map((r) => r.userS + r.sysS)),
      oursCpuS: median(m.runs.ours.map((r) => r.userS + r.sysS)),
      peerMaxRssMiB: Math.max(...m.runs.peer.map((r) => r.maxRssKiB)) / 1024,
      oursMaxRssMiB: Math.max(...m.runs.ours.map((r) => r.maxRssKiB)) / 1024,
      dataCheck: m.dataCheck,
      runs: m.runs,
    };
  });

  const after = { loadAverage: os.loadavg(), finishedAt: new Date().toISOString() };
  const date = startedAt.toISOString().slice(0, 10);
  let commit = 'unknown';
  try {
    commit = sh('git', ['-C', repo, 'rev-parse', '--short', 'HEAD']) + (sh('git', ['-C', repo, 'status', '--porcelain']) ? ' (with uncommitted changes)' : '');
  } catch {
    // not a git checkout
  }
  const report = {
    command: 'npm run bench:formats',
    expandsTo: 'npm run build && node bench/formats.js',
    environment: { BOOTCACHE_BENCH_DIR: benchDir, BENCH_ROUNDS: rounds },
    commit,
    startedAt: startedAt.toISOString(),
    machine: before,
    after,
    fixtures: { dir: benchDir, files: fx.files, guestSha256: fx.sha256 },
    method: METHOD,
    results,
  };
  const resultsDir = join(repo, 'bench/results');
  await mkdir(resultsDir, { recursive: true });
  const jsonPath = join(resultsDir, 'formats.json');
  const mdPath = join(resultsDir, 'formats.md');
  await writeFile(jsonPath, `${JSON.stringify(report, null, 2)}\n`);
  await writeFile(mdPath, markdown(report));
  log(`wrote ${jsonPath} and ${mdPath}`);
  for (const r of results) {
    log(`${r.id}: ${r.ratio.toFixed(2)}x of ${r.peer}${r.target === undefined ? '' : ` (target ${r.target}x: ${r.met ? 'met' : 'NOT met'})`}, ours peak RSS ${r.oursMaxRssMiB.toFixed(0)} MiB`);
  }
}

/** A command line for the report; long qemu-io read lists are cut to their first few reads. */
function shortCommand(cmd, args) {
  const reads = args.filter((a) => a.startsWith('read -q')).length;
  if (reads <= 3) return [cmd, ...args.map((a) => (/\s|"/.test(a) ? `'${a}'` : a))].join(' ');
  const head = args.slice(0, 3 + 2 * 3).map((a) => (/\s|"/.test(a) ? `'${a}'` : a));
  return `${cmd} ${head.join(' ')} ... (${reads} reads in all) ${args[args.length - 1]}`;
}

const METHOD = [
  'Ratio = our speed / the peer\'s speed = peer work time / our work time (higher is better; 1.0 = as fast).',
  'Our work time is timed inside the child node process (which imports dist/), from opening the image (and loading the map) to closing it, so node\'s start-up and exit are left out (their median cost in this run is under "Start-up" below).',
  'The peer\'s work time is its process wall time minus its start-up: the median wall time of the same tool doing a trivial job (qemu-img: converting a 64 KiB qcow2 to null-co; qemu-io: one 4 KiB read of the same image), measured in the same rounds.',
  'Whole-process wall ratios (start-up included on both sides) are listed too.',
  '(a)/(b) peer: `qemu-img convert -n -f qcow2 -O raw IMG json:{raw over null-co}`: qemu-img reads the whole guest disk (8 coroutines, 2 MiB buffers, its own zero detection) and the null-co driver discards the writes, so neither side writes anything. `/dev/null` cannot be a convert target ("Cannot grow device files").',
  '(a)/(b) ours: Qcow2Image.readInto of the whole disk in 4 MiB chunks, 4 in flight, into a ring of 4 reused buffers; data is not hashed in the timed runs.',
  '(c) peer: qemu-io -f qcow2 -r with one `read -q OFF LEN` per run of set blocks in the map, all in one invocation (reads one at a time, into fresh buffers, discards the data).',
  '(c) ours: buildSegment with the CLI\'s defaults (1 MiB chunks, 3 read ahead, block checksums on the main thread): it reads the same blocks, computes SHA-256 over all the data and a checksum per block (CRC-32 since 2026-11-27; SHA-256 in the results recorded before), writes and fsyncs the .bcseg. That is more work than the peer does. The segment goes to tmpfs (/dev/shm) so that neither side depends on this shared VM\'s disk; (cd) writes it to the bench directory on disk instead, flush included.',
  '(b)/(cz) ours: compressed clusters are decompressed on worker threads (one per CPU, at most 4); our peak RSS includes those workers. qemu-img decompresses on its own thread pool.',
  'Page cache: every contender runs once, untimed, before the timed runs, so both read the fixtures from a warm page cache (the fixtures total about 3 GiB; the machine has far more free memory).',
  'Rounds: each contender runs BENCH_ROUNDS times (default 3), alternating with its peer, the order flipped every round; the medians are reported. The machine is shared, so absolute times vary from run to run (see every timed run below); alternating spreads that noise over both sides.',
  'Peak RSS: /usr/bin/time %M of each process (ours also reports process.resourceUsage().maxRSS); the maximum over the timed runs.',
];

function markdown(r) {
  const f = (n, d = 2) => n.toFixed(d);
  const m = r.machine;
  const lines = [];
  lines.push(`# Image formats benchmark, ${r.startedAt.slice(0, 10)}`, '');
  lines.push(`Command: \`${r.command}\` (\`${r.expandsTo}\`), fixtures cached in \`${r.fixtures.dir}\`, ${r.environment.BENCH_ROUNDS} timed rounds. Commit ${r.commit}.`, '');
  lines.push(
    `Machine: ${m.nproc} CPUs (${m.cpuModel}), ${f(m.memTotalBytes / 1024 ** 3, 1)} GiB memory (${f(m.memAvailableBytes / 1024 ** 3, 1)} GiB available at start), ` +
      `load average at start ${m.loadAverage.map((l) => f(l)).join(' / ')}, at the end ${r.after.loadAverage.map((l) => f(l)).join(' / ')} (1/5/15 min; the machine is shared). ` +
      `${m.kernel}, node ${m.node}, ${m.qemu}.`,
    '',
  );
  lines.push('Fixtures: a 2 GiB disk of generated, non-zero data (1/4 random, 1/2 text, 1/4 record tables per 4 KiB block), converted with `qemu-img convert -O qcow2 -o cluster_size=65536` ' +
    `(${f(r.fixtures.files['disk-64k.qcow2'].size / MiB, 0)} MiB) and with \`-c -o cluster_size=65536,compression_type=zlib\` (${f(r.fixtures.files['disk-64k-zlib.qcow2'].size / MiB, 0)} MiB) and \`compression_type=zstd\` (${f(r.fixtures.files['disk-64k-zstd.qcow2'].size / MiB, 0)} MiB). ` +
    'Maps: block runs from test/data/debian12-minbase-boot.csv (4 KiB blocks); the larger map adds shifted copies of the trace until it has 4x the blocks.', '');
  lines.push('| | measurement | ours | peer | ours MiB/s | peer MiB/s | ratio (target) | met | wall ratio | ours peak RSS | peer peak RSS |');
  lines.push('|---|---|---|---|---:|---:|---:|---|---:|---:|---:|');
  for (const x of r.results) {
    lines.push(
      `| ${x.id} | ${x.title} | ${x.ours} | ${x.peer} | ${f(x.oursMiBps, 0)} | ${f(x.peerMiBps, 0)} | **${f(x.ratio)}x** (${x.target === undefined ? '-' : `>= ${x.target}x`}) | ` +
        `${x.met === undefined ? '-' : x.met ? 'yes' : 'NO'} | ${f(x.wallRatio)}x | ${f(x.oursMaxRssMiB, 0)} MiB | ${f(x.peerMaxRssMiB, 0)} MiB |`,
    );
  }
  lines.push('', 'Medians (ms): work time is what the ratio uses; wall is the whole process; CPU is user + system seconds.', '');
  lines.push('| | ours work | ours wall | ours CPU s | peer work | peer wall | peer start-up | peer CPU s | map |');
  lines.push('|---|---:|---:|---:|---:|---:|---:|---:|---|');
  for (const x of r.results) {
    lines.push(
      `| ${x.id} | ${f(x.oursWorkMs, 0)} | ${f(x.oursWallMs, 0)} | ${f(x.oursCpuS)} | ${f(x.peerWorkMs, 0)} | ${f(x.peerWallMs, 0)} | ${f(x.peerStartupMs, 0)} | ${f(x.peerCpuS)} | ` +
        `${x.map ? `${x.map.blocks} blocks, ${f(x.map.bytes / MiB, 0)} MiB, ${x.map.runs} runs` : '-'} |`,
    );
  }
  lines.push('', 'Every timed run (ms; ours: in-process / wall):', '');
  for (const x of r.results) {
    const peer = x.runs.peer.map((p) => f(p.wallMs, 0)).join(', ');
    const ours = x.runs.ours.map((o) => `${f(o.child.ms, 0)}/${f(o.wallMs, 0)}`).join(', ');
    lines.push(`- ${x.id}: ours ${ours}; peer ${peer}; peer start-up ${x.runs.baseline.map((b) => f(b.wallMs, 0)).join(', ')}`);
  }
  const startup = median(r.results.flatMap((x) => x.runs.ours.map((o) => o.wallMs - o.child.ms)));
  const peerStartup = median(r.results.map((x) => x.peerStartupMs));
  lines.push('', `Start-up: node's start-up and exit (our wall time minus our work time) cost ${f(startup, 0)} ms (median over all our runs); the peers' ${f(peerStartup, 0)} ms.`);
  const checks = r.results.filter((x) => x.dataCheck).map((x) => `${x.id}: ${x.dataCheck}`);
  if (checks.length) lines.push('', `Data check (warm-up runs): ${checks.join('; ')}.`);
  const c = r.results.find((x) => x.id === 'c');
  const c4 = r.results.find((x) => x.id === 'c4');
  const a = r.results.find((x) => x.id === 'a');
  const b = r.results.find((x) => x.id === 'b');
  if (c && c4 && a && b) {
    const grew = c4.oursMaxRssMiB / c.oursMaxRssMiB;
    lines.push(
      '',
      `Peak RSS (d): reading 2 GiB took ${f(a.oursMaxRssMiB, 0)} MiB (uncompressed) and ${f(b.oursMaxRssMiB, 0)} MiB (compressed) at most; ` +
        `build-segment took ${f(c.oursMaxRssMiB, 0)} MiB for the ${f(c.map.bytes / MiB, 0)} MiB map and ${f(c4.oursMaxRssMiB, 0)} MiB for the ${f(c4.map.bytes / MiB, 0)} MiB map ` +
        `(${f(grew)}x for ${f(c4.map.bytes / c.map.bytes, 1)}x the data): ${grew <= 1.25 ? 'bounded, it does not grow with the map' : 'it GREW with the map'}.`,
    );
  }
  lines.push('');
  lines.push('## Method', '', ...r.method.map((l) => `- ${l}`), '');
  lines.push('## Peer commands', '', ...r.results.map((x) => `- ${x.id}: \`${x.peerCommand}\``), '');
  lines.push('## Our commands', '', ...r.results.map((x) => `- ${x.id}: \`${x.oursCommand}\``), '');
  return `${lines.join('\n')}\n`;
}

await main();
