// Why two builds of one recipe share so little of their boots' bytes: the
// initramfs. Compares two initrd.img files (gzip-compressed cpio "newc", as
// initramfs-tools makes them without zstd) member by member: names, contents,
// mtimes.
//
//   node bench/content/initramfs-diff.js INITRD_A INITRD_B
//
// prints JSON.
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';

/** name -> { mtime, sha256 } of every member (cpio newc: 110-byte ASCII hex headers, 4-byte alignment). */
function members(path) {
  const data = readFileSync(path);
  const gz = data.indexOf(Buffer.from([0x1f, 0x8b, 0x08]));
  if (gz < 0) throw new Error(`${path}: no gzip stream (another compressor?)`);
  const raw = gunzipSync(data.subarray(gz));
  const out = new Map();
  let at = 0;
  while (at + 110 <= raw.length && raw.toString('latin1', at, at + 6) === '070701') {
    const field = (k) => parseInt(raw.toString('latin1', at + 6 + 8 * k, at + 14 + 8 * k), 16);
    const [mtime, size, nameSize] = [field(5), field(6), field(11)];
    const name = raw.toString('utf8', at + 110, at + 110 + nameSize - 1);
    const body = (at + 110 + nameSize + 3) & ~3;
    at = (body + size + 3) & ~3;
    if (name === 'TRAILER!!!') break;
    out.set(name, { mtime, sha256: createHash('sha256').update(raw.subarray(body, body + size)).digest('hex') });
  }
  return { uncompressedPrefixBytes: gz, members: out };
}

const [pathA, pathB] = process.argv.slice(2);
if (!pathB) {
  console.error('usage: node bench/content/initramfs-diff.js INITRD_A INITRD_B');
  process.exit(2);
}
const a = members(pathA);
const b = members(pathB);
const names = new Set([...a.members.keys(), ...b.members.keys()]);
const onlyOne = [...names].filter((n) => !a.members.has(n) || !b.members.has(n));
const both = [...names].filter((n) => a.members.has(n) && b.members.has(n));
const contentDiffers = both.filter((n) => a.members.get(n).sha256 !== b.members.get(n).sha256);
const mtimeDiffers = both.filter((n) => a.members.get(n).mtime !== b.members.get(n).mtime);
console.log(JSON.stringify({
  files: { a: pathA, b: pathB },
  fileSha256Equal: createHash('sha256').update(readFileSync(pathA)).digest('hex') === createHash('sha256').update(readFileSync(pathB)).digest('hex'),
  members: { a: a.members.size, b: b.members.size, inOneOnly: onlyOne.length },
  contentDiffers: contentDiffers.length,
  mtimeDiffers: mtimeDiffers.length,
  examples: mtimeDiffers.slice(0, 3).map((n) => ({ name: n, mtimeA: a.members.get(n).mtime, mtimeB: b.members.get(n).mtime })),
}, null, 2));
