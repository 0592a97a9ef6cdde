// Block-overlap facts computed offline from the published maps, segments and
// indexes (no boot): which of one image's boot blocks another image's boot
// (or index) also holds, by content and at the same offset.
//
//   node bench/content/overlap.js MAP_A SEG_A MAP_B SEG_B [INDEX_C]
//
// prints JSON. Digests are SHA-256 per block (segment version 2 digest
// table; image index digest table): docs/formats.md.
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';

const dist = new URL('../../dist/', import.meta.url);
const { loadMap } = await import(new URL('format/map.js', dist).href);
const { SegmentReader } = await import(new URL('format/segment.js', dist).href);
const { ImageIndex } = await import(new URL('format/image-index.js', dist).href);

const DIGEST = 32;

/** Block number -> digest (hex): the set bits of `bitmap` in order, the digest of rank r at r x 32 in `table`. */
function byBlock(bitmap, blockCount, table) {
  const blocks = new Map();
  let rank = 0;
  for (let b = 0; b < blockCount; b++) {
    if (!bitmap.get(b)) continue;
    blocks.set(b, table.subarray(rank * DIGEST, (rank + 1) * DIGEST).toString('hex'));
    rank++;
  }
  return blocks;
}

/** A boot: block number -> digest (hex), from a map and its version 2 segment. */
export async function bootBlocks(mapPath, segmentPath) {
  const map = await loadMap(mapPath);
  const segment = await SegmentReader.open(segmentPath);
  try {
    if (!segment.hasDigests) throw new Error(`${segmentPath}: a version 1 segment (no block digests)`);
    if (segment.blockCount !== map.blocksSet) throw new Error(`${segmentPath}: ${segment.blockCount} blocks, map ${mapPath} has ${map.blocksSet}`);
    return { blockSize: map.blockSize, blocks: byBlock(map.bitmap, map.blockCount, segment.blockDigests(0, segment.blockCount)) };
  } finally {
    await segment.close();
  }
}

/** Every non-zero block of an image: block number -> digest (hex), from its index. */
export async function indexBlocks(indexPath) {
  const index = await ImageIndex.open(indexPath);
  try {
    await index.loadTable();
    return { blockSize: index.blockSize, blocks: byBlock(index.bitmap, index.blockCount, index.digestTable), previous: index.previous };
  } finally {
    await index.close();
  }
}

/**
 * Of `of`'s blocks: how many have content that `against` holds (anywhere), the
 * same content at the same block, and distinct contents (what a content cache keeps).
 */
export function overlap(of, against) {
  const contents = new Set(against.blocks.values());
  let sameContent = 0;
  let sameOffset = 0;
  let sameOffsetAnyContent = 0;
  const distinct = new Set();
  for (const [b, d] of of.blocks) {
    distinct.add(d);
    if (contents.has(d)) sameContent++;
    const there = against.blocks.get(b);
    if (there !== undefined) {
      sameOffsetAnyContent++;
      if (there === d) sameOffset++;
    }
  }
  const n = of.blocks.size;
  return {
    blocks: n,
    distinctContents: distinct.size,
    sameContent,
    sameContentShare: n ? sameContent / n : 0,
    sameOffsetSameContent: sameOffset,
    sameOffsetSameContentShare: n ? sameOffset / n : 0,
    sameOffsetAnyContent,
  };
}

/**
 * The digests of a file's blocks as a filesystem with `blockSize` blocks
 * stores them (the last one padded with zeros): to tell which boot blocks
 * are that file's (the guest's initramfs, its kernel).
 */
export async function fileBlockDigests(path, blockSize = 4096) {
  const data = await readFile(path);
  const out = new Set();
  for (let at = 0; at < data.length; at += blockSize) {
    const block = Buffer.alloc(blockSize);
    data.copy(block, 0, at, Math.min(at + blockSize, data.length));
    out.add(createHash('sha256').update(block).digest('hex'));
  }
  return out;
}

/** Of `of`'s blocks whose content `against` does not hold: how many are blocks of each named file. */
export function unmatchedByFile(of, against, files) {
  const contents = new Set(against.blocks.values());
  const counts = Object.fromEntries(Object.keys(files).map((k) => [k, 0]));
  let unmatched = 0;
  let other = 0;
  for (const d of of.blocks.values()) {
    if (contents.has(d)) continue;
    unmatched++;
    const file = Object.keys(files).find((k) => files[k].has(d));
    if (file) counts[file]++;
    else other++;
  }
  return { unmatched, ...counts, other };
}

/** Distinct contents over several boots: what a content-addressed cache of them all holds at best. */
export function distinctContents(boots) {
  const all = new Set();
  let blocks = 0;
  for (const b of boots) {
    blocks += b.blocks.size;
    for (const d of b.blocks.values()) all.add(d);
  }
  return { blocks, distinct: all.size, ratio: all.size ? blocks / all.size : 1 };
}

if (process.argv[1] && import.meta.url === new URL(`file://${process.argv[1]}`).href) {
  const [mapA, segA, mapB, segB, indexC] = process.argv.slice(2);
  if (!segB) {
    console.error('usage: node bench/content/overlap.js MAP_A SEG_A MAP_B SEG_B [INDEX_C]');
    process.exit(2);
  }
  const a = await bootBlocks(mapA, segA);
  const b = await bootBlocks(mapB, segB);
  const out = { bOverA: overlap(b, a), aOverB: overlap(a, b), both: distinctContents([a, b]) };
  if (indexC) out.aOverIndexC = overlap(a, await indexBlocks(indexC));
  console.log(JSON.stringify(out, null, 2));
}
