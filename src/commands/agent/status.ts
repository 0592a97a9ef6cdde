import { Flags } from '@oclif/core';
import type { AgentStatus } from '../../agent/agent.js';
import { DEFAULT_CONTROL } from '../../agent/config.js';
import { controlRequest } from '../../agent/control.js';
import { BaseCommand, commandUsage, exitCodesHelp } from '../../cli/base-command.js';
import { ExitCode } from '../../errors.js';
import { formatBytes } from '../../cli/progress.js';


const EXIT_CODES = exitCodesHelp([ExitCode.AGENT], { [ExitCode.AGENT]: 'the control socket is unreachable' });

export default class AgentStatusCommand extends BaseCommand<typeof AgentStatusCommand> {
  static override summary = "Show a running agent's exports, cache, prefetch progress and counters.";
  static override description = `Asks the agent on its control socket. The --json result has "exports" (name, size, connections, prefetch progress, last boot: state recording/complete/discarded, reads, duration, endReason, discardReason), "cache" (capacity and use; "disk": the cache filesystem's room, a warning when it cannot hold --cache-size, and "shrunk" once a full disk shrank the cache), "prefetchBuffers" (the chunk buffers the agent keeps: bufferBytes, maxIdle, idle, allocated), "nbd" (activeConnections, totalConnections, rejectedConnections refused when full, droppedConnections still negotiating and dropped to make room, rejectedPerClient refused at --max-connections-per-client, bufferedBytes and peakBufferedBytes of reply buffers held within maxBufferedBytes, pausedConnections not read while that budget is spent, requestBufferedBytes, handshakes, requests, requestsInFlight, bytesRead, readErrors, protocolErrors) and "counters": {"storage": {"readRequests", "readBytes"}, "cache": {"hits", "misses"}, "prefetch": {"bytes", "unusedBytes"}, "boots": {"recorded", "skipped", "failed", "discarded"}}.

${EXIT_CODES}`;

  static override examples = ['<%= config.bin %> <%= command.id %> --json', '<%= config.bin %> <%= command.id %> --control /tmp/agent.ctl'];

  static override flags = {
    control: Flags.string({ description: "The agent's control socket.", helpValue: 'PATH', default: DEFAULT_CONTROL }),
  };

  static override usage = commandUsage(this);

  async run(): Promise<AgentStatus> {
    const status = await controlRequest<AgentStatus>(this.flags.control, 'GET', '/status');
    const c = status.counters;
    this.log(`agent pid ${status.pid}, up ${status.uptimeSeconds}s, storage ${status.storage}`);
    this.log(`cache: ${formatBytes(status.cache.usedBytes)} of ${formatBytes(status.cache.capacityBytes)} used`);
    const disk = status.cache.disk;
    if (disk.shrunk) this.log(`cache: shrunk ${disk.shrunk.times}x for lack of disk space (configured ${formatBytes(disk.configuredCapacityBytes)}), last at ${disk.shrunk.at}: ${disk.shrunk.reason}`);
    else if (disk.warning) this.log(`cache: warning: ${disk.warning}`);
    const pool = status.prefetchBuffers;
    this.log(`prefetch buffers: ${pool.allocated} of ${formatBytes(pool.bufferBytes)} allocated, ${pool.idle} idle`);
    const n = status.nbd;
    this.log(
      `nbd: ${n.activeConnections} connections open, ${n.totalConnections} accepted, ${n.rejectedConnections} refused and ${n.droppedConnections} dropped when full, ${n.rejectedPerClient} refused per client; reply buffers ${formatBytes(n.bufferedBytes)} of ${formatBytes(n.maxBufferedBytes)} (peak ${formatBytes(n.peakBufferedBytes)}), ${n.pausedConnections} connections paused; ${n.requests} requests, ${n.readErrors} read errors, ${n.protocolErrors} protocol errors`,
    );
    this.log(
      `counters: storage ${c.storage.readRequests} reads / ${formatBytes(c.storage.readBytes)}; cache ${c.cache.hits} hits / ${c.cache.misses} misses; prefetch ${formatBytes(c.prefetch.bytes)} (${formatBytes(c.prefetch.unusedBytes)} unused); boots recorded ${c.boots.recorded}, discarded ${c.boots.discarded}`,
    );
    for (const e of status.exports) {
      const boot = e.lastBoot ? `last boot ${e.lastBoot.state}, ${e.lastBoot.reads} reads, ${(e.lastBoot.durationMs / 1000).toFixed(1)} s${e.lastBoot.discardReason === undefined ? '' : ` (${e.lastBoot.discardReason})`}` : 'no boot yet';
      const prefetch = e.prefetch ? `, prefetch ${e.prefetch.state} ${formatBytes(e.prefetch.bytesRead)}/${formatBytes(e.prefetch.bytesTotal)}` : '';
      this.log(`  ${e.name}: ${formatBytes(e.size)}, ${e.connections} connections, ${boot}${prefetch}`);
    }
    return status;
  }
}
