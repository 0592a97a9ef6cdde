// The storage and cache servers of the peers benchmark. Every configuration
// reads the same image file through the same emulated remote storage: a
// per-request delay D (and optionally a bandwidth cap) in front of the file.
//   - peers: nbdkit's file plugin behind its delay (and rate) filter, with the
//     log filter at the bottom counting what reaches the storage;
//   - bootcache: the agent's own --storage-delay wrapper, counted by the agent.
import { linkSync, mkdirSync, rmSync } from 'node:fs';
import { join, basename } from 'node:path';
import { run, startServer, stopChild } from '../lib/process.js';
import { startAgent as startAgentProcess } from '../lib/agent.js';

export { pollAgent } from '../lib/agent.js';
import { storageLog } from './nbdkit-log.js';

/**
 * nbdkit over the image file: the emulated remote storage, optionally with
 * nbdkit's own cache and readahead filters in front (configuration 3).
 * Filter order: the first is nearest the client, so readahead -> cache ->
 * delay -> rate -> log -> file: the log sees exactly the storage requests.
 */
export async function startNbdkit({ dir, name, image, delayMs, rateBps, cached }) {
  const sock = join(dir, `${name}.sock`);
  const logfile = join(dir, `${name}.storage.log`);
  rmSync(logfile, { force: true });
  const filters = [];
  const params = [];
  if (cached) {
    filters.push('--filter=readahead', '--filter=cache');
    params.push('cache-on-read=true');
  }
  filters.push('--filter=delay');
  params.push(`rdelay=${delayMs}ms`);
  if (rateBps) {
    filters.push('--filter=rate');
    params.push(`rate=${rateBps * 8}`); // the rate filter counts bits per second
  }
  filters.push('--filter=log');
  params.push(`logfile=${logfile}`);
  const args = ['-f', '-r', '--exit-with-parent', '-U', sock, ...filters, 'file', image, ...params];
  const child = await startServer('nbdkit', args, sock, `nbdkit ${name}`, join(dir, `${name}.server.log`));
  return {
    kind: 'nbdkit',
    uri: `nbd+unix:///?socket=${sock}`,
    command: `nbdkit ${args.join(' ')}`,
    storage: storageLog(logfile),
    stop: () => stopChild(child),
  };
}

/** qemu-nbd over the local image: configuration 1 for replays (no storage between). */
export async function startLocalNbd({ dir, image }) {
  const sock = join(dir, 'local.sock');
  const args = ['-r', '-f', 'raw', '-t', '--socket', sock, '-x', 'disk', image];
  const child = await startServer('qemu-nbd', args, sock, 'qemu-nbd', join(dir, 'local.server.log'));
  return { kind: 'qemu-nbd', uri: `nbd+unix:///disk?socket=${sock}`, command: `qemu-nbd ${args.join(' ')}`, stop: () => stopChild(child) };
}

/**
 * Configuration 4's node graph: a local qcow2 overlay (`cor.qcow2`) whose
 * backing is the remote, behind a copy-on-read filter, so every read from the
 * remote (any protocol node: NBD here, HTTP in the fleet bench) is copied
 * into the overlay. `corBlockdevs` is shared by the real
 * boot (QEMU, with a throwaway top overlay for the guest's writes) and the
 * replay (qemu-storage-daemon exporting the filter node over NBD).
 */
export async function createCorOverlay(path, remoteUri) {
  rmSync(path, { force: true });
  // -u: do not open the backing (the remote may not be up yet).
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-F', 'raw', '-b', remoteUri, path, '2G']);
}

export function corBlockdevs(overlay, remote) {
  return [
    { ...remote, 'node-name': 'remote', 'read-only': true },
    { driver: 'qcow2', 'node-name': 'corcache', file: { driver: 'file', filename: overlay }, backing: 'remote' },
    { driver: 'copy-on-read', 'node-name': 'cor', file: 'corcache' },
  ];
}

/** The remote of corBlockdevs as an NBD export on a unix socket. */
export function nbdRemote(socket) {
  return { driver: 'nbd', server: { type: 'unix', path: socket } };
}

export function socketOf(uri) {
  const m = /[?&]socket=([^&]+)/.exec(uri);
  if (!m) throw new Error(`no socket in ${uri}`);
  return decodeURIComponent(m[1]);
}

/** qemu-storage-daemon exporting the copy-on-read node: configuration 4 for replays. */
export async function startCorExport({ dir, overlay, remoteUri }) {
  const sock = join(dir, 'cor-export.sock');
  const args = [];
  for (const b of corBlockdevs(overlay, nbdRemote(socketOf(remoteUri)))) args.push('--blockdev', JSON.stringify(b));
  args.push('--nbd-server', `addr.type=unix,addr.path=${sock}`);
  args.push('--export', 'type=nbd,id=exp0,node-name=cor,name=disk,writable=off');
  const child = await startServer('qemu-storage-daemon', args, sock, 'qemu-storage-daemon', join(dir, 'cor-export.server.log'));
  return { kind: 'qemu-storage-daemon', uri: `nbd+unix:///disk?socket=${sock}`, command: `qemu-storage-daemon ${args.join(' ')}`, stop: () => stopChild(child) };
}

/**
 * A storage directory for the agent holding the image (hard-linked: same
 * inode, so the same identity across rounds) and nothing else: no map, no
 * segment, so the first boot records.
 */
export function freshStorageDir(dir, image) {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  linkSync(image, join(dir, basename(image)));
  return dir;
}

/** The bootcache agent (configurations 5-7). */
export function startAgent({ bin, dir, name, storage, cache, delayMs, extra = [] }) {
  return startAgentProcess({
    bin, storage, cache, delayMs, extra, cacheSize: '2G',
    socket: join(dir, `${name}.sock`),
    control: join(dir, `${name}.ctl`),
    logFile: join(dir, `${name}.server.log`),
  });
}

/** Agent storage counters as a cumulative sampler, like storageLog's. */
export function agentStorage(agent) {
  return {
    async totals() {
      const s = await agent.status();
      return { requests: s.counters.storage.readRequests, bytes: s.counters.storage.readBytes };
    },
  };
}
