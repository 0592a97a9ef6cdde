/**
 * Where a command's files are: a local path, or `s3://BUCKET/KEY`. An image
 * on S3 is read in place (ranged GETs); a map or segment on S3 is fetched
 * into a temporary file for the command's file-based code, and an output
 * on S3 is written to a temporary file first and then put, so the object
 * appears whole or not at all. Errors name the s3:// location, not the
 * temporary file.
 */
import { createReadStream } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { Flags } from '@oclif/core';
import { BootcacheError, FileNotFoundError } from '../errors.js';
import { detectFileKind, kindOfHead, type FileKind } from '../core/inspect.js';
import { openImageFromSource } from '../image/open.js';
import type { DiskImage, SourceOpener } from '../image/types.js';
import { createS3Client, type S3Options } from '../storage/open.js';
import { S3Storage, isS3Url, parseS3Url } from '../storage/s3.js';
import { checkProbedDisk, openImageFromFlags } from './image-flags.js';
import { checkInput, type InputKind } from './inputs.js';

/** Flags of every command that reads or writes files: how to reach s3:// locations. */
export const s3Flags = {
  's3-endpoint': Flags.string({ description: 'S3 endpoint for s3:// locations (default AWS_ENDPOINT_URL, else AWS).', helpValue: 'URL' }),
  's3-path-style': Flags.boolean({ description: 'Path-style S3 requests, as Ceph RGW and MinIO need (default off).', allowNo: true }),
  's3-region': Flags.string({ description: 'S3 region (default AWS_REGION, else us-east-1).', helpValue: 'REGION' }),
};

type S3FlagValues = { 's3-endpoint'?: string | undefined; 's3-path-style'?: boolean | undefined; 's3-region'?: string | undefined };

export class Locations {
  private readonly s3: S3Options;
  private storage: S3Storage | undefined;
  private bucket: string | undefined;
  private tmp: string | undefined;
  /** Temporary file of each fetched location, and back. */
  private readonly fetched = new Map<string, string>();

  constructor(flags: S3FlagValues) {
    this.s3 = {
      ...(flags['s3-endpoint'] === undefined ? {} : { endpoint: flags['s3-endpoint'] }),
      ...(flags['s3-path-style'] === undefined ? {} : { pathStyle: flags['s3-path-style'] }),
      ...(flags['s3-region'] === undefined ? {} : { region: flags['s3-region'] }),
    };
  }

  /** The bucket's storage and the key of an s3:// location. */
  private object(location: string): { storage: S3Storage; key: string } {
    const { bucket, prefix } = parseS3Url(location);
    if (prefix === '') throw new FileNotFoundError('names a bucket, not an object', { file: location });
    if (this.storage === undefined || this.bucket !== bucket) {
      this.storage = new S3Storage(createS3Client(this.s3), { bucket, prefix: '' });
      this.bucket = bucket;
    }
    return { storage: this.storage, key: prefix };
  }

  private async tmpDir(): Promise<string> {
    this.tmp ??= await mkdtemp(join(tmpdir(), 'bootcache-s3-'));
    return this.tmp;
  }

  /** checkInput for a local path; for s3://, that the object exists and (fetched) is of `kind`. */
  async check(location: string, kind?: InputKind): Promise<void> {
    if (!isS3Url(location)) return checkInput(location, kind);
    const { storage, key } = this.object(location);
    if (!(await storage.stat(key))) throw new FileNotFoundError(`no such object (while opening the ${kind ?? 'file'})`, { file: location });
    if (kind === 'image' || kind === undefined) return;
    await this.named(location, async () => checkInput(await this.local(location), kind));
  }

  /** A local file holding the location's bytes: the path itself, or an s3:// object fetched once. */
  async local(location: string): Promise<string> {
    if (!isS3Url(location)) return location;
    const known = this.fetched.get(location);
    if (known !== undefined) return known;
    const { storage, key } = this.object(location);
    const path = join(await this.tmpDir(), `${this.fetched.size}-${basename(key)}`);
    await writeFile(path, await storage.get(key));
    this.fetched.set(location, path);
    return path;
  }

  /** Runs `fn` on a local file holding the location's bytes (see local()); its errors name the location. */
  async read<T>(location: string, fn: (path: string) => Promise<T>): Promise<T> {
    const path = await this.local(location);
    return this.named(location, () => fn(path), path);
  }

  /** What the file is, by its first bytes: a map, a segment, an index, or else an image. */
  async kind(location: string): Promise<FileKind> {
    if (!isS3Url(location)) return detectFileKind(location);
    const { storage, key } = this.object(location);
    const size = (await storage.stat(key))?.size ?? 0;
    return kindOfHead(size === 0 ? Buffer.alloc(0) : await storage.read(key, 0, Math.min(size, 16)));
  }

  /** Opens an image: a local file, or an s3:// object read in place (backing files resolve relative to its key). */
  async openImage(location: string, flags: { format?: string | undefined; force?: boolean }): Promise<DiskImage> {
    if (!isS3Url(location)) return openImageFromFlags(location, flags);
    const { storage, key } = this.object(location);
    const opener: SourceOpener = {
      async openRelative(from, name) {
        const backingKey = storage.resolveRelative(from.name, name);
        return { source: await storage.openSource(backingKey), key: backingKey };
      },
    };
    const format = flags.format === 'raw' || flags.format === 'qcow2' ? flags.format : undefined;
    const image = await openImageFromSource(await storage.openSource(key), opener, { force: flags.force ?? false }, [key], format);
    return checkProbedDisk(image, location, format);
  }

  /** Runs `fn` with the image open, closing it whatever happens. */
  async withImage<T>(location: string, flags: { format?: string | undefined; force?: boolean }, fn: (image: DiskImage) => Promise<T>): Promise<T> {
    const image = await this.openImage(location, flags);
    try {
      return await fn(image);
    } finally {
      await image.close();
    }
  }

  /**
   * Runs `write` on a local path for the output `location`: the path itself,
   * or a temporary file that is put to S3 once `write` succeeded.
   */
  async output<T>(location: string, write: (path: string) => Promise<T>): Promise<T> {
    if (!isS3Url(location)) return write(location);
    const { storage, key } = this.object(location);
    const path = join(await this.tmpDir(), `out-${basename(key)}`);
    const result = await this.named(location, () => write(path), path);
    await storage.put(key, createReadStream(path, { highWaterMark: 4 * 1024 * 1024 }));
    return result;
  }

  /** Errors of `fn` name `location` instead of its temporary file. */
  private async named<T>(location: string, fn: () => Promise<T>, path = this.fetched.get(location)): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      const tmp = path ?? this.fetched.get(location);
      if (err instanceof BootcacheError && tmp !== undefined) err.message = err.message.split(tmp).join(location);
      throw err;
    }
  }

  /** Removes the temporary files. */
  async close(): Promise<void> {
    if (this.tmp !== undefined) await rm(this.tmp, { recursive: true, force: true });
  }
}

/** Runs `fn` with the command's locations, removing their temporary files afterwards. */
export async function withLocations<T>(flags: S3FlagValues, fn: (loc: Locations) => Promise<T>): Promise<T> {
  const loc = new Locations(flags);
  try {
    return await fn(loc);
  } finally {
    await loc.close();
  }
}
