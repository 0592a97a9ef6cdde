import type { CacheListing, CachedSpace } from '../../agent/cache-catalog.js';
import { controlRequest } from '../../agent/control.js';
import { CONTENT_SPACE } from '../../agent/content-blocks.js';
import { controlFlag } from '../../cli/agent-control.js';
import { BaseCommand, commandUsage, exitCodesHelp } from '../../cli/base-command.js';
import { formatBytes } from '../../cli/progress.js';
import { ExitCode } from '../../errors.js';

const EXIT_CODES = exitCodesHelp([ExitCode.AGENT], { [ExitCode.AGENT]: 'the control socket is unreachable' });

export default class AgentCache extends BaseCommand<typeof AgentCache> {
  static override summary = "List the images in a running agent's cache, with their bytes and last boot.";
  static override description = `One row per cache space: the identity of an image, or of a layer or sub-chain of its backing chain (overlays on one backing file share its space). The --json result has "blockSize", "capacityBytes", "usedBytes" and "spaces", largest first: {"space" (the identity hash), "blocks", "bootBlocks", "bytes" and "bootBytes" (blocks × block size, boot blocks included in "bytes"), "lastBootedAt" (ISO 8601, when an image of it last booted), "layers" (storage keys of the layers its bytes depend on, top first; absent when the agent does not know where the space comes from), "images" (exports opened through it), "openBy" (exports using it now)}. Spaces the agent knows from its registry (DIR/spaces.json in the cache directory) are listed with 0 blocks once evicted.

${EXIT_CODES}`;

  static override examples = ['<%= config.bin %> <%= command.id %>', '<%= config.bin %> <%= command.id %> --control /tmp/agent.ctl --json'];

  static override flags = {
    control: controlFlag(),
  };

  static override usage = commandUsage(this);

  async run(): Promise<CacheListing> {
    const listing = await controlRequest<CacheListing>(this.flags.control, 'GET', '/cache');
    this.log(`cache: ${formatBytes(listing.usedBytes)} of ${formatBytes(listing.capacityBytes)} used, ${listing.spaces.length} spaces, ${formatBytes(listing.blockSize)} blocks`);
    if (listing.spaces.length > 0) this.log(spaceTable(listing.spaces));
    return listing;
  }
}

/** Aligned columns; the space as its first 12 hex digits (as git shortens hashes). */
function spaceTable(spaces: CachedSpace[]): string {
  const rows = [
    ['SPACE', 'BYTES', 'BOOT', 'LAST BOOT', 'LAYERS', 'IMAGES'],
    ...spaces.map((s) => [
      s.space.slice(0, 12),
      formatBytes(s.bytes),
      formatBytes(s.bootBytes),
      s.lastBootedAt ?? '-',
      s.space === CONTENT_SPACE ? '(content, every image)' : s.layers === undefined ? '(unknown origin)' : s.layers.join(' > '),
      [...s.images.map((i) => (s.openBy.includes(i) ? `${i} (open)` : i)), ...s.openBy.filter((o) => !s.images.includes(o)).map((o) => `${o} (open)`)].join(', ') || '-',
    ]),
  ];
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows.map((r) => r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]!))).join('  ')).join('\n');
}
