import { Flags } from '@oclif/core';
import { pino } from 'pino';
import { Agent, type AgentStatus } from '../../agent/agent.js';
import {
  CONFIG_DEFAULTS, DEFAULT_CONTROL, DEFAULT_NBD_PORT, DEFAULT_SOCKET, loadConfigFile, resolveConfig,
} from '../../agent/config.js';
import { BaseCommand, commandUsage, exitCodesHelp } from '../../cli/base-command.js';
import { ExitCode } from '../../errors.js';
import { passedSockets } from '../../agent/socket-activation.js';


const EXIT_CODES = exitCodesHelp([ExitCode.BAD_INPUT, ExitCode.IO, ExitCode.AGENT], {
  [ExitCode.BAD_INPUT]: 'the config file or the storage root is missing or unreadable',
  [ExitCode.IO]: 'the cache or the storage fails',
  [ExitCode.AGENT]: 'the agent cannot start (socket in use, bad config, cache locked)',
});

export type AgentRunResult = Pick<AgentStatus, 'counters' | 'uptimeSeconds'>;

export default class AgentRun extends BaseCommand<typeof AgentRun> {
  static override summary = 'Run the bootcache agent: serve images over NBD with caching, prefetch and boot recording.';
  static override description = `Serves every image under the storage root as a read-only NBD export named by its path relative to the root (a qcow2 image is served as its guest-visible disk, format raw for the client). On the first open of an export it streams the image's boot segment (IMAGE.bcseg) into the local cache; it records the blocks each boot reads and, when the boot ends (idle gap, window, mark-booted or last close), merges them into IMAGE.bcmap and publishes a new IMAGE.bcseg next to the image. A recording that reads more than --boot-max-share of the image's data (and more than --boot-max-share-floor) is a whole-disk read (a copy, a backup), not a boot: it ends there and is discarded, with a warning.

Runs in the foreground until SIGTERM or SIGINT: it then stops accepting, finishes in-flight requests, and flushes maps and the cache index (a signal during the start makes it give up cleanly, exit status 0). Logs are JSON lines (pino) on stdout. TCP is used only with --listen (default port ${DEFAULT_NBD_PORT}).

Settings come from flags or a JSON config file (--config); flags win. Config keys: storage, cache, socket, listen, control, metrics, rawExtensions, cacheSize, cacheMisses, storageDelayMs, storageErrorRate, storageRetries, storageRetryDelayMs, storageTimeoutMs, s3Endpoint, s3PathStyle, s3Region, tls, tlsCertificates, tlsVerifyPeer, tlsPsk, boot {idleMs, windowMs, minReads, maxShare, maxShareFloor}, merge {minSeen, window}, prefetchChunk, prefetchDepth, prefetchRate, readahead, missWindow, blockSize, maintenance, maxConnections, maxConnectionsPerClient, maxBuffered, socketMode, socketGroup, logLevel, warmup.

${EXIT_CODES}`;

  static override examples = [
    '<%= config.bin %> <%= command.id %> --storage /srv/images --cache /var/cache/bootcache --socket /run/bootcache/nbd.sock',
    "qemu-system-x86_64 -drive file=nbd+unix:///debian12.qcow2?socket=/run/bootcache/nbd.sock,format=raw,snapshot=on ...",
    '<%= config.bin %> <%= command.id %> --config /etc/bootcache/agent.json --listen 0.0.0.0:10809',
  ];

  static override flags = {
    config: Flags.string({ description: 'JSON config file.', helpValue: 'FILE' }),
    storage: Flags.string({ description: 'Storage root holding the images: a local directory (or an NFS mount), or s3://BUCKET/PREFIX.', helpValue: 'DIR|s3://BUCKET/PREFIX' }),
    cache: Flags.string({ description: 'Cache directory (the local cache device).', helpValue: 'DIR' }),
    socket: Flags.string({ description: `NBD unix socket (default ${DEFAULT_SOCKET}).`, helpValue: 'PATH' }),
    listen: Flags.string({ description: `Also listen on TCP HOST:PORT (default port ${DEFAULT_NBD_PORT}).`, helpValue: 'HOST:PORT' }),
    control: Flags.string({ description: `Control socket for status and mark-booted (default ${DEFAULT_CONTROL}).`, helpValue: 'PATH' }),
    'socket-mode': Flags.string({ description: 'Permission bits of the NBD socket; connecting needs write permission (default 660).', helpValue: 'OCTAL' }),
    'socket-group': Flags.string({ description: 'Group of both sockets, name or gid, e.g. the group QEMU runs in (default: the agent\'s).', helpValue: 'GROUP' }),
    'max-connections': Flags.integer({ description: `NBD connections at once; when full, the longest-negotiating one makes room, else newcomers are closed (default ${CONFIG_DEFAULTS.maxConnections}).`, helpValue: 'N' }),
    'max-connections-per-client': Flags.integer({ description: 'NBD connections at once from one client (a unix socket peer\'s uid, a TCP peer\'s address); more are refused (default half of --max-connections).', helpValue: 'N' }),
    'max-buffered': Flags.string({ description: `Reply buffers the NBD server holds over all connections, e.g. 512M; connections wanting more stop being read until replies drain (default ${CONFIG_DEFAULTS.maxBuffered / 1024 ** 2}M, at least 64M).`, helpValue: 'BYTES' }),
    'cache-size': Flags.string({ description: `Cache capacity, e.g. 8G (default ${CONFIG_DEFAULTS.cacheSize / 1024 ** 3}G).`, helpValue: 'BYTES' }),
    'cache-misses': Flags.boolean({ description: `Cache blocks read on a miss, not only prefetched ones (default ${CONFIG_DEFAULTS.cacheMisses ? 'on' : 'off'}).`, allowNo: true }),
    'storage-delay': Flags.integer({ description: 'Test/benchmark: delay every storage read by MS milliseconds.', helpValue: 'MS' }),
    'storage-error-rate': Flags.string({ description: 'Test/benchmark: fail this fraction of storage reads.', helpValue: 'FRACTION' }),
    'storage-retries': Flags.integer({ description: `Send a storage read that failed with an I/O error again up to N times, with exponential backoff, before the guest gets EIO (default ${CONFIG_DEFAULTS.storageRetries}).`, helpValue: 'N' }),
    'storage-retry-delay': Flags.integer({ description: `Delay before the first storage retry in ms, doubled for each further one, with jitter (default ${CONFIG_DEFAULTS.storageRetryDelayMs}).`, helpValue: 'MS' }),
    'storage-timeout': Flags.string({ description: `A guest read that needs storage gets EIO once this many seconds have passed, its retries included; each request gets at most 10 s of it (default ${CONFIG_DEFAULTS.storageTimeoutMs / 1000}).`, helpValue: 'SECONDS' }),
    'raw-extensions': Flags.string({ description: 'Exports are disk images: qcow2 images (by their header) and raw images whose name ends in one of these, comma-separated (default .raw,.img). Other files in the storage root are not exported.', helpValue: 'EXTS' }),
    tls: Flags.string({ description: 'TLS on NBD connections: off, on (a client may start TLS) or require (a TCP client must start TLS before anything else; unix socket clients may). Needs --tls-certificates or --tls-psk (default off).', options: ['off', 'on', 'require'] }),
    'tls-certificates': Flags.string({ description: 'X.509 credentials directory in QEMU\'s layout: server-cert.pem, server-key.pem, and ca-cert.pem for --tls-verify-peer.', helpValue: 'DIR' }),
    'tls-verify-peer': Flags.boolean({ description: 'Require a client certificate signed by ca-cert.pem (X.509 only; default off).', allowNo: true }),
    'tls-psk': Flags.string({ description: 'Pre-shared keys, one "username:hexkey" line per client, as `psktool -u NAME -p FILE` writes them.', helpValue: 'FILE' }),
    metrics: Flags.string({ description: 'Serve Prometheus metrics at http://HOST:PORT/metrics (no per-image labels; see docs/agent.md, "Metrics").', helpValue: 'HOST:PORT' }),
    's3-endpoint': Flags.string({ description: 'S3 endpoint for s3:// storage, e.g. http://rgw.example:7480 (default AWS_ENDPOINT_URL, else AWS). Credentials come from the AWS chain: environment, shared config and credentials files, AWS_PROFILE.', helpValue: 'URL' }),
    's3-path-style': Flags.boolean({ description: 'Path-style S3 requests (http://host/BUCKET/KEY), as Ceph RGW and MinIO need (default off).', allowNo: true }),
    's3-region': Flags.string({ description: 'S3 region (default AWS_REGION, else us-east-1).', helpValue: 'REGION' }),
    'boot-idle': Flags.string({ description: 'End of boot: seconds with no new block read (default 20).', helpValue: 'SECONDS' }),
    'boot-window': Flags.string({ description: 'End of boot: maximum seconds of recording (default 300).', helpValue: 'SECONDS' }),
    'boot-min-reads': Flags.integer({ description: 'Reads before an idle gap may end the boot, and below which a recording is a probe, not a boot (default 64).', helpValue: 'N' }),
    'boot-max-share': Flags.string({ description: 'A recording that reads more than this share of the image\'s data is a copy or a backup, not a boot: it ends and is discarded; 0 turns this off (default 0.5).', helpValue: 'FRACTION' }),
    'boot-max-share-floor': Flags.string({ description: 'Bytes of distinct blocks a recording may always read, whatever --boot-max-share says (default 256M).', helpValue: 'BYTES' }),
    'merge-min-seen': Flags.integer({ description: 'Keep blocks read in at least M of the last K boots (default 2).', helpValue: 'M' }),
    'merge-window': Flags.integer({ description: 'K, the boots remembered for merging (default 4).', helpValue: 'K' }),
    'prefetch-chunk': Flags.string({ description: 'Segment bytes per sequential prefetch read (default 8M).', helpValue: 'BYTES' }),
    'prefetch-depth': Flags.integer({ description: 'Prefetch reads in flight (the bounded buffer, default 4).', helpValue: 'N' }),
    'prefetch-rate': Flags.string({ description: 'Pace the segment stream to this many bytes per second on a shared storage link, e.g. 25M; it then keeps one read in flight. Guest reads are never paced (default 0, unlimited).', helpValue: 'BYTES_PER_S' }),
    readahead: Flags.string({ description: 'Largest sequential readahead on cache misses, e.g. 2M; 0 turns it off (default 2M).', helpValue: 'BYTES' }),
    'miss-window': Flags.string({ description: 'Widen each guest miss to its aligned window of this size, one storage request for the blocks around it too, e.g. 1M; 0 turns it off (default 1M).', helpValue: 'BYTES' }),
    'log-level': Flags.string({ description: 'pino log level.', options: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] }),
    maintenance: Flags.string({ description: 'Cron schedule for maintenance (reclaiming the cached blocks of images gone from storage, cache index compaction), or "off".', helpValue: 'CRON' }),
    warmup: Flags.boolean({ description: `Before listening, boot a scratch image through a private agent (about 2 s) so the first real boot runs on optimised code (default ${CONFIG_DEFAULTS.warmup ? 'on' : 'off'}).`, allowNo: true }),
  };

  static override usage = commandUsage(this);

  async run(): Promise<AgentRunResult> {
    const f = this.flags;
    const fromFile = f.config ? await loadConfigFile(f.config) : {};
    // Flags by name, in their own units: resolveConfig converts them and names them in errors.
    const config = resolveConfig(fromFile, {}, f);
    const log = pino({ level: config.logLevel, base: { pid: process.pid } });
    // Sockets passed by systemd (socket activation) replace --socket, --listen and --control.
    const agent = new Agent(config, log, passedSockets());
    // Before start(), which takes a while (the prefault): a signal then would
    // kill the process by default and leave its sockets and cache lock behind.
    // Now the agent stops, and start() gives up with what it opened closed.
    let signalled = false;
    const stopped = new Promise<NodeJS.Signals>((resolve) => {
      const stopOn = (signal: NodeJS.Signals): void => {
        signalled = true;
        resolve(signal);
      };
      process.once('SIGTERM', () => stopOn('SIGTERM'));
      process.once('SIGINT', () => stopOn('SIGINT'));
    }).then(async (signal) => {
      log.info({ signal }, 'stopping');
      await agent.stop();
    });
    log.debug('starting');
    try {
      await agent.start();
    } catch (err) {
      if (!signalled) throw err;
    }
    await stopped;
    return agent.summary();
  }
}
