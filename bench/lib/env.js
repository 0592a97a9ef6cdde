// Benchmark settings from BENCH_* environment variables: a bad value is a
// one-line usage error (exit 2), never a silent default.
export function usage(message) {
  console.error(`bench: ${message}`);
  process.exit(2);
}

/** A comma-separated list, each item in `allowed` when given. */
export function listEnv(name, fallback, allowed) {
  const v = process.env[name];
  const items = v === undefined || v === '' ? fallback : v.split(',').map((x) => x.trim()).filter(Boolean);
  if (allowed) for (const x of items) if (!allowed.includes(x)) usage(`${name}: unknown "${x}" (one of ${allowed.join(', ')})`);
  return items;
}

/** A comma-separated list of non-negative numbers. */
export function numbersEnv(name, fallback) {
  return listEnv(name, fallback).map((x) => {
    const n = Number(x);
    if (!Number.isFinite(n) || n < 0) usage(`${name}: not a number: ${x}`);
    return n;
  });
}
