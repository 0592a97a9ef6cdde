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
 * Each layer's inputs are in its LayerInfo (DiskImage.layers()); the agent's
 * cache derives the spaces shared across backing chains from them
 * (src/agent/cache/spaces.ts).
 *
 * Copying an image must keep its mtime (cp -p, rsync -a) for its map and
 * segment to stay valid; otherwise the agent records and rebuilds them.
 */
import { createHash } from 'node:crypto';
import type { ImageFormat } from './types.js';

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

export function sha256Hex(...parts: Buffer[]): string {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest('hex');
}
