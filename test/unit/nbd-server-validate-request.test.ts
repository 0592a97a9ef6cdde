/** Judging NBD transmission requests before they are served (pure). */
import { describe, expect, it } from 'vitest';
import * as P from '../../src/nbd/protocol.js';
import type { Negotiated } from '../../src/nbd/server/handshake.js';
import type { NbdExport } from '../../src/nbd/server/export.js';
import { validateRequest, type RequestFields } from '../../src/nbd/server/validate-request.js';

const SIZE = 1024 * 1024;

function agreed(overrides: Partial<Negotiated> = {}): Negotiated {
  const exp = { name: 'disk', size: SIZE } as NbdExport;
  return { export: exp, structured: true, blockStatus: true, blockSizeAgreed: true, minBlock: 512, maxBlock: 65536, ...overrides };
}

function request(type: number, offset = 0, length = 4096, flags = 0): RequestFields {
  return { type, flags, offset, length };
}

describe('validateRequest', () => {
  it('passes valid READ, FLUSH, CACHE and BLOCK_STATUS requests', () => {
    expect(validateRequest(request(P.NBD_CMD_READ), agreed())).toBeNull();
    expect(validateRequest(request(P.NBD_CMD_READ, 0, 0), agreed())).toBeNull();
    expect(validateRequest(request(P.NBD_CMD_READ, 0, 4096, P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_DF), agreed())).toBeNull();
    expect(validateRequest(request(P.NBD_CMD_FLUSH, 0, 0), agreed())).toBeNull();
    expect(validateRequest(request(P.NBD_CMD_CACHE, SIZE - 4096), agreed())).toBeNull();
    expect(validateRequest(request(P.NBD_CMD_BLOCK_STATUS, 0, SIZE, P.NBD_CMD_FLAG_REQ_ONE), agreed())).toBeNull();
  });

  it('refuses writes on the read-only export with EPERM, whatever their flags or range', () => {
    for (const type of [P.NBD_CMD_WRITE, P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES]) {
      expect(validateRequest(request(type, SIZE * 2, 4096, 0xffff), agreed())).toEqual({ errno: P.NBD_EPERM, message: 'export is read-only' });
    }
  });

  it('refuses flags the command does not take, before looking at the range', () => {
    expect(validateRequest(request(P.NBD_CMD_READ, SIZE, 4096, P.NBD_CMD_FLAG_DF), agreed({ structured: false }))).toEqual({
      errno: P.NBD_EINVAL,
      message: 'unsupported flags 0x4 for NBD_CMD_READ',
    });
    expect(validateRequest(request(P.NBD_CMD_CACHE, 0, 4096, P.NBD_CMD_FLAG_NO_HOLE), agreed())?.message).toBe('unsupported flags 0x2 for NBD_CMD_CACHE');
    expect(validateRequest(request(P.NBD_CMD_FLUSH, 1, 0, P.NBD_CMD_FLAG_REQ_ONE), agreed())?.message).toBe('unsupported flags 0x8 for NBD_CMD_FLUSH');
  });

  it('refuses FLUSH with an offset or length', () => {
    expect(validateRequest(request(P.NBD_CMD_FLUSH, 0, 512), agreed())?.message).toBe('NBD_CMD_FLUSH with non-zero offset or length');
  });

  it('checks the maximum block size (READ, CACHE), the end of the export and the agreed alignment', () => {
    expect(validateRequest(request(P.NBD_CMD_READ, 0, 65536 + 512), agreed())?.message).toBe('request of 66048 bytes exceeds the 65536-byte maximum block size');
    expect(validateRequest(request(P.NBD_CMD_BLOCK_STATUS, 0, SIZE), agreed())).toBeNull();
    expect(validateRequest(request(P.NBD_CMD_READ, SIZE - 512, 1024), agreed())?.message).toBe(
      `request of 1024 bytes at offset ${SIZE - 512} is beyond the end of the export (${SIZE} bytes)`,
    );
    expect(validateRequest(request(P.NBD_CMD_READ, 100, 512), agreed())?.message).toBe(
      'request of 512 bytes at offset 100 is not aligned to the 512-byte minimum block size',
    );
    expect(validateRequest(request(P.NBD_CMD_READ, 100, 512), agreed({ blockSizeAgreed: false }))).toBeNull();
    expect(validateRequest(request(P.NBD_CMD_READ, Number.MAX_SAFE_INTEGER, 1), agreed())?.errno).toBe(P.NBD_EINVAL);
  });

  it('refuses BLOCK_STATUS without a metadata context, then bad flags, then a zero length', () => {
    expect(validateRequest(request(P.NBD_CMD_BLOCK_STATUS, 0, 4096, 0xff), agreed({ blockStatus: false }))?.message).toBe('no metadata context was negotiated');
    expect(validateRequest(request(P.NBD_CMD_BLOCK_STATUS), agreed({ structured: false }))?.message).toBe('no metadata context was negotiated');
    expect(validateRequest(request(P.NBD_CMD_BLOCK_STATUS, 0, 4096, P.NBD_CMD_FLAG_DF), agreed())?.message).toBe('unsupported flags 0x4 for NBD_CMD_BLOCK_STATUS');
    expect(validateRequest(request(P.NBD_CMD_BLOCK_STATUS, 0, 0), agreed())?.message).toBe('NBD_CMD_BLOCK_STATUS of length 0');
  });

  it('refuses unknown commands with EINVAL', () => {
    expect(validateRequest(request(42, 0, 0, 0xffff), agreed())).toEqual({ errno: P.NBD_EINVAL, message: 'unknown command 42' });
  });
});
