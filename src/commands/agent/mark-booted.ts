import { Flags } from '@oclif/core';
import type { BootSummary } from '../../agent/boot-recorder.js';
import { waitForConsoleLine } from '../../agent/console-watch.js';
import { controlRequest } from '../../agent/control.js';
import { controlFlag, exportArg } from '../../cli/agent-control.js';
import { BaseCommand, commandUsage, exitCodesHelp } from '../../cli/base-command.js';
import { ExitCode } from '../../errors.js';
import { parseUntil } from '../../profile/console.js';
import { DEFAULT_UNTIL } from '../../profile/end-of-boot.js';

const EXIT_CODES = exitCodesHelp([ExitCode.BAD_INPUT, ExitCode.BOOT_TIMEOUT, ExitCode.AGENT], {
  [ExitCode.BAD_INPUT]: 'the agent has no such export, or it has no boot recorded',
  [ExitCode.BOOT_TIMEOUT]: 'with --console: no line matched --until before --timeout',
  [ExitCode.AGENT]: 'the control socket is unreachable',
});

export type MarkBootedResult = BootSummary & { consoleLine?: string };

export default class AgentMarkBooted extends BaseCommand<typeof AgentMarkBooted> {
  static override summary = 'Tell the agent that the boot of an export is over.';
  static override description = `The explicit end-of-boot signal: the agent stops recording the export's boot, merges the recorded blocks into IMAGE.bcmap and publishes a new IMAGE.bcseg.

With --console, it waits first for the guest to say that it has booted: it follows the VM's serial console log (QEMU's -serial file:PATH) until a line matches --until (default: a login prompt or BOOTCACHE-BOOT-COMPLETE), then marks the boot. Start it next to the VM. A guest can print its own marker from a systemd unit ordered after multi-user.target (ExecStart=/bin/sh -c 'echo BOOTCACHE-BOOT-COMPLETE > /dev/ttyS0').

${EXIT_CODES}`;

  static override examples = [
    '<%= config.bin %> <%= command.id %> debian12.qcow2',
    '<%= config.bin %> <%= command.id %> debian12.qcow2 --console /var/log/vm1-serial.log',
    "<%= config.bin %> <%= command.id %> debian12.qcow2 --console /var/log/vm1-serial.log --until 'BOOT-OK' --json",
  ];

  static override args = {
    export: exportArg(),
  };

  static override flags = {
    control: controlFlag(),
    console: Flags.string({ description: "Wait for a line on this serial console log (QEMU's -serial file:PATH) before marking the boot.", helpValue: 'FILE' }),
    until: Flags.string({ description: `With --console: the line that says the guest has booted, a regular expression (default ${DEFAULT_UNTIL}).`, helpValue: 'REGEX' }),
    timeout: Flags.integer({ description: 'With --console: seconds to wait for the line (default 600).', helpValue: 'SECONDS', default: 600 }),
    'from-start': Flags.boolean({ description: 'With --console: read the log from its start, not from where it ends now.', default: false }),
  };

  static override usage = commandUsage(this);

  async run(): Promise<MarkBootedResult> {
    const f = this.flags;
    let consoleLine: string | undefined;
    if (f.console !== undefined) {
      consoleLine = await waitForConsoleLine(f.console, { until: parseUntil(f.until ?? DEFAULT_UNTIL), timeoutMs: f.timeout * 1000, fromStart: f['from-start'] });
    }
    const summary = await controlRequest<BootSummary>(f.control, 'POST', `/mark-booted?export=${encodeURIComponent(this.args.export)}`);
    const seen = consoleLine === undefined ? '' : ` after console line ${JSON.stringify(consoleLine)}`;
    this.log(
      `${this.args.export}: boot ${summary.state} (${summary.endReason ?? 'recording'})${seen}, ${summary.reads} reads, ${summary.blocks} blocks, ${(summary.durationMs / 1000).toFixed(1)} s`,
    );
    return consoleLine === undefined ? summary : { ...summary, consoleLine };
  }
}
