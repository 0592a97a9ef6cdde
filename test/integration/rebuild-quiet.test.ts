/**
 * A segment rebuild waits while another boot on this host is in its first
 * seconds (config rebuildQuietMs): status shows the rebuild "waiting", the
 * segment appears once that boot is older than the quiet period.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../src/agent/agent.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { exportUri, startTestAgent, waitUntil } from '../helpers/agent.js';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const QUIET_MS = 3000;
let dir: string;
let agent: Agent | undefined;

beforeAll(async () => {
  dir = await tmpDir('bc-rebuild-quiet-');
  await mkdir(join(dir, 'storage'));
  for (const name of ['a.raw', 'b.raw']) await writeFile(join(dir, 'storage', name), randomBytes(16 * MiB));
});

afterAll(async () => {
  await agent?.stop();
  await removeTmpDir(dir);
});

const exists = (path: string): Promise<boolean> => stat(path).then(() => true, () => false);

/** 128 scattered 4 KiB reads: a boot, not a probe. */
async function boot(client: NbdClient): Promise<void> {
  for (let i = 0; i < 128; i++) await client.read(((i * 37) % 4096) * 4096, 4096);
}

describe('rebuilds away from boot starts', () => {
  it('a finished boot is published only once the boot that started meanwhile is past its first seconds', async () => {
    const started = await startTestAgent(join(dir, 'storage'), join(dir, 'agent'), { rebuildQuietMs: QUIET_MS, boot: { minReads: 16 } });
    agent = started.agent;
    const a = await NbdClient.connect(exportUri(started.config, 'a.raw'));
    await boot(a);
    // b starts booting; a's boot ends right after.
    const b = await NbdClient.connect(exportUri(started.config, 'b.raw'));
    await b.read(0, 4096);
    const bStarted = Date.now();
    agent.markBooted('a.raw');
    await new Promise((r) => setTimeout(r, 100));
    const rebuild = (): string | undefined => agent!.status().exports.find((e) => e.name === 'a.raw')?.rebuild?.state;
    expect(rebuild()).toBe('waiting');
    expect(await exists(join(dir, 'storage', 'a.raw.bcseg'))).toBe(false);
    await waitUntil(() => agent!.status().exports.find((e) => e.name === 'a.raw')?.rebuild?.lastPublishedAt !== undefined, 'a.raw published', 30_000);
    const published = Date.parse(agent.status().exports.find((e) => e.name === 'a.raw')!.rebuild!.lastPublishedAt!);
    expect(published - bStarted).toBeGreaterThanOrEqual(QUIET_MS - 500);
    expect(await exists(join(dir, 'storage', 'a.raw.bcseg'))).toBe(true);
    await a.close();
    await b.close();
  });

  it('stopping the agent does not wait for the quiet period', async () => {
    const started = await startTestAgent(join(dir, 'storage'), join(dir, 'agent-2'), { rebuildQuietMs: 600_000, boot: { minReads: 16 } });
    const a = await NbdClient.connect(exportUri(started.config, 'a.raw'));
    await boot(a);
    const b = await NbdClient.connect(exportUri(started.config, 'b.raw'));
    await b.read(0, 4096);
    started.agent.markBooted('a.raw');
    await a.close();
    await new Promise((r) => setTimeout(r, 100));
    // b is still booting: a's rebuild waits, and stop() ends the wait.
    expect(started.agent.status().exports.find((e) => e.name === 'a.raw')?.rebuild?.state).toBe('waiting');
    const t0 = Date.now();
    await started.agent.stop();
    expect(Date.now() - t0).toBeLessThan(20_000);
    await b.close().catch(() => undefined);
  });
});
