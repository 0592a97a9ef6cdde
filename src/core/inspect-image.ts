import { imageDataBytes } from '../image/data-bytes.js';
import type { DiskImage, LayerInfo } from '../image/types.js';

export interface ImageInspection {
  kind: 'image';
  path: string;
  format: DiskImage['format'];
  virtualSize: number;
  /** qcow2 only */
  clusterSize?: number;
  /** Host bytes holding data in the top layer (qcow2 data clusters; raw: file size). */
  allocatedBytes: number;
  /** Guest bytes that read as data through the chain (not zero, not unallocated). */
  dataBytes: number;
  identity: string;
  /** The backing chain below the image, nearest first. */
  backingChain: Array<Pick<LayerInfo, 'name' | 'format' | 'virtualSize' | 'fileSize' | 'allocatedBytes'>>;
  /** The chain, top first, without the identity inputs (the identity stands for them). */
  layers: Array<Omit<LayerInfo, 'stamp' | 'metadata'>>;
}

/** Guest-visible facts about an image, from its metadata only (no data reads). */
export async function inspectImage(image: DiskImage): Promise<ImageInspection> {
  const layers = image.layers();
  const top = layers[0]!;
  const dataBytes = await imageDataBytes(image);
  const result: ImageInspection = {
    kind: 'image',
    path: image.name,
    format: image.format,
    virtualSize: image.virtualSize,
    allocatedBytes: top.allocatedBytes,
    dataBytes,
    identity: image.identity,
    backingChain: layers.slice(1).map(({ name, format, virtualSize, fileSize, allocatedBytes }) => ({
      name, format, virtualSize, fileSize, allocatedBytes,
    })),
    layers: layers.map(({ stamp: _stamp, metadata: _metadata, ...layer }) => layer),
  };
  if (top.clusterSize !== undefined) result.clusterSize = top.clusterSize;
  return result;
}
