import { Args, Flags } from '@oclif/core';
import { BaseCommand, commandUsage, exitCodesHelp } from '../cli/base-command.js';
import { imageFlags } from '../cli/image-flags.js';
import { s3Flags, withLocations, type Locations } from '../cli/locations.js';
import { runTasks } from '../cli/progress.js';
import { adoptForImage, type AdoptResult } from '../core/adopt.js';
import { verifyImageIndexFile, type IndexVerifyReport } from '../core/image-index.js';
import { verifySegment, type VerifyReport } from '../core/verify.js';
import { shortHex } from '../format/binary.js';
import { ExitCode, UsageError } from '../errors.js';
import { isS3Url } from '../storage/s3.js';
import { loadMap } from '../format/map.js';


const EXIT_CODES = exitCodesHelp([ExitCode.VERIFY_FAILED, ExitCode.BAD_INPUT, ExitCode.IO], {
  [ExitCode.IO]: 'I/O failure reading the files, or (--adopt) the map or segment cannot be written',
});

export type VerifySegmentResult = VerifyReport & { image: string; map: string; adopted?: AdoptResult };
export type VerifyIndexResult = IndexVerifyReport & { image: string };
export type VerifyCommandResult = VerifySegmentResult | VerifyIndexResult;

export default class Verify extends BaseCommand<typeof Verify> {
  static override summary = 'Check a boot segment against its map and image, or an image index against its image.';
  static override description = `Checks the segment header, that image, map and segment belong together (image identity, map digest, block count), each block's checksum and (version 2 segments) SHA-256 digest, and every block against the image data at the offset computed from the map (select over the bitmap). Exits 1 and names the first mismatching blocks (rank and image offset) when anything differs; a file that is not a well-formed image, map or segment (truncated, the wrong kind) is exit 3.

With --index IDX it checks an image index instead (and no map or segment): it reads the image once, recomputes every block's SHA-256, and exits 1 naming the first blocks whose digest differs, that hold data without a digest, or that have a digest but read as zeros, or when the image identity differs (the image changed); a malformed index is exit 3.

After a copy that did not keep the image's mtime (plain cp; cp -p and rsync -a keep it), the identity differs while the data and checksums all match: verify says so, and --adopt then re-stamps the map and segment for the copy.

${EXIT_CODES}`;

  static override examples = [
    '<%= config.bin %> <%= command.id %> debian12.qcow2',
    '<%= config.bin %> <%= command.id %> debian12.qcow2 --map debian12.qcow2.bcmap --segment debian12.qcow2.bcseg --json',
    '<%= config.bin %> <%= command.id %> copy.qcow2 --map copy.qcow2.bcmap --segment copy.qcow2.bcseg --adopt',
    '<%= config.bin %> <%= command.id %> debian12.qcow2 --index debian12.qcow2.bcidx',
  ];

  static override args = {
    image: Args.string({ description: 'Disk image (raw or qcow2).', required: true }),
  };

  static override flags = {
    ...imageFlags,
    ...s3Flags,
    map: Flags.string({ description: 'Boot workload map (default: IMAGE.bcmap).', helpValue: 'MAP' }),
    segment: Flags.string({ description: 'Boot segment (default: IMAGE.bcseg).', helpValue: 'SEG' }),
    index: Flags.string({
      description: 'Check this image index (.bcidx) against the image, instead of a map and segment.',
      helpValue: 'IDX',
      exclusive: ['map', 'segment', 'adopt'],
    }),
    adopt: Flags.boolean({
      description:
        'When only the image identity differs (a copy without its mtime) and every block matched, re-stamp the map and segment for this image (atomically).',
      default: false,
    }),
  };

  static override usage = commandUsage(this);

  async run(): Promise<VerifyCommandResult> {
    return withLocations<VerifyCommandResult>(this.flags, (loc) => (this.flags.index === undefined ? this.verify(loc) : this.verifyIndex(loc, this.flags.index)));
  }

  private async verifyIndex(loc: Locations, indexPath: string): Promise<VerifyIndexResult> {
    const { image: imagePath } = this.args;
    await loc.check(imagePath, 'image');
    await loc.check(indexPath, 'index');
    const report = await loc.withImage(imagePath, this.flags, async (image) => {
      const ctx: { report?: IndexVerifyReport } = {};
      await runTasks(
        [
          {
            title: `Verifying ${indexPath} against ${imagePath}`,
            task: async (c, task) => {
              c.report = await loc.read(indexPath, (path) =>
                verifyImageIndexFile(image, path, {
                  onProgress: (done, total) => {
                    task.output = `${done}/${total} blocks`;
                  },
                }),
              );
            },
          },
        ],
        ctx,
        this.interactive,
      );
      return ctx.report!;
    });
    const result: VerifyIndexResult = { ...report, index: indexPath, image: imagePath };
    if (report.ok) {
      this.log(`${indexPath}: OK (${report.blocksChecked} blocks read, ${report.imageDataBlocks} digests checked against ${imagePath})`);
      return result;
    }
    process.exitCode = ExitCode.VERIFY_FAILED;
    if (!this.jsonEnabled()) {
      process.stderr.write(`${indexPath}: verification FAILED\n`);
      for (const problem of report.problems) process.stderr.write(`  ${problem}\n`);
      for (const m of report.mismatches) process.stderr.write(`  block ${m.block} (image offset ${m.imageOffset}): ${m.reason} mismatch\n`);
    }
    return result;
  }

  private async verify(loc: Locations): Promise<VerifySegmentResult> {
    const { image: imagePath } = this.args;
    const mapPath = this.flags.map ?? `${imagePath}.bcmap`;
    const segmentPath = this.flags.segment ?? `${imagePath}.bcseg`;
    if (this.flags.adopt && [imagePath, mapPath, segmentPath].some(isS3Url)) {
      throw new UsageError('--adopt re-stamps local files only; verify an s3:// image without it, or adopt a local copy and upload it');
    }
    // The image first: "IMAGE.bcmap does not exist" would mislead when IMAGE itself is missing.
    await loc.check(imagePath, 'image');
    await loc.check(mapPath, 'map');
    await loc.check(segmentPath, 'segment');
    const { report, adopted } = await loc.withImage(imagePath, this.flags, async (image) => {
      const map = await loc.read(mapPath, loadMap);
      const ctx: { report?: VerifyReport } = {};
      await runTasks(
        [
          {
            title: `Verifying ${segmentPath} against ${imagePath}`,
            task: async (c, task) => {
              c.report = await loc.read(segmentPath, (path) =>
                verifySegment(image, map, path, {
                  onProgress: (done, total) => {
                    task.output = `${done}/${total} blocks`;
                  },
                }),
              );
            },
          },
        ],
        ctx,
        this.interactive,
      );
      const verified = ctx.report!;
      const adoption = this.flags.adopt && verified.adoptable ? await adoptForImage(image, map, mapPath, segmentPath, verified) : undefined;
      return { report: verified, adopted: adoption };
    });
    const result: VerifySegmentResult = { ...report, image: imagePath, map: mapPath, ...(adopted ? { adopted } : {}) };
    if (report.ok) {
      this.log(`${segmentPath}: OK (${report.blocksChecked} blocks checked against ${imagePath})`);
      return result;
    }
    if (adopted) {
      this.log(
        `${segmentPath}: adopted for ${imagePath}: all ${report.blocksChecked} blocks and their checksums matched; ` +
          `re-stamped ${adopted.rewritten.join(' and ')} with identity ${shortHex(adopted.identity)}`,
      );
      return result;
    }
    process.exitCode = ExitCode.VERIFY_FAILED;
    if (!this.jsonEnabled()) {
      process.stderr.write(`${segmentPath}: verification FAILED\n`);
      for (const problem of report.problems) process.stderr.write(`  ${problem}\n`);
      for (const m of report.mismatches) {
        process.stderr.write(`  block rank ${m.rank} (image offset ${m.imageOffset ?? '?'}): ${m.reason} mismatch\n`);
      }
      if (this.flags.adopt) process.stderr.write('  not adopted: --adopt re-stamps only when the identity is the one difference\n');
    }
    return result;
  }
}
