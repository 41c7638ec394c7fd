/**
 * The server's sessions: each keeps its Chat in memory between requests, and its state in a session
 * backend (store/) so that it outlives the process and can move between instances.
 *
 * A turn runs under the session's lease (store/backend.ts). Before its response completes, the turn's
 * ledger checkpoint is written through (small); the full checkpoint is written back when the session
 * has been idle `snapshotIdleMs`, when it leaves memory (beyond `maxSessions`, least recently used
 * first), and at shutdown. A session not in memory is restored from the store: its full checkpoint
 * when it is of the latest turn, else its ledger (the retained tokens prefilled once). While the store
 * is unreachable, live sessions keep answering from memory and their writes are retried until it is
 * back; a session that is not in memory then gets 503 (it is not started over).
 */
import type { Counter, Histogram } from 'prom-client';
import type { Chat } from '../local/chat.js';
import type { EvictionEvent } from '../shared/telemetry.js';
import { Gate, QueueAbortedError } from './admission.js';
import { StaleWriteError, StoreUnavailableError, type SessionBackend, type StoredSession } from './store/backend.js';
import { HttpError, sessionKey, storeUnavailable } from './wire.js';

export interface Session {
  readonly id: string;
  /** The store's key (a hash of the id): session ids never reach a file name or a Redis key. */
  readonly key: string;
  readonly gate: Gate;
  chat: Chat | undefined;
  /** Turns of the live chat (the store's version once written). */
  version: number;
  /** The version the store is known to hold of this chat (behind `version` while a write is pending). */
  storedVersion: number;
  /** The version of the last full checkpoint written back. */
  fullVersion: number;
  /** Conversation messages (user + assistant, not system) the server has seen; see reconciliation in docs/server.md. */
  messagesSeen: number;
  lastUsed: number;
  idleTimer: NodeJS.Timeout | undefined;
  /** The latest evictions of this session's chat while this instance served it (newest last), for its memory view. */
  evictions: SessionEviction[];
}

/** An eviction of a session's chat, with when it happened. */
export type SessionEviction = EvictionEvent & { at: number };

/** How many evictions a session's memory view keeps. */
export const SESSION_EVICTIONS_KEPT = 50;

/** A turn's hold on its session: the lease (none while the store is unreachable: served from memory). */
export interface TurnLease {
  readonly token: number | undefined;
  /** The version the store holds (newer than the live chat's: another instance served turns since). */
  readonly storedVersion: number;
  readonly renew: NodeJS.Timeout | undefined;
}

export interface SessionStoreOptions {
  backend: SessionBackend;
  maxSessions: number;
  sessionTtlMs: number;
  maxSessionQueue: number;
  /** A session's lease lasts this long (renewed while a turn runs). */
  leaseMs: number;
  /** A request for a session leased elsewhere waits this long for it, then gets 409. */
  leaseWaitMs: number;
  /** An idle session's full checkpoint is written back after this (0: only at eviction and shutdown). */
  snapshotIdleMs: number;
  /** False: the store holds ledgers only (restores prefill; a fraction of the bytes). */
  fullSnapshots: boolean;
  events: Counter<'event'>;
  /** Time of each write to the store: a turn's ledger (write-through), a full checkpoint (write-back). */
  writeSeconds: Histogram<'kind'>;
  log: { warn(obj: object, msg: string): void; error(obj: object, msg: string): void };
  /** Background work (write-backs, retries) is tracked so close() waits for it. */
  track<T>(p: Promise<T>): Promise<T>;
}

/** How often writes that failed while the store was unreachable are retried. */
const RETRY_MS = 500;

export class SessionStore {
  readonly #sessions = new Map<string, Session>();
  readonly #o: SessionStoreOptions;
  readonly #sweeper: NodeJS.Timeout | undefined;
  /** Sessions whose latest turn the store does not hold yet. */
  readonly #pending = new Set<Session>();
  #retrier: NodeJS.Timeout | undefined;
  #closed = false;

  constructor(o: SessionStoreOptions) {
    this.#o = o;
    this.#sweeper = o.sessionTtlMs > 0 ? setInterval(() => this.#expire(), Math.max(250, Math.min(60_000, Math.floor(o.sessionTtlMs / 4)))) : undefined;
    this.#sweeper?.unref();
  }

  get backend(): SessionBackend {
    return this.#o.backend;
  }

  /** Sessions live in this process, and those the store holds (as of this instance's last write). */
  counts(): { live: number; stored: number } {
    let live = 0;
    for (const s of this.#sessions.values()) if (s.chat) live++;
    return { live, stored: this.#o.backend.usage().sessions };
  }

  /** Store health for /health: degraded while it is unreachable or writes wait for it. */
  health(): { kind: string; available: boolean; pendingWrites: number } {
    return { kind: this.#o.backend.kind, available: this.#o.backend.available, pendingWrites: this.#pending.size };
  }

  /** The session with this id, created (without a chat) when new. */
  session(id: string): Session {
    let s = this.#sessions.get(id);
    if (!s) {
      s = { id, key: sessionKey(id), gate: new Gate(1, this.#o.maxSessionQueue), chat: undefined, version: 0, storedVersion: 0, fullVersion: 0, messagesSeen: 0, lastUsed: Date.now(), idleTimer: undefined, evictions: [] };
      this.#sessions.set(id, s);
    }
    return s;
  }

  /**
   * Takes the session's lease for a turn, waiting up to leaseWaitMs while another instance holds it
   * (then 409 with Retry-After). A live chat older than what the store holds is dropped (another
   * instance served the session since). While the store is unreachable a live session goes on from
   * memory; one that is not live gets 503.
   */
  async begin(s: Session, signal: AbortSignal): Promise<TurnLease> {
    clearTimeout(s.idleTimer);
    const deadline = Date.now() + this.#o.leaseWaitMs;
    for (;;) {
      let r;
      try {
        r = await this.#o.backend.acquire(s.key, this.#o.leaseMs);
      } catch (err) {
        if (!(err instanceof StoreUnavailableError)) throw err;
        if (s.chat) return { token: undefined, storedVersion: s.storedVersion, renew: undefined };
        throw storeUnavailable();
      }
      if ('token' in r) {
        // The store moved on since this chat last wrote or read it (another instance served the
        // session, possibly while this one answered from memory during an outage): this line of
        // turns has diverged and goes; the store's is restored.
        if (s.chat && r.version > s.storedVersion) this.#dropLive(s, 'superseded');
        if (!s.chat) s.version = s.storedVersion = s.fullVersion = r.version;
        const token = r.token;
        const renew = setInterval(() => {
          this.#o.backend.renew(s.key, token, this.#o.leaseMs).catch(() => {});
        }, Math.max(50, Math.floor(this.#o.leaseMs / 3)));
        renew.unref();
        return { token, storedVersion: r.version, renew };
      }
      // Aborted while waiting (the shutdown's deadline, or the client left): not a busy session.
      if (signal.aborted) throw new QueueAbortedError();
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new HttpError(409, 'invalid_request_error', 'session_busy', 'Another instance is serving this session; retry shortly', null,
          { 'retry-after': String(Math.max(1, Math.ceil(r.heldMs / 1000))) });
      }
      await new Promise((res) => setTimeout(res, Math.min(left, r.heldMs, 100)));
    }
  }

  /** What the store holds of a session that is not live here (undefined: nothing). */
  read(s: Session): Promise<StoredSession | undefined> {
    return this.#o.backend.read(s.key);
  }

  /**
   * After a turn, before its response completes: the ledger is written through. Returns whether the
   * store holds the turn now (false: the store is unreachable or the lease ran out; the write is
   * retried; null: no store). A write the store refuses for a newer version (another instance went on
   * with the session) drops the live chat: 409.
   */
  async commit(s: Session, lease: TurnLease): Promise<boolean | null> {
    const chat = s.chat;
    if (!chat) return false;
    s.version++;
    s.lastUsed = Date.now();
    if (!this.#o.backend.durable) return null;
    if (lease.token === undefined) {
      this.#markPending(s);
      return false;
    }
    const t0 = performance.now();
    try {
      await this.#writeLedger(s, chat, lease.token);
      this.#o.writeSeconds.observe({ kind: 'ledger' }, (performance.now() - t0) / 1000);
      return true;
    } catch (err) {
      // A lease that ran out under the turn (Redis away past leaseMs, say) is not a takeover: the turn
      // stays and is written under a new lease, where the versions say whether another instance went on.
      if (err instanceof StaleWriteError && err.reason !== 'lease') {
        this.#dropLive(s, 'superseded');
        throw new HttpError(409, 'invalid_request_error', 'session_conflict', 'This session was taken over by another instance while the turn ran; its result is not kept. Retry the message');
      }
      this.#o.log.warn({ err, session: s.id }, 'writing a turn to the session store failed; retrying in the background');
      this.#markPending(s);
      return false;
    }
  }

  /**
   * After a request: the lease goes (before the session's gate opens, so the next request of this
   * session finds it free), then the gate (`releaseGate`); the idle write-back is scheduled, and LRU
   * sessions beyond the limit leave memory.
   */
  end(s: Session, lease: TurnLease | undefined, releaseGate: (() => void) | undefined): void {
    s.lastUsed = Date.now();
    if (lease) {
      clearInterval(lease.renew);
      if (lease.token !== undefined) this.#o.backend.release(s.key, lease.token).catch(() => {});
    }
    releaseGate?.();
    if (!s.chat && s.gate.idle && !this.#pending.has(s)) this.#sessions.delete(s.id);
    clearTimeout(s.idleTimer);
    if (s.chat && this.#o.snapshotIdleMs > 0 && this.#o.fullSnapshots && this.#o.backend.durable) {
      s.idleTimer = setTimeout(() => void this.#o.track(this.#writeBackIdle(s)), this.#o.snapshotIdleMs);
      s.idleTimer.unref();
    }
    void this.#o.track(this.#shrink(this.#o.maxSessions));
  }

  /** Before a session gets a chat: LRU idle sessions leave memory (written back) so that one more fits. */
  makeRoom(): Promise<void> {
    return this.#shrink(this.#o.maxSessions - 1);
  }

  /** Shutdown: every live session's full checkpoint (and any pending turn) goes to the store, then its chat is freed. */
  async close(): Promise<void> {
    this.#closed = true;
    clearInterval(this.#sweeper);
    clearTimeout(this.#retrier);
    for (const s of this.#sessions.values()) {
      clearTimeout(s.idleTimer);
      const chat = s.chat;
      if (!chat) continue;
      if (this.#o.backend.durable) {
        try {
          // A lease still held (another instance's turn, or one of ours Redis kept through an outage)
          // is waited out, at most one lease period.
          let r = await this.#persist(s, chat, true);
          for (const until = Date.now() + this.#o.leaseMs; r === 'held' && Date.now() < until;) {
            await new Promise((res) => setTimeout(res, 100));
            r = await this.#persist(s, chat, true);
          }
          if (r === 'held' && s.storedVersion < s.version) this.#o.log.error({ session: s.id, turns: s.version - s.storedVersion }, 'turns of a session could not be written at shutdown (its lease stayed held)');
        } catch (err) {
          this.#o.log.error({ err, session: s.id, turns: s.version - s.storedVersion }, 'writing a session to the store at shutdown failed');
        }
      }
      s.chat = undefined;
      chat.dispose();
    }
    this.#sessions.clear();
    await this.#o.backend.close();
  }

  async #writeLedger(s: Session, chat: Chat, token: number): Promise<void> {
    const version = s.version;
    const ledger = await chat.checkpoint({ kind: 'ledger' });
    await this.#o.backend.writeLedger(s.key, token, { id: s.id, version, messagesSeen: s.messagesSeen, lastUsed: s.lastUsed, ledger });
    s.storedVersion = Math.max(s.storedVersion, version);
    if (s.storedVersion === s.version) this.#pending.delete(s);
  }

  /**
   * Under its own lease: the pending ledger, then (when `full`) the full checkpoint of this version.
   * 'held': another owner holds the lease now (try again later); 'superseded': the store holds a newer
   * version, and the live chat was dropped.
   */
  async #persist(s: Session, chat: Chat, full: boolean): Promise<'written' | 'held' | 'superseded'> {
    const r = await this.#o.backend.acquire(s.key, this.#o.leaseMs);
    if (!('token' in r)) return 'held';
    const token = r.token;
    // A full checkpoint of a large model takes a while to serialise and send: the lease is renewed meanwhile.
    const renew = setInterval(() => this.#o.backend.renew(s.key, token, this.#o.leaseMs).catch(() => {}), Math.max(50, Math.floor(this.#o.leaseMs / 3)));
    renew.unref();
    try {
      if (r.version > s.storedVersion) {
        this.#dropLive(s, 'superseded');
        return 'superseded';
      }
      if (s.storedVersion < s.version || r.version < s.version) await this.#writeLedger(s, chat, r.token);
      if (full && (this.#o.fullSnapshots || !this.#o.backend.durable) && s.fullVersion < s.version) {
        const t0 = performance.now();
        await this.#o.backend.writeFull(s.key, r.token, s.version, await chat.checkpoint({ kind: 'full' }));
        this.#o.writeSeconds.observe({ kind: 'full' }, (performance.now() - t0) / 1000);
        s.fullVersion = s.version;
      }
      return 'written';
    } catch (err) {
      // The lease ran out under the write (nobody wrote a newer turn for all we know): try again later.
      if (err instanceof StaleWriteError && err.reason === 'lease') return 'held';
      if (err instanceof StaleWriteError) {
        this.#dropLive(s, 'superseded');
        return 'superseded';
      }
      throw err;
    } finally {
      clearInterval(renew);
      await this.#o.backend.release(s.key, token).catch(() => {});
    }
  }

  async #writeBackIdle(s: Session): Promise<void> {
    const release = s.gate.tryEnter();
    if (!release) return;
    try {
      if (s.chat && !this.#closed && s.fullVersion < s.version) await this.#persist(s, s.chat, true);
    } catch (err) {
      if (!(err instanceof StoreUnavailableError)) this.#o.log.warn({ err, session: s.id }, 'writing back an idle session failed');
    } finally {
      release();
    }
  }

  #markPending(s: Session): void {
    this.#pending.add(s);
    this.#retrier ??= setTimeout(() => void this.#o.track(this.#retryPending()), RETRY_MS);
    this.#retrier.unref?.();
  }

  /** Catch-up after an outage: each pending session's latest ledger, under its lease, once the store answers. */
  async #retryPending(): Promise<void> {
    this.#retrier = undefined;
    if (this.#closed) return;
    for (const s of [...this.#pending]) {
      if (!this.#o.backend.available) break;
      const release = s.gate.tryEnter();
      if (!release) continue;
      try {
        // A lease still held (by another instance, or one of this instance's from before the outage
        // that Redis kept) is waited out: the session stays pending.
        const r = s.chat ? await this.#persist(s, s.chat, false) : 'superseded';
        if (r !== 'held') this.#pending.delete(s);
        if (r === 'written') this.#o.events.inc({ event: 'caught_up' });
      } catch (err) {
        if (!(err instanceof StoreUnavailableError)) this.#o.log.warn({ err, session: s.id }, 'a pending session write failed');
      } finally {
        release();
      }
    }
    if (this.#pending.size > 0 && !this.#closed) {
      this.#retrier ??= setTimeout(() => void this.#o.track(this.#retryPending()), RETRY_MS);
      this.#retrier.unref();
    }
  }

  /** The live chat is older than the store's (another instance went on with the session): it goes. */
  #dropLive(s: Session, event: 'superseded'): void {
    const chat = s.chat;
    s.chat = undefined;
    this.#pending.delete(s);
    chat?.dispose();
    this.#o.events.inc({ event });
    this.#o.log.warn({ session: s.id }, 'a live session was superseded by a newer one in the store; it will be restored from there');
  }

  /** Writes back an idle live session and frees its chat. False when it is busy or cannot be written (it stays live). */
  async #evict(s: Session): Promise<boolean> {
    const release = s.gate.tryEnter();
    if (!release) return false;
    try {
      const chat = s.chat;
      if (!chat) return false;
      clearTimeout(s.idleTimer);
      const r = await this.#persist(s, chat, true);
      if (r === 'superseded') return true;
      if (r === 'held') return false;
      s.chat = undefined;
      chat.dispose();
      this.#o.events.inc({ event: 'checkpointed' });
      return true;
    } catch (err) {
      this.#o.log.error({ err, session: s.id }, 'writing back an idle session failed; it stays in memory');
      return false;
    } finally {
      release();
      if (!s.chat && s.gate.idle) this.#sessions.delete(s.id);
    }
  }

  /** Writes back least recently used idle sessions while more than `limit` are live. */
  async #shrink(limit: number): Promise<void> {
    while (this.counts().live > limit) {
      let victim: Session | undefined;
      for (const s of this.#sessions.values()) if (s.chat && s.gate.idle && !this.#pending.has(s) && (!victim || s.lastUsed < victim.lastUsed)) victim = s;
      if (!victim || !(await this.#evict(victim))) return;
    }
  }

  /** Idle sessions past the TTL leave memory; the store forgets them by its own TTL (another instance may hold a newer turn). */
  #expire(): void {
    const now = Date.now();
    for (const s of this.#sessions.values()) {
      if (!s.gate.idle || now - s.lastUsed <= this.#o.sessionTtlMs) continue;
      clearTimeout(s.idleTimer);
      s.chat?.dispose();
      s.chat = undefined;
      this.#pending.delete(s);
      this.#sessions.delete(s.id);
      this.#o.events.inc({ event: 'expired' });
    }
    this.#o.track(this.#o.backend.expire()).catch((err) => this.#o.log.warn({ err }, 'deleting expired sessions failed'));
  }
}
