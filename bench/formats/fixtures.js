// Fixtures for bench/formats.js, cached outside the repository (default
// /var/tmp/bootcache-bench/formats, or $BOOTCACHE_BENCH_DIR): a 2 GiB disk of
// non-zero, partly compressible data as an uncompressed qcow2 (64 KiB
// clusters) and as zlib- and zstd-compressed qcow2s (64 KiB clusters). A fixture is
// rebuilt when its recorded generator version, size or mtime no longer match.
import { execFileSync } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { mkdir, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';

export const GiB = 1024 ** 3;
export const MiB = 1024 ** 2;
export const DISK_SIZE = 2 * GiB;
const GENERATOR_VERSION = 1;
const BLOCK = 4096;
const WRITE_CHUNK = 16 * MiB;

/**
 * Deterministic disk content, block by block (4 KiB), chosen by a keystream
 * byte: 1/4 pseudo-random bytes (incompressible), 1/2 text (4 KiB slices of a
 * 1 MiB word corpus, about 2-3x compressible with deflate), 1/4 record-like
 * tables (a 16-byte record with the block number, highly compressible). No
 * block is all zeros, so nothing is sparse. The keystream is AES-128-CTR
 * over zeros with a fixed key.
 */
function* diskChunks(size) {
  const key = Buffer.alloc(16, 0x42);
  const keystream = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  const words = (
    'the of and to in is that for it as was with be by on not he this are or his from at which but have an they ' +
    'you were her all she there would their we him been has when who will more no if out so said what up its about ' +
    'into than them can only other new some could time these two may then do first any my now such like our over man ' +
    'me even most made after also did many before must through back years where much your way well down should because ' +
    'kernel module systemd mount device block driver firmware service target network config library package'
  ).split(' ');
  const corpusRng = keystream.update(Buffer.alloc(MiB));
  const corpus = Buffer.alloc(MiB);
  for (let at = 0, i = 0; at < corpus.length; i++) {
    const word = words[corpusRng[i % corpusRng.length] % words.length];
    at += corpus.write(`${word}${corpusRng[(i + 7) % corpusRng.length] % 13 === 0 ? '.\n' : ' '}`, at);
  }
  for (let offset = 0; offset < size; offset += WRITE_CHUNK) {
    const length = Math.min(WRITE_CHUNK, size - offset);
    const random = keystream.update(Buffer.alloc(length));
    const out = Buffer.allocUnsafe(length);
    for (let b = 0; b < length; b += BLOCK) {
      const kind = random[b];
      const blockNo = (offset + b) / BLOCK;
      if (kind < 64) {
        random.copy(out, b, b, b + BLOCK);
        out[b] |= 1; // never an all-zero block
      } else if (kind < 192) {
        const from = (random.readUInt32LE(b + 4) % (corpus.length / 64 - BLOCK / 64)) * 64;
        corpus.copy(out, b, from, from + BLOCK);
      } else {
        for (let r = 0; r < BLOCK; r += 16) {
          out.writeUInt32LE(blockNo, b + r);
          out.writeUInt32LE(r, b + r + 4);
          out.writeUInt32LE(0x600d_f00d, b + r + 8);
          out.writeUInt32LE(kind, b + r + 12);
        }
      }
    }
    yield out;
  }
}

async function writeDisk(path) {
  const hash = createHash('sha256');
  const fh = await open(path, 'w');
  try {
    let at = 0;
    for (const chunk of diskChunks(DISK_SIZE)) {
      hash.update(chunk);
      await fh.write(chunk, 0, chunk.length, at);
      at += chunk.length;
    }
  } finally {
    await fh.close();
  }
  return hash.digest('hex');
}

const run = (cmd, args) => execFileSync(cmd, args, { stdio: ['ignore', 'ignore', 'inherit'] });

/**
 * Makes (or reuses) the fixtures; returns their paths, the guest data's
 * SHA-256 and sizes. `log` gets progress lines.
 */
export async function ensureFixtures(dir, log) {
  await mkdir(dir, { recursive: true });
  const metaPath = join(dir, 'fixtures.json');
  const plain = join(dir, 'disk-64k.qcow2');
  const zlib = join(dir, 'disk-64k-zlib.qcow2');
  const zstd = join(dir, 'disk-64k-zstd.qcow2');
  let meta;
  try {
    meta = JSON.parse(await readFile(metaPath, 'utf8'));
  } catch {
    meta = undefined;
  }
  const fresh = async (path) => {
    try {
      const st = await stat(path);
      const known = meta?.files?.[basename(path)];
      return known?.size === st.size && known.mtimeMs === st.mtimeMs;
    } catch {
      return false;
    }
  };
  if (meta?.version === GENERATOR_VERSION && (await fresh(plain)) && (await fresh(zlib)) && (await fresh(zstd))) {
    log(`reusing fixtures in ${dir}`);
    return { plain, zlib, zstd, sha256: meta.sha256, files: meta.files };
  }
  const raw = join(dir, 'disk.raw');
  log(`writing ${DISK_SIZE / GiB} GiB of test data to ${raw}`);
  const sha256 = await writeDisk(raw);
  log('qemu-img convert -O qcow2 (64 KiB clusters)');
  await rm(plain, { force: true });
  run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536', raw, plain]);
  log('qemu-img convert -c -O qcow2 (64 KiB clusters, zlib)');
  await rm(zlib, { force: true });
  run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536,compression_type=zlib', raw, zlib]);
  log('qemu-img convert -c -O qcow2 (64 KiB clusters, zstd)');
  await rm(zstd, { force: true });
  run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536,compression_type=zstd', raw, zstd]);
  await rm(raw, { force: true });
  const files = {};
  for (const path of [plain, zlib, zstd]) {
    const st = await stat(path);
    files[basename(path)] = { size: st.size, mtimeMs: st.mtimeMs };
  }
  await writeFile(metaPath, `${JSON.stringify({ version: GENERATOR_VERSION, sha256, files }, null, 2)}\n`);
  return { plain, zlib, zstd, sha256, files };
}
