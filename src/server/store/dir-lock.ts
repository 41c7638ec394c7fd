/**
 * One server per checkpoint directory. Its leases live in that server's memory, so a second server on
 * the same directory would serve the same sessions with nothing to fence them (and its start-up sweep
 * would delete the other's temp files). Sharing sessions between instances is what the Redis store is
 * for. The lock is a file holding its owner (pid, host, and on Linux when that process started),
 * touched every LOCK_BEAT_MS: a lock left by a process that is gone (kill -9, exited and not yet
 * reaped, or its pid since taken by another process: another start time) is taken over at once on the
 * same host, and a live owner keeps it however long it does not touch it (stopped, say); another
 * host's lock, which cannot be asked, once it is LOCK_STALE_MS old.
 *
 * The holder checks at every beat that the file is still its own (an operator's rm is undone; a lock
 * another server took, say over a shared filesystem after beats failed for LOCK_STALE_MS, is lost for
 * good), and before every write when its last touch is older than two beats: a server that lost its
 * lock, or cannot tell, writes nothing more (StoreUnavailableError: live sessions go on from memory).
 */
import { hostname } from 'node:os';
import { readFile, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { StoreUnavailableError } from './backend.js';

const LOCK_FILE = '.finite-memory-llm.lock';
const LOCK_BEAT_MS = 2_000;
export const LOCK_STALE_MS = 10_000;

/** Lock files this process holds (two servers in one process count as two owners). */
const held = new Set<string>();

interface Owner {
  pid: number;
  host: string;
  /** Linux: the process's start time (/proc/<pid>/stat field 22), which tells a reused pid. */
  started?: string;
}

export class DirLock {
  readonly #path: string;
  readonly #owner: string;
  #beat: NodeJS.Timeout | undefined;
  #touchedAt = Date.now();
  #lost: string | undefined;
  #checking: Promise<void> | undefined;
  #released = false;
  readonly #onLost: (why: string) => void;

  private constructor(path: string, owner: string, onLost: (why: string) => void) {
    this.#path = path;
    this.#owner = owner;
    this.#onLost = onLost;
  }

  /**
   * Takes the directory's lock, or throws StoreUnavailableError naming the server that holds it.
   * `onLost` hears once why it was lost, if it ever is.
   */
  static async take(dir: string, onLost: (why: string) => void = () => {}): Promise<DirLock> {
    const started = await startedAt(process.pid);
    const owner = JSON.stringify({ pid: process.pid, host: hostname(), ...(started !== undefined ? { started } : {}) } satisfies Owner);
    const lock = new DirLock(join(dir, LOCK_FILE), owner, onLost);
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        await writeFile(lock.#path, lock.#owner, { flag: 'wx' });
        held.add(lock.#path);
        lock.#touchedAt = Date.now();
        lock.#beat = setInterval(() => void lock.#check().catch(() => {}), LOCK_BEAT_MS);
        lock.#beat.unref();
        return lock;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
      const h = await holder(lock.#path);
      if (h.live) {
        throw new StoreUnavailableError(`The checkpoint dir ${dir} is in use by another server (${h.who}). Two servers cannot share one checkpoint dir: give each its own, or share sessions through Redis (--store)`);
      }
      await rm(lock.#path, { force: true });   // its owner is gone: taken over
    }
    throw new StoreUnavailableError(`The checkpoint dir ${dir} was locked by another server starting at the same time`);
  }

  /** Why this process no longer holds the lock; undefined while it does. */
  get lost(): string | undefined {
    return this.#lost;
  }

  /** Throws StoreUnavailableError unless the lock is still this process's and was touched in time. */
  async assertHeld(): Promise<void> {
    if (this.#released) throw new StoreUnavailableError('The checkpoint dir lock was given up: this server is closing');
    if (this.#lost === undefined && Date.now() - this.#touchedAt > 2 * LOCK_BEAT_MS) await this.#check();
    if (this.#lost !== undefined) throw new StoreUnavailableError(`This server lost its checkpoint dir lock (${this.#lost}): it writes no sessions until restarted`);
    // Untouched this long, another host may take it: nothing is written until a touch succeeds.
    if (Date.now() - this.#touchedAt > LOCK_STALE_MS - LOCK_BEAT_MS) throw new StoreUnavailableError('The checkpoint dir lock could not be touched lately: no session is written until it can');
  }

  /** One beat: the file must still be this process's. Serialized (a beat and a write's check). */
  #check(): Promise<void> {
    this.#checking ??= this.#checkOnce().finally(() => (this.#checking = undefined));
    return this.#checking;
  }

  async #checkOnce(): Promise<void> {
    if (this.#lost !== undefined || this.#released) return;
    let text: string | undefined;
    try {
      text = await readFile(this.#path, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') return;   // unreadable for now: the next beat tries again
    }
    if (text === undefined) {
      // Removed under this server (an operator's rm): put back, unless another server took it first.
      try {
        await writeFile(this.#path, this.#owner, { flag: 'wx' });
        this.#touchedAt = Date.now();
      } catch (err) {
        // Only another server's file is a loss; anything else (EMFILE, ENOSPC, the directory gone) is
        // tried again at the next beat, nothing being written meanwhile once the touch is old.
        if ((err as NodeJS.ErrnoException).code === 'EEXIST') this.#lose(`taken by ${(await holder(this.#path)).who} after it was removed`);
      }
      return;
    }
    if (text !== this.#owner) {
      this.#lose(`taken by ${(await holder(this.#path)).who}`);
      return;
    }
    const now = new Date();
    try {
      await utimes(this.#path, now, now);
      this.#touchedAt = now.getTime();
    } catch {
      // Removed between the read and the touch, or the filesystem failing: the next beat sees which.
    }
  }

  #lose(why: string): void {
    this.#lost = why;
    clearInterval(this.#beat);
    this.#onLost(why);
  }

  /** Gives the lock up (only if it is still this process's). */
  async release(): Promise<void> {
    this.#released = true;
    clearInterval(this.#beat);
    await this.#checking?.catch(() => {});   // a beat in flight could otherwise put the file back after it goes
    held.delete(this.#path);
    if ((await readFile(this.#path, 'utf8').catch(() => '')) === this.#owner) await rm(this.#path, { force: true });
  }
}

/** Who holds a lock file, and whether that holder may still be running. */
async function holder(path: string): Promise<{ live: boolean; who: string }> {
  const [text, st] = await Promise.all([readFile(path, 'utf8').catch(() => ''), stat(path).catch(() => undefined)]);
  if (!st) return { live: false, who: 'nobody' };
  let owner: Owner | undefined;
  try {
    const o = JSON.parse(text) as Partial<Owner>;
    if (Number.isSafeInteger(o.pid) && typeof o.host === 'string') owner = { pid: o.pid!, host: o.host, ...(typeof o.started === 'string' ? { started: o.started } : {}) };
  } catch {
    // Unreadable (a crash while writing it): only its age says anything.
  }
  const fresh = Date.now() - st.mtimeMs < LOCK_STALE_MS;
  if (!owner) return { live: fresh, who: 'a server that left no readable lock' };
  const who = `pid ${owner.pid} on ${owner.host}`;
  if (owner.host !== hostname()) return { live: fresh, who };
  // This host: ask the process. Our own pid holds it if this process took it; else it is an earlier
  // life of this pid (a container restarted with the same pid), not a live holder.
  if (owner.pid === process.pid) return { live: held.has(path), who };
  try {
    process.kill(owner.pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return { live: false, who };   // EPERM: it runs, as another user
  }
  if (await isZombie(owner.pid)) return { live: false, who };   // killed, not yet reaped by its parent
  // Alive: the owner, unless another process took its pid since (which would keep the directory
  // locked for as long as it ran). Its start time says; without one (not Linux, an older lock), a
  // live owner touches the lock every LOCK_BEAT_MS.
  const started = owner.started !== undefined ? await startedAt(owner.pid) : undefined;
  return { live: started !== undefined ? started === owner.started : fresh, who };
}

/** Linux: when the process started (clock ticks since boot, /proc/<pid>/stat field 22); undefined elsewhere. */
async function startedAt(pid: number): Promise<string | undefined> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  const field = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];   // fields from the 3rd on
  return field !== undefined && /^\d+$/.test(field) ? field : undefined;
}

/** Linux: the process has exited and waits for its parent to reap it (state Z in /proc/<pid>/stat). */
async function isZombie(pid: number): Promise<boolean> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  return / Z /.test(stat.slice(stat.lastIndexOf(')')));
}
