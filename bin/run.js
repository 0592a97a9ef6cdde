#!/usr/bin/env node
// libuv's thread pool keeps its default 4 threads. Setting UV_THREADPOOL_SIZE
// here would be too late anyway (the ES module loader has started the pool),
// and 16 threads measured no better for the agent on 2 CPUs
// (docs/benchmarks-agent.md, "Seventh session").
// Colour is decided before oclif and listr2 load (src/cli/ci.ts).
const { disableColourUnlessTerminal } = await import('../dist/cli/ci.js');
disableColourUnlessTerminal();
const { execute } = await import('@oclif/core');
await execute({ dir: import.meta.url });
