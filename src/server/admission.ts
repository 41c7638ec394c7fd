/**
 * Admission: a counting semaphore with a bounded FIFO queue. The server holds one per session (one
 * request at a time, a small queue behind it) and one for the whole server (maxConcurrent decoding).
 */
export class QueueAbortedError extends Error {}

export type Release = () => void;

/** A counting semaphore with a bounded FIFO queue; a waiter whose signal aborts leaves the queue. */
export class Gate {
  #active = 0;
  readonly #waiting: { grant: () => void }[] = [];
  constructor(readonly capacity: number, readonly maxQueue: number) {}

  get active(): number {
    return this.#active;
  }

  get waiting(): number {
    return this.#waiting.length;
  }

  get idle(): boolean {
    return this.#active === 0 && this.#waiting.length === 0;
  }

  tryEnter(): Release | undefined {
    if (this.#active >= this.capacity || this.#waiting.length > 0) return undefined;
    this.#active++;
    return this.#release();
  }

  /** Undefined when the queue is full. Rejects with QueueAbortedError if `signal` aborts while waiting. */
  enter(signal?: AbortSignal): Promise<Release> | undefined {
    const now = this.tryEnter();
    if (now) return Promise.resolve(now);
    if (this.#waiting.length >= this.maxQueue) return undefined;
    return new Promise<Release>((resolve, reject) => {
      const onAbort = () => {
        const i = this.#waiting.indexOf(waiter);
        if (i >= 0) this.#waiting.splice(i, 1);
        reject(new QueueAbortedError());
      };
      const waiter = {
        grant: () => {
          signal?.removeEventListener('abort', onAbort);
          resolve(this.#release());
        },
      };
      if (signal?.aborted) return reject(new QueueAbortedError());
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#waiting.push(waiter);
    });
  }

  #release(): Release {
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const next = this.#waiting.shift();
      if (next) next.grant(); // the slot passes straight to the next waiter
      else this.#active--;
    };
  }
}
