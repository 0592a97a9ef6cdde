import { Args, Flags } from '@oclif/core';
import { BaseCommand, commandUsage, exitCodesHelp } from '../cli/base-command.js';
import { ExitCode } from '../errors.js';
import { imageFlags } from '../cli/image-flags.js';
import { s3Flags, withLocations, type Locations } from '../cli/locations.js';
import { formatBytes, runTasks } from '../cli/progress.js';
import { buildSegment, type BuildSegmentResult } from '../core/build-segment.js';
import { loadMap } from '../format/map.js';


const EXIT_CODES = exitCodesHelp([ExitCode.VERIFY_FAILED, ExitCode.BAD_INPUT, ExitCode.IO], {
  [ExitCode.VERIFY_FAILED]: 'the map does not belong to this image (identity or size)',
});

export type BuildSegmentCommandResult = BuildSegmentResult & { image: string; map: string };

export default class BuildSegment extends BaseCommand<typeof BuildSegment> {
  static override summary = 'Build the boot segment: the blocks of the map, back to back.';
  static override description = `Reads the blocks set in the map from the image (guest-visible data: a qcow2 image and its raw conversion give the same segment data) and writes them in ascending block order, with a CRC-32 checksum and a SHA-256 content digest per block (segment version 2), streaming with bounded memory. The block of rank r sits at r x blockSize from the data start. The file is written atomically (temporary file, fsync, rename).

The --json result includes blocks, bytes and dataSha256 (SHA-256 of the concatenated block data in segment order).

${EXIT_CODES}`;

  static override examples = [
    '<%= config.bin %> <%= command.id %> debian12.qcow2',
    '<%= config.bin %> <%= command.id %> debian12.qcow2 --map debian12.qcow2.bcmap --out debian12.qcow2.bcseg --json',
  ];

  static override args = {
    image: Args.string({ description: 'Disk image (raw or qcow2).', required: true }),
  };

  static override flags = {
    ...imageFlags,
    ...s3Flags,
    map: Flags.string({ description: 'Boot workload map (default: IMAGE.bcmap).', helpValue: 'MAP' }),
    out: Flags.string({ description: 'Segment file to write (default: IMAGE.bcseg).', helpValue: 'SEG' }),
  };

  static override usage = commandUsage(this);

  async run(): Promise<BuildSegmentCommandResult> {
    return withLocations(this.flags, (loc) => this.build(loc));
  }

  private async build(loc: Locations): Promise<BuildSegmentCommandResult> {
    const { image: imagePath } = this.args;
    const mapPath = this.flags.map ?? `${imagePath}.bcmap`;
    const out = this.flags.out ?? `${imagePath}.bcseg`;
    // The image first: an error about IMAGE.bcmap when IMAGE itself is missing would mislead.
    await loc.check(imagePath, 'image');
    await loc.check(mapPath, 'map');
    const built = await loc.withImage(imagePath, this.flags, async (image) => {
      const map = await loc.read(mapPath, loadMap);
      const ctx: { result?: BuildSegmentResult } = {};
      await runTasks(
        [
          {
            title: `Building ${out} (${map.blocksSet} blocks, ${formatBytes(map.blocksSet * map.blockSize)})`,
            task: async (c, task) => {
              c.result = await loc.output(out, (path) =>
                buildSegment(image, map, path, {
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
      return ctx.result!;
    });
    this.log(`${out}: ${built.blocks} blocks, ${formatBytes(built.bytes)}, dataSha256 ${built.dataSha256}`);
    return { ...built, path: out, image: imagePath, map: mapPath };
  }
}
