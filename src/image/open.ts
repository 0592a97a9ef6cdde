import { realpath } from 'node:fs/promises';
import { BackingChainError, fromSystemError } from '../errors.js';
import { FileByteSource, checkTarget, fileSourceOpener, readSourceInto } from './file-source.js';
import { Qcow2Image, QCOW2_MAGIC } from './qcow2/image.js';
import { RawImage } from './raw.js';
import type { ByteSource, DiskImage, ImageFormat, OpenImageOptions, SourceOpener } from './types.js';

export const DEFAULT_MAX_CHAIN_DEPTH = 16;

/** Opens a local image file, probing its format unless one is given. */
export async function openImage(path: string, options: OpenImageOptions = {}): Promise<DiskImage> {
  const source = await FileByteSource.open(path);
  let key: string;
  try {
    key = await realpath(path);
  } catch (err) {
    await source.close();
    throw fromSystemError(err, path, 'resolving path');
  }
  return openImageFromSource(source, fileSourceOpener, options, [key], options.format);
}

/** Format from the first bytes: qcow2 magic, or raw. */
export async function probeFormat(source: ByteSource): Promise<ImageFormat> {
  if (source.size < 4) return 'raw';
  const magic = await source.read(0, 4);
  return magic.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
}

/**
 * Opens an image on `stored`; `chainKeys` holds the canonical keys of the
 * layers above it (cycle detection). The image takes ownership of `stored`.
 */
export async function openImageFromSource(
  stored: ByteSource,
  opener: SourceOpener,
  options: OpenImageOptions,
  chainKeys: string[],
  format?: ImageFormat,
): Promise<DiskImage> {
  try {
    const source = new HeadServedSource(stored, await stored.read(0, Math.min(stored.size, OPEN_HEAD_BYTES)));
    const fmt = format ?? (await probeFormat(source));
    if (fmt === 'raw') return await RawImage.open(source);
    const maxDepth = options.maxChainDepth ?? DEFAULT_MAX_CHAIN_DEPTH;
    return await Qcow2Image.open(source, {
      force: options.force ?? false,
      openBacking: async (name: string, backingFormat: ImageFormat | undefined) => {
        checkBackingName(source.name, name);
        if (chainKeys.length >= maxDepth) {
          throw new BackingChainError(`backing chain is deeper than ${maxDepth} images`, { file: source.name });
        }
        const { source: backingSource, key } = await opener.openRelative(source, name);
        if (chainKeys.includes(key)) {
          await backingSource.close();
          throw new BackingChainError(`backing chain has a cycle: ${JSON.stringify(name)} is already in the chain`, {
            file: source.name,
          });
        }
        return openImageFromSource(backingSource, opener, options, [...chainKeys, key], backingFormat);
      },
    });
  } catch (err) {
    await stored.close().catch(() => undefined);
    throw err;
  }
}

/**
 * Bytes read at once when an image is opened: the format probe, the raw
 * identity sample and the qcow2 header (in its first cluster) are then served
 * from one request instead of three or more, each a round trip on an object
 * store.
 */
export const OPEN_HEAD_BYTES = 64 * 1024;

/**
 * A source whose first bytes are served from memory, for as long as it is
 * open: they are of the version opened, which is the only version the
 * source's other reads return (ByteSource.version), and a raw image's head
 * is the guest's first read, the boot sector, which then costs no round trip.
 */
class HeadServedSource implements ByteSource {
  constructor(
    private readonly inner: ByteSource,
    private readonly head: Buffer,
  ) {}

  get name(): string {
    return this.inner.name;
  }

  get size(): number {
    return this.inner.size;
  }

  get stamp(): string {
    return this.inner.stamp;
  }

  get version(): string {
    return this.inner.version;
  }

  read(offset: number, length: number): Promise<Buffer> {
    const head = this.head;
    if (offset >= 0 && length >= 0 && offset + length <= head.length) {
      return Promise.resolve(Buffer.from(head.subarray(offset, offset + length)));
    }
    return this.inner.read(offset, length);
  }

  readInto(offset: number, length: number, target: Buffer, targetOffset: number): Promise<void> {
    const head = this.head;
    if (offset >= 0 && length >= 0 && offset + length <= head.length) {
      checkTarget(target, targetOffset, length);
      head.copy(target, targetOffset, offset, offset + length);
      return Promise.resolve();
    }
    return readSourceInto(this.inner, offset, length, target, targetOffset);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}

/** Backing names must be plain file names: no protocols, no json: pseudo-names. */
function checkBackingName(file: string, name: string): void {
  if (name.length === 0) throw new BackingChainError('empty backing file name', { file });
  if (name.startsWith('json:')) {
    throw new BackingChainError(`backing file name ${JSON.stringify(name)} uses the json: syntax, which is refused`, { file });
  }
  // QEMU treats "proto:..." as a protocol when the part before ':' has no '/'.
  const colon = name.indexOf(':');
  if (colon > 0 && !name.slice(0, colon).includes('/')) {
    throw new BackingChainError(`backing file name ${JSON.stringify(name)} names a protocol, which is refused`, { file });
  }
  if (name.includes('\0')) throw new BackingChainError('backing file name contains a NUL byte', { file });
}
