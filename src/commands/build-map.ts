import { Args, Flags } from '@oclif/core';
import { BaseCommand, commandUsage, exitCodesHelp } from '../cli/base-command.js';
import { ExitCode } from '../errors.js';
import { imageFlags } from '../cli/image-flags.js';
import { s3Flags, withLocations, type Locations } from '../cli/locations.js';
import { formatBytes } from '../cli/progress.js';
import { buildMapFromTraceFile } from '../core/build-map.js';
import { saveMap } from '../format/map.js';


const EXIT_CODES = exitCodesHelp([ExitCode.BAD_INPUT, ExitCode.IO]);

export interface BuildMapCommandResult {
  map: string;
  image: string;
  identity: string;
  blockSize: number;
  virtualSize: number;
  reads: number;
  readBytes: number;
  otherOps: number;
  blocksSet: number;
  bytes: number;
  runs: number;
}

export default class BuildMap extends BaseCommand<typeof BuildMap> {
  static override summary = 'Build a boot workload map from a boot trace.';
  static override description = `Reads a trace (CSV: t_us,op,offset,length with an optional fifth column done_us) and sets every block that a read touches. Other operations are ignored. The map records the image's identity, so it only matches this version of the image.

${EXIT_CODES}`;

  static override examples = [
    '<%= config.bin %> <%= command.id %> debian12.qcow2 --trace boot.csv --out debian12.qcow2.bcmap',
    '<%= config.bin %> <%= command.id %> disk.raw --trace boot.csv --block-size 65536 --out disk.raw.bcmap --json',
  ];

  static override args = {
    image: Args.string({ description: 'Disk image (raw or qcow2).', required: true }),
  };

  static override flags = {
    ...imageFlags,
    ...s3Flags,
    trace: Flags.string({ description: 'Boot trace CSV (t_us,op,offset,length[,done_us]).', required: true, helpValue: 'FILE' }),
    'block-size': Flags.integer({ description: 'Map block size in bytes: a power of two from 512 to 2097152.', default: 4096, helpValue: 'N' }),
    out: Flags.string({ description: 'Map file to write (default: IMAGE.bcmap).', helpValue: 'MAP' }),
  };

  static override usage = commandUsage(this);

  async run(): Promise<BuildMapCommandResult> {
    return withLocations(this.flags, (loc) => this.build(loc));
  }

  private async build(loc: Locations): Promise<BuildMapCommandResult> {
    const { image: imagePath } = this.args;
    const { trace } = this.flags;
    const out = this.flags.out ?? `${imagePath}.bcmap`;
    await loc.check(imagePath, 'image');
    await loc.check(trace, 'trace');
    const result = await loc.withImage(imagePath, this.flags, async (image) => {
      const built = await loc.read(trace, (path) => buildMapFromTraceFile(image, path, { blockSize: this.flags['block-size'] }));
      await loc.output(out, (path) => saveMap(path, built.map));
      return {
        map: out,
        image: imagePath,
        identity: image.identity,
        blockSize: built.map.blockSize,
        virtualSize: built.map.virtualSize,
        reads: built.reads,
        readBytes: built.readBytes,
        otherOps: built.otherOps,
        blocksSet: built.map.blocksSet,
        bytes: built.map.blocksSet * built.map.blockSize,
        runs: built.map.bitmap.countRuns(),
      };
    });
    this.log(
      `${out}: ${result.blocksSet} blocks of ${result.blockSize} B (${formatBytes(result.bytes)}) in ${result.runs} runs, from ${result.reads} reads (${formatBytes(result.readBytes)})`,
    );
    return result;
  }
}
