import type { DiskImage, Extent } from '../../image/types.js';
import { ExportNotFoundError } from '../errors.js';

/**
 * What the NBD server serves. The agent implements ExportProvider (its cache
 * manager sits behind it); the server never touches files itself.
 */

/** One opened export, owned by one NBD connection. */
export interface NbdExport {
  /** Canonical name (sent as NBD_INFO_NAME). */
  readonly name: string;
  /** Size in bytes. */
  readonly size: number;
  /** Human-readable text for NBD_INFO_DESCRIPTION, if any. */
  readonly description?: string;
  /**
   * Exactly `length` bytes at `offset`. The server only calls it with ranges
   * inside [0, size), up to the maximum request size, many at a time. Any
   * throw becomes an EIO reply; the connection stays up. The server keeps the
   * returned buffer until it is written out: do not reuse or modify it.
   */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * Bytes read() (and cache()) allocate for the range, when more than
   * `length` (block alignment): what the server counts against its buffer budget.
   */
  bufferBytes?(offset: number, length: number): number;
  /** Allocation extents covering [offset, offset+length), in order. */
  extents(offset: number, length: number): Promise<Extent[]>;
  /** Hint that the range will be read soon (NBD_CMD_CACHE). */
  cache?(offset: number, length: number): Promise<void>;
  /** Called once, when the connection that opened it has ended and its requests settled. */
  close(): Promise<void>;
}

/** What NBD_OPT_INFO and the meta context options need to know without opening. */
export interface ExportDescription {
  name: string;
  size: number;
  description?: string;
}

export interface ExportProvider {
  /** Names for NBD_OPT_LIST. */
  list(): Promise<string[]>;
  /**
   * Opens `name` for one connection. Throws ExportNotFoundError when the name
   * is unknown; any other throw is reported to the client as "not available".
   */
  open(name: string): Promise<NbdExport>;
  /**
   * Optional cheap lookup used by NBD_OPT_INFO and NBD_OPT_*_META_CONTEXT, so
   * that a client asking about an export does not open it (opening may start
   * a prefetch). Without it the server opens and closes the export.
   */
  describe?(name: string): Promise<ExportDescription>;
}

/** Serves a DiskImage as an NBD export; closing the export closes the image. */
export class DiskImageExport implements NbdExport {
  constructor(
    readonly name: string,
    private readonly image: DiskImage,
    readonly description?: string,
  ) {}

  get size(): number {
    return this.image.virtualSize;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.image.read(offset, length);
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.image.extents(offset, length);
  }

  close(): Promise<void> {
    return this.image.close();
  }
}

export interface DiskImageExportEntry {
  /** Opens a fresh image for each connection (each gets its own file handle). */
  open(): Promise<DiskImage>;
  description?: string;
}

/**
 * A fixed set of named disk images. Each connection opens its own DiskImage
 * through the entry's callback. The empty name (the NBD "default" export)
 * maps to `defaultExport` when given.
 */
export class DiskImageExportProvider implements ExportProvider {
  private readonly entries: Map<string, DiskImageExportEntry>;

  constructor(
    entries: Record<string, DiskImageExportEntry | (() => Promise<DiskImage>)>,
    private readonly options: { defaultExport?: string } = {},
  ) {
    this.entries = new Map(
      Object.entries(entries).map(([name, entry]) => [name, typeof entry === 'function' ? { open: entry } : entry]),
    );
  }

  async list(): Promise<string[]> {
    return [...this.entries.keys()];
  }

  async open(name: string): Promise<NbdExport> {
    const [canonical, entry] = this.lookup(name);
    return new DiskImageExport(canonical, await entry.open(), entry.description);
  }

  private lookup(name: string): [string, DiskImageExportEntry] {
    const canonical = name === '' && this.options.defaultExport !== undefined ? this.options.defaultExport : name;
    const entry = this.entries.get(canonical);
    if (entry === undefined) {
      throw new ExportNotFoundError(`no export named ${JSON.stringify(name)}`);
    }
    return [canonical, entry];
  }
}
