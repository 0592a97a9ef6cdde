/**
 * One memory budget for the reply buffers of every NBD connection. A client
 * that sends reads and never reads the replies makes the server hold them
 * until it disconnects; without a bound across connections, a few such
 * clients take the agent's memory.
 *
 * The budget is split in two halves. The first is divided equally among the
 * server's connection slots: a connection can always hold its slot's share,
 * whatever the others do, so clients that stop reading can never starve the
 * rest. The second is shared, first come first served; when it runs out, the
 * connections that want more wait (they stop reading requests), and what is
 * given back goes first to the waiting connections that hold the least.
 */
export class BufferBudget {
  /** What one connection can always hold. */
  readonly guaranteedBytes: number;
  /** The part shared by all connections beyond their guaranteed bytes. */
  readonly sharedBytes: number;
  private used = 0;
  private sharedUsed = 0;
  private peak = 0;
  private readonly waiting: BudgetAccount[] = [];

  constructor(
    /** Bytes held at most, over all accounts. */
    readonly limitBytes: number,
    /** Accounts open at most at once (the server's connection slots). */
    readonly slots: number,
  ) {
    this.guaranteedBytes = Math.floor(limitBytes / 2 / slots);
    this.sharedBytes = limitBytes - this.guaranteedBytes * slots;
  }

  /** An account for one connection; close it when the connection ends. */
  open(): BudgetAccount {
    return new BudgetAccount(this);
  }

  /** Bytes held now, by all accounts. */
  get usedBytes(): number {
    return this.used;
  }

  /** Most bytes ever held at once. */
  get peakBytes(): number {
    return this.peak;
  }

  /** Accounts waiting for bytes now (their connections read no requests meanwhile). */
  get waitingAccounts(): number {
    return this.waiting.length;
  }

  /** Shared bytes `account` would take on top of what it holds to hold `bytes` more. */
  private sharedCost(account: BudgetAccount, bytes: number): number {
    const g = this.guaranteedBytes;
    return Math.max(account.heldBytes + bytes - g, 0) - Math.max(account.heldBytes - g, 0);
  }

  /** @internal Takes `bytes` for `account` when they fit now. */
  tryTake(account: BudgetAccount, bytes: number): boolean {
    const shared = this.sharedCost(account, bytes);
    if (this.sharedUsed + shared > this.sharedBytes || this.used + bytes > this.limitBytes) return false;
    this.sharedUsed += shared;
    this.used += bytes;
    this.peak = Math.max(this.peak, this.used);
    return true;
  }

  /** @internal Gives back `bytes` of an account that held `heldBefore`. */
  give(heldBefore: number, bytes: number): void {
    const g = this.guaranteedBytes;
    this.sharedUsed -= Math.max(heldBefore - g, 0) - Math.max(heldBefore - bytes - g, 0);
    this.used -= bytes;
    this.grant();
  }

  /** @internal */
  enqueue(account: BudgetAccount): void {
    this.waiting.push(account);
  }

  /** @internal */
  dequeue(account: BudgetAccount): void {
    const i = this.waiting.indexOf(account);
    if (i >= 0) this.waiting.splice(i, 1);
  }

  /** Serves the waiting accounts that fit, those holding the least first (stable: equal holders in arrival order). */
  private grant(): void {
    if (this.waiting.length === 0) return;
    const byHeld = [...this.waiting].sort((a, b) => a.heldBytes - b.heldBytes);
    for (const account of byHeld) account.retry();
  }
}

/** One connection's share of a BufferBudget. */
export class BudgetAccount {
  private held = 0;
  private wanted: { bytes: number; resolve(granted: boolean): void } | null = null;
  private closed = false;

  constructor(private readonly budget: BufferBudget) {}

  /** Bytes this account holds. */
  get heldBytes(): number {
    return this.held;
  }

  /** The most one take() may ask for. */
  get largestTake(): number {
    return this.budget.guaranteedBytes + this.budget.sharedBytes;
  }

  /** True while a take() waits for bytes. */
  get waiting(): boolean {
    return this.wanted !== null;
  }

  /**
   * Takes `bytes`: true at once when they fit, else a promise that resolves
   * true once they were taken, or false when the account was closed first.
   * One take at a time may wait.
   */
  take(bytes: number): true | Promise<boolean> {
    if (this.closed) return Promise.resolve(false);
    if (this.wanted !== null) throw new Error('BudgetAccount: one take at a time may wait');
    if (bytes > this.largestTake) {
      throw new RangeError(`BudgetAccount: ${bytes} bytes can never fit a budget of ${this.budget.limitBytes}`);
    }
    if (this.budget.tryTake(this, bytes)) {
      this.held += bytes;
      return true;
    }
    return new Promise<boolean>((resolve) => {
      this.wanted = { bytes, resolve };
      this.budget.enqueue(this);
    });
  }

  /** Gives back `bytes` taken earlier. */
  release(bytes: number): void {
    if (bytes === 0) return;
    const before = this.held;
    this.held -= bytes;
    this.budget.give(before, bytes);
  }

  /** A waiting take() resolves false; later takes too. Bytes still held are released by their holders. */
  close(): void {
    this.closed = true;
    this.cancel();
  }

  /** A waiting take() resolves false. */
  cancel(): void {
    const w = this.wanted;
    if (w === null) return;
    this.wanted = null;
    this.budget.dequeue(this);
    w.resolve(false);
  }

  /** @internal Called by the budget when bytes came back. */
  retry(): void {
    const w = this.wanted;
    if (w === null || !this.budget.tryTake(this, w.bytes)) return;
    this.held += w.bytes;
    this.wanted = null;
    this.budget.dequeue(this);
    w.resolve(true);
  }
}
