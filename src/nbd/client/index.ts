export { NbdClient, type NbdBlockSize, type NbdClientOptions, type NbdExportInfo } from './client.js';
export { NbdPool, type BlockReader, type NbdPoolOptions } from './pool.js';
export { parseNbdUri, formatNbdTarget, type NbdTarget } from './uri.js';
export {
  NbdConnectError,
  NbdDisconnectedError,
  NbdHandshakeError,
  NbdServerError,
  NbdUnknownExportError,
  NbdUriError,
} from '../errors.js';
