/**
 * The libvirt XML in the docs is valid libvirt XML: each <disk> example,
 * placed in a minimal domain, passes virt-xml-validate (libvirt's own
 * Relax-NG schemas). A broken copy must fail, so the check can fail.
 */
import { execFile } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { removeTmpDir, tmpDir } from '../helpers/qemu.js';

const DOCS = ['README.md', 'docs/agent.md'];

function validate(file: string): Promise<{ code: number; output: string }> {
  return new Promise((resolve) => {
    execFile('virt-xml-validate', [file, 'domain'], (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : ((err as { code?: number }).code ?? 1), output: stdout + stderr });
    });
  });
}

/** The <disk> elements of every ```xml block in `text`. */
function diskExamples(text: string): string[] {
  const blocks = [...text.matchAll(/```xml\n([\s\S]*?)```/g)].map((m) => m[1]!);
  return blocks.flatMap((b) => [...b.matchAll(/<disk[\s\S]*?<\/disk>/g)].map((m) => m[0]));
}

const domain = (disk: string): string =>
  `<domain type='kvm'>\n  <name>bootcache-doc-example</name>\n  <memory unit='MiB'>512</memory>\n  <os><type arch='x86_64'>hvm</type></os>\n  <devices>\n${disk}\n  </devices>\n</domain>\n`;

let dir: string;
const examples: Array<{ doc: string; disk: string }> = [];

beforeAll(async () => {
  dir = await tmpDir('bc-libvirt-xml-');
  for (const doc of DOCS) {
    const text = await readFile(join(import.meta.dirname, '..', '..', doc), 'utf8');
    for (const disk of diskExamples(text)) examples.push({ doc, disk });
  }
});

afterAll(async () => {
  await removeTmpDir(dir);
});

describe('libvirt XML in the docs', () => {
  it('has examples, and each validates against libvirt\'s domain schema', async () => {
    expect(examples.length).toBeGreaterThanOrEqual(2);
    for (const [i, { doc, disk }] of examples.entries()) {
      const file = join(dir, `example-${i}.xml`);
      await writeFile(file, domain(disk));
      const r = await validate(file);
      expect(r.code, `${doc} example ${i + 1}: ${r.output}`).toBe(0);
    }
  });

  it('a broken example fails, so the check can fail', async () => {
    const file = join(dir, 'broken.xml');
    await writeFile(file, domain(examples[0]!.disk.replace("transport='unix'", "transport='carrier-pigeon'")));
    expect((await validate(file)).code).not.toBe(0);
  });
});
