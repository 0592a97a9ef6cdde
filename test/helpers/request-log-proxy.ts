/**
 * A TCP proxy in front of the test RGW that logs the HTTP requests passing
 * through it (method, path without the query, Range header): what a client
 * of the object store asked, counted at the wire rather than by its own
 * counters. Bodies pass unparsed; request heads are found at line starts.
 */
import { connect, createServer, type AddressInfo, type Server, type Socket } from 'node:net';

export interface LoggedRequest {
  method: string;
  path: string;
  range?: string;
}

export interface RequestLogProxy {
  endpoint: string;
  requests: LoggedRequest[];
  close(): Promise<void>;
}

const REQUEST_LINE = /^(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP\/1\.1$/;

export async function startRequestLogProxy(target: string): Promise<RequestLogProxy> {
  const url = new URL(target);
  const requests: LoggedRequest[] = [];
  const sockets = new Set<Socket>();
  const server: Server = createServer((inbound) => {
    const outbound = connect(Number(url.port), url.hostname);
    for (const s of [inbound, outbound]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => undefined);
    }
    let pending = '';
    inbound.on('data', (data: Buffer) => {
      pending += data.toString('latin1');
      for (;;) {
        const end = pending.indexOf('\r\n\r\n');
        if (end < 0) break;
        const lines = pending.slice(0, end).split('\r\n');
        pending = pending.slice(end + 4);
        const start = lines.findIndex((l) => REQUEST_LINE.test(l));
        if (start < 0) continue;
        const [, method, target] = REQUEST_LINE.exec(lines[start]!)!;
        const range = lines.slice(start + 1).find((l) => /^range:/i.test(l))?.replace(/^range:\s*/i, '');
        requests.push({ method: method!, path: target!.replace(/\?.*$/, ''), ...(range === undefined ? {} : { range }) });
      }
      // Keep only a possible partial head: a body (a PUT's) is not searched further than its last line.
      if (pending.length > 64 * 1024) pending = pending.slice(-8192);
      outbound.write(data);
    });
    outbound.pipe(inbound);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    endpoint: `http://127.0.0.1:${port}`,
    requests,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
