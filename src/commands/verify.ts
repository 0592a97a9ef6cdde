import { Args, Flags } from '@oclif/core';
import { BaseCommand, EXIT_CODES_HELP } from '../cli/base-command.js';
import { imageFlags, withImage } from '../cli/image-flags.js';
import { runTasks } from '../cli/progress.js';
import { verifySegment, type VerifyReport } from '../core/verify.js';
import { ExitCode } from '../errors.js';
import { loadMap } from '../format/map.js';

export type VerifyCommandResult = VerifyReport & { image: string; map: string };

export default class Verify extends BaseCommand<typeof Verify> {
  static override summary = 'Check a boot segment against its map and image.';
  static override description = `Checks the segment header, that image, map and segment belong together (image identity, map digest, block count), each block's checksum, and every block against the image data at the offset computed from the map (select over the bitmap). Exits 1 and names the first mismatching blocks (rank and image offset) when anything differs.

${EXIT_CODES_HELP}`;

  static override examples = [
    '<%= config.bin %> <%= command.id %> debian12.qcow2',
    '<%= config.bin %> <%= command.id %> debian12.qcow2 --map debian12.qcow2.bcmap --segment debian12.qcow2.bcseg --json',
  ];

  static override args = {
    image: Args.string({ description: 'Disk image (raw or qcow2).', required: true }),
  };

  static override flags = {
    ...imageFlags,
    map: Flags.string({ description: 'Boot workload map (default: IMAGE.bcmap).', helpValue: 'MAP' }),
    segment: Flags.string({ description: 'Boot segment (default: IMAGE.bcseg).', helpValue: 'SEG' }),
  };

  async run(): Promise<VerifyCommandResult> {
    const { image: imagePath } = this.args;
    const mapPath = this.flags.map ?? `${imagePath}.bcmap`;
    const segmentPath = this.flags.segment ?? `${imagePath}.bcseg`;
    const map = await loadMap(mapPath);
    const report = await withImage(imagePath, this.flags, async (image) => {
      const ctx: { report?: VerifyReport } = {};
      await runTasks(
        [
          {
            title: `Verifying ${segmentPath} against ${imagePath}`,
            task: async (c, task) => {
              c.report = await verifySegment(image, map, segmentPath, {
                onProgress: (done, total) => {
                  task.output = `${done}/${total} blocks`;
                },
              });
            },
          },
        ],
        ctx,
        this.interactive,
      );
      return ctx.report!;
    });
    const result = { ...report, image: imagePath, map: mapPath };
    if (report.ok) {
      this.log(`${segmentPath}: OK (${report.blocksChecked} blocks checked against ${imagePath})`);
      return result;
    }
    process.exitCode = ExitCode.VERIFY_FAILED;
    if (!this.jsonEnabled()) {
      process.stderr.write(`${segmentPath}: verification FAILED\n`);
      for (const problem of report.problems) process.stderr.write(`  ${problem}\n`);
      for (const m of report.mismatches) {
        process.stderr.write(`  block rank ${m.rank} (image offset ${m.imageOffset ?? '?'}): ${m.reason} mismatch\n`);
      }
    }
    return result;
  }
}
