/**
 * An S3 bucket (AWS S3, Ceph RGW, MinIO) as the storage system, at
 * `s3://BUCKET/PREFIX`. Keys are relative to the prefix.
 *
 * - stat: HeadObject. The stamp is size and ETag; the version is the ETag.
 * - openSource: every ranged GET of an open source carries `If-Match` with
 *   the ETag it opened, so an object overwritten while VMs run is never read
 *   as a mix of two versions: a 412 (or a 404) is ImageChangedError, as for a
 *   rewritten local file.
 * - put: a single PUT for a buffer, a multipart upload with bounded memory
 *   for a stream. Both are atomic on S3: readers see the old object or the
 *   new one.
 * - list: pages through ListObjectsV2.
 */
import { Readable } from 'node:stream';
import {
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  type GetObjectCommandOutput,
  type S3Client,
} from '@aws-sdk/client-s3';
import { Upload } from '@aws-sdk/lib-storage';
import { BootcacheError, ConflictError, FileNotFoundError, ImageChangedError, StorageIOError, StorageReadError, UsageError } from '../errors.js';
import { checkTarget } from '../image/file-source.js';
import type { ByteSource } from '../image/types.js';
import { validateKey } from './local.js';
import { posix } from 'node:path';
import type { ObjectStat, OpenOptions, PutOptions, Storage } from './types.js';

/** A parsed `s3://BUCKET/PREFIX` location. */
export interface S3Location {
  bucket: string;
  /** Key prefix without leading or trailing '/'; '' for the bucket's root. */
  prefix: string;
}

export const S3_SCHEME = 's3://';

export function isS3Url(location: string): boolean {
  return location.startsWith(S3_SCHEME);
}

/** Parses `s3://BUCKET[/PREFIX]`; throws UsageError on anything else. */
export function parseS3Url(url: string): S3Location {
  if (!isS3Url(url)) throw new UsageError(`${JSON.stringify(url)} is not an s3:// URL`);
  const rest = url.slice(S3_SCHEME.length);
  const slash = rest.indexOf('/');
  const bucket = slash === -1 ? rest : rest.slice(0, slash);
  // Bucket naming rules (S3 "Bucket naming rules"): 3-63 of [a-z0-9.-], starting and ending alphanumeric.
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) {
    throw new UsageError(`${JSON.stringify(url)}: ${JSON.stringify(bucket)} is not a valid bucket name`);
  }
  const prefix = (slash === -1 ? '' : rest.slice(slash + 1)).replace(/\/+$/, '');
  if (prefix !== '') validateKey(prefix);
  return { bucket, prefix };
}

/** Multipart part size for streamed puts (segments); memory is about partSize × UPLOAD_QUEUE. */
const UPLOAD_PART_SIZE = 8 * 1024 * 1024;
const UPLOAD_QUEUE = 2;

interface S3ErrorShape {
  name?: string;
  Code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number };
}

function httpStatus(err: unknown): number | undefined {
  return (err as S3ErrorShape | undefined)?.$metadata?.httpStatusCode;
}

function isNotFound(err: unknown): boolean {
  const e = err as S3ErrorShape | undefined;
  return httpStatus(err) === 404 || e?.name === 'NoSuchKey' || e?.name === 'NotFound';
}

/** Maps an SDK error to a bootcache error: permanent ones as they are, others worth a retry. */
function s3Failure(err: unknown, key: string, doing: string): BootcacheError {
  if (err instanceof BootcacheError) return err;
  const e = err as S3ErrorShape | undefined;
  const status = httpStatus(err);
  const what = `${e?.name ?? 'error'}${status === undefined ? '' : ` (HTTP ${status})`}: ${e?.message ?? String(err)}`;
  if (isNotFound(err)) return new FileNotFoundError(`no such object (while ${doing})`, { file: key, cause: err });
  if (status === 403 || status === 401) return new StorageIOError(`access denied (while ${doing}): ${what}`, { file: key, cause: err });
  if (status === 400) return new StorageIOError(`bad request (while ${doing}): ${what}`, { file: key, cause: err });
  return new StorageReadError(`${what} (while ${doing})`, { file: key, cause: err });
}

export class S3Storage implements Storage {
  readonly description: string;

  constructor(
    private readonly client: S3Client,
    private readonly location: S3Location,
    /** Keys per ListObjectsV2 page (S3's maximum is 1000). */
    private readonly listPageSize = 1000,
  ) {
    this.description = `s3://${location.bucket}${location.prefix === '' ? '' : `/${location.prefix}`}`;
  }

  async ready(): Promise<void> {
    try {
      await this.client.send(new HeadBucketCommand({ Bucket: this.location.bucket }));
    } catch (err) {
      const status = httpStatus(err);
      const endpoint = await this.client.config.endpoint?.().then((e) => `${e.protocol}//${e.hostname}${e.port === undefined ? '' : `:${e.port}`}`).catch(() => undefined);
      const at = endpoint === undefined ? '' : ` at ${endpoint}`;
      if (status === 404) throw new StorageIOError(`bucket ${JSON.stringify(this.location.bucket)} does not exist${at}`, { cause: err });
      if (status === 403 || status === 401) throw new StorageIOError(`access to bucket ${JSON.stringify(this.location.bucket)}${at} denied: check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/credentials)`, { cause: err });
      const e = err as S3ErrorShape;
      throw new StorageIOError(`cannot reach the object store${at} for bucket ${JSON.stringify(this.location.bucket)}: ${e?.name ?? 'error'}: ${e?.message ?? String(err)}`, { cause: err });
    }
  }

  /** The bucket key of a storage key. */
  private objectKey(key: string): string {
    validateKey(key);
    return this.location.prefix === '' ? key : `${this.location.prefix}/${key}`;
  }

  async stat(key: string): Promise<ObjectStat | undefined> {
    try {
      const head = await this.client.send(new HeadObjectCommand({ Bucket: this.location.bucket, Key: this.objectKey(key) }));
      return objectStat(key, head.ContentLength, head.ETag, head.LastModified);
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw s3Failure(err, key, 'stat');
    }
  }

  async read(key: string, offset: number, length: number): Promise<Buffer> {
    const target = Buffer.allocUnsafe(length);
    await this.getInto(key, undefined, offset, length, target, 0, undefined);
    return target;
  }

  async get(key: string): Promise<Buffer> {
    let out: GetObjectCommandOutput;
    try {
      out = await this.client.send(new GetObjectCommand({ Bucket: this.location.bucket, Key: this.objectKey(key) }));
    } catch (err) {
      throw s3Failure(err, key, 'reading');
    }
    try {
      return Buffer.from(await out.Body!.transformToByteArray());
    } catch (err) {
      throw s3Failure(err, key, 'reading');
    }
  }

  async put(key: string, body: Buffer | AsyncIterable<Buffer>, options: PutOptions = {}): Promise<ObjectStat> {
    const Key = this.objectKey(key);
    if (options.ifVersion !== undefined && !Buffer.isBuffer(body)) throw new RangeError('a conditional put takes a Buffer');
    // A single PUT's response names the version written (its ETag): no HEAD after it.
    let written: string | undefined;
    try {
      if (options.ifVersion !== undefined) {
        written = await this.conditionalPut(key, Key, body as Buffer, options.ifVersion);
      } else if (Buffer.isBuffer(body)) {
        written = (await this.client.send(new PutObjectCommand({ Bucket: this.location.bucket, Key, Body: body, ContentLength: body.length }))).ETag;
      } else {
        const upload = new Upload({
          client: this.client,
          params: { Bucket: this.location.bucket, Key, Body: Readable.from(body) },
          partSize: UPLOAD_PART_SIZE,
          queueSize: UPLOAD_QUEUE,
          leavePartsOnError: false,
        });
        await upload.done();
      }
    } catch (err) {
      if (err instanceof ConflictError) throw err;
      const failure = s3Failure(err, key, 'publishing');
      throw failure instanceof StorageReadError ? new StorageIOError(failure.message, { file: key, cause: err }) : failure;
    }
    if (written !== undefined && Buffer.isBuffer(body)) return objectStat(key, body.length, written)!;
    const st = await this.stat(key);
    if (!st) throw new StorageIOError('object vanished right after publishing', { file: key });
    return st;
  }

  /** Set once the endpoint took a bare If-Match ETag after refusing the quoted one (Ceph RGW 16): later puts send it bare first. */
  private bareIfMatch = false;

  /**
   * PUT with If-Match (or If-None-Match: *). Ceph RGW 16 compares If-Match
   * on PUT against the bare ETag, without the quotes that S3 and HTTP use: a
   * 412 while the object still carries the expected ETag is retried once
   * with the bare value, which later puts then send first. Returns the ETag written.
   */
  private async conditionalPut(key: string, Key: string, body: Buffer, ifVersion: string | null): Promise<string | undefined> {
    const put = async (condition: { IfMatch?: string; IfNoneMatch?: string }) =>
      (await this.client.send(new PutObjectCommand({ Bucket: this.location.bucket, Key, Body: body, ContentLength: body.length, ...condition }))).ETag;
    const conflict = (err: unknown): ConflictError =>
      new ConflictError(`changed since it was read (expected ${ifVersion ?? 'no object'})`, { file: key, cause: err });
    if (ifVersion === null) {
      return put({ IfNoneMatch: '*' }).catch((err: unknown) => {
        throw httpStatus(err) === 412 ? conflict(err) : err;
      });
    }
    const quoted = ifVersion.slice(ifVersion.indexOf(':') + 1);
    const bare = quoted.replace(/^"(.*)"$/, '$1');
    const [first, second] = this.bareIfMatch ? [bare, quoted] : [quoted, bare];
    try {
      return await put({ IfMatch: first });
    } catch (err) {
      if (httpStatus(err) !== 412 || first === second) throw httpStatus(err) === 412 ? conflict(err) : err;
      if ((await this.stat(key))?.version !== ifVersion) throw conflict(err);
      const etag = await put({ IfMatch: second }).catch((again: unknown) => {
        throw httpStatus(again) === 412 ? conflict(again) : again;
      });
      this.bareIfMatch = second === bare;
      return etag;
    }
  }

  async list(prefix = ''): Promise<ObjectStat[]> {
    const base = this.location.prefix === '' ? '' : `${this.location.prefix}/`;
    const out: ObjectStat[] = [];
    let token: string | undefined;
    do {
      let page;
      try {
        page = await this.client.send(
          new ListObjectsV2Command({ Bucket: this.location.bucket, Prefix: `${base}${prefix}`, ContinuationToken: token, MaxKeys: this.listPageSize }),
        );
      } catch (err) {
        throw s3Failure(err, prefix || '.', 'listing');
      }
      for (const object of page.Contents ?? []) {
        if (object.Key === undefined || !object.Key.startsWith(base)) continue;
        const key = object.Key.slice(base.length);
        // Keys that cannot name a storage object here (directory markers, '..' segments) are left out.
        try {
          validateKey(key);
        } catch {
          continue;
        }
        const st = objectStat(key, object.Size, object.ETag, object.LastModified);
        if (st) out.push(st);
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token !== undefined);
    return out.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  }

  readonly opensWithHead = true;

  /**
   * One version of an object. With `known`, no request; with `head`, one
   * ranged GET of the head, whose response names the version (ETag) and the
   * size (Content-Range) as a HEAD would; otherwise a HEAD.
   */
  async openSource(key: string, options: OpenOptions = {}): Promise<ByteSource> {
    if (options.known) return new S3ByteSource(this, key, options.known);
    const head = options.head ?? 0;
    if (head > 0) {
      const opened = await this.getHead(key, head);
      if (opened) return new S3ByteSource(this, key, opened.stat, opened.head);
    }
    const st = await this.stat(key);
    if (!st) throw new FileNotFoundError('no such object (while opening)', { file: key });
    return new S3ByteSource(this, key, st);
  }

  /** The first `length` bytes (fewer if the object is shorter) and the version they belong to; undefined for an empty object (416). */
  private async getHead(key: string, length: number): Promise<{ stat: ObjectStat; head: Buffer } | undefined> {
    const doing = `opening with a read of its first ${length} bytes`;
    let out: GetObjectCommandOutput;
    try {
      out = await this.client.send(new GetObjectCommand({ Bucket: this.location.bucket, Key: this.objectKey(key), Range: `bytes=0-${length - 1}` }));
    } catch (err) {
      if (isNotFound(err)) throw new FileNotFoundError('no such object (while opening)', { file: key, cause: err });
      if (httpStatus(err) === 416) return undefined;
      throw s3Failure(err, key, doing);
    }
    // "bytes 0-N/TOTAL" (RFC 9110, 14.4); a 200 without it is the whole object.
    const total = /\/(\d+)$/.exec(out.ContentRange ?? '')?.[1];
    const size = total !== undefined ? Number(total) : out.ContentLength;
    const stat = objectStat(key, size, out.ETag, out.LastModified);
    if (!stat) throw new StorageReadError(`response to ${doing} lacks a size or an ETag`, { file: key });
    const want = Math.min(length, stat.size);
    const head = Buffer.allocUnsafe(want);
    await readBodyInto(out.Body as Readable, head, 0, want, key, doing);
    return { stat, head };
  }

  resolveRelative(fromKey: string, name: string): string {
    if (name.startsWith('/') || name.includes('://')) {
      throw new UsageError(`backing file ${JSON.stringify(name)} of ${fromKey}: only names relative to the image can be resolved on an object store`);
    }
    const key = posix.normalize(posix.join(posix.dirname(fromKey), name));
    if (key === '..' || key.startsWith('../')) {
      throw new UsageError(`backing file ${JSON.stringify(name)} of ${fromKey} lies outside ${this.description}`);
    }
    return key;
  }

  /**
   * A ranged GET into target[targetOffset, +length); with `etag`, only of
   * that version (If-Match): a 412 or 404 then means the object changed.
   */
  async getInto(
    key: string,
    etag: string | undefined,
    offset: number,
    length: number,
    target: Buffer,
    targetOffset: number,
    onChanged: ((err: ImageChangedError) => void) | undefined,
  ): Promise<void> {
    checkTarget(target, targetOffset, length);
    if (length === 0) return;
    const doing = `reading ${length} bytes at offset ${offset}`;
    let out: GetObjectCommandOutput;
    try {
      out = await this.client.send(
        new GetObjectCommand({
          Bucket: this.location.bucket,
          Key: this.objectKey(key),
          Range: `bytes=${offset}-${offset + length - 1}`,
          IfMatch: etag,
        }),
      );
    } catch (err) {
      if (etag !== undefined && (httpStatus(err) === 412 || isNotFound(err))) {
        const changed = new ImageChangedError(
          `changed on storage since it was opened (ETag ${etag}${isNotFound(err) ? ', now deleted' : ''}); the version opened can no longer be read`,
          { file: key, cause: err },
        );
        onChanged?.(changed);
        throw changed;
      }
      throw s3Failure(err, key, doing);
    }
    await readBodyInto(out.Body as Readable, target, targetOffset, length, key, doing);
  }
}

/** Copies a response body of exactly `length` bytes into `target` at `targetOffset`; more or fewer is an error. */
async function readBodyInto(body: Readable, target: Buffer, targetOffset: number, length: number, key: string, doing: string): Promise<void> {
  let done = 0;
  try {
    for await (const chunk of body) {
      const bytes = chunk as Buffer;
      if (done + bytes.length > length) throw new Error(`the response holds more than the ${length} bytes asked for`);
      bytes.copy(target, targetOffset + done);
      done += bytes.length;
    }
  } catch (err) {
    throw s3Failure(err, key, doing);
  }
  if (done !== length) throw new StorageReadError(`response ended after ${done} of ${length} bytes (while ${doing})`, { file: key });
}

/** An ObjectStat from a size and an ETag; undefined when the listing lacks either. */
function objectStat(key: string, size: number | undefined, etag: string | undefined, modified?: Date): ObjectStat | undefined {
  if (size === undefined || etag === undefined) return undefined;
  return { key, size, stamp: `${size}:${etag}`, version: `${size}:${etag}`, ...(modified === undefined ? {} : { modifiedMs: modified.getTime() }) };
}

/** One version of an object: every read names its ETag (If-Match). */
class S3ByteSource implements ByteSource {
  readonly name: string;
  readonly size: number;
  readonly stamp: string;
  readonly version: string;
  readonly modifiedMs?: number;
  readonly headLength?: number;
  private readonly etag: string;
  private changed: ImageChangedError | undefined;

  constructor(
    private readonly storage: S3Storage,
    key: string,
    st: ObjectStat,
    /** Bytes [0, head.length) of this version, read with the open. */
    private readonly head?: Buffer,
  ) {
    this.name = key;
    this.size = st.size;
    this.stamp = st.stamp;
    this.version = st.version;
    if (st.modifiedMs !== undefined) this.modifiedMs = st.modifiedMs;
    if (head !== undefined && head.length > 0) this.headLength = head.length;
    this.etag = st.version.slice(st.version.indexOf(':') + 1);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const target = Buffer.allocUnsafe(length);
    await this.readInto(offset, length, target, 0);
    return target;
  }

  async readInto(offset: number, length: number, target: Buffer, targetOffset: number): Promise<void> {
    if (this.changed) throw this.changed;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new StorageIOError(`read of ${length} bytes at offset ${offset} is past the end of the object (${this.size} bytes)`, { file: this.name });
    }
    if (this.head !== undefined && offset + length <= this.head.length) {
      this.head.copy(target, targetOffset, offset, offset + length);
      return;
    }
    await this.storage.getInto(this.name, this.etag, offset, length, target, targetOffset, (err) => {
      this.changed = err;
    });
  }

  async close(): Promise<void> {
    // Nothing held: requests share the client's connection pool.
  }
}
