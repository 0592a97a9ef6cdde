/**
 * zstd decoding of one qcow2 compressed cluster, as QEMU's
 * qcow2_zstd_decompress does it: frames are decoded until exactly one
 * cluster is produced, the last frame must end exactly there, and bytes
 * after it (the rest of the last 512-byte sector) are ignored.
 *
 * Each frame is decoded by libzstd (ZSTD_decompress, see libzstd.ts), as
 * QEMU does: a frame that libzstd refuses, that would decode past the
 * cluster, or whose size differs from its header's is an error.
 *
 * decodeZstdCluster is serialised into the decoder worker threads (see
 * decode-pool.ts), so it must stay self-contained: no imports, no references
 * to module-level names; libzstd comes in as a parameter.
 */

/** The libzstd entry points used, from its emscripten module (WebAssembly memory in HEAPU8). */
export interface LibzstdModule {
  _malloc(size: number): number;
  _free(ptr: number): void;
  _ZSTD_decompress(dst: number, dstCapacity: number, src: number, srcSize: number): number;
  _ZSTD_isError(code: number): number;
  readonly HEAPU8: Uint8Array;
}

/** Errors from decodeZstdCluster carry this prefix so callers can tell them apart. */
export const ZSTD_ERROR_PREFIX = 'zstd: ';

/**
 * Decodes one cluster into `out` (by default a new Uint8Array of exactly
 * `clusterSize` bytes) and returns it, or throws an Error whose message
 * starts with ZSTD_ERROR_PREFIX (`out` then holds unspecified bytes).
 */
export function decodeZstdCluster(
  src: Uint8Array,
  clusterSize: number,
  zstd: LibzstdModule,
  out: Uint8Array = new Uint8Array(clusterSize),
): Uint8Array {
  const fail = (message: string): never => {
    throw new Error(`zstd: ${message}`);
  };
  // QEMU compresses one cluster (at most 2 MiB) per frame and declares its
  // size; a frame without a size and a larger window is refused.
  const maxWindow = 8 * 1024 * 1024;
  // One frame through libzstd, into at most `capacity` bytes (ZSTD_decompress
  // fails with dstSize_tooSmall past it).
  const decodeFrame = (frame: Uint8Array, capacity: number): Uint8Array => {
    const src = zstd._malloc(frame.length);
    const dst = zstd._malloc(Math.max(1, capacity));
    if (src === 0 || dst === 0) {
      zstd._free(src);
      zstd._free(dst);
      throw new Error('zstd: out of decoder memory');
    }
    try {
      zstd.HEAPU8.set(frame, src);
      const n = zstd._ZSTD_decompress(dst, capacity, src, frame.length);
      // zstd_errors.h: ZSTD_error_dstSize_tooSmall = 70 (an error is -code as a size_t).
      if (zstd._ZSTD_isError(n) && -n === 70) throw new Error(`zstd: data decompresses to more than one cluster (${clusterSize} bytes)`);
      if (zstd._ZSTD_isError(n)) throw new Error(`zstd: invalid data (libzstd refused the frame, error ${-n})`);
      return zstd.HEAPU8.slice(dst, dst + (n >>> 0));
    } finally {
      zstd._free(src);
      zstd._free(dst);
    }
  };
  if (out.length !== clusterSize) throw new RangeError(`output buffer of ${out.length} bytes for a ${clusterSize}-byte cluster`);
  let produced = 0;
  let pos = 0;
  const u32le = (p: number): number => (src[p]! | (src[p + 1]! << 8) | (src[p + 2]! << 16) | (src[p + 3]! << 24)) >>> 0;
  const need = (n: number): void => {
    if (n > src.length) fail(`data ended after ${produced} of ${clusterSize} bytes`);
  };
  while (produced < clusterSize) {
    need(pos + 8);
    const magic = u32le(pos);
    // RFC 8878 3.1.2: skippable frames, magic 0x184D2A5?, 4-byte length.
    if ((magic & 0xfffffff0) >>> 0 === 0x184d2a50) {
      pos += 8 + u32le(pos + 4);
      continue;
    }
    // RFC 8878 3.1.1: Zstandard frame, magic 0xFD2FB528.
    if (magic !== 0xfd2fb528) fail(`bad frame magic 0x${magic.toString(16)}`);
    // Frame_Header_Descriptor: FCS flag bits 7-6, Single_Segment bit 5, reserved bit 3,
    // Content_Checksum bit 2, Dictionary_ID flag bits 1-0.
    const descriptor = src[pos + 4]!;
    const fcsFlag = descriptor >> 6;
    const singleSegment = (descriptor >> 5) & 1;
    if (descriptor & 0x08) fail('frame header has the reserved bit set');
    if (descriptor & 0x03) fail('frame uses a dictionary');
    let p = pos + 5;
    let windowSize = 0;
    if (!singleSegment) {
      // Window_Descriptor: exponent bits 7-3, mantissa bits 2-0.
      const wd = src[p]!;
      const base = 2 ** (10 + (wd >> 3));
      windowSize = base + (base / 8) * (wd & 7);
      p += 1;
    }
    // Frame_Content_Size: 0, 1, 2, 4 or 8 bytes, little endian; 2-byte sizes are offset by 256.
    const fcsBytes = [singleSegment, 2, 4, 8][fcsFlag]!;
    need(p + fcsBytes);
    let contentSize = 0;
    for (let i = fcsBytes - 1; i >= 0; i--) contentSize = contentSize * 256 + src[p + i]!;
    if (fcsBytes === 2) contentSize += 256;
    // With Single_Segment, Window_Size is Frame_Content_Size.
    if (singleSegment) windowSize = contentSize;
    p += fcsBytes;
    // Blocks (RFC 8878 3.1.1.2): 3-byte header, Last_Block bit 0, Block_Type bits 2-1,
    // Block_Size bits 23-3; raw and compressed blocks carry Block_Size bytes, RLE one.
    for (let last = 0; !last; ) {
      need(p + 3);
      const bh = src[p]! | (src[p + 1]! << 8) | (src[p + 2]! << 16);
      last = bh & 1;
      const type = (bh >> 1) & 3;
      if (type === 3) fail('block has the reserved block type');
      p += 3 + (type === 1 ? 1 : bh >>> 3);
      need(p);
    }
    if ((descriptor >> 2) & 1) p += 4; // Content_Checksum
    need(p);
    const frame = src.subarray(pos, p);
    const room = clusterSize - produced;
    if (fcsBytes > 0 && contentSize > room) fail(`data decompresses to more than one cluster (${clusterSize} bytes)`);
    if (fcsBytes === 0 && windowSize > maxWindow) fail(`window of ${windowSize} bytes is too large`);
    const data = decodeFrame(frame, room);
    if (fcsBytes > 0 && data.length !== contentSize) fail(`frame decoded to ${data.length} bytes, its header says ${contentSize}`);
    out.set(data, produced);
    produced += data.length;
    pos = p;
  }
  return out;
}
