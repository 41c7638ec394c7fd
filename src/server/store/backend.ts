/**
 * Where a server's sessions outlive its process: a backend keeps, per session, the ledger checkpoint
 * of its latest turn (written through on every turn, small) and, when one was written at that same
 * version, its full checkpoint (written back when the session goes idle, leaves memory or the server
 * stops). Two backends: a local directory (one instance) and Redis (instances share sessions).
 *
 * One owner at a time: a turn runs under the session's lease (an expiry and a fencing token taken from
 * a counter that only grows). A write carries the lease's token and the version it writes; the
 * backend refuses it (compare-and-set) when the lease is no longer that token or the stored version is
 * not older, so an instance that stalled past its lease cannot overwrite a newer turn.
 */

/** What a backend holds of one session. */
export interface StoredSession {
  /** The client's session id (the key is its hash). */
  readonly id: string;
  /** Turns persisted so far: the ledger is of this version. */
  readonly version: number;
  readonly messagesSeen: number;
  readonly lastUsed: number;
  readonly ledger: Uint8Array;
  /** The full checkpoint, present only when it is of `version`. */
  readonly full: Uint8Array | undefined;
}

export type AcquireResult =
  /** The lease is this caller's; `version` is what the store holds (0: nothing). */
  | { readonly token: number; readonly version: number }
  /** Another owner holds it for about `retryAfterMs` more. */
  | { readonly heldMs: number };

export interface LedgerWrite {
  readonly id: string;
  readonly version: number;
  readonly messagesSeen: number;
  readonly lastUsed: number;
  readonly ledger: Uint8Array;
}

export interface SessionBackend {
  /** 'dir' or 'redis' (what /health and metrics say). */
  readonly kind: 'dir' | 'redis';
  /** Whether the backend answers (false while Redis is unreachable). */
  readonly available: boolean;
  /** Whether a turn's ledger is written through (false for the temp dir of a server with no store). */
  readonly durable: boolean;
  acquire(key: string, leaseMs: number): Promise<AcquireResult>;
  /** Extends a held lease; false when it is no longer this token's. */
  renew(key: string, token: number, leaseMs: number): Promise<boolean>;
  release(key: string, token: number): Promise<void>;
  read(key: string): Promise<StoredSession | undefined>;
  /** Write-through of a turn; the full checkpoint of an older version is dropped with it. */
  writeLedger(key: string, token: number, w: LedgerWrite): Promise<void>;
  /** Write-back: refused unless the stored version is `version`. */
  writeFull(key: string, token: number, version: number, full: Uint8Array): Promise<void>;
  delete(key: string): Promise<void>;
  /** Forgets sessions past the TTL (Redis does by key expiry: a no-op there). */
  expire(): Promise<void>;
  /** Sessions and bytes the store holds, as of this instance's last write (other instances' since then not counted). */
  usage(): { sessions: number; bytes: number };
  close(): Promise<void>;
}

/** The backend refused a write: the lease is another's now, or the store holds a newer version. */
export class StaleWriteError extends Error {
  readonly code = 'SESSION_CONFLICT';
  constructor(readonly reason: 'lease' | 'version') {
    super(reason === 'lease' ? 'the session lease is held by another owner' : 'the store holds a newer version of the session');
    this.name = 'StaleWriteError';
  }
}

/** The backend cannot be reached (Redis down, a command timed out). */
export class StoreUnavailableError extends Error {
  readonly code = 'STORE_UNAVAILABLE';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'StoreUnavailableError';
  }
}

export interface BackendLimits {
  /** Sessions stored; beyond it the least recently used are deleted. */
  readonly maxStoredSessions: number;
  /** Bytes stored; beyond it the least recently used are deleted. */
  readonly maxStoredBytes: number;
  /** A session not used for this long is deleted (0: never). */
  readonly sessionTtlMs: number;
}
