// Storage requests as nbdkit's log filter records them (one line per request,
// `... connection=N Read id=K offset=0x... count=0x... ...`), and a sampler
// turning any cumulative counter into a time series during a boot.
import { readFileSync, existsSync } from 'node:fs';

const READ_LINE = /\bRead id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+) /;

/** Cumulative storage reads in an nbdkit log file. */
export function storageLog(logfile) {
  return {
    async totals() {
      if (!existsSync(logfile)) return { requests: 0, bytes: 0 };
      let requests = 0;
      let bytes = 0;
      for (const line of readFileSync(logfile, 'utf8').split('\n')) {
        const m = READ_LINE.exec(line);
        if (!m) continue;
        requests++;
        bytes += Number.parseInt(m[1], 16);
      }
      return { requests, bytes };
    },
  };
}

/**
 * Samples `storage.totals()` every `intervalMs` from now until stop(); stop()
 * resolves with the requests and bytes since start and the series (seconds
 * since start, cumulative requests and bytes since start).
 */
export async function sampleStorage(storage, intervalMs = 500) {
  const base = await storage.totals();
  const started = performance.now();
  const series = [{ t: 0, requests: 0, bytes: 0 }];
  let stopped = false;
  let busy = Promise.resolve();
  const take = async () => {
    const now = await storage.totals();
    series.push({
      t: Math.round(performance.now() - started) / 1000,
      requests: now.requests - base.requests,
      bytes: now.bytes - base.bytes,
    });
  };
  const timer = setInterval(() => {
    if (!stopped) busy = busy.then(take).catch(() => undefined);
  }, intervalMs);
  return {
    async stop() {
      stopped = true;
      clearInterval(timer);
      await busy;
      await take();
      const last = series[series.length - 1];
      return { requests: last.requests, bytes: last.bytes, series };
    },
  };
}
