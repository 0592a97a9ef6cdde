/**
 * Decompression of qcow2 compressed clusters, matching QEMU's
 * qcow2_zlib_decompress / qcow2_zstd_decompress (block/qcow2-threads.c):
 * the output must be exactly one cluster; bytes after the compressed stream
 * (the rest of the last 512-byte sector) are ignored. zstd is in zstd.ts;
 * both run on worker threads (decode-pool.ts).
 *
 * inflateQcow2Cluster is serialised into those workers, so it must stay
 * self-contained: no imports, no references to module-level names; zlib
 * comes in as a parameter.
 */
import * as zlib from 'node:zlib';

/** A decompression failure; the caller turns it into an InvalidImageError naming the guest offset. */
export class DecompressError extends Error {}

/** The parts of node:zlib inflateQcow2Cluster uses. */
export type ZlibModule = Pick<typeof zlib, 'inflateRawSync' | 'createInflateRaw' | 'constants'>;

/**
 * Inflates raw deflate data (the "deflate" compression type has no zlib
 * header) into `out` (exactly one cluster). Resolves when done; rejects with
 * an Error whose message says what is wrong with the data.
 */
export async function inflateQcow2Cluster(z: ZlibModule, src: Uint8Array, clusterSize: number, out: Uint8Array): Promise<void> {
  const options = {
    // Tolerate a stream cut short (QEMU accepts Z_BUF_ERROR once the output is full)
    // and stop at the end of the stream, ignoring trailing bytes.
    finishFlush: z.constants.Z_SYNC_FLUSH,
    // One output chunk per cluster, so the result needs no concatenation.
    chunkSize: Math.max(clusterSize, z.constants.Z_MIN_CHUNK),
  };
  let data: Buffer | undefined;
  let failure = '';
  try {
    // The common case: the stream ends exactly at the cluster's end. The
    // output limit bounds memory: a stream that inflates past one cluster fails.
    data = z.inflateRawSync(src, { ...options, maxOutputLength: clusterSize });
  } catch (err) {
    const e = err as { code?: unknown; message?: unknown };
    failure =
      e.code === 'ERR_BUFFER_TOO_LARGE'
        ? 'deflate data inflates to more than one cluster'
        : `deflate data is invalid: ${typeof e.message === 'string' ? e.message : String(err)}`;
  }
  if (data !== undefined) {
    if (data.length !== clusterSize) throw new Error(`deflate data produced ${data.length} bytes, expected ${clusterSize}`);
    out.set(data);
    return;
  }
  // QEMU accepts a stream as soon as it has filled the cluster (Z_BUF_ERROR
  // with avail_out == 0), whatever follows; the one-shot inflate cannot stop
  // there, so the data goes through a stream whose output chunks are one
  // cluster long, and its first chunk is kept if it is full.
  const first = await new Promise<Uint8Array | undefined>((resolve) => {
    const inflater = z.createInflateRaw(options);
    let settled = false;
    const settle = (chunk: Uint8Array | undefined): void => {
      if (settled) return;
      settled = true;
      inflater.destroy();
      resolve(chunk);
    };
    inflater.on('data', (chunk: Buffer) => settle(chunk.length === clusterSize ? chunk : undefined));
    inflater.on('error', () => settle(undefined));
    inflater.on('end', () => settle(undefined));
    inflater.end(src);
  });
  if (!first) throw new Error(failure);
  out.set(first);
}

/**
 * Inflates raw deflate data into one cluster on the calling thread; returns
 * the cluster or the DecompressError for it.
 */
export async function inflateCluster(data: Uint8Array, clusterSize: number): Promise<Buffer | DecompressError> {
  const out = Buffer.alloc(clusterSize);
  try {
    await inflateQcow2Cluster(zlib, data, clusterSize, out);
    return out;
  } catch (err) {
    return new DecompressError(err instanceof Error ? err.message : String(err));
  }
}
