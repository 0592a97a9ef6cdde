// commands/index/index.ts, not commands/index.ts: oclif takes a top-level index file for the root command.
import { Args, Flags } from '@oclif/core';
import { BaseCommand, commandUsage, exitCodesHelp } from '../../cli/base-command.js';
import { imageFlags } from '../../cli/image-flags.js';
import { s3Flags, withLocations, type Locations } from '../../cli/locations.js';
import { formatBytes, runTasks } from '../../cli/progress.js';
import { buildImageIndex, checkIndexBlockSize, type BuildIndexResult } from '../../core/image-index.js';
import { ExitCode, UsageError } from '../../errors.js';
import { checkPreviousKey } from '../../format/image-index.js';

const EXIT_CODES = exitCodesHelp([ExitCode.BAD_INPUT, ExitCode.IO]);

export type IndexCommandResult = BuildIndexResult & { image: string; index: string; seconds: number };

export default class Index extends BaseCommand<typeof Index> {
  static override summary = 'Build the image index: a SHA-256 digest for every block that holds data.';
  static override description = `Reads the whole image once, in ascending order with large reads (guest-visible data through the backing chain; ranges the image's metadata says are zero or unallocated are not read), and writes IMAGE.bcidx: a bitmap of the blocks that hold data and their SHA-256 digests in block order. A block that reads as zeros, whether unallocated, a zero cluster or data that is all zeros, has no digest. The digests are the ones a segment with the same block size stores, so a cache keyed by content can serve a block from any image that put it there. Memory stays bounded: the table is written as it is computed (32 bytes per data block: at most 16 MiB for a 2 GiB image of 4 KiB blocks). The file is written atomically (temporary file, fsync, rename).

--previous KEY records the image this one is a new version of (the agent may predict this image's boot from the previous version's segment). A KEY starting with ./ or ../ is relative to the image's directory; any other KEY is relative to the storage root.

Check an index against its image with \`bootcache verify IMAGE --index IMAGE.bcidx\`.

${EXIT_CODES}`;

  static override examples = [
    '<%= config.bin %> <%= command.id %> debian12-v2.qcow2',
    '<%= config.bin %> <%= command.id %> debian12-v2.qcow2 --previous ./debian12-v1.qcow2 --json',
    '<%= config.bin %> <%= command.id %> s3://golden-images/v2/debian12.qcow2 --previous v1/debian12.qcow2',
  ];

  static override args = {
    image: Args.string({ description: 'Disk image (raw or qcow2).', required: true }),
  };

  static override flags = {
    ...imageFlags,
    ...s3Flags,
    'block-size': Flags.integer({ description: 'Index block size in bytes: a power of two from 512 to 2097152 (the segment\'s, for comparable digests).', default: 4096, helpValue: 'N' }),
    out: Flags.string({ description: 'Index file to write (default: IMAGE.bcidx).', helpValue: 'IDX' }),
    previous: Flags.string({ description: 'The image this one is a new version of: ./ or ../ relative to the image\'s directory, else relative to the storage root.', helpValue: 'KEY' }),
  };

  static override usage = commandUsage(this);

  async run(): Promise<IndexCommandResult> {
    return withLocations(this.flags, (loc) => this.index(loc));
  }

  private async index(loc: Locations): Promise<IndexCommandResult> {
    const { image: imagePath } = this.args;
    const out = this.flags.out ?? `${imagePath}.bcidx`;
    const blockSize = this.flags['block-size'];
    const previous = this.flags.previous;
    // Flag values first: they need no file.
    checkIndexBlockSize(blockSize);
    const problem = previous === undefined ? undefined : checkPreviousKey(previous);
    if (problem) throw new UsageError(problem);
    await loc.check(imagePath, 'image');
    const started = performance.now();
    const built = await loc.withImage(imagePath, this.flags, async (image) => {
      const ctx: { result?: BuildIndexResult } = {};
      await runTasks(
        [
          {
            title: `Indexing ${imagePath} (${formatBytes(image.virtualSize)}) into ${out}`,
            task: async (c, task) => {
              c.result = await loc.output(out, (path) =>
                buildImageIndex(image, path, {
                  blockSize,
                  previous,
                  onProgress: (done, total) => {
                    task.output = `${done}/${total} blocks read`;
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
    const seconds = Math.round(performance.now() - started) / 1000;
    this.log(
      `${out}: ${built.dataBlocks} data blocks of ${built.blockCount} (${formatBytes(built.dataBlocks * built.blockSize)}), ` +
        `${formatBytes(built.fileBytes)} in ${seconds} s`,
    );
    return { ...built, path: out, index: out, image: imagePath, seconds };
  }
}
