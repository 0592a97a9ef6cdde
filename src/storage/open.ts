/**
 * Opens the storage system named by a location: a local directory (or NFS
 * mount), or `s3://BUCKET/PREFIX`. Endpoint and credentials follow the AWS
 * conventions (AWS_ENDPOINT_URL, the environment, the shared config and
 * credentials files, AWS_PROFILE), so existing configs work unchanged.
 */
import { Agent as HttpAgent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import { S3Client } from '@aws-sdk/client-s3';
import { UsageError } from '../errors.js';
import { LocalDirStorage } from './local.js';
import { S3Storage, isS3Url, parseS3Url } from './s3.js';
import type { Storage } from './types.js';

export interface S3Options {
  /** Endpoint URL (Ceph RGW, MinIO); else AWS_ENDPOINT_URL, else AWS's. */
  endpoint?: string;
  /** Path-style requests (http://host/bucket/key), needed by Ceph RGW and MinIO. */
  pathStyle?: boolean;
  /** Region; else AWS_REGION, AWS_DEFAULT_REGION, else us-east-1 (what RGW and MinIO accept). */
  region?: string;
  /** Connections kept open to the endpoint: the prefetch depth plus misses in flight. */
  maxSockets?: number;
  /** One request's limit in ms (connection, headers and body). */
  requestTimeoutMs?: number;
  /** Attempts per request by the SDK (jittered exponential backoff on 5xx, 503 SlowDown and timeouts). */
  maxAttempts?: number;
}

export const S3_DEFAULTS = { maxSockets: 32, requestTimeoutMs: 30_000, maxAttempts: 3 } as const;

/** An S3 client for `options`: keep-alive connections, checksums only where S3 requires them. */
export function createS3Client(options: S3Options = {}): S3Client {
  const endpoint = options.endpoint ?? process.env.AWS_ENDPOINT_URL_S3 ?? process.env.AWS_ENDPOINT_URL;
  if (endpoint !== undefined) {
    let url: URL;
    try {
      url = new URL(endpoint);
    } catch {
      throw new UsageError(`S3 endpoint ${JSON.stringify(endpoint)} is not a URL`);
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new UsageError(`S3 endpoint ${JSON.stringify(endpoint)} is not http:// or https://`);
  }
  // The SDK warns once per process that its 2027 releases need node 22: not an operator's concern at run time.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
  const maxSockets = options.maxSockets ?? S3_DEFAULTS.maxSockets;
  const agentOptions = { keepAlive: true, maxSockets };
  return new S3Client({
    ...(endpoint === undefined ? {} : { endpoint }),
    forcePathStyle: options.pathStyle ?? false,
    region: options.region ?? process.env.AWS_REGION ?? process.env.AWS_DEFAULT_REGION ?? 'us-east-1',
    maxAttempts: options.maxAttempts ?? S3_DEFAULTS.maxAttempts,
    // Ceph 16 refuses the SDK's default streaming checksums (411 MissingContentLength).
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    requestHandler: {
      connectionTimeout: Math.min(options.requestTimeoutMs ?? S3_DEFAULTS.requestTimeoutMs, 10_000),
      requestTimeout: options.requestTimeoutMs ?? S3_DEFAULTS.requestTimeoutMs,
      throwOnRequestTimeout: true,
      httpAgent: new HttpAgent(agentOptions),
      httpsAgent: new HttpsAgent(agentOptions),
    },
  });
}

/** The storage system at `location`: a directory, or s3://BUCKET/PREFIX. */
export async function openStorage(location: string, s3: S3Options = {}): Promise<Storage> {
  if (isS3Url(location)) return new S3Storage(createS3Client(s3), parseS3Url(location));
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(location)) {
    throw new UsageError(`storage ${JSON.stringify(location)}: only a directory or s3://BUCKET/PREFIX is supported`);
  }
  return LocalDirStorage.open(location);
}
