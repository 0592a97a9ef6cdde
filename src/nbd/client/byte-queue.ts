/**
 * Bytes received from a socket, consumed in exact-size pieces. Takes are
 * zero-copy when the piece lies inside one received chunk; takeInto copies
 * into the caller's memory.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private headOffset = 0;
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** Removes and returns exactly n bytes, or undefined (consuming nothing) if fewer are queued. */
  take(n: number): Buffer | undefined {
    if (n > this.total) return undefined;
    if (n === 0) return Buffer.alloc(0);
    const head = this.chunks[0]!;
    const available = head.length - this.headOffset;
    if (n <= available) {
      const piece = head.subarray(this.headOffset, this.headOffset + n);
      this.advance(n);
      return piece;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.chunks[0]!;
      const count = Math.min(n - filled, chunk.length - this.headOffset);
      chunk.copy(out, filled, this.headOffset, this.headOffset + count);
      filled += count;
      this.advance(count);
    }
    return out;
  }

  /** Moves up to `max` queued bytes into target at `at` (no allocation); how many it moved. */
  takeInto(target: Buffer, at: number, max: number): number {
    const n = Math.min(max, this.total);
    let moved = 0;
    while (moved < n) {
      const chunk = this.chunks[0]!;
      const count = Math.min(n - moved, chunk.length - this.headOffset);
      chunk.copy(target, at + moved, this.headOffset, this.headOffset + count);
      moved += count;
      this.advance(count);
    }
    return moved;
  }

  /** Copies what is still queued into memory of its own: the chunks' memory is about to be reused. */
  detach(): void {
    if (this.total === 0) {
      this.chunks = [];
      this.headOffset = 0;
      return;
    }
    const own = Buffer.allocUnsafe(this.total);
    this.takeInto(own, 0, this.total);
    this.push(own);
  }

  private advance(n: number): void {
    this.total -= n;
    this.headOffset += n;
    while (this.chunks.length > 0 && this.headOffset >= this.chunks[0]!.length) {
      this.headOffset -= this.chunks[0]!.length;
      this.chunks.shift();
    }
  }
}
