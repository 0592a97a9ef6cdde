/**
 * Which files are disk images: a qcow2 image by its magic, a raw image by
 * its name (`.raw`, `.img` by default). A raw image has no header, so any
 * file "is" one; without this rule a README or a log in the storage root
 * would be served to VMs as a disk.
 */
import { QCOW2_MAGIC } from './qcow2/image.js';

export const DEFAULT_RAW_EXTENSIONS = ['.raw', '.img'];

/** Whether `name` ends in one of `extensions` (case-insensitive). */
export function hasRawExtension(name: string, extensions: readonly string[] = DEFAULT_RAW_EXTENSIONS): boolean {
  const lower = name.toLowerCase();
  return extensions.some((e) => lower.endsWith(e.toLowerCase()));
}

/** Whether `head` (the first bytes of a file) starts with the qcow2 magic ("QFI\xfb", qcow2.rst "Header"). */
export function isQcow2Head(head: Uint8Array): boolean {
  return head.length >= 4 && Buffer.from(head.buffer, head.byteOffset, 4).readUInt32BE(0) === QCOW2_MAGIC;
}

/** The rule in one line, for --help and errors. */
export function diskRule(extensions: readonly string[] = DEFAULT_RAW_EXTENSIONS): string {
  return `a qcow2 image (by its header) or a raw image named *${extensions.join(', *')}`;
}
