import { realpath } from 'node:fs/promises';
import { BackingChainError, fromSystemError } from '../errors.js';
import { FileByteSource, fileSourceOpener } from './file-source.js';
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
 * Opens an image on `source`; `chainKeys` holds the canonical keys of the
 * layers above it (cycle detection). The image takes ownership of `source`.
 */
export async function openImageFromSource(
  source: ByteSource,
  opener: SourceOpener,
  options: OpenImageOptions,
  chainKeys: string[],
  format?: ImageFormat,
): Promise<DiskImage> {
  try {
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
    await source.close().catch(() => undefined);
    throw err;
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
