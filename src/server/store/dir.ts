/**
 * The local-directory session backend: one instance's sessions survive its restart and its `kill -9`.
 * Per session `<key>.session` (a header and the ledger checkpoint of the latest turn) and, when written
 * back, `<key>.full` (the full checkpoint of that version). Every file is written to a temp file,
 * flushed to disk and renamed over the old one, so a crash leaves the previous turn or the new one,
 * never a torn file. Leases are in-process (one instance owns the directory).
 */
import { randomUUID } from 'node:crypto';
import { mkdir, mkdtemp, open, readdir, readFile, rename, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DirLock } from './dir-lock.js';
import { StaleWriteError, type AcquireResult, type BackendLimits, type LedgerWrite, type SessionBackend, type StoredSession } from './backend.js';

const MAGIC = Buffer.from('FMLS');

interface Header {
  id: string;
  version: number;
  messagesSeen: number;
  lastUsed: number;
  /** For a `.full` file: the version it is of. */
  of?: number;
}

interface Entry {
  id: string;
  version: number;
  lastUsed: number;
  ledgerBytes: number;
  fullBytes: number;
  fullVersion: number;
}

function encode(h: Header, body: Uint8Array): Buffer {
  const json = Buffer.from(JSON.stringify(h));
  const len = Buffer.alloc(4);
  len.writeUInt32LE(json.length);
  return Buffer.concat([MAGIC, len, json, body]);
}

function decode(buf: Buffer): { header: Header; body: Uint8Array } {
  if (buf.length < 8 || !buf.subarray(0, 4).equals(MAGIC)) throw new Error('not a session file');
  const n = buf.readUInt32LE(4);
  if (8 + n > buf.length) throw new Error('truncated session file');
  const h = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Header;
  if (typeof h.id !== 'string' || !Number.isSafeInteger(h.version) || h.version < 0) throw new Error('malformed session header');
  return { header: { id: h.id, version: h.version, messagesSeen: Number(h.messagesSeen) || 0, lastUsed: Number(h.lastUsed) || 0, of: h.of }, body: buf.subarray(8 + n) };
}

/** A file's header alone (a full checkpoint can be megabytes). */
async function readHeader(path: string): Promise<Header> {
  const fh = await open(path, 'r');
  try {
    const head = Buffer.alloc(8);
    await fh.read(head, 0, 8, 0);
    const n = head.subarray(0, 4).equals(MAGIC) ? head.readUInt32LE(4) : 0;
    if (n === 0 || n > 1 << 20) throw new Error('not a session file');
    const rest = Buffer.alloc(n);
    await fh.read(rest, 0, n, 8);
    return decode(Buffer.concat([head, rest])).header;
  } finally {
    await fh.close();
  }
}

export class DirBackend implements SessionBackend {
  readonly kind = 'dir';
  readonly durable: boolean;
  readonly #dir: string;
  readonly #limits: BackendLimits;
  readonly #index = new Map<string, Entry>();
  readonly #leases = new Map<string, { token: number; until: number }>();
  #fence = 0;
  #lock: DirLock | undefined;

  private constructor(dir: string, durable: boolean, limits: BackendLimits) {
    this.#dir = dir;
    this.durable = durable;
    this.#limits = limits;
  }

  /**
   * `dir` undefined: a temp dir that close() removes (sessions then only move out of memory).
   * `onLockLost`: told once if another server takes the directory's lock (see dir-lock.ts).
   */
  static async open(dir: string | undefined, limits: BackendLimits, keyOf: (id: string) => string, onLockLost?: (why: string) => void): Promise<DirBackend> {
    const durable = dir !== undefined;
    const path = dir ?? (await mkdtemp(join(tmpdir(), 'fml-sessions-')));
    await mkdir(path, { recursive: true });
    const b = new DirBackend(path, durable, limits);
    if (durable) {
      b.#lock = await DirLock.take(path, onLockLost);
      try {
        await b.#readBack(keyOf);
      } catch (err) {
        await b.#lock.release();
        throw err;
      }
    }
    return b;
  }

  /** False once the directory's lock is lost (another server took it): nothing is written then. */
  get available(): boolean {
    return this.#lock?.lost === undefined;
  }

  #file(key: string, ext: 'session' | 'full'): string {
    return join(this.#dir, `${key}.${ext}`);
  }

  async acquire(key: string, leaseMs: number): Promise<AcquireResult> {
    await this.#lock?.assertHeld();
    const now = Date.now();
    const held = this.#leases.get(key);
    if (held && held.until > now) return { heldMs: held.until - now };
    const token = ++this.#fence;
    this.#leases.set(key, { token, until: now + leaseMs });
    return { token, version: this.#index.get(key)?.version ?? 0 };
  }

  async renew(key: string, token: number, leaseMs: number): Promise<boolean> {
    const held = this.#leases.get(key);
    if (held?.token !== token) return false;
    held.until = Date.now() + leaseMs;
    return true;
  }

  async release(key: string, token: number): Promise<void> {
    if (this.#leases.get(key)?.token === token) this.#leases.delete(key);
  }

  #check(key: string, token: number): void {
    const held = this.#leases.get(key);
    if (held?.token !== token || held.until < Date.now()) throw new StaleWriteError('lease');
  }

  async read(key: string): Promise<StoredSession | undefined> {
    const e = this.#index.get(key);
    if (!e) return undefined;
    if (this.#limits.sessionTtlMs > 0 && Date.now() - e.lastUsed > this.#limits.sessionTtlMs) {
      await this.delete(key);
      return undefined;
    }
    // A session file that cannot be read back (damaged on disk, its header too) is a session that
    // cannot be restored: it starts over with X-Session-Reset, not a 500 on every request.
    let session: ReturnType<typeof decode>;
    try {
      session = decode(await readFile(this.#file(key, 'session')));
    } catch {
      return undefined;
    }
    const { header, body } = session;
    let full: Uint8Array | undefined;
    if (e.fullVersion === header.version) {
      const f = await readFile(this.#file(key, 'full')).then(decode, () => undefined);
      if (f?.header.of === header.version) full = f.body;
    }
    return { id: header.id, version: header.version, messagesSeen: header.messagesSeen, lastUsed: header.lastUsed, ledger: body, full };
  }

  async writeLedger(key: string, token: number, w: LedgerWrite): Promise<void> {
    this.#check(key, token);
    await this.#lock?.assertHeld();
    const e = this.#index.get(key);
    if (e && e.version >= w.version) throw new StaleWriteError('version');
    await this.#writeAtomic(this.#file(key, 'session'), encode({ id: w.id, version: w.version, messagesSeen: w.messagesSeen, lastUsed: w.lastUsed }, w.ledger));
    // The full checkpoint is of an older turn now: it must never be restored instead of this one.
    if (e && e.fullBytes > 0) await rm(this.#file(key, 'full'), { force: true });
    this.#index.set(key, { id: w.id, version: w.version, lastUsed: w.lastUsed, ledgerBytes: w.ledger.byteLength, fullBytes: 0, fullVersion: 0 });
    await this.#enforceLimits(key);
  }

  async writeFull(key: string, token: number, version: number, full: Uint8Array): Promise<void> {
    this.#check(key, token);
    await this.#lock?.assertHeld();
    const e = this.#index.get(key);
    if (!e || e.version !== version) throw new StaleWriteError('version');
    await this.#writeAtomic(this.#file(key, 'full'), encode({ id: e.id, version, messagesSeen: 0, lastUsed: e.lastUsed, of: version }, full));
    e.fullBytes = full.byteLength;
    e.fullVersion = version;
    await this.#enforceLimits(key);
  }

  async delete(key: string): Promise<void> {
    await this.#lock?.assertHeld();
    this.#index.delete(key);
    await Promise.all([rm(this.#file(key, 'session'), { force: true }), rm(this.#file(key, 'full'), { force: true })]);
  }

  expire(): Promise<void> {
    return this.available ? this.#enforceLimits('') : Promise.resolve();
  }

  usage(): { sessions: number; bytes: number } {
    let bytes = 0;
    for (const e of this.#index.values()) bytes += e.ledgerBytes + e.fullBytes;
    return { sessions: this.#index.size, bytes };
  }

  async close(): Promise<void> {
    if (!this.durable) await rm(this.#dir, { recursive: true, force: true });
    await this.#lock?.release();
  }

  /** Temp file, flushed, renamed over the old one: a crash leaves one whole version. */
  async #writeAtomic(path: string, data: Buffer): Promise<void> {
    const tmp = `${path}.tmp-${process.pid}-${randomUUID().slice(0, 8)}`;
    try {
      const fh = await open(tmp, 'w');
      try {
        await fh.writeFile(data);
        if (this.durable) await fh.datasync();
      } finally {
        await fh.close();
      }
      await rename(tmp, path);
    } catch (err) {
      // A full disk (ENOSPC) fails the write itself: the partial temp file goes too, or each retry of
      // a pending session would leave another one eating what space is freed.
      await rm(tmp, { force: true });
      throw err;
    }
    // The rename itself reaches the disk with the directory's entry (power loss, not only kill -9).
    if (this.durable) {
      const dir = await open(this.#dir, 'r');
      try {
        await dir.sync();
      } finally {
        await dir.close();
      }
    }
  }

  /** Expired sessions go, then the least recently used beyond the caps (never `keep`, just written). */
  async #enforceLimits(keep: string): Promise<void> {
    const { sessionTtlMs: ttl, maxStoredSessions, maxStoredBytes } = this.#limits;
    const now = Date.now();
    const byAge = [...this.#index.entries()].sort((a, b) => a[1].lastUsed - b[1].lastUsed);
    let { sessions, bytes } = this.usage();
    for (const [key, e] of byAge) {
      const expired = ttl > 0 && now - e.lastUsed > ttl;
      if (!expired && sessions <= maxStoredSessions && bytes <= maxStoredBytes) break;
      if (key === keep || this.#leases.get(key)?.until! > now) continue;
      sessions--;
      bytes -= e.ledgerBytes + e.fullBytes;
      await this.delete(key);
    }
  }

  /** What a restarted server finds: whole session files (temp files of a crash are removed). */
  async #readBack(keyOf: (id: string) => string): Promise<void> {
    const names = await readdir(this.#dir);
    for (const name of names) {
      if (/\.tmp-\d+-/.test(name)) await rm(join(this.#dir, name), { force: true });
    }
    for (const name of names) {
      if (!name.endsWith('.session')) continue;
      const key = name.slice(0, -'.session'.length);
      try {
        const { header, body } = decode(await readFile(join(this.#dir, name)));
        if (keyOf(header.id) !== key) continue;
        const full = await stat(this.#file(key, 'full')).catch(() => undefined);
        const fullVersion = full ? ((await readHeader(this.#file(key, 'full')).catch(() => undefined))?.of ?? 0) : 0;
        this.#index.set(key, { id: header.id, version: header.version, lastUsed: header.lastUsed, ledgerBytes: body.byteLength, fullBytes: full?.size ?? 0, fullVersion });
      } catch {
        // An unreadable file is left alone and never restored, but the session is known (its key is
        // the name): its next request gets X-Session-Reset (restore_failed), not a silent new session.
        const st = await stat(join(this.#dir, name)).catch(() => undefined);
        this.#index.set(key, { id: '', version: 1, lastUsed: st?.mtimeMs ?? Date.now(), ledgerBytes: st?.size ?? 0, fullBytes: 0, fullVersion: 0 });
      }
    }
    await this.#enforceLimits('');
  }
}
