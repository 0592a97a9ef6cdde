import { Flags } from '@oclif/core';
import type { WarmResult } from '../../agent/agent.js';
import { controlRequest } from '../../agent/control.js';
import { controlFlag, exportArg } from '../../cli/agent-control.js';
import { BaseCommand, commandUsage, exitCodesHelp } from '../../cli/base-command.js';
import { formatBytes } from '../../cli/progress.js';
import { ExitCode } from '../../errors.js';

const EXIT_CODES = exitCodesHelp([ExitCode.BAD_INPUT, ExitCode.IO, ExitCode.AGENT], {
  [ExitCode.BAD_INPUT]: 'the agent has no such export, or no map and segment of it are published',
  [ExitCode.IO]: 'the stream failed (storage or cache)',
  [ExitCode.AGENT]: 'the control socket is unreachable',
});

export default class AgentWarm extends BaseCommand<typeof AgentWarm> {
  static override summary = "Stream an export's boot segment into this host's cache before any VM starts.";
  static override description = `Pre-seeding: the agent streams the image's published segment into its cache device, as it would on the first open, and answers when the stream has ended. The first boot of the image on this host is then served from the cache. Nothing is recorded as a boot. Run it after an image is published, or when a host joins the fleet.

${EXIT_CODES}`;

  static override examples = ['<%= config.bin %> <%= command.id %> debian12.qcow2', '<%= config.bin %> <%= command.id %> pool/debian12.qcow2 --control /tmp/agent.ctl --json'];

  static override args = {
    export: exportArg(),
  };

  static override flags = {
    control: controlFlag(),
    timeout: Flags.integer({ description: 'Seconds to wait for the stream to end (default 600).', helpValue: 'SECONDS', default: 600 }),
  };

  static override usage = commandUsage(this);

  async run(): Promise<WarmResult> {
    const r = await controlRequest<WarmResult>(this.flags.control, 'POST', `/warm?export=${encodeURIComponent(this.args.export)}`, this.flags.timeout * 1000);
    const skipped = r.blocksCached > 0 && r.storageBytes === 0 ? ', every block was cached already' : '';
    this.log(
      `${r.export}: ${r.state}, ${r.blocks} blocks (${formatBytes(r.bytesTotal)}), ${formatBytes(r.storageBytes)} read from storage in ${r.seconds.toFixed(1)} s${skipped}`,
    );
    return r;
  }
}
