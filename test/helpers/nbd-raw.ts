/**
 * A bare NBD client for hostile-client tests: it negotiates with
 * NBD_OPT_EXPORT_NAME and then leaves the socket to the test, which may send
 * requests and never read the replies.
 */
import net from 'node:net';

const NBD_OPTS_MAGIC = 0x49484156454f5054n; // "IHAVEOPT"
const NBD_OPT_EXPORT_NAME = 1;
const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
const NBD_FLAG_C_NO_ZEROES = 1 << 1;
const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_CMD_READ = 0;
const GREETING_BYTES = 18;
/** NBD_OPT_EXPORT_NAME's reply with NO_ZEROES: export size (64 bits) and transmission flags (16 bits). */
const EXPORT_REPLY_BYTES = 10;

export interface RawExport {
  socket: net.Socket;
  size: number;
}

/** Connects and negotiates `exportName`; rejects when the server closes or fails first. */
export function openRawExport(connect: net.NetConnectOpts, exportName: string): Promise<RawExport> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(connect);
    let received = Buffer.alloc(0);
    const fail = (err: Error): void => {
      socket.destroy();
      reject(err);
    };
    const closed = (): void => reject(new Error('server closed the connection during the handshake'));
    socket.once('error', fail);
    socket.once('close', closed);
    socket.on('connect', () => {
      const flags = Buffer.alloc(4);
      flags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
      const name = Buffer.from(exportName, 'utf8');
      const option = Buffer.alloc(16);
      option.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
      option.writeUInt32BE(NBD_OPT_EXPORT_NAME, 8);
      option.writeUInt32BE(name.length, 12);
      socket.write(Buffer.concat([flags, option, name]));
    });
    const onData = (chunk: Buffer): void => {
      received = Buffer.concat([received, chunk]);
      if (received.length < GREETING_BYTES + EXPORT_REPLY_BYTES) return;
      socket.off('data', onData);
      socket.off('close', closed);
      socket.off('error', fail);
      socket.on('error', () => undefined);
      socket.pause();
      resolve({ socket, size: Number(received.readBigUInt64BE(GREETING_BYTES)) });
    };
    socket.on('data', onData);
  });
}

/** `count` NBD_CMD_READ requests of `length` bytes at offsets cycling through [0, size). */
export function readRequests(count: number, length: number, size: number, firstHandle = 1): Buffer {
  const out = Buffer.alloc(28 * count);
  const slots = Math.max(1, Math.floor(size / length));
  for (let i = 0; i < count; i++) {
    const at = 28 * i;
    out.writeUInt32BE(NBD_REQUEST_MAGIC, at);
    out.writeUInt16BE(0, at + 4);
    out.writeUInt16BE(NBD_CMD_READ, at + 6);
    out.writeBigUInt64BE(BigInt(firstHandle + i), at + 8);
    out.writeBigUInt64BE(BigInt((i % slots) * length), at + 16);
    out.writeUInt32BE(length, at + 24);
  }
  return out;
}
