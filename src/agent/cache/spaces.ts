/**
 * Cache spaces of an image: under which identity the cache keeps a block,
 * so that images sharing a backing file share its cached blocks.
 *
 * Owner identity: the bytes a layer supplies itself (its data, compressed and
 * zero clusters) depend on that layer's file alone, so they are named by
 *   layer owner = identity of that layer as if it were the whole chain,
 *                 i.e. computeIdentity(format, its virtualSize, [its layer])
 * which is the image identity of a layer without backing file. Zeros read
 * past the end of a shorter backing file depend on the backing file's size
 * too: they are owned by the identity of the sub-chain from the layer that
 * reads them as zeros. For the bottom layer both are the same.
 *
 * Everything here follows from image facts: each layer's identity inputs
 * (DiskImage.layers()) and which layer decides each range (the depth of
 * DiskImage.extents()).
 */
import { computeIdentity } from '../../image/identity.js';
import { checkRange } from '../../image/raw.js';
import type { DiskImage, ImageExtent, LayerInfo } from '../../image/types.js';

/** What the spaces of an image are computed from. */
export type SpaceSource = Pick<DiskImage, 'name' | 'virtualSize' | 'identity' | 'layers' | 'extents'>;

export class ImageSpaces {
  /** Per layer, top first: owner identity of the bytes the layer supplies itself. */
  private readonly layerOwners: string[];
  /** Per layer, top first: identity of the sub-chain it starts (its zeros past its backing file's end). */
  private readonly subChains: string[];

  constructor(private readonly image: SpaceSource) {
    const layers = image.layers();
    this.layerOwners = layers.map((layer) => layerIdentity(layer, [layer]));
    this.subChains = layers.map((layer, i) => layerIdentity(layer, layers.slice(i)));
  }

  /** More than one layer: blocks may belong to a backing file's space. */
  get layered(): boolean {
    return this.layerOwners.length > 1;
  }

  /**
   * Every space this image's blocks may be cached under: its identity, and
   * per layer its owner identity and the identity of the sub-chain it starts.
   */
  all(): string[] {
    return chainSpaceLayers(this.image).map((s) => s.space);
  }

  /**
   * The space that determines the bytes of [offset, offset+length): the owner
   * identity of the one layer that supplies the whole range, or undefined when
   * layers mix within it. Single-layer images (and empty ranges) answer the
   * image identity without any lookup.
   */
  async owner(offset: number, length: number): Promise<string | undefined> {
    if (!this.layered || length === 0) {
      checkRange(this.image, offset, length);
      return this.image.identity;
    }
    return this.ownerOf(await this.image.extents(offset, length));
  }

  /** The one owner of all of `extents` (of this image), or undefined when they have several. */
  ownerOf(extents: readonly ImageExtent[]): string | undefined {
    let owner: string | undefined;
    for (const extent of extents) {
      // Unallocated at depth d: zeros decided by the sub-chain from d (the bottom layer, or past its backing file's end).
      const o = (extent.kind === 'unallocated' ? this.subChains : this.layerOwners)[extent.depth];
      if (o === undefined || (owner !== undefined && o !== owner)) return undefined;
      owner = o;
    }
    return owner;
  }
}

/** Every space an image's blocks may be cached under (ImageSpaces.all). */
export function chainSpaces(image: ChainImage): string[] {
  return chainSpaceLayers(image).map((s) => s.space);
}

/** What the spaces of a chain depend on: its identity and its layers. */
export type ChainImage = Pick<DiskImage, 'identity' | 'layers'>;

/**
 * chainSpaces, each with the layers whose files determine its bytes
 * (indexes into image.layers(), top is 0): every layer for the image's
 * identity, layer i alone for its owner identity, i to the last for its sub-chain.
 */
export function chainSpaceLayers(image: ChainImage): Array<{ space: string; first: number; last: number }> {
  const layers = image.layers();
  const last = layers.length - 1;
  const spaces = new Map<string, { space: string; first: number; last: number }>();
  const add = (space: string, first: number, to: number): void => {
    if (!spaces.has(space)) spaces.set(space, { space, first, last: to });
  };
  add(image.identity, 0, last);
  layers.forEach((layer, i) => {
    add(layerIdentity(layer, [layer]), i, i);
    add(layerIdentity(layer, layers.slice(i)), i, last);
  });
  return [...spaces.values()];
}

function layerIdentity(top: LayerInfo, chain: LayerInfo[]): string {
  return computeIdentity(top.format, top.virtualSize, chain);
}
