/**
 * The server's sessions: each keeps its Chat between requests. Beyond `maxSessions` live ones, the
 * least recently used idle session is checkpointed to disk and its chat freed (restored on its next
 * request); idle sessions past `sessionTtlMs` are dropped with their checkpoint; stored checkpoints
 * are capped in count and bytes. A configured checkpoint dir is read back at start.
 */
import { mkdir, mkdtemp, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Counter } from 'prom-client';
import { getBinding } from '../local/binding.js';
import type { Chat } from '../local/chat.js';
import { Gate } from './admission.js';
import { sha256 } from './wire.js';

export interface Session {
  readonly id: string;
  /** File name stem (hash of the id): session ids never reach the file system. */
  readonly key: string;
  readonly gate: Gate;
  chat: Chat | undefined;
  /** A checkpoint of this session is on disk and current. */
  stored: boolean;
  /** Conversation messages (user + assistant, not system) the server has seen; see reconciliation in the README. */
  messagesSeen: number;
  lastUsed: number;
  /** Size of the checkpoint on disk (when stored). */
  storedBytes: number;
}

interface SessionMeta {
  id: string;
  messagesSeen: number;
  lastUsed: number;
}

export interface SessionStoreOptions {
  /** Where checkpoints go; undefined: a temp dir, deleted at close. */
  checkpointDir: string | undefined;
  maxSessions: number;
  sessionTtlMs: number;
  maxSessionQueue: number;
  maxStoredSessions: number;
  maxStoredBytes: number;
  events: Counter<'event'>;
  log: { warn(obj: object, msg: string): void; error(obj: object, msg: string): void };
  /** Background work (TTL drops, LRU checkpoints) is tracked so close() waits for it. */
  track<T>(p: Promise<T>): Promise<T>;
}

export class SessionStore {
  readonly #sessions = new Map<string, Session>();
  readonly #o: SessionStoreOptions;
  readonly #dir: string;
  readonly #sweeper: NodeJS.Timeout | undefined;

  private constructor(o: SessionStoreOptions, dir: string) {
    this.#o = o;
    this.#dir = dir;
    this.#sweeper = o.sessionTtlMs > 0 ? setInterval(() => this.#expire(), Math.max(250, Math.min(60_000, Math.floor(o.sessionTtlMs / 4)))) : undefined;
    this.#sweeper?.unref();
  }

  static async open(o: SessionStoreOptions): Promise<SessionStore> {
    const dir = o.checkpointDir ?? (await mkdtemp(join(tmpdir(), 'fml-sessions-')));
    await mkdir(dir, { recursive: true });
    // What a process killed mid-write left here: checkpoint temp files (native naming, only those of
    // dead processes) and session metadata temp files.
    getBinding().removeStaleCheckpointTemps(dir);
    const store = new SessionStore(o, dir);
    if (o.checkpointDir !== undefined) await store.#readBack();
    return store;
  }

  checkpointPath(s: Session): string {
    return join(this.#dir, `${s.key}.fmlckpt`);
  }

  #metaPath(s: Session): string {
    return join(this.#dir, `${s.key}.json`);
  }

  counts(): { live: number; stored: number } {
    let live = 0;
    let stored = 0;
    for (const s of this.#sessions.values()) {
      if (s.chat) live++;
      else if (s.stored) stored++;
    }
    return { live, stored };
  }

  /** The session with this id, created (without a chat) when new. */
  session(id: string): Session {
    let s = this.#sessions.get(id);
    if (!s) this.#sessions.set(id, (s = this.#newSession(id)));
    return s;
  }

  /** Before a session gets a chat: checkpoints LRU idle sessions so that one more fits. */
  makeRoom(): Promise<void> {
    return this.#shrink(this.#o.maxSessions - 1);
  }

  /** After a request: a session that never got a chat goes; LRU sessions beyond the limit are checkpointed. */
  done(s: Session): void {
    s.lastUsed = Date.now();
    if (!s.chat && !s.stored && s.gate.idle) this.#sessions.delete(s.id);
    void this.#o.track(this.#shrink(this.#o.maxSessions));
  }

  deleteFiles(s: Session): Promise<unknown> {
    return Promise.all([rm(this.checkpointPath(s), { force: true }), rm(this.#metaPath(s), { force: true })]);
  }

  /** Shutdown: live sessions are checkpointed (when the dir is the user's) and freed; a temp dir goes. */
  async close(): Promise<void> {
    clearInterval(this.#sweeper);
    const persist = this.#o.checkpointDir !== undefined;
    for (const s of this.#sessions.values()) {
      const chat = s.chat;
      if (!chat) continue;
      if (persist) {
        try {
          await this.#checkpoint(s, chat);
        } catch (err) {
          this.#o.log.error({ err, session: s.id }, 'checkpointing a session at shutdown failed');
        }
      }
      s.chat = undefined;
      chat.dispose();
    }
    this.#sessions.clear();
    if (!persist) await rm(this.#dir, { recursive: true, force: true });
  }

  #newSession(id: string): Session {
    return { id, key: sha256(id).toString('hex').slice(0, 40), gate: new Gate(1, this.#o.maxSessionQueue), chat: undefined, stored: false, messagesSeen: 0, lastUsed: Date.now(), storedBytes: 0 };
  }

  async #checkpoint(s: Session, chat: Chat): Promise<void> {
    await chat.saveCheckpoint(this.checkpointPath(s));
    const meta: SessionMeta = { id: s.id, messagesSeen: s.messagesSeen, lastUsed: s.lastUsed };
    const tmp = `${this.#metaPath(s)}.tmp`;
    await writeFile(tmp, JSON.stringify(meta));
    await rename(tmp, this.#metaPath(s));
    s.stored = true;
    s.storedBytes = (await stat(this.checkpointPath(s))).size;
  }

  /** Checkpoints an idle live session and frees its chat. False when it is busy (or saving failed: it stays live). */
  async #evict(s: Session): Promise<boolean> {
    const release = s.gate.tryEnter();
    if (!release) return false;
    try {
      const chat = s.chat;
      if (!chat) return false;
      await this.#checkpoint(s, chat);
      s.chat = undefined;
      chat.dispose();
      this.#o.events.inc({ event: 'checkpointed' });
      return true;
    } catch (err) {
      s.stored = false;
      this.#o.log.error({ err, session: s.id }, 'checkpointing an idle session failed; it stays in memory');
      return false;
    } finally {
      release();
    }
  }

  /** Checkpoints least recently used idle sessions while more than `limit` are live. */
  async #shrink(limit: number): Promise<void> {
    while (this.counts().live > limit) {
      let victim: Session | undefined;
      for (const s of this.#sessions.values()) if (s.chat && s.gate.idle && (!victim || s.lastUsed < victim.lastUsed)) victim = s;
      if (!victim || !(await this.#evict(victim))) return;
      await this.#capStored();
    }
  }

  /** Forgets a session that is not live: its checkpoint and metadata go. */
  async #drop(s: Session, event: 'expired' | 'dropped'): Promise<void> {
    this.#sessions.delete(s.id);
    this.#o.events.inc({ event });
    if (s.stored) await this.deleteFiles(s);
  }

  /** Deletes the least recently used checkpoints beyond maxStoredSessions / maxStoredBytes. */
  async #capStored(): Promise<void> {
    const stored = [...this.#sessions.values()].filter((s) => s.stored && !s.chat && s.gate.idle).sort((a, b) => a.lastUsed - b.lastUsed);
    let count = this.counts().stored;
    let bytes = stored.reduce((n, s) => n + s.storedBytes, 0);
    for (const s of stored) {
      if (count <= this.#o.maxStoredSessions && bytes <= this.#o.maxStoredBytes) break;
      count--;
      bytes -= s.storedBytes;
      await this.#drop(s, 'dropped');
    }
  }

  #expire(): void {
    const now = Date.now();
    for (const s of this.#sessions.values()) {
      if (!s.gate.idle || now - s.lastUsed <= this.#o.sessionTtlMs) continue;
      s.chat?.dispose();
      s.chat = undefined;
      this.#o.track(this.#drop(s, 'expired')).catch((err) => this.#o.log.warn({ err }, 'deleting an expired checkpoint failed'));
    }
  }

  /** A configured checkpoint dir is read back: its sessions are restored on their next request. */
  async #readBack(): Promise<void> {
    const ttl = this.#o.sessionTtlMs;
    for (const name of await readdir(this.#dir)) {
      if (name.endsWith('.json.tmp')) await rm(join(this.#dir, name), { force: true });
      if (!name.endsWith('.json')) continue;
      try {
        const meta = JSON.parse(await readFile(join(this.#dir, name), 'utf8')) as SessionMeta;
        const s = this.#newSession(String(meta.id));
        if (`${s.key}.json` !== name) continue;
        s.messagesSeen = Number(meta.messagesSeen) || 0;
        s.lastUsed = Number(meta.lastUsed) || 0;
        const st = await stat(this.checkpointPath(s)).catch(() => undefined);
        s.stored = st?.isFile() ?? false;
        s.storedBytes = st?.size ?? 0;
        if (!s.stored || (ttl > 0 && Date.now() - s.lastUsed > ttl)) await this.deleteFiles(s);
        else this.#sessions.set(s.id, s);
      } catch (err) {
        this.#o.log.warn({ err, file: name }, 'ignoring an unreadable session file');
      }
    }
    await this.#capStored();
  }
}
