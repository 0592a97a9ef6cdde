/**
 * Bytes received from a socket, consumed in exact-size pieces. Takes are
 * zero-copy when the piece lies inside one received chunk.
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

  private advance(n: number): void {
    this.total -= n;
    this.headOffset += n;
    while (this.chunks.length > 0 && this.headOffset >= this.chunks[0]!.length) {
      this.headOffset -= this.chunks[0]!.length;
      this.chunks.shift();
    }
  }
}
