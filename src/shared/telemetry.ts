/**
 * Telemetry hooks. A chat calls them after each turn, off the turn's own path: the turn's promise
 * settles first, hooks run on a later tick, a hook that throws (or rejects) is reported to `onError`
 * and never rethrown, and a slow async hook is never awaited.
 */
import { InvalidOptionError } from './errors.js';
import type { PolicyName } from './types.js';
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
  /** The latency guard replaced the policy's choice with `sliding`, or a summary could not be written and the eviction went without it. */
  fallback: boolean;
  /** Earlier replies' reasoning, evicted by `pastReasoning` ('drop' at the turn's start, 'first' before the policy), not by the policy. */
  pastReasoning: boolean;
  /** rolling_summary/hybrid: summary tokens that took the evicted tokens' place. */
  summaryTokens: number;
  /** rolling_summary/hybrid: tokens decoded before the summary (the reply left open closed, then the instruction); 0 without one. */
  summaryPromptTokens: number;
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

/** Where a reported error came from: the turn itself, or a hook that threw. */
export type TelemetrySource = 'turn' | 'onTurn' | 'onEviction' | 'onClose';

/** The hooks of any chat, local or remote: `TTurn` is its turn event, `TEviction` its eviction event. */
export interface TelemetryHooks<TTurn, TEviction = never> {
  onTurn?(event: TTurn): void | Promise<void>;
  onEviction?(event: TEviction): void | Promise<void>;
  /** Errors of a turn (the send rejects too) and errors thrown by the other hooks. */
  onError?(error: unknown, context: { chatId: string; source: TelemetrySource }): void;
  /** The chat was disposed (lets aggregating hooks drop its gauges). */
  onClose?(chatId: string): void;
}

/** A local chat's hooks. */
export type Telemetry = TelemetryHooks<TurnEvent, EvictionEvent>;

/** Runs hooks safely, for local and remote chats alike. @internal */
export class TelemetryEmitter<TTurn, TEviction = never> {
  readonly #hooks: TelemetryHooks<TTurn, TEviction>;
  readonly #chatId: string;

  constructor(hooks: TelemetryHooks<TTurn, TEviction>, chatId: string) {
    this.#hooks = hooks;
    this.#chatId = chatId;
  }

  turn(event: TTurn, evictions: readonly TEviction[] = []): void {
    setImmediate(() => {
      for (const e of evictions) this.#call('onEviction', () => this.#hooks.onEviction?.(e));
      this.#call('onTurn', () => this.#hooks.onTurn?.(event));
    });
  }

  error(err: unknown): void {
    setImmediate(() => this.#report(err, 'turn'));
  }

  /**
   * On a later tick too, after the hooks of turns already ended: a chat disposed right after its
   * turn (a server's one-off request) had onClose before onTurn, which then put its gauges back for
   * good (a Prometheus map entry per request).
   */
  close(): void {
    setImmediate(() => {
      try {
        this.#hooks.onClose?.(this.#chatId);
      } catch (err) {
        this.#report(err, 'onClose');
      }
    });
  }

  #call(source: 'onTurn' | 'onEviction', fn: () => void | Promise<void> | undefined): void {
    try {
      const r = fn();
      if (r && typeof (r as Promise<void>).then === 'function') (r as Promise<void>).then(undefined, (err) => this.#report(err, source));
    } catch (err) {
      this.#report(err, source);
    }
  }

  #report(err: unknown, source: TelemetrySource): void {
    try {
      this.#hooks.onError?.(err, { chatId: this.#chatId, source });
    } catch {
      // An error hook that throws has nowhere left to report to; the chat must not break.
    }
  }
}

/** Checks an options' `telemetry` object: undefined, or an object whose known hooks are functions. */
export function checkTelemetry<T extends TelemetryHooks<unknown, unknown>>(value: unknown, hooks: readonly string[] = ['onTurn', 'onEviction', 'onError', 'onClose']): T | undefined {
  if (value === undefined) return undefined;
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new InvalidOptionError('Expected an object of hooks for telemetry');
  for (const key of hooks) {
    const v = (value as Record<string, unknown>)[key];
    if (v !== undefined && typeof v !== 'function') throw new InvalidOptionError(`Expected a function for telemetry.${key}`);
  }
  return value as T;
}
