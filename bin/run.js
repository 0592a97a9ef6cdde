#!/usr/bin/env node
// libuv's thread pool keeps its default 4 threads. Setting UV_THREADPOOL_SIZE
// here would be too late anyway (the ES module loader has started the pool),
// and 16 threads measured no better for the agent on 2 CPUs: four alternating
// cold replays 27.15 / 26.99 / 26.70 / 26.50 s against 26.34 / 26.83 / 26.35 /
// 26.63 s with 4 (docs/benchmarks-agent.md, "Seventh session").
const { execute } = await import('@oclif/core');
await execute({ dir: import.meta.url });
