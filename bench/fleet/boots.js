// Real boots of the reference guest from the bucket, through the delay proxy:
// the local image, the peers that read an S3 object (nbdkit's S3 plugin and
// curl plugin with the cache and readahead filters, QEMU's curl driver under
// a copy-on-read overlay), and bootcache (first boot, cold host, warm).
import { join } from 'node:path';
import { rmSync } from 'node:fs';
import { DeleteObjectsCommand, PutObjectAclCommand } from '@aws-sdk/client-s3';
import { run, startServer, stopChild } from '../lib/process.js';
import { measureBoot } from '../peers/boot.js';
import { createCorOverlay } from '../peers/servers.js';
import { presignGet } from './bucket.js';
import { startHost, firstBoot, settled, hostCounters, counterDelta } from './hosts.js';

/** What crossed the proxy towards the clients: HTTP requests and bytes. */
function proxyStorage(proxy) {
  return {
    async totals() {
      const x = await proxy.counters();
      return { requests: Object.values(x.requests).reduce((a, n) => a + n, 0), bytes: x.bytesToClient };
    },
  };
}

/** nbdkit with the cache and readahead filters over `plugin` (read-only). */
async function startCachedNbdkit(dir, name, plugin) {
  const sock = join(dir, `${name}.sock`);
  const args = ['-f', '-r', '--exit-with-parent', '-U', sock, '--filter=readahead', '--filter=cache', ...plugin, 'cache-on-read=true'];
  const child = await startServer('nbdkit', args, sock, `nbdkit ${name}`, join(dir, `${name}.server.log`));
  return { uri: `nbd+unix:///?socket=${sock}`, command: `nbdkit ${args.join(' ')}`, stop: () => stopChild(child) };
}

/**
 * Both curl clients find the size with a HEAD request first; a presigned URL
 * signs one method (GET), so RGW answers that HEAD with 403. Returns the
 * clients' own error lines as the evidence, or null when the URL opens.
 */
async function presignedUrlProblem(url) {
  const qemu = await run('qemu-img', ['info', `json:${JSON.stringify({ file: { driver: 'http', url } })}`], { allowFail: true });
  const nbdkit = await run('nbdkit', ['-U', '-', '-r', 'curl', `url=${url}`, '--run', 'nbdinfo --size "$uri"'], { allowFail: true });
  const line = (r) => (r.stderr || r.stdout).trim().split('\n')[0].replace(/X-Amz-Signature=[0-9a-f]+/, 'X-Amz-Signature=...');
  const head = await run('curl', ['-s', '-I', '-o', '/dev/null', '-w', '%{http_code}', url], { allowFail: true });
  const get = await run('curl', ['-s', '-r', '0-511', '-o', '/dev/null', '-w', '%{http_code}', url], { allowFail: true });
  if (qemu.code === 0 && nbdkit.code === 0) return null;
  return {
    curlHead: head.stdout, curlRangedGet: get.stdout,
    qemuImgInfo: qemu.code === 0 ? 'ok' : line(qemu),
    nbdkitCurl: nbdkit.code === 0 ? 'ok' : line(nbdkit),
  };
}

export async function bootPart(ctx, { withProxy, delays, configs }) {
  const bctx = { dir: ctx.dir, accel: ctx.accel, commands: new Map() };
  const rows = [];
  const notes = [];
  const want = (c) => configs.includes(c);
  // The local image is booted at the start and at the end of every delay's
  // block, so each block's ratios are to local boots under the same load.
  const localBoot = async (delayMs, phase) => {
    if (!want('local')) return;
    const m = await measureBoot(bctx, { kind: 'file', path: ctx.image }, null);
    rows.push({ config: 'local', phase, label: `local image (${phase} the D = ${delayMs} ms block)`, delayMs, ...m });
    ctx.log(`  local image, ${phase} D=${delayMs} ms: ${m.seconds.toFixed(2)} s`);
  };
  for (const delayMs of delays) {
    await localBoot(delayMs, 'before');
    await withProxy(ctx, delayMs, async (c) => {
      const storage = proxyStorage(c.proxy);
      const signedUrl = (await presignGet(c.proxy.endpoint, ctx.bucket, ctx.key)).replace(/^https?:\/\/[^/]+/, c.proxy.endpoint);
      const publicUrl = `${c.proxy.endpoint}/${ctx.bucket}/${ctx.key}`;
      const attempt = async (config, phase, label, body) => {
        try {
          const m = await body();
          rows.push({ config, phase, label, delayMs, ...m });
          ctx.log(`  D=${delayMs} ms ${label}: ${m.seconds.toFixed(2)} s, storage ${m.storage.requests} req / ${(m.storage.bytes / 2 ** 20).toFixed(1)} MiB`);
        } catch (err) {
          rows.push({ config, phase, label, delayMs, seconds: null, error: err.message });
          ctx.log(`  D=${delayMs} ms ${label}: failed: ${err.message}`);
        }
      };
      if (want('qemu-curl') || want('nbdkit-curl')) {
        const problem = await presignedUrlProblem(signedUrl);
        if (problem && !notes.some((n) => n.kind === 'presigned')) {
          notes.push({ kind: 'presigned', evidence: problem });
          // The same object, read unsigned: a public-read ACL on the image alone.
          await ctx.client.send(new PutObjectAclCommand({ Bucket: ctx.bucket, Key: ctx.key, ACL: 'public-read' }));
        }
      }
      const curlUrl = notes.some((n) => n.kind === 'presigned') ? publicUrl : signedUrl;
      if (want('nbdkit-s3')) {
        const server = await startCachedNbdkit(ctx.dir, 'nbdkit-s3', ['S3', `endpoint-url=${c.proxy.endpoint}`, `bucket=${ctx.bucket}`, `key=${ctx.key}`]);
        bctx.commands.set('nbdkit-s3', server.command.replace(ctx.bucket, 'BUCKET').replace(c.proxy.endpoint, 'PROXY'));
        try {
          await attempt('nbdkit-s3', 'cold', 'nbdkit S3 plugin + cache + readahead, cold', () => measureBoot(bctx, { kind: 'uri', uri: server.uri }, storage));
          await attempt('nbdkit-s3', 'warm', 'nbdkit S3 plugin + cache + readahead, warm', () => measureBoot(bctx, { kind: 'uri', uri: server.uri }, storage));
        } finally {
          await server.stop();
        }
      }
      if (want('nbdkit-curl')) {
        const server = await startCachedNbdkit(ctx.dir, 'nbdkit-curl', ['curl', `url=${curlUrl}`]);
        bctx.commands.set('nbdkit-curl', server.command.replace(ctx.bucket, 'BUCKET').replace(c.proxy.endpoint, 'PROXY'));
        try {
          await attempt('nbdkit-curl', 'cold', 'nbdkit curl plugin + cache + readahead, cold', () => measureBoot(bctx, { kind: 'uri', uri: server.uri }, storage));
        } finally {
          await server.stop();
        }
      }
      if (want('qemu-curl')) {
        const overlay = join(ctx.dir, 'cor.qcow2');
        await createCorOverlay(overlay, curlUrl);
        const remote = { driver: 'http', url: curlUrl, readahead: 1024 * 1024 };
        bctx.commands.set('qemu-curl', `QEMU -blockdev ${JSON.stringify({ ...remote, url: 'URL' })} (remote) -> qcow2(cor.qcow2, backing=remote) -> copy-on-read -> qcow2(throwaway top overlay for guest writes)`);
        try {
          await attempt('qemu-curl', 'cold', 'QEMU curl driver (readahead 1M) + copy-on-read overlay, cold', () => measureBoot(bctx, { kind: 'cor', overlay, remote }, storage));
        } finally {
          rmSync(overlay, { force: true });
        }
      }
      if (want('bootcache')) {
        // No map or segment: the first boot records them.
        await ctx.client.send(new DeleteObjectsCommand({ Bucket: ctx.bucket, Delete: { Objects: [{ Key: `${ctx.key}.bcmap` }, { Key: `${ctx.key}.bcseg` }] } }));
        await attempt('bootcache', 'first', 'bootcache, first boot', () =>
          firstBoot({ ...c, imageName: ctx.imageName }, (agent) => measureBoot(bctx, { kind: 'uri', uri: agent.uriFor(ctx.imageName) }, storage)));
        const agent = await startHost({ ...c.host, name: 'boot-host' });
        try {
          for (const phase of ['cold', 'warm']) {
            await attempt('bootcache', phase, `bootcache, ${phase === 'cold' ? 'cold host' : 'warm'}`, async () => {
              const before = await hostCounters(agent);
              const m = await measureBoot(bctx, { kind: 'uri', uri: agent.uriFor(ctx.imageName) }, storage);
              const agentStorage = counterDelta(await hostCounters(agent), before).storage;
              await settled(agent, ctx.imageName, `the ${phase} boot to be published`);
              return { ...m, agentStorage };
            });
          }
        } finally {
          await agent.stop();
        }
      }
    });
    await localBoot(delayMs, 'after');
  }
  return {
    delays, runs: 1, rows, notes,
    commands: Object.fromEntries(bctx.commands),
  };
}
