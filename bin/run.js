#!/usr/bin/env node
// The agent and the segment builder keep many small file reads and writes in
// flight (cache device, prefetch); libuv's default pool of 4 threads would
// serialise them. It must be set before the first fs call creates the pool.
process.env.UV_THREADPOOL_SIZE ??= '16';

const { execute } = await import('@oclif/core');
await execute({ dir: import.meta.url });
