/**
 * Telemetry hooks. A chat calls them after each turn, off the turn's own path: the turn's promise
 * settles first, hooks run on a later tick, a hook that throws (or rejects) is reported to `onError`
 * and never rethrown, and a slow async hook is never awaited.
 */
import type { PolicyName } from './options.js';
import type { ChatStats, StopReason, TurnStats } from './types.js';

export interface EvictionEvent {
  chatId: string;
  policy: PolicyName;
  turn: number;
  /** 'prefill': before the turn's new tokens; 'generation': while the reply was being written. */
  phase: 'prefill' | 'generation';
  evictedTokens: number;
  /** Positions evicted, as [begin, end) ranges of positions before the eviction. */
  positions: [number, number][];
  policyMs: number;
  evictMs: number;
  /** The latency guard replaced the policy's choice with `sliding`. */
  fallback: boolean;
  /** rolling_summary/hybrid: summary tokens that took the evicted tokens' place. */
  summaryTokens: number;
}

export interface TurnEvent {
  chatId: string;
  policy: PolicyName;
  turn: number;
  stopReason: StopReason;
  stats: TurnStats;
  /** The chat's cumulative figures after the turn (retained tokens, KV bytes...). */
  chat: ChatStats;
}

export interface Telemetry {
  onTurn?(event: TurnEvent): void | Promise<void>;
  onEviction?(event: EvictionEvent): void | Promise<void>;
  /** Errors of a turn (the send rejects too) and errors thrown by the other hooks. */
  onError?(error: unknown, context: { chatId: string; source: 'turn' | 'onTurn' | 'onEviction' }): void;
  /** The chat was disposed (lets aggregating hooks drop its gauges). */
  onClose?(chatId: string): void;
}

/** Runs hooks safely. @internal */
export class TelemetryEmitter {
  readonly #hooks: Telemetry;
  readonly #chatId: string;

  constructor(hooks: Telemetry, chatId: string) {
    this.#hooks = hooks;
    this.#chatId = chatId;
  }

  turn(event: TurnEvent, evictions: EvictionEvent[]): void {
    setImmediate(() => {
      for (const e of evictions) this.#call('onEviction', () => this.#hooks.onEviction?.(e));
      this.#call('onTurn', () => this.#hooks.onTurn?.(event));
    });
  }

  error(err: unknown): void {
    setImmediate(() => this.#report(err, 'turn'));
  }

  close(): void {
    try {
      this.#hooks.onClose?.(this.#chatId);
    } catch (err) {
      this.#report(err, 'onTurn');
    }
  }

  #call(source: 'onTurn' | 'onEviction', fn: () => void | Promise<void> | undefined): void {
    try {
      const r = fn();
      if (r && typeof (r as Promise<void>).then === 'function') (r as Promise<void>).then(undefined, (err) => this.#report(err, source));
    } catch (err) {
      this.#report(err, source);
    }
  }

  #report(err: unknown, source: 'turn' | 'onTurn' | 'onEviction'): void {
    try {
      this.#hooks.onError?.(err, { chatId: this.#chatId, source });
    } catch {
      // An error hook that throws has nowhere left to report to; the chat must not break.
    }
  }
}

export function checkTelemetry(value: unknown): Telemetry | undefined {
  if (value === undefined) return undefined;
  if (value === null || typeof value !== 'object') throw new TypeError('telemetry must be an object of hooks');
  for (const key of ['onTurn', 'onEviction', 'onError', 'onClose'] as const) {
    const v = (value as Record<string, unknown>)[key];
    if (v !== undefined && typeof v !== 'function') throw new TypeError(`telemetry.${key} must be a function`);
  }
  return value as Telemetry;
}
