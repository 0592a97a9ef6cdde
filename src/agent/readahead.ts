/**
 * Sequential readahead on cache misses, for the reads no segment predicts
 * (a first boot, or blocks the map missed). A boot loader reading the kernel
 * and initrd issues thousands of small serial reads; on remote storage each
 * costs a round trip. When a read continues a recent stream, the miss is
 * extended past the read's end by a window that doubles per hit of the
 * stream, from `initialBytes` up to `maxBytes` (the Linux page cache's
 * scheme, as nbdkit's readahead filter does it).
 *
 * Several streams are tracked at once (VMs booting the same image, a guest's
 * parallel readers), least recently used first out.
 */

export interface ReadaheadOptions {
  /** First window, bytes; 0 disables readahead. */
  initialBytes: number;
  /** Largest window, bytes. */
  maxBytes: number;
  /** Streams tracked at once. */
  streams?: number;
}

export const DEFAULT_READAHEAD: ReadaheadOptions = { initialBytes: 128 * 1024, maxBytes: 2 * 1024 * 1024, streams: 16 };

interface Stream {
  /** Where the stream's next read is expected (end of its furthest read). */
  next: number;
  /** End of what has been read ahead for the stream so far. */
  aheadEnd: number;
  window: number;
  lastUse: number;
}

export class SequentialReadahead {
  private readonly streams: Stream[] = [];
  private readonly maxStreams: number;
  private clock = 0;

  constructor(private readonly options: ReadaheadOptions) {
    if (options.initialBytes < 0 || options.maxBytes < options.initialBytes) {
      throw new RangeError(`readahead: need 0 <= initial (${options.initialBytes}) <= max (${options.maxBytes})`);
    }
    this.maxStreams = Math.max(1, options.streams ?? DEFAULT_READAHEAD.streams!);
  }

  get enabled(): boolean {
    return this.options.initialBytes > 0;
  }

  /**
   * Notes a guest read of [offset, end); `missed` says whether any of it had
   * to come from storage. Returns the end of the range to fetch ahead to:
   * beyond `end` only for a miss that continues a stream (a stream running
   * through cached blocks needs nothing, and reading ahead there would fetch
   * blocks the boot never reads).
   */
  onRead(offset: number, end: number, missed: boolean): number {
    if (!this.enabled) return end;
    this.clock++;
    const stream = this.streams.find((s) => offset >= s.next && offset <= s.aheadEnd);
    if (!stream) {
      this.remember({ next: end, aheadEnd: end, window: 0, lastUse: this.clock });
      return end;
    }
    stream.next = Math.max(stream.next, end);
    stream.lastUse = this.clock;
    if (!missed) return end;
    stream.window = stream.window === 0 ? this.options.initialBytes : Math.min(this.options.maxBytes, stream.window * 2);
    stream.aheadEnd = Math.max(stream.aheadEnd, end + stream.window);
    return stream.aheadEnd;
  }

  private remember(stream: Stream): void {
    if (this.streams.length >= this.maxStreams) {
      let oldest = 0;
      for (let i = 1; i < this.streams.length; i++) if (this.streams[i]!.lastUse < this.streams[oldest]!.lastUse) oldest = i;
      this.streams.splice(oldest, 1);
    }
    this.streams.push(stream);
  }
}
