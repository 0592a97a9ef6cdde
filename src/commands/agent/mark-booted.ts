import { Args, Flags } from '@oclif/core';
import type { BootSummary } from '../../agent/boot-recorder.js';
import { DEFAULT_CONTROL } from '../../agent/config.js';
import { controlRequest } from '../../agent/control.js';
import { BaseCommand, commandUsage, exitCodesHelp } from '../../cli/base-command.js';
import { ExitCode } from '../../errors.js';


const EXIT_CODES = exitCodesHelp([ExitCode.BAD_INPUT, ExitCode.AGENT], {
  [ExitCode.BAD_INPUT]: 'the agent has no such export',
  [ExitCode.AGENT]: 'the control socket is unreachable',
});

export default class AgentMarkBooted extends BaseCommand<typeof AgentMarkBooted> {
  static override summary = 'Tell the agent that the boot of an export is over.';
  static override description = `The explicit end-of-boot signal: the agent stops recording the export's boot, merges the recorded blocks into IMAGE.bcmap and publishes a new IMAGE.bcseg. Use it from the guest's "boot complete" hook or the orchestrator.

${EXIT_CODES}`;

  static override examples = ['<%= config.bin %> <%= command.id %> debian12.qcow2', '<%= config.bin %> <%= command.id %> debian12.qcow2 --control /tmp/agent.ctl --json'];

  static override args = {
    export: Args.string({ description: 'Export name (the image path relative to the storage root).', required: true }),
  };

  static override flags = {
    control: Flags.string({ description: "The agent's control socket.", helpValue: 'PATH', default: DEFAULT_CONTROL }),
  };

  static override usage = commandUsage(this);

  async run(): Promise<BootSummary> {
    const summary = await controlRequest<BootSummary>(
      this.flags.control,
      'POST',
      `/mark-booted?export=${encodeURIComponent(this.args.export)}`,
    );
    this.log(`${this.args.export}: boot ${summary.state} (${summary.endReason ?? 'recording'}), ${summary.reads} reads, ${summary.blocks} blocks, ${(summary.durationMs / 1000).toFixed(1)} s`);
    return summary;
  }
}
