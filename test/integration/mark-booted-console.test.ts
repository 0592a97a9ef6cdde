/**
 * `agent mark-booted --console`: the host-side way for a guest's "boot
 * complete" to reach the agent. It follows the VM's serial console log and
 * marks the boot when a line matches --until. Tested on a log the test
 * writes, and on a real boot of the reference Debian guest through the agent
 * (when the guest is built, or BOOTCACHE_E2E=1 demands it).
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { appendFile, copyFile, link, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../src/agent/agent.js';
import { NbdClient } from '../../src/nbd/client/index.js';
import { exportUri, startTestAgent } from '../helpers/agent.js';
import { cli } from '../helpers/cli.js';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';

let dir: string;
const agents: Agent[] = [];
beforeAll(async () => {
  dir = await tmpDir('bc-markbooted-');
  await mkdir(join(dir, 'storage'));
  await writeFile(join(dir, 'storage', 'disk.raw'), Buffer.alloc(4 * 1024 * 1024, 7));
});
afterEach(async () => {
  while (agents.length) await agents.pop()!.stop();
});
afterAll(async () => {
  await removeTmpDir(dir);
});

describe('mark-booted --console', () => {
  it('waits for the marker line on the console log, then ends the boot', async () => {
    const { agent, config } = await startTestAgent(join(dir, 'storage'), join(dir, 'a1'), { boot: { idleMs: 600_000, windowMs: 600_000, minReads: 1 } });
    agents.push(agent);
    const nbd = await NbdClient.connect(exportUri(config, 'disk.raw'));
    await nbd.read(0, 4096);
    const log = join(dir, 'serial.log');
    await writeFile(log, 'SeaBIOS\r\nBooting from Hard Disk...\r\n');
    const marking = cli('agent', 'mark-booted', 'disk.raw', '--control', config.control, '--console', log, '--json', '--timeout', '90');
    let settled = false;
    void marking.finally(() => (settled = true));
    await new Promise((r) => setTimeout(r, 800));
    // Still recording: the lines so far are not the marker (and were there before the watch).
    expect(agent.status().exports[0]?.lastBoot?.state).toBe('recording');
    // The command reads from the end of the log as it finds it: on a loaded machine it may start
    // watching after a first marker, so the guest's marker comes again until it is seen.
    while (!settled) {
      await appendFile(log, '[  OK  ] Reached target Multi-User System.\r\n\x1b[0;32mBOOTCACHE-BOOT-COMPLETE\x1b[0m\r\n');
      await Promise.race([marking, new Promise((r) => setTimeout(r, 2000))]);
    }
    const done = await marking;
    expect(done.stderr).toBe('');
    expect(done.status).toBe(0);
    expect(done.json).toMatchObject({ state: 'complete', endReason: 'mark-booted', consoleLine: 'BOOTCACHE-BOOT-COMPLETE' });
    await nbd.close();
  });

  it('gives up after --timeout with exit 5, naming the last line', async () => {
    const { agent, config } = await startTestAgent(join(dir, 'storage'), join(dir, 'a2'));
    agents.push(agent);
    const log = join(dir, 'slow.log');
    await writeFile(log, '');
    // Written after the command started (it reads from the end of the log as it finds it).
    setTimeout(() => void appendFile(log, 'Loading Linux 6.1.0 ...\n'), 1500);
    const r = await cli('agent', 'mark-booted', 'disk.raw', '--control', config.control, '--console', log, '--timeout', '3');
    expect(r.status).toBe(5);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/no console line matched .* within 3 s \(last line: "Loading Linux 6\.1\.0 \.\.\."\)/);
  });
});

const refDir = process.env.BOOTCACHE_REF_DIR ?? '/var/cache/bootcache/reference-guest';
const refImage = join(refDir, 'debian12.qcow2');
const demanded = process.env.BOOTCACHE_E2E === '1';

describe.skipIf(!existsSync(refImage) && !demanded)('mark-booted --console on the reference guest', () => {
  it('a real boot through the agent is marked when the guest prints its marker', async () => {
    const storage = join(dir, 'ref');
    await mkdir(storage);
    // A hard link when the file systems allow it (no copy of 800 MB), else a copy.
    await link(refImage, join(storage, 'debian12.qcow2')).catch(() => copyFile(refImage, join(storage, 'debian12.qcow2')));
    const { agent, config } = await startTestAgent(storage, join(dir, 'ref-agent'), { boot: { idleMs: 600_000, windowMs: 900_000, minReads: 64 }, cacheSize: '1G' });
    agents.push(agent);
    const log = join(dir, 'ref-serial.log');
    const qemu = spawn('qemu-system-x86_64', [
      '-accel', 'tcg', '-nodefaults', '-display', 'none', '-m', '512', '-smp', '2',
      '-chardev', `file,id=s0,path=${log}`, '-serial', 'chardev:s0',
      '-drive', `file=${exportUri(config, 'debian12.qcow2').replaceAll(',', ',,')},format=raw,if=virtio,snapshot=on`,
    ], { stdio: 'ignore' });
    try {
      const r = await cli('agent', 'mark-booted', 'debian12.qcow2', '--control', config.control, '--console', log, '--until', 'BOOTCACHE-BOOT-COMPLETE', '--timeout', '400', '--json');
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
      const summary = r.json as { state: string; endReason: string; reads: number; blocks: number };
      expect(summary).toMatchObject({ state: 'complete', endReason: 'mark-booted' });
      // A real boot: thousands of reads.
      expect(summary.reads).toBeGreaterThan(1000);
      await agent.settled();
      expect(existsSync(join(storage, 'debian12.qcow2.bcseg'))).toBe(true);
    } finally {
      qemu.kill('SIGKILL');
    }
  }, 600_000);
});
