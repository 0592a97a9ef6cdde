import { Args, Flags } from '@oclif/core';
import { BaseCommand, commandUsage, exitCodesHelp } from '../cli/base-command.js';
import { ExitCode, fromSystemError } from '../errors.js';
import { writeFileAtomic } from '../format/atomic-write.js';
import { checkInput } from '../cli/inputs.js';
import { runTasks } from '../cli/progress.js';
import { DEFAULT_ASSUMED_SERVICE_US } from '../replay/plan.js';
import { formatReplayReport } from '../replay/format.js';
import { ReplaySession, type ReplayResult } from '../replay/replay.js';
import { readTraceFile, type BootTrace } from '../replay/trace.js';

interface ReplayContext {
  trace?: BootTrace;
  session?: ReplaySession;
  result?: ReplayResult;
}


const EXIT_CODES = exitCodesHelp([ExitCode.BAD_INPUT, ExitCode.IO], {
  [ExitCode.BAD_INPUT]: 'the trace is unreadable or malformed, or the export does not exist',
  [ExitCode.IO]: 'the NBD server cannot be reached or fails a read, or --reads-csv cannot be written',
});

export default class Replay extends BaseCommand<typeof Replay> {
  static override summary = 'Replay a recorded VM boot against an NBD server.';

  static override description = `Replays the reads of a boot trace (t_us,op,offset,length[,done_us]) against an NBD export, keeping the recorded concurrency and the guest's think time, and reports how long the boot would take on that storage: completion time, its ratio to the recorded boot, read latency percentiles and a per-phase timeline.

With done_us, a read waits for every read that had completed when it was issued in the recording, then for its recorded think time. Without done_us, each read waits for the previous one (serial fallback). --no-think-time drops think times, so the replay is bound by storage alone. See docs/replay.md.

${EXIT_CODES}`;

  static override examples = [
    {
      description: 'Replay a boot against qemu-nbd on a Unix socket',
      command: '<%= config.bin %> <%= command.id %> boot-timed.csv --uri "nbd+unix:///disk?socket=/tmp/disk.sock"',
    },
    {
      description: 'Storage-bound replay over TCP, as JSON',
      command: '<%= config.bin %> <%= command.id %> boot-timed.csv --uri nbd://nas.example:10809/debian12 --no-think-time --json',
    },
  ];

  static override args = {
    trace: Args.string({ description: 'boot trace CSV (t_us,op,offset,length[,done_us])', required: true }),
  };

  static override flags = {
    uri: Flags.string({
      description: 'NBD export: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH',
      required: true,
    }),
    'think-time': Flags.boolean({
      description: 'Keep the guest\'s recorded think time (default on; --no-think-time: issue each read as soon as its dependencies complete)',
      default: true,
      allowNo: true,
    }),
    warmup: Flags.boolean({
      description: 'Before the timed run, replay the trace once against an in-process zero export, so the timed run starts with optimised code (default on; --no-warmup: time a fresh process)',
      default: true,
      allowNo: true,
    }),
    clamp: Flags.boolean({ description: 'Trim reads past the end of the export instead of refusing the trace' }),
    connections: Flags.integer({
      description: 'NBD connections to spread reads over (used only if the server allows multi-conn)',
      default: 1,
      min: 1,
      max: 64,
    }),
    phases: Flags.integer({ description: 'Number of equal phases of recorded time in the timeline', default: 10, min: 1, max: 1000 }),
    'ignore-done': Flags.boolean({ description: 'Use the serial fallback model even if the trace has done_us' }),
    'reads-csv': Flags.string({
      description: 'Also write one CSV row per read: recorded and replayed issue/completion times, in µs (for plots and comparisons)',
    }),
    'service-time': Flags.integer({
      description: 'Serial fallback: assumed service time of a local read, in µs',
      default: DEFAULT_ASSUMED_SERVICE_US,
      min: 0,
    }),
  };

  static override usage = commandUsage(this);

  public async run(): Promise<ReplayResult> {
    const { args, flags } = this;
    const ctx: ReplayContext = {};
    await checkInput(args.trace, 'trace');
    try {
      await this.replay(ctx, args.trace, flags);
    } finally {
      await ctx.session?.close();
    }
    const result = ctx.result!;
    this.log(formatReplayReport(result));
    return result;
  }

  private async replay(ctx: ReplayContext, tracePath: string, flags: Replay['flags']): Promise<void> {
    await runTasks<ReplayContext>([
      {
        title: `Read trace ${tracePath}`,
        task: async (c) => { c.trace = await readTraceFile(tracePath); },
      },
      {
        title: flags.warmup ? `Warm up (untimed), then connect to ${flags.uri}` : `Connect to ${flags.uri}`,
        task: async (c) => {
          c.session = await ReplaySession.open(c.trace!, {
            uri: flags.uri,
            thinkTime: flags['think-time'],
            clamp: flags.clamp,
            connections: flags.connections,
            phases: flags.phases,
            ignoreCompletionTimes: flags['ignore-done'],
            assumedServiceUs: flags['service-time'],
            warmup: flags.warmup,
          });
        },
      },
    ], ctx, this.interactive);
    const showProgress = this.interactive && process.stderr.isTTY === true;
    ctx.result = await ctx.session!.run(showProgress ? this.progressLine() : undefined);
    const csvPath = flags['reads-csv'];
    if (csvPath !== undefined) {
      try {
        await writeFileAtomic(csvPath, Buffer.from(ctx.session!.readsCsv()!));
      } catch (err) {
        throw fromSystemError(err, csvPath, 'writing the per-read CSV');
      }
    }
  }

  /**
   * A one-line progress counter on stderr, redrawn at most once a second:
   * a spinner redrawn many times a second would steal CPU time from the
   * replay it measures.
   */
  private progressLine(): (completed: number, total: number) => void {
    const started = Date.now();
    let shown = started;
    let width = 0;
    return (completed, total) => {
      const now = Date.now();
      if (completed === total) {
        if (width > 0) process.stderr.write(`\r${' '.repeat(width)}\r`);
        return;
      }
      if (now - shown < 1000) return;
      shown = now;
      const line = `replaying: ${completed}/${total} reads, ${((now - started) / 1000).toFixed(0)} s`;
      width = Math.max(width, line.length);
      process.stderr.write(`\r${line.padEnd(width)}`);
    };
  }
}
