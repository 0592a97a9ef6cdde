import { Args, Flags } from '@oclif/core';
import { BaseCommand, commandUsage, exitCodesHelp } from '../cli/base-command.js';
import { ExitCode } from '../errors.js';
import { imageFlags } from '../cli/image-flags.js';
import { s3Flags, withLocations, type Locations } from '../cli/locations.js';
import { formatBytes } from '../cli/progress.js';
import { inspectImage, type ImageInspection } from '../core/inspect-image.js';
import { inspectIndex, inspectMap, inspectSegment, type IndexInspection, type MapInspection, type SegmentInspection } from '../core/inspect.js';


const EXIT_CODES = exitCodesHelp([ExitCode.BAD_INPUT, ExitCode.IO], { [ExitCode.IO]: 'I/O failure reading the file' });

export type InspectResult = ImageInspection | MapInspection | SegmentInspection | IndexInspection;

export default class Inspect extends BaseCommand<typeof Inspect> {
  static override summary = 'Describe an image, a boot workload map, a boot segment or an image index.';
  static override description = `Recognises the file by its first bytes.
- image: format, virtual size, cluster size, backing chain, allocated bytes;
- map: blockSize, blocksSet, bytes, runs (contiguous runs of blocks), boots merged;
- segment: blocks, bytes, block checksum algorithm, identity, dataSha256;
- index: data blocks (those with a digest), digest table size, identity, previous version.

${EXIT_CODES}`;

  static override examples = [
    '<%= config.bin %> <%= command.id %> debian12.qcow2',
    '<%= config.bin %> <%= command.id %> debian12.qcow2.bcmap --json',
    '<%= config.bin %> <%= command.id %> debian12.qcow2.bcseg',
    '<%= config.bin %> <%= command.id %> debian12.qcow2.bcidx --json',
  ];

  static override args = {
    file: Args.string({ description: 'Image, map (.bcmap), segment (.bcseg) or image index (.bcidx).', required: true }),
  };

  static override flags = {
    ...imageFlags,
    ...s3Flags,
    kind: Flags.option({ description: 'Treat the file as this kind instead of detecting it.', options: ['image', 'map', 'segment', 'index'] as const })(),
  };

  static override usage = commandUsage(this);

  async run(): Promise<InspectResult> {
    return withLocations(this.flags, (loc) => this.inspect(loc));
  }

  private async inspect(loc: Locations): Promise<InspectResult> {
    const path = this.args.file;
    await loc.check(path, this.flags.kind);
    const kind = this.flags.kind ?? (await loc.kind(path));
    if (kind === 'map') {
      const m = await loc.read(path, inspectMap);
      this.log(`${path}: boot workload map v${m.version}`);
      this.log(`  block size ${m.blockSize} B, virtual size ${formatBytes(m.virtualSize)}`);
      this.log(`  ${m.blocksSet} blocks set (${formatBytes(m.bytes)}) in ${m.runs} runs, ${m.boots} boot(s) merged`);
      this.log(`  image identity ${m.identity}`);
      return m;
    }
    if (kind === 'segment') {
      const s = await loc.read(path, inspectSegment);
      this.log(`${path}: boot segment v${s.version}`);
      this.log(`  ${s.blocks} blocks of ${s.blockSize} B (${formatBytes(s.bytes)}), block checksums ${s.blockChecksum}`);
      this.log(`  block digests ${s.blockDigest ?? `none (a version ${s.version} segment)`}`);
      this.log(`  image identity ${s.identity}`);
      this.log(`  map digest ${s.mapDigest}`);
      this.log(`  dataSha256 ${s.dataSha256}`);
      return s;
    }
    if (kind === 'index') {
      const x = await loc.read(path, inspectIndex);
      this.log(`${path}: image index v${x.version}`);
      this.log(`  ${x.blockCount} blocks of ${x.blockSize} B, virtual size ${formatBytes(x.virtualSize)}`);
      this.log(`  ${x.dataBlocks} data blocks (${formatBytes(x.dataBytes)}), the others read as zeros; digest table ${formatBytes(x.tableBytes)} (${x.blockDigest})`);
      this.log(`  image identity ${x.identity}`);
      this.log(`  previous version ${x.previous ?? 'none'}`);
      return x;
    }
    const info = await loc.withImage(path, this.flags, (image) => inspectImage(image));
    this.log(`${path}: ${info.format}, virtual size ${formatBytes(info.virtualSize)} (${info.virtualSize} bytes)`);
    if (info.clusterSize !== undefined) this.log(`  cluster size ${formatBytes(info.clusterSize)}`);
    this.log(`  allocated ${formatBytes(info.allocatedBytes)}, guest data ${formatBytes(info.dataBytes)}`);
    for (const layer of info.backingChain) this.log(`  backing: ${layer.name} (${layer.format}, ${formatBytes(layer.virtualSize)})`);
    this.log(`  identity ${info.identity}`);
    return info;
  }
}
