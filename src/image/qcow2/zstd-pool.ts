/**
 * zstd cluster decoding on worker threads: the zstd side of the shared
 * decode pool (decode-pool.ts), which also inflates deflate clusters.
 */
import { DecodePool } from './decode-pool.js';

export class ZstdPool {
  private readonly pool: DecodePool;

  /** `size` workers (default: one per core, at most 4); 0 decodes on the calling thread. */
  constructor(size?: number) {
    this.pool = new DecodePool(size);
  }

  /**
   * Decodes each source into one cluster. Each result is the cluster or an
   * Error (message prefixed "zstd: ") for that source alone.
   */
  decodeMany(sources: Uint8Array[], clusterSize: number): Promise<Array<Buffer | Error>> {
    return this.pool.decodeMany('zstd', sources, clusterSize);
  }
}
