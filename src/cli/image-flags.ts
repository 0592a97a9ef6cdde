import { Flags } from '@oclif/core';
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
  return openImage(path, options);
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
