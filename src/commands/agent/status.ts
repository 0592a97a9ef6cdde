import type { AgentStatus, ExportStatus } from '../../agent/agent.js';
import { controlRequest } from '../../agent/control.js';
import { controlFlag } from '../../cli/agent-control.js';
import { BaseCommand, commandUsage, exitCodesHelp } from '../../cli/base-command.js';
import { ExitCode } from '../../errors.js';
import { formatBytes } from '../../cli/progress.js';


const EXIT_CODES = exitCodesHelp([ExitCode.AGENT], { [ExitCode.AGENT]: 'the control socket is unreachable' });

export default class AgentStatusCommand extends BaseCommand<typeof AgentStatusCommand> {
  static override summary = "Show a running agent's exports, cache, prefetch progress and counters.";
  static override description = `Asks the agent on its control socket. The --json result has "exports" (name, size, connections, prefetch progress, last boot: state recording/complete/discarded, reads, duration, endReason, discardReason), "cache" (capacity and use; "content": the content-addressed blocks shared by every image, with "logicalBytes" (what the cached blocks would take if each image kept its own copy), "physicalBytes" (what the cache holds), their "ratio", and "hits", "mismatches" (entries that failed their digest and were read elsewhere) and "unmatchedMisses" (blocks read from storage that did not hash to their segment digest; see docs/cache-device.md); "disk": the cache filesystem's room, a warning when it cannot hold --cache-size, and "shrunk" once a full disk shrank the cache), "prefetchBuffers" (the chunk buffers the agent keeps: bufferBytes, maxIdle, idle, allocated), "nbd" (activeConnections, totalConnections, rejectedConnections refused when full, droppedConnections still negotiating and dropped to make room, rejectedPerClient refused at --max-connections-per-client, bufferedBytes and peakBufferedBytes of reply buffers held within maxBufferedBytes, pausedConnections not read while that budget is spent, requestBufferedBytes, handshakes, requests, requestsInFlight, bytesRead, readErrors, protocolErrors, tlsSessions started with NBD_OPT_STARTTLS and tlsFailures of TLS handshakes) and "counters": {"storage": {"readRequests", "readBytes"}, "guestReads": {"cache", "prefetch", "storage"} (blocks of guest reads by where they came from; the cache device's own get() calls are "cache.lookups": {"hit", "miss"}), "prefetch": {"bytes", "unusedBytes"} (unused: bytes a stream loaded that the first boot after it never read, counted once per stream), "boots": {"recorded", "skipped", "failed", "discarded"}, "publish": {"maps", "segments", "segmentsKept", "conflicts", "repairs", "builds"}}. Times are ISO 8601 ("startedAt"), durations in ms.

${EXIT_CODES}`;

  static override examples = ['<%= config.bin %> <%= command.id %> --json', '<%= config.bin %> <%= command.id %> --control /tmp/agent.ctl'];

  static override flags = {
    control: controlFlag(),
  };

  static override usage = commandUsage(this);

  async run(): Promise<AgentStatus> {
    const status = await controlRequest<AgentStatus>(this.flags.control, 'GET', '/status');
    const c = status.counters;
    this.log(`agent pid ${status.pid}, up ${status.uptimeSeconds}s, storage ${status.storage}`);
    const content = status.cache.content;
    this.log(
      `cache: ${formatBytes(status.cache.usedBytes)} of ${formatBytes(status.cache.capacityBytes)} used; ` +
        `${formatBytes(content.logicalBytes)} logical in ${formatBytes(content.physicalBytes)} physical (${content.ratio.toFixed(2)}x), ` +
        `${content.hits} content hits, ${content.mismatches} failed their digest`,
    );
    const disk = status.cache.disk;
    if (disk.shrunk) this.log(`cache: shrunk ${disk.shrunk.times}x for lack of disk space (configured ${formatBytes(disk.configuredCapacityBytes)}), last at ${disk.shrunk.at}: ${disk.shrunk.reason}`);
    else if (disk.warning) this.log(`cache: warning: ${disk.warning}`);
    const pool = status.prefetchBuffers;
    this.log(`prefetch buffers: ${pool.allocated} buffers of ${formatBytes(pool.bufferBytes)} each allocated, ${pool.idle} of them idle`);
    const n = status.nbd;
    this.log(
      `nbd: ${n.activeConnections} connections open, ${n.totalConnections} accepted, ${n.rejectedConnections} refused and ${n.droppedConnections} dropped when full, ${n.rejectedPerClient} refused per client; reply buffers ${formatBytes(n.bufferedBytes)} of ${formatBytes(n.maxBufferedBytes)} (peak ${formatBytes(n.peakBufferedBytes)}), ${n.pausedConnections} connections paused; ${n.requests} requests, ${n.readErrors} read errors, ${n.protocolErrors} protocol errors; ${n.tlsSessions} TLS sessions, ${n.tlsFailures} failed TLS handshakes`,
    );
    const g = c.guestReads;
    this.log(`storage: ${c.storage.readRequests} read requests, ${formatBytes(c.storage.readBytes)}`);
    this.log(`guest read blocks: ${g.cache} from the cache, ${g.prefetch} from prefetch chunks in flight, ${g.storage} from storage`);
    this.log(`cache device lookups: ${status.cache.lookups.hit} hit, ${status.cache.lookups.miss} miss`);
    this.log(`prefetch: ${formatBytes(c.prefetch.bytes)} streamed, ${formatBytes(c.prefetch.unusedBytes)} of it never read by a boot`);
    this.log(`boots: ${c.boots.recorded} recorded, ${c.boots.skipped} skipped, ${c.boots.discarded} discarded, ${c.boots.failed} failed`);
    for (const e of status.exports) {
      const boot = e.lastBoot
        ? `last boot ${e.lastBoot.state} (started ${e.lastBoot.startedAt}), ${e.lastBoot.reads} reads, ${(e.lastBoot.durationMs / 1000).toFixed(1)} s${e.lastBoot.discardReason === undefined ? '' : ` (${e.lastBoot.discardReason})`}`
        : 'no boot yet';
      this.log(`  ${e.name}: ${formatBytes(e.size)}, ${e.connections} connections, ${boot}${prefetchText(e.prefetch)}`);
    }
    return status;
  }
}

/** The export's prefetch in words; a stream that read nothing because every block was cached says so. */
function prefetchText(p: ExportStatus['prefetch']): string {
  if (!p) return '';
  if (p.state === 'done' && p.bytesRead === 0 && p.blocksCached === p.blocks) {
    return `, prefetch skipped: all ${formatBytes(p.bytesTotal)} of the segment were cached already`;
  }
  const cached = p.blocksCached > 0 ? ` (${p.blocksCached} of ${p.blocks} blocks cached already)` : '';
  return `, prefetch ${p.state} ${formatBytes(p.bytesRead)} of ${formatBytes(p.bytesTotal)} read${cached}`;
}
