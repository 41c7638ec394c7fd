/** The remote backend's circuit breaker, shared by the chats of one connection. @internal */
import { CircuitOpenError } from '../shared/errors.js';

export interface CircuitOptions {
  /** Consecutive failed calls (each after its retries) that open the circuit. Default 5. */
  failureThreshold: number;
  /** How long an open circuit refuses calls before letting one trial call through. Default 30000. */
  cooldownMs: number;
}

/** Closed -> (N consecutive failures) open -> (cooldown) half-open: one trial call -> closed or open again. */
export class CircuitBreaker {
  #failures = 0;
  #openedAt = 0;
  #state: 'closed' | 'open' | 'half-open' = 'closed';
  constructor(readonly options: CircuitOptions, private readonly now: () => number = () => performance.now()) {}

  get state(): 'closed' | 'open' | 'half-open' {
    return this.#state;
  }

  /** Throws CircuitOpenError, or returns whether this call is the half-open trial. */
  admit(): { trial: boolean } {
    if (this.#state === 'closed') return { trial: false };
    const left = this.#openedAt + this.options.cooldownMs - this.now();
    if (this.#state === 'open' && left <= 0) {
      this.#state = 'half-open';
      return { trial: true };
    }
    // Open, or half-open with its trial in flight: then the caller waits a cooldown's share, never 0
    // (which made callers retry in a tight loop while the trial ran).
    throw new CircuitOpenError(this.#state === 'half-open' ? Math.max(1, Math.ceil(this.options.cooldownMs / 10)) : Math.max(0, left));
  }

  success(): void {
    this.#failures = 0;
    this.#state = 'closed';
  }

  failure(): void {
    this.#failures++;
    if (this.#state === 'half-open' || this.#failures >= this.options.failureThreshold) {
      this.#state = 'open';
      this.#openedAt = this.now();
    }
  }

  /** A trial call that ended without a verdict (the caller aborted): let the next call try. */
  release(trial: boolean): void {
    if (trial && this.#state === 'half-open') {
      this.#state = 'open';
      this.#openedAt = this.now() - this.options.cooldownMs;
    }
  }
}

/** Thrown internally when the caller's signal aborted. */
