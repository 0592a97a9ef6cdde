import type { EvictResult } from '../../agent/cache-catalog.js';
import { controlRequest } from '../../agent/control.js';
import { controlFlag, exportArg } from '../../cli/agent-control.js';
import { BaseCommand, commandUsage, exitCodesHelp } from '../../cli/base-command.js';
import { formatBytes } from '../../cli/progress.js';
import { ExitCode } from '../../errors.js';

const EXIT_CODES = exitCodesHelp([ExitCode.BAD_INPUT, ExitCode.IO, ExitCode.AGENT], {
  [ExitCode.BAD_INPUT]: 'the agent has no such export, and its cache knows no image of that name',
  [ExitCode.IO]: 'the cache device failed',
  [ExitCode.AGENT]: 'the control socket is unreachable',
});

export default class AgentEvict extends BaseCommand<typeof AgentEvict> {
  static override summary = "Drop an export's blocks from a running agent's cache.";
  static override description = `Drops every cached block of the export's backing chain: the spaces of its current version, of older versions still open, and of the versions the agent recorded under that name (so an image already deleted from storage can be evicted too). A backing layer shared with sibling overlays is dropped as well: they read its blocks from storage again ("sharedWith" names them). Safe while VMs are connected: their reads then come from storage, never a wrong byte. The --json result has "export", "blocks" and "bytes" dropped, and "spaces": {"space", "blocks", "bytes", "layers", "sharedWith"}.

${EXIT_CODES}`;

  static override examples = [
    '<%= config.bin %> <%= command.id %> debian12.qcow2',
    '<%= config.bin %> <%= command.id %> vm-a.qcow2 --json',
    '<%= config.bin %> <%= command.id %> old/debian11.qcow2 --control /tmp/agent.ctl',
  ];

  static override args = {
    export: exportArg(),
  };

  static override flags = {
    control: controlFlag(),
  };

  static override usage = commandUsage(this);

  async run(): Promise<EvictResult> {
    const r = await controlRequest<EvictResult>(this.flags.control, 'POST', `/evict?export=${encodeURIComponent(this.args.export)}`);
    const count = r.spaces.length === 1 ? '1 space' : `${r.spaces.length} spaces`;
    this.log(`${r.export}: dropped ${r.blocks} blocks (${formatBytes(r.bytes)}) in ${count}`);
    for (const s of r.spaces) {
      if (s.sharedWith.length === 0) continue;
      this.log(`  ${s.layers?.join(' > ') ?? s.space.slice(0, 12)}: ${formatBytes(s.bytes)} shared with ${s.sharedWith.join(', ')}, which read it from storage again`);
    }
    return r;
  }
}
