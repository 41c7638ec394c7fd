// bench/turns.ts: noise control on a shared machine (other processes' CPU use, a calibration probe).
import { readFileSync } from 'node:fs';
import { MAX_OTHER_CPU, SLOW_FACTOR } from './config.ts';
import { type Chat, type Model } from '../../src/index.ts';
import { THREADS, prompt } from './config.ts';

// ---------------------------------------------------------------------------------------------------
// CPU use of other processes. On a shared 2-core machine, anything else running makes llama.cpp's two
// threads wait for each other (a turn can take 100x longer), so each measured round records how much
// CPU the rest of the machine used meanwhile: /proc/stat busy time minus this process and its
// node-llama-cpp workers. Linux only; elsewhere the share is NaN and nothing is redone.

export const TICKS_PER_SECOND = 100; // USER_HZ

export interface CpuSnapshot {
  total: number;
  busy: number;
  own: number;
}

export const workerPids = new Set<number>();

export function cpuSnapshot(): CpuSnapshot {
  try {
    const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
    const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = f;
    const busy = user + nice + system + irq + softirq + steal;
    const u = process.cpuUsage();
    let own = ((u.user + u.system) / 1e6) * TICKS_PER_SECOND;
    for (const pid of workerPids) {
      try {
        const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
        const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
        own += Number(rest[11]) + Number(rest[12]); // utime, stime (fields 14 and 15)
      } catch {}
    }
    return { total: busy + idle + iowait, busy, own };
  } catch {
    return { total: NaN, busy: NaN, own: NaN };
  }
}

/** Share of the machine's CPU capacity (0..1) used by other processes between two snapshots. */
export function otherCpu(a: CpuSnapshot, b: CpuSnapshot): number {
  const total = b.total - a.total;
  if (!(total > 0)) return NaN;
  return Math.max(0, (b.busy - a.busy - (b.own - a.own)) / total);
}

export const cpuLog = { turns: 0, redoneBusy: 0, redoneSlow: 0, acceptedDirty: 0, kept: [] as number[], plainRedone: 0, calibration: [] as string[] };

/**
 * Machine-state probe. This VM's 2 vCPUs sometimes run llama.cpp's 2 threads far slower (a bare decode
 * step of a tiny model goes from 0.3 ms to 15 ms for minutes) with no other process visible in
 * /proc/stat. (The addon is built with GGML_OPENMP=OFF and attaches no ggml threadpool, so every
 * llama_decode with 2 threads creates and joins a worker thread; presumably getting that thread running
 * on the other, idle vCPU is what sometimes takes that long; 1 thread did not show it in our tests.) A separate small chat of the model under test times
 * 2 x plainDecode(8) before and after every measured turn; the turn is redone when either probe is more
 * than SLOW_FACTOR x the best probe seen so far.
 */
export class Calibrator {
  best = Infinity;
  readonly #chat: Chat;
  private constructor(chat: Chat) {
    this.#chat = chat;
  }
  static async create(model: Model): Promise<Calibrator> {
    const chat = model.createChat({ policy: 'sliding', maxTokens: 256, threads: THREADS });
    await chat.send(prompt(0), { maxNewTokens: 1, temperature: 0 });
    const c = new Calibrator(chat);
    for (let k = 0; k < 10; k++) {
      c.probe();
      await new Promise((r) => setTimeout(r, 20));
    }
    return c;
  }
  /** The faster of two back-to-back plainDecode(8) runs (the first may find the caches cold after another context ran). */
  probe(): number {
    const internals = this.#chat._internals();
    const ms = Math.min(internals.plainDecode(8), internals.plainDecode(8));
    this.best = Math.min(this.best, ms);
    return ms;
  }
  slow(...probes: number[]): boolean {
    return probes.some((p) => p > SLOW_FACTOR * this.best);
  }
  dispose(): void {
    this.#chat.dispose();
  }
}

/** The calibration probe of the model being measured (set by main for each model). */
export const calibration: { current: Calibrator | undefined } = { current: undefined };

