// The directory session store when the disk fails under a write: an injected ENOSPC from the file
// handle's writeFile (the disk itself is real; only that call fails, as on a full disk).
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';

const failWrites = { on: false };
vi.mock('node:fs/promises', async (importOriginal) => {
  const fs = await importOriginal<typeof import('node:fs/promises')>();
  const open: typeof fs.open = async (...args: Parameters<typeof fs.open>) => {
    const fh = await fs.open(...args);
    const writeFile = fh.writeFile.bind(fh);
    fh.writeFile = (async (data: Parameters<typeof writeFile>[0]) => {
      if (failWrites.on) {
        await writeFile(Buffer.alloc(7));   // part of it reached the disk
        throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
      }
      return writeFile(data);
    }) as typeof fh.writeFile;
    return fh;
  };
  return { ...fs, open, default: { ...fs, open } };
});

const { DirBackend } = await import('../../src/server/store/dir.ts');

const dir = mkdtempSync(join(tmpdir(), 'fml-dir-store-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('the directory store on a full disk', () => {
  it('a failed write leaves no temp file behind, and the stored version stays whole', async () => {
    const store = await DirBackend.open(dir, { maxStoredSessions: 10, maxStoredBytes: 1 << 20, sessionTtlMs: 0 }, (id) => id);
    const lease = await store.acquire('k', 10_000);
    if (!('token' in lease)) throw new Error('expected the lease');
    const w = (version: number) => ({ id: 's', version, messagesSeen: 0, lastUsed: Date.now(), ledger: new Uint8Array([version]) });
    await store.writeLedger('k', lease.token, w(1));
    failWrites.on = true;
    for (let retry = 0; retry < 3; retry++) await expect(store.writeLedger('k', lease.token, w(2))).rejects.toMatchObject({ code: 'ENOSPC' });
    failWrites.on = false;
    expect(readdirSync(dir).filter((f) => f.includes('.tmp-'))).toEqual([]);
    expect(await store.read('k')).toMatchObject({ version: 1, ledger: Buffer.from([1]) });
    await store.close();
  });
});
