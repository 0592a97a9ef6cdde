/**
 * Image identity: a cheap fingerprint that ties maps and segments to one
 * version of one image, without reading the whole image.
 *
 * identity = SHA-256 over a canonical JSON of
 *   { v: 1, format, virtualSize, layers: [ { format, stamp, metadata } ... ] }
 * with one entry per layer of the backing chain, top first, where
 * - stamp    is the storage identity of the layer (size and mtime in ns for a
 *            file, size and ETag for an object): any rewrite changes it;
 * - metadata is a SHA-256 of the format's own metadata: for qcow2 the header
 *            cluster (header and header extensions) and the L1 table; for raw
 *            the first and last 64 KiB (partition tables, boot sectors).
 *
 * Owner identity (cache spaces shared across a backing chain): the bytes a
 * layer supplies itself (its data, compressed and zero clusters) depend on
 * that layer's file alone, so they are named by
 *   layerOwner = identity of that layer as if it were the whole chain,
 *                i.e. computeIdentity(format, its virtualSize, [its layer])
 * which is the image identity of a layer without backing file. Zeros read
 * past the end of a shorter backing file depend on the backing file's size
 * too: they are owned by the identity of the sub-chain from the layer that
 * reads them as zeros.
 *
 * Copying an image must keep its mtime (cp -p, rsync -a) for its map and
 * segment to stay valid; otherwise the agent records and rebuilds them.
 */
import { createHash } from 'node:crypto';
import type { ImageFormat, LayerInfo } from './types.js';

export interface LayerIdentity {
  format: ImageFormat;
  stamp: string;
  metadata: string;
}

export const IDENTITY_VERSION = 1;

export function computeIdentity(format: ImageFormat, virtualSize: number, layers: LayerIdentity[]): string {
  const canonical = JSON.stringify({
    v: IDENTITY_VERSION,
    format,
    virtualSize,
    layers: layers.map((l) => ({ format: l.format, stamp: l.stamp, metadata: l.metadata })),
  });
  return createHash('sha256').update(canonical).digest('hex');
}

/**
 * Every space an image's blocks may be cached under: its identity, and per
 * layer its owner identity and the identity of the sub-chain it starts.
 */
export function chainSpaces(image: ChainImage): string[] {
  return chainSpaceLayers(image).map((s) => s.space);
}

/**
 * chainSpaces, each with the layers whose files determine its bytes
 * (indexes into image.layers(), top is 0): every layer for the image's
 * identity, layer i alone for its owner identity, i to the last for its sub-chain.
 */
export function chainSpaceLayers(image: ChainImage): Array<{ space: string; first: number; last: number }> {
  const infos = image.layers();
  const ids = image.identityLayers();
  const last = infos.length - 1;
  const spaces = new Map<string, { space: string; first: number; last: number }>();
  const add = (space: string, first: number, to: number): void => {
    if (!spaces.has(space)) spaces.set(space, { space, first, last: to });
  };
  add(image.identity, 0, last);
  infos.forEach((info, i) => {
    add(computeIdentity(info.format, info.virtualSize, [ids[i]!]), i, i);
    add(computeIdentity(info.format, info.virtualSize, ids.slice(i)), i, last);
  });
  return [...spaces.values()];
}

/** What chainSpaces needs of an image. */
export type ChainImage = { layers(): LayerInfo[]; identityLayers(): LayerIdentity[]; identity: string };

export function sha256Hex(...parts: Buffer[]): string {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest('hex');
}
