/**
 * One server per checkpoint directory. Its leases live in that server's memory, so a second server on
 * the same directory would serve the same sessions with nothing to fence them (and its start-up sweep
 * would delete the other's temp files). Sharing sessions between instances is what the Redis store is
 * for. The lock is a file holding its owner (pid, host), touched every LOCK_BEAT_MS: a lock left by a
 * process that is gone (kill -9, or exited and not yet reaped) is taken over at once on the same host;
 * any lock once it is LOCK_STALE_MS old (another host's process cannot be asked, and a pid can be
 * reused by another process).
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
}

export class DirLock {
  readonly #path: string;
  readonly #owner: string;
  #beat: NodeJS.Timeout | undefined;

  private constructor(path: string, owner: string) {
    this.#path = path;
    this.#owner = owner;
  }

  /** Takes the directory's lock, or throws StoreUnavailableError naming the server that holds it. */
  static async take(dir: string): Promise<DirLock> {
    const lock = new DirLock(join(dir, LOCK_FILE), JSON.stringify({ pid: process.pid, host: hostname() } satisfies Owner));
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        await writeFile(lock.#path, lock.#owner, { flag: 'wx' });
        held.add(lock.#path);
        lock.#beat = setInterval(() => {
          const now = new Date();
          utimes(lock.#path, now, now).catch(() => {});
        }, LOCK_BEAT_MS);
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

  /** Gives the lock up (only if it is still this process's). */
  async release(): Promise<void> {
    clearInterval(this.#beat);
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
    if (Number.isSafeInteger(o.pid) && typeof o.host === 'string') owner = { pid: o.pid!, host: o.host };
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
  // A live holder touches the lock every LOCK_BEAT_MS: a stale one names a pid that was reused by
  // another process since (which would have kept the directory locked for as long as that one ran).
  if (!fresh) return { live: false, who };
  try {
    process.kill(owner.pid, 0);
    return { live: !(await isZombie(owner.pid)), who };   // killed, not yet reaped by its parent
  } catch (err) {
    return { live: (err as NodeJS.ErrnoException).code === 'EPERM', who };
  }
}

/** Linux: the process has exited and waits for its parent to reap it (state Z in /proc/<pid>/stat). */
async function isZombie(pid: number): Promise<boolean> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  return / Z /.test(stat.slice(stat.lastIndexOf(')')));
}
