/**
 * Console and firmware lines after which the boot cannot succeed, so that
 * profile stops at once (exit 6) instead of waiting for --timeout. A line
 * that matches --until is never fatal: --until 'Kernel panic' still ends a
 * boot well.
 */

interface FatalLine {
  pattern: RegExp;
  /** Printed without a newline after it (a prompt): the line being written counts. */
  prompt?: boolean;
}

const FATAL_LINES: readonly FatalLine[] = [
  // SeaBIOS src/boot.c boot_fail(): every boot device failed.
  { pattern: /^No bootable device\./ },
  // SeaBIOS src/boot.c boot_disk() and boot_cdrom(): "Boot failed: not a bootable disk", "... could not read the boot disk".
  { pattern: /^Boot failed\b/ },
  // Linux kernel/panic.c panic(): "Kernel panic - not syncing: ...".
  { pattern: /\bKernel panic\b/ },
  // GRUB's rescue shell: it found no usable configuration or modules.
  { pattern: /^grub rescue>/, prompt: true },
];

/**
 * The line, when it is fatal. `complete` is false for the line still being
 * written, which only a prompt can match (the rest of a line may yet come).
 */
export function isFatalBootLine(line: string, complete: boolean): boolean {
  const text = line.trim();
  if (text.length === 0) return false;
  return FATAL_LINES.some((f) => (complete || f.prompt === true) && f.pattern.test(text));
}
