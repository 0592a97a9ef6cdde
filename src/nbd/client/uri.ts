import { NbdUriError } from '../errors.js';
import { NBD_DEFAULT_PORT } from '../protocol.js';

/** Where an NBD export lives. */
export type NbdTarget =
  | { transport: 'tcp'; host: string; port: number; exportName: string }
  | { transport: 'unix'; socket: string; exportName: string };

/**
 * Parses the NBD URI forms bootcache accepts (the NBD URI convention used by
 * qemu and libnbd):
 *   nbd://HOST[:PORT]/EXPORT            (TCP, default port 10809)
 *   nbd+unix:///EXPORT?socket=PATH      (Unix domain socket)
 * The export name is the percent-decoded path without its leading "/";
 * an empty name selects the server's default export.
 */
export function parseNbdUri(uri: string): NbdTarget {
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    throw new NbdUriError(`invalid NBD URI "${uri}" (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)`);
  }
  const exportName = decodeExportName(url, uri);
  switch (url.protocol) {
    case 'nbd:': {
      if (url.hostname === '') throw new NbdUriError(`NBD URI "${uri}" has no host`);
      if (url.search !== '') throw new NbdUriError(`NBD URI "${uri}": query parameters are not supported with nbd://`);
      const port = url.port === '' ? NBD_DEFAULT_PORT : Number(url.port);
      // WHATWG URL keeps IPv6 literals bracketed; net.connect wants them bare.
      const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
      return { transport: 'tcp', host, port, exportName };
    }
    case 'nbd+unix:': {
      if (url.hostname !== '') throw new NbdUriError(`NBD URI "${uri}": nbd+unix:// takes no host (use nbd+unix:///EXPORT?socket=PATH)`);
      const socket = url.searchParams.get('socket');
      if (socket === null || socket === '') throw new NbdUriError(`NBD URI "${uri}" needs ?socket=PATH`);
      for (const key of url.searchParams.keys()) {
        if (key !== 'socket') throw new NbdUriError(`NBD URI "${uri}": unsupported query parameter "${key}"`);
      }
      return { transport: 'unix', socket, exportName };
    }
    case 'nbds:':
    case 'nbds+unix:':
      throw new NbdUriError(`NBD URI "${uri}": TLS (nbds) is not supported`);
    default:
      throw new NbdUriError(`NBD URI "${uri}": unsupported scheme "${url.protocol.slice(0, -1)}" (use nbd:// or nbd+unix://)`);
  }
}

function decodeExportName(url: URL, uri: string): string {
  const path = url.pathname.startsWith('/') ? url.pathname.slice(1) : url.pathname;
  try {
    return decodeURIComponent(path);
  } catch {
    throw new NbdUriError(`NBD URI "${uri}": bad percent-encoding in the export name`);
  }
}

/** A short label for messages: "nbd://host:port/export" or "nbd+unix:///export?socket=path". */
export function formatNbdTarget(target: NbdTarget): string {
  const name = encodeURIComponent(target.exportName);
  if (target.transport === 'unix') return `nbd+unix:///${name}?socket=${target.socket}`;
  const host = target.host.includes(':') ? `[${target.host}]` : target.host;
  return `nbd://${host}:${target.port}/${name}`;
}
