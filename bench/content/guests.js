// The bench's sibling guests and their publication: A (the reference guest),
// B (A's recipe with services added), A2 (A's recipe run again: a rebuild),
// built by scripts/reference-guest/build.sh and cached per machine; A and B
// published with `bootcache profile` (map + version 2 segment), A2 with
// `bootcache index --previous` only. Publications are cached too, stamped
// with the image file they were made for.
import { existsSync, linkSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { run } from '../lib/process.js';
import { MARKER } from '../peers/boot.js';

export const SERVICES = 'nginx,redis-server,chrony,python3';
const CACHE_ROOT = '/var/cache/bootcache';

/** The three guests: export name in storage, build directory, how it is published. */
export function guestPlan(env = process.env) {
  return [
    {
      id: 'A', name: 'ref.raw', what: 'the reference guest',
      dir: env.BOOTCACHE_REF_DIR ?? join(CACHE_ROOT, 'reference-guest'), publish: 'profile',
    },
    {
      id: 'B', name: 'services.raw', what: `the reference guest + ${SERVICES.split(',').join(', ')}`,
      dir: env.BENCH_SERVICES_DIR ?? join(CACHE_ROOT, 'reference-guest-services'), extra: SERVICES, publish: 'profile',
    },
    {
      id: "A'", name: 'ref-rebuild.raw', what: 'the reference guest rebuilt (same recipe, another build)',
      dir: env.BENCH_REBUILD_DIR ?? join(CACHE_ROOT, 'reference-guest-rebuild'), publish: 'index', previous: './ref.raw',
    },
  ];
}

function manifestOf(dir) {
  const path = join(dir, 'manifest.json');
  return existsSync(path) && existsSync(join(dir, 'debian12.raw')) ? JSON.parse(readFileSync(path, 'utf8')) : undefined;
}

/**
 * Builds (or finds) every guest. A is used as it is when its build directory
 * holds a manifest and an image: it is the reference guest other benches and
 * worktrees share, and build.sh would rebuild it in place whenever its recipe
 * (the scripts' text) differs from the one that made it.
 */
export async function ensureGuests({ root, guests, log }) {
  const build = join(root, 'scripts/reference-guest/build.sh');
  for (const g of guests) {
    if (g.id === 'A' && manifestOf(g.dir)) {
      log(`${g.id}: ${g.dir} (cached reference guest, used as it is)`);
    } else {
      const args = ['--out', g.dir, ...(g.extra ? ['--extra-packages', g.extra] : [])];
      log(`${g.id}: build.sh ${args.join(' ')} (cached per machine; a fresh build takes minutes)`);
      const started = performance.now();
      const { stdout, stderr } = await run(build, args, { label: `build.sh (${g.id})` });
      g.buildCommand = `scripts/reference-guest/build.sh ${args.join(' ')}`;
      g.buildRunS = (performance.now() - started) / 1000;
      g.buildOutput = (stdout + stderr).trim().split('\n').slice(-1)[0];
    }
    g.manifest = manifestOf(g.dir);
    if (!g.manifest) throw new Error(`${g.id}: no manifest.json and debian12.raw in ${g.dir}`);
    g.image = join(g.dir, 'debian12.raw');
  }
}

/** The image file a publication was made for: a rewrite changes it. */
function stampOf(path) {
  const st = statSync(path);
  return { size: st.size, mtimeMs: st.mtimeMs, ino: st.ino };
}

function linkFresh(from, to) {
  rmSync(to, { force: true });
  linkSync(from, to);
}

/**
 * Publishes every guest into `published` (cached: redone only when the image
 * file changed), then makes a fresh storage directory of hard links: the
 * images (about 800 MB of data each) and their map, segment, index. The agent
 * publishes new maps and segments by renaming over these links, which leaves
 * the cached publications as they were.
 */
export async function publishGuests({ bin, guests, published, storage, accel, log }) {
  mkdirSync(published, { recursive: true });
  rmSync(storage, { recursive: true, force: true });
  mkdirSync(storage, { recursive: true });
  for (const g of guests) linkFresh(g.image, join(storage, g.name));
  for (const g of guests) {
    const base = join(published, g.name);
    const stampPath = `${base}.stamp.json`;
    const want = { ...stampOf(g.image), publish: g.publish, previous: g.previous ?? null, recipe: g.manifest.recipe };
    const files = g.publish === 'profile' ? [`${g.name}.bcmap`, `${g.name}.bcseg`] : [`${g.name}.bcidx`];
    const have = existsSync(stampPath) ? JSON.parse(readFileSync(stampPath, 'utf8')) : undefined;
    const fresh = have && JSON.stringify(have.want) === JSON.stringify(want) && files.every((f) => existsSync(join(published, f)));
    if (fresh) {
      log(`${g.id}: publication cached (${files.join(', ')})`);
      g.publication = have.result;
    } else {
      // Made on the storage link, so relative keys (--previous ./ref.raw) resolve there.
      const image = join(storage, g.name);
      const started = performance.now();
      let result;
      if (g.publish === 'profile') {
        log(`${g.id}: bootcache profile (one boot under ${accel})`);
        const { stdout } = await run(process.execPath, [bin, 'profile', image, '--format', 'raw', '--accel', accel, '--until', MARKER, '--idle', '0',
          '--out-map', `${base}.bcmap`, '--out-segment', `${base}.bcseg`, '--out-trace', `${base}.trace.csv`,
          '--console-log', `${base}.console.log`, '--force', '--json'], { label: `bootcache profile (${g.id})` });
        result = JSON.parse(stdout);
      } else {
        log(`${g.id}: bootcache index --previous ${g.previous}`);
        const { stdout } = await run(process.execPath, [bin, 'index', image, '--previous', g.previous, '--out', `${base}.bcidx`, '--json'],
          { label: `bootcache index (${g.id})` });
        result = JSON.parse(stdout);
      }
      g.publication = { seconds: (performance.now() - started) / 1000, result };
      writeFileSync(stampPath, `${JSON.stringify({ want, result: g.publication }, null, 2)}\n`);
    }
    g.publicationCommand = g.publish === 'profile'
      ? `bootcache profile ${g.name} --format raw --accel ${accel} --until ${MARKER} --idle 0 --out-map ${g.name}.bcmap --out-segment ${g.name}.bcseg`
      : `bootcache index ${g.name} --previous ${g.previous}`;
    for (const f of files) linkFresh(join(published, f), join(storage, f));
    g.files = Object.fromEntries(files.map((f) => [f.slice(g.name.length + 1), { path: join(published, f), bytes: statSync(join(published, f)).size }]));
  }
}
