import { Flags } from '@oclif/core';
import { UnknownFileTypeError } from '../errors.js';
import { DEFAULT_RAW_EXTENSIONS, hasRawExtension } from '../image/disk-names.js';
import { openImage } from '../image/open.js';
import type { DiskImage } from '../image/types.js';

/** Flags shared by every command that opens an image. */
export const imageFlags = {
  format: Flags.string({
    description: 'Image format; probed from the first bytes when omitted.',
    options: ['raw', 'qcow2'],
  }),
  force: Flags.boolean({
    description: 'Open a qcow2 image even when its corrupt bit is set.',
    default: false,
  }),
};

export async function openImageFromFlags(path: string, flags: { format?: string | undefined; force?: boolean }): Promise<DiskImage> {
  const options: Parameters<typeof openImage>[1] = { force: flags.force ?? false };
  if (flags.format === 'raw' || flags.format === 'qcow2') options.format = flags.format;
  return checkProbedDisk(await openImage(path, options), path, flags.format);
}

/**
 * A probed image that is not qcow2 is raw only by its name (.raw, .img):
 * any file reads as a raw image, so a README must not. `--format raw` says so
 * for any name.
 */
export async function checkProbedDisk(image: DiskImage, name: string, format: string | undefined): Promise<DiskImage> {
  if (format !== undefined || image.format !== 'raw' || hasRawExtension(name)) return image;
  await image.close();
  throw new UnknownFileTypeError(`is not a disk image: not qcow2, and not named *${DEFAULT_RAW_EXTENSIONS.join(' or *')}; pass --format raw to read it as a raw image`, { file: name });
}

/** Runs `fn` with the image open, closing it whatever happens. */
export async function withImage<T>(
  path: string,
  flags: { format?: string | undefined; force?: boolean },
  fn: (image: DiskImage) => Promise<T>,
): Promise<T> {
  const image = await openImageFromFlags(path, flags);
  try {
    return await fn(image);
  } finally {
    await image.close();
  }
}
