/**
 * A small LRU cache of buffers with a byte budget (Map keeps insertion
 * order; a hit moves the entry to the end). At least `minEntries` entries
 * are kept even when they exceed the budget, so huge clusters still cache.
 */
export class BufferLru<K> {
  private readonly entries = new Map<K, Buffer>();
  private bytes = 0;

  constructor(
    private readonly budgetBytes: number,
    private readonly minEntries: number,
  ) {}

  get(key: K): Buffer | undefined {
    const value = this.entries.get(key);
    if (value !== undefined) {
      this.entries.delete(key);
      this.entries.set(key, value);
    }
    return value;
  }

  set(key: K, value: Buffer): void {
    const old = this.entries.get(key);
    if (old !== undefined) {
      this.entries.delete(key);
      this.bytes -= old.length;
    }
    this.entries.set(key, value);
    this.bytes += value.length;
    while (this.bytes > this.budgetBytes && this.entries.size > this.minEntries) {
      const oldest = this.entries.keys().next().value as K;
      this.bytes -= this.entries.get(oldest)!.length;
      this.entries.delete(oldest);
    }
  }

  clear(): void {
    this.entries.clear();
    this.bytes = 0;
  }

  get size(): number {
    return this.entries.size;
  }
}
