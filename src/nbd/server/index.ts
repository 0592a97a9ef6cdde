export { NbdServer, type NbdServerOptions, type NbdServerStats, type NbdLogger, type NbdLogLevel } from './server.js';
export { ExportNotFoundError } from '../errors.js';
export {
  DiskImageExport,
  DiskImageExportProvider,
  type DiskImageExportEntry,
  type ExportDescription,
  type ExportProvider,
  type NbdExport,
} from './export.js';
export { toBlockStatus, allocationFlags, type BlockStatusDescriptor } from './block-status.js';
