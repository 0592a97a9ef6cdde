import { Listr, type ListrTask } from 'listr2';

/**
 * Runs tasks with a listr2 task list on a TTY; silently otherwise (under
 * --json, in CI, in pipes), so machine output stays clean.
 */
export async function runTasks<Ctx extends object>(
  tasks: ListrTask<Ctx>[],
  ctx: Ctx,
  interactive: boolean,
): Promise<Ctx> {
  const list = interactive
    ? new Listr<Ctx>(tasks, { ctx, exitOnError: true, rendererOptions: { collapseSubtasks: false } })
    : new Listr<Ctx, 'silent'>(tasks, { ctx, exitOnError: true, renderer: 'silent' });
  return list.run();
}

/** Human-readable bytes: 1536 -> "1.5 KiB". */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value >= 100 ? 0 : 1)} ${units[unit]}`;
}
