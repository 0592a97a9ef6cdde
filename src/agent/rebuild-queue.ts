/**
 * The segment rebuilds of one image, one after the other, and their state
 * for `status`. A rebuild that fails leaves the queue usable: the next boot's
 * rebuild runs as usual.
 */
/** waiting: queued behind a boot in its first seconds on this host (see Agent.awayFromBootStarts). */
export type RebuildState = 'idle' | 'waiting' | 'running' | 'failed';

export interface RebuildStatus {
  state: RebuildState;
  lastError?: string;
  lastPublishedAt?: string;
}

export interface RebuildOutcome {
  /** true: a map and segment were published; false: nothing to publish. */
  published: boolean;
}

export class RebuildQueue {
  private tail: Promise<void> = Promise.resolve();
  private state: RebuildState = 'idle';
  private lastError: string | undefined;
  private lastPublishedAt: string | undefined;
  /** Rebuilds queued or running. */
  private pending = 0;

  /**
   * Runs `rebuild` after the rebuilds queued before it, and after `wait`
   * (which never rejects); `done` hears how it ended (published, nothing to
   * publish, or the error).
   */
  enqueue(rebuild: () => Promise<RebuildOutcome>, done: (outcome: RebuildOutcome | Error) => void, wait?: () => Promise<void>): void {
    this.pending++;
    this.tail = this.tail.then(async () => {
      try {
        if (wait) {
          this.state = 'waiting';
          await wait();
        }
        this.state = 'running';
        const outcome = await rebuild();
        if (outcome.published) this.lastPublishedAt = new Date().toISOString();
        this.state = 'idle';
        done(outcome);
      } catch (err) {
        const error = err instanceof Error ? err : new Error(String(err));
        this.state = 'failed';
        this.lastError = error.message;
        done(error);
      } finally {
        this.pending--;
      }
    });
  }

  /** True from enqueue until that rebuild has ended. */
  get busy(): boolean {
    return this.pending > 0;
  }

  /** Resolves when every rebuild queued so far has ended. */
  settled(): Promise<void> {
    return this.tail;
  }

  status(): RebuildStatus {
    const s: RebuildStatus = { state: this.state };
    if (this.lastError) s.lastError = this.lastError;
    if (this.lastPublishedAt) s.lastPublishedAt = this.lastPublishedAt;
    return s;
  }
}
