import { UsageError } from '../../errors.js';
import { NbdClient, type NbdClientOptions, type NbdExportInfo } from './client.js';
import { parseNbdUri, type NbdTarget } from './uri.js';

/** Something that reads byte ranges of one export: one connection or several. */
export interface BlockReader {
  readonly size: number;
  read(offset: number, length: number, into?: Buffer): Promise<Buffer>;
  close(): Promise<void>;
}

export interface NbdPoolOptions extends NbdClientOptions {
  /** Connections wanted (default 1). More than one only if the server sets NBD_FLAG_CAN_MULTI_CONN. */
  connections?: number;
}

/**
 * Several connections to one export (multi-conn), each read sent on the
 * connection with the fewest reads in flight. The server must advertise
 * NBD_FLAG_CAN_MULTI_CONN ("Transmission flags", bit 8); otherwise the pool
 * keeps a single connection, as the spec asks.
 */
export class NbdPool implements BlockReader {
  private constructor(private readonly clients: NbdClient[]) {}

  static async connect(target: NbdTarget | string, options: NbdPoolOptions = {}): Promise<NbdPool> {
    const wanted = options.connections ?? 1;
    if (!Number.isInteger(wanted) || wanted < 1 || wanted > 64) {
      throw new UsageError(`connections must be an integer from 1 to 64, got ${wanted}`);
    }
    const parsed = typeof target === 'string' ? parseNbdUri(target) : target;
    const first = await NbdClient.connect(parsed, options);
    if (wanted === 1 || !first.info.canMultiConn) return new NbdPool([first]);
    const others = await Promise.allSettled(
      Array.from({ length: wanted - 1 }, () => NbdClient.connect(parsed, options)),
    );
    const clients = [first];
    let failure: unknown;
    for (const result of others) {
      if (result.status === 'fulfilled') clients.push(result.value);
      else failure ??= result.reason;
    }
    if (failure !== undefined) {
      await Promise.allSettled(clients.map((client) => client.close()));
      throw failure;
    }
    return new NbdPool(clients);
  }

  get info(): NbdExportInfo {
    return this.clients[0]!.info;
  }

  get size(): number {
    return this.clients[0]!.size;
  }

  get connections(): number {
    return this.clients.length;
  }

  get inFlight(): number {
    return this.clients.reduce((sum, client) => sum + client.inFlight, 0);
  }

  read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    let best = this.clients[0]!;
    for (const client of this.clients) if (client.inFlight < best.inFlight) best = client;
    return best.read(offset, length, into);
  }

  async close(): Promise<void> {
    await Promise.allSettled(this.clients.map((client) => client.close()));
  }
}
