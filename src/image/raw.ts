import { InvalidImageError } from '../errors.js';
import { readSourceInto } from './file-source.js';
import { computeIdentity, sha256Hex, type LayerIdentity } from './identity.js';
import type { ByteSource, DiskImage, ImageExtent, LayerInfo } from './types.js';

const IDENTITY_SAMPLE = 64 * 1024;

/** A raw image: guest bytes are the file bytes. */
export class RawImage implements DiskImage {
  readonly format = 'raw' as const;
  readonly identity: string;

  private constructor(
    private readonly source: ByteSource,
    private readonly layerIdentity: LayerIdentity,
  ) {
    this.identity = computeIdentity('raw', source.size, [layerIdentity]);
  }

  static async open(source: ByteSource): Promise<RawImage> {
    const head = await source.read(0, Math.min(IDENTITY_SAMPLE, source.size));
    const tailStart = Math.max(0, source.size - IDENTITY_SAMPLE);
    const tail = await source.read(tailStart, source.size - tailStart);
    return new RawImage(source, { format: 'raw', stamp: source.stamp, metadata: sha256Hex(head, tail) });
  }

  get name(): string {
    return this.source.name;
  }

  get virtualSize(): number {
    return this.source.size;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkRange(this, offset, length);
    return this.source.read(offset, length);
  }

  async readInto(offset: number, length: number, target: Buffer, targetOffset: number): Promise<void> {
    checkRange(this, offset, length);
    return readSourceInto(this.source, offset, length, target, targetOffset);
  }

  async extents(offset: number, length: number): Promise<ImageExtent[]> {
    checkRange(this, offset, length);
    return length === 0 ? [] : [{ offset, length, kind: 'data', depth: 0 }];
  }

  layers(): LayerInfo[] {
    return [
      {
        name: this.source.name,
        format: 'raw',
        virtualSize: this.source.size,
        fileSize: this.source.size,
        allocatedBytes: this.source.size,
        stamp: this.layerIdentity.stamp,
        metadata: this.layerIdentity.metadata,
      },
    ];
  }

  async close(): Promise<void> {
    await this.source.close();
  }
}

/** Rejects reads outside [0, virtualSize). */
export function checkRange(image: Pick<DiskImage, 'name' | 'virtualSize'>, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 ||
      offset + length > image.virtualSize) {
    throw new InvalidImageError(
      `read of ${length} bytes at offset ${offset} is outside the virtual disk (${image.virtualSize} bytes)`,
      { file: image.name },
    );
  }
}
