/**
 * Recording a profiled boot at the NBD server: an ExportProvider that serves
 * one DiskImage read-only and records every read of the current boot into a
 * block bitmap (the map) and an access-ordered trace (the CSV format of
 * test/data: t_us,op,offset,length,done_us; docs/formats.md "Trace CSV").
 */
import { Bitmap } from '../format/bitmap.js';
import type { BootRecord } from '../format/map.js';
import { ExportNotFoundError, type ExportDescription, type ExportProvider, type NbdExport } from '../nbd/server/index.js';
import type { DiskImage, Extent } from '../image/types.js';

export const TRACE_HEADER = 't_us,op,offset,length,done_us';

/** One boot's reads. Times are µs since `startedAt` (QEMU's start, performance.now() ms). */
export class BootRecording {
  readonly bitmap: Bitmap;
  reads = 0;
  bytes = 0;
  blocks = 0;
  private startedAt: number | undefined;
  private stopped = false;
  private readonly tUs: number[] = [];
  private readonly offsets: number[] = [];
  private readonly lengths: number[] = [];
  private readonly doneUs: (number | undefined)[] = [];
  /** Called for each recorded read with its time (ms since start) and the blocks it added. */
  onRead: ((atMs: number, newBlocks: number) => void) | undefined;

  constructor(
    readonly virtualSize: number,
    readonly blockSize: number,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.bitmap = new Bitmap(Math.ceil(virtualSize / blockSize));
  }

  /** Sets time zero (QEMU's start). */
  start(at: number = this.now()): void {
    this.startedAt = at;
  }

  /** Ms since start. */
  elapsedMs(): number {
    return this.startedAt === undefined ? 0 : this.now() - this.startedAt;
  }

  /** Stops recording: later reads are served but not recorded. */
  stop(): void {
    this.stopped = true;
  }

  get recording(): boolean {
    return !this.stopped;
  }

  /** Records the start of a read; returns its row, or -1 when not recording. */
  begin(offset: number, length: number): number {
    if (this.stopped || length <= 0) return -1;
    const atMs = this.elapsedMs();
    const row = this.tUs.length;
    this.tUs.push(Math.max(0, Math.round(atMs * 1000)));
    this.offsets.push(offset);
    this.lengths.push(length);
    this.doneUs.push(undefined);
    this.reads++;
    this.bytes += length;
    const first = Math.floor(offset / this.blockSize);
    const last = Math.min(Math.floor((offset + length - 1) / this.blockSize), this.bitmap.length - 1);
    let added = 0;
    for (let block = first; block <= last; block++) {
      if (!this.bitmap.get(block)) {
        this.bitmap.set(block);
        added++;
      }
    }
    this.blocks += added;
    this.onRead?.(atMs, added);
    return row;
  }

  /** Records the completion of row `row` (a read finishing after stop() still gets its time). */
  complete(row: number): void {
    if (row < 0 || row >= this.doneUs.length) return;
    this.doneUs[row] = Math.max(this.tUs[row]!, Math.round(this.elapsedMs() * 1000));
  }

  /** The trace as CSV text chunks (header first), reads in the order they were issued. */
  *traceCsv(rowsPerChunk = 4096): Generator<string> {
    let chunk = `${TRACE_HEADER}\n`;
    for (let i = 0; i < this.tUs.length; i++) {
      chunk += `${this.tUs[i]},read,${this.offsets[i]},${this.lengths[i]},${this.doneUs[i] ?? ''}\n`;
      if ((i + 1) % rowsPerChunk === 0) {
        yield chunk;
        chunk = '';
      }
    }
    if (chunk.length > 0) yield chunk;
  }

  /** This boot as mergeBoots takes it. */
  bootRecord(identity: string): BootRecord {
    return { blockSize: this.blockSize, virtualSize: this.virtualSize, identity, bitmap: this.bitmap };
  }
}

/** One export (`name`) serving `image`; reads go to the current recording. */
export class RecordingExportProvider implements ExportProvider {
  recording: BootRecording | undefined;
  /** Connections open now. */
  connections = 0;

  constructor(
    readonly image: DiskImage,
    readonly name = 'disk',
  ) {}

  async list(): Promise<string[]> {
    return [this.name];
  }

  async describe(name: string): Promise<ExportDescription> {
    this.check(name);
    return { name: this.name, size: this.image.virtualSize };
  }

  async open(name: string): Promise<NbdExport> {
    this.check(name);
    this.connections++;
    return new RecordingExport(this);
  }

  private check(name: string): void {
    if (name !== this.name && name !== '') throw new ExportNotFoundError(`no export named ${JSON.stringify(name)}`);
  }
}

class RecordingExport implements NbdExport {
  private closed = false;

  constructor(private readonly provider: RecordingExportProvider) {}

  get name(): string {
    return this.provider.name;
  }

  get size(): number {
    return this.provider.image.virtualSize;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const recording = this.provider.recording;
    const row = recording ? recording.begin(offset, length) : -1;
    const data = await this.provider.image.read(offset, length);
    recording?.complete(row);
    return data;
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.provider.image.extents(offset, length);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.provider.connections--;
  }
}
