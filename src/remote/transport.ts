/**
 * The remote backend's transport: one OpenAI-compatible `POST /chat/completions` over `fetch`, with
 * retries (exponential backoff, full jitter, Retry-After), a per-attempt timeout, the caller's abort
 * signal, SSE streaming (never retried once a token was delivered) and a circuit breaker
 * (circuit-breaker.ts). @internal (its errors are public, in shared/errors.ts)
 */
import { RemoteHttpError, RemoteTimeoutError, RemoteUnavailableError, type FiniteMemoryError } from '../shared/errors.js';
import type { ToolCall } from '../shared/types.js';
import type { CircuitBreaker } from './circuit-breaker.js';

export { CircuitBreaker, type CircuitOptions } from './circuit-breaker.js';

export interface RetryOptions {
  /** Retries after the first attempt (so `retries + 1` attempts at most). Default 2. */
  retries: number;
  /** Base of the exponential backoff: attempt n waits uniform(0, min(maxDelayMs, minDelayMs * 2^(n-1))). Default 250. */
  minDelayMs: number;
  /** Cap of one backoff delay. Default 8000. */
  maxDelayMs: number;
}

/** Longest Retry-After honoured; a longer one ends the retries at once. */
const MAX_RETRY_AFTER_MS = 60_000;

export class AbortedError extends Error {}

export interface CompletionResult {
  text: string;
  /** The reply's reasoning (`reasoning_content`, as llama-server, DeepSeek and this project's server send it); '' when none. */
  reasoning: string;
  finishReason: string | null;
  /** The calls the reply made (`tool_calls`; a stream's pieces joined). */
  toolCalls: ToolCall[];
  usage: { prompt_tokens?: number; completion_tokens?: number } | undefined;
  attempts: number;
  /** The server's `finite_memory` extension when present (this project's own server). */
  extra: unknown;
}

export interface TransportOptions {
  baseURL: string;
  apiKey: string | undefined;
  retry: RetryOptions;
  timeoutMs: number;
  circuit: CircuitBreaker;
  fetch: typeof fetch;
}

/** A message's `tool_calls` as the chat reports them (what is not a function call is left out). */
function toolCallsOf(v: unknown): ToolCall[] {
  if (!Array.isArray(v)) return [];
  return (v as { id?: unknown; function?: { name?: unknown; arguments?: unknown } }[])
    .filter((c) => typeof c?.function?.name === 'string')
    .map((c) => ({ id: typeof c.id === 'string' ? c.id : '', name: c.function!.name as string, arguments: typeof c.function!.arguments === 'string' ? c.function!.arguments : JSON.stringify(c.function!.arguments ?? {}) }));
}

/** Parses `Retry-After` (delta seconds or an HTTP date) into milliseconds. */
export function parseRetryAfter(value: string | null, now = Date.now()): number | undefined {
  if (!value) return undefined;
  const v = value.trim();
  if (/^\d+(\.\d+)?$/.test(v)) return Number(v) * 1000;
  const date = Date.parse(v);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, date - now);
}

export function backoffMs(retry: RetryOptions, attempt: number): number {
  const cap = Math.min(retry.maxDelayMs, retry.minDelayMs * 2 ** (attempt - 1));
  return Math.random() * cap;
}

/** Resolves after `ms`, or rejects with AbortedError as soon as `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new AbortedError());
    const onAbort = () => {
      clearTimeout(timer);
      reject(new AbortedError());
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** "1 attempt", "3 attempts": how error messages say how often the request was sent. */
const attempts = (n: number) => `${n} attempt${n > 1 ? 's' : ''}`;

/** The caller's onToken threw (`error`): never retried, not the remote's failure; the chat keeps the turn. */
export class CallerError extends Error {
  constructor(readonly error: unknown) {
    super('onToken threw');
  }
}

/** One attempt's failure, and whether another attempt may follow. */
class AttemptError extends Error {
  constructor(readonly error: (attempts: number) => FiniteMemoryError, readonly retryable: boolean, readonly retryAfterMs?: number) {
    super('attempt failed');
  }
}

/** Where a streamed reply's pieces go. */
interface StreamSink {
  onToken?: (piece: string) => void;
  onReasoning?: (piece: string) => void;
}

const retryableStatus = (s: number) => s === 408 || s === 429 || s >= 500;

export class Transport {
  readonly #o: TransportOptions;
  readonly #url: string;
  constructor(options: TransportOptions) {
    this.#o = options;
    this.#url = `${options.baseURL.replace(/\/+$/, '')}/chat/completions`;
  }

  /** The API key never appears in an error message (a server could echo a header back). */
  #redact(message: string): string {
    const key = this.#o.apiKey;
    return key ? message.split(key).join('[redacted]') : message;
  }

  /**
   * Sends one chat completion. With `onToken` or `onReasoning`, streams it (SSE). Throws AbortedError when `signal`
   * aborts (with the text delivered so far in `partial`), else a typed FiniteMemoryError.
   */
  async complete(body: Record<string, unknown>, options: { signal?: AbortSignal; onToken?: (piece: string) => void; onReasoning?: (piece: string) => void; partial?: { text: string; reasoning?: string } }): Promise<CompletionResult> {
    const { signal, onToken, onReasoning } = options;
    const sink = onToken || onReasoning ? { onToken, onReasoning } : undefined;
    if (signal?.aborted) throw new AbortedError();
    const { trial } = this.#o.circuit.admit();
    const maxAttempts = trial ? 1 : this.#o.retry.retries + 1;
    let attempt = 0;
    try {
      while (true) {
        attempt++;
        try {
          const r = await this.#attempt(body, signal, sink, options.partial);
          this.#o.circuit.success();
          return { ...r, attempts: attempt };
        } catch (err) {
          if (err instanceof AbortedError || signal?.aborted) throw err instanceof AbortedError ? err : new AbortedError();
          if (err instanceof CallerError) throw err;
          if (!(err instanceof AttemptError)) throw err;
          const retryAfter = err.retryAfterMs;
          if (!err.retryable || attempt >= maxAttempts || (retryAfter !== undefined && retryAfter > MAX_RETRY_AFTER_MS)) {
            const final = err.error(attempt);
            // Client errors (4xx other than 408/429) say nothing about the remote's health: they
            // neither count as a failure nor close the circuit (a half-open trial then lets the next try).
            if (!(final instanceof RemoteHttpError) || retryableStatus(final.status)) this.#o.circuit.failure();
            else this.#o.circuit.release(trial);
            throw final;
          }
          await sleep(retryAfter ?? backoffMs(this.#o.retry, attempt), signal);
        }
      }
    } catch (err) {
      if (err instanceof AbortedError) this.#o.circuit.release(trial);
      if (err instanceof CallerError) this.#o.circuit.release(trial);
      throw err;
    }
  }

  async #attempt(body: Record<string, unknown>, signal: AbortSignal | undefined, sink: StreamSink | undefined, partial: { text: string; reasoning?: string } | undefined): Promise<Omit<CompletionResult, 'attempts'>> {
    // timeoutMs bounds the wait for the answer and, in a stream, each wait for the next event: a long
    // reply that keeps streaming is not cut at timeoutMs (a deadline for the whole stream failed every
    // reply longer than it, and the turn then lost what the user had seen).
    const timer = new AbortController();
    let deadline: NodeJS.Timeout | undefined;
    const arm = () => {
      clearTimeout(deadline);
      deadline = setTimeout(() => timer.abort(), this.#o.timeoutMs);
    };
    arm();
    const timeout = timer.signal;
    const combined = signal ? AbortSignal.any([signal, timeout]) : timeout;
    const headers: Record<string, string> = { 'content-type': 'application/json', accept: sink ? 'text/event-stream' : 'application/json' };
    if (this.#o.apiKey) headers.authorization = `Bearer ${this.#o.apiKey}`;
    let delivered = false;
    // Said of a failure after tokens reached the caller (never retried then).
    const started = () => (delivered ? ' after the stream had started (not retried)' : '');
    // Maps a thrown fetch/body error to an attempt error (or an abort).
    const fail = (err: unknown): never => {
      if (err instanceof AttemptError || err instanceof AbortedError || err instanceof CallerError) throw err;
      if (signal?.aborted) throw new AbortedError();
      const retryable = !delivered; // never retry once tokens reached the caller
      const suffix = started();
      if (timeout.aborted) throw new AttemptError((n) => new RemoteTimeoutError(`the remote did not answer within ${this.#o.timeoutMs} ms${suffix} (${attempts(n)})`, n), retryable);
      const detail = this.#redact(err instanceof Error ? (err.cause instanceof Error ? `${err.message}: ${err.cause.message}` : err.message) : String(err));
      throw new AttemptError((n) => new RemoteUnavailableError(`the remote connection failed${suffix}: ${detail} (${attempts(n)})`, n, err), retryable);
    };
    try {
      const res = await this.#o.fetch(this.#url, { method: 'POST', headers, body: JSON.stringify(body), signal: combined });
      if (!res.ok) {
        const text = await res.text().catch(() => '');
        let message = text.slice(0, 300);
        try {
          const j = JSON.parse(text) as { error?: { message?: unknown } };
          if (typeof j?.error?.message === 'string') message = j.error.message.slice(0, 300);
        } catch {
          // not JSON: keep the text
        }
        const status = res.status;
        const msg = this.#redact(`the remote answered HTTP ${status}${message ? `: ${message}` : ''}`);
        throw new AttemptError((n) => new RemoteHttpError(status, `${msg} (${attempts(n)})`, n), retryableStatus(status), retryableStatus(status) ? parseRetryAfter(res.headers.get('retry-after')) : undefined);
      }
      if (!sink) {
        const j = (await res.json()) as { choices?: { message?: { content?: unknown; reasoning_content?: unknown; tool_calls?: unknown }; finish_reason?: unknown }[]; usage?: CompletionResult['usage']; finite_memory?: unknown };
        const choice = j.choices?.[0];
        if (!choice) throw new AttemptError((n) => new RemoteUnavailableError(`the remote's answer has no choices (${attempts(n)})`, n), true);
        return {
          text: typeof choice.message?.content === 'string' ? choice.message.content : '',
          reasoning: typeof choice.message?.reasoning_content === 'string' ? choice.message.reasoning_content : '',
          finishReason: typeof choice.finish_reason === 'string' ? choice.finish_reason : null,
          toolCalls: toolCallsOf(choice.message?.tool_calls),
          usage: j.usage ?? undefined,
          extra: j.finite_memory,
        };
      }
      // SSE: events separated by a blank line; `data:` lines joined; `data: [DONE]` ends the stream.
      if (!res.body) throw new AttemptError((n) => new RemoteUnavailableError('the remote sent no body', n), true);
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      let text = '';
      let reasoning = '';
      let finishReason: string | null = null;
      // A stream's calls come in pieces by index: the id and name once, the arguments in parts.
      const calls: { id: string; name: string; arguments: string }[] = [];
      let usage: CompletionResult['usage'];
      let extra: unknown;
      let done = false;
      const handle = (event: string) => {
        const data = event
          .split(/\r?\n/)
          .filter((l) => l.startsWith('data:'))
          .map((l) => l.slice(5).replace(/^ /, ''))
          .join('\n');
        if (!data) return;
        if (data === '[DONE]') {
          done = true;
          return;
        }
        let j: { error?: { message?: unknown }; choices?: { delta?: { content?: unknown; reasoning_content?: unknown; tool_calls?: unknown }; finish_reason?: unknown }[]; usage?: CompletionResult['usage']; finite_memory?: unknown };
        try {
          j = JSON.parse(data);
        } catch {
          throw new AttemptError((n) => new RemoteUnavailableError('the remote sent a malformed stream event', n), !delivered);
        }
        if (j.error) {
          // The remote failed after its 200: a failure of the remote (the circuit counts it), retried
          // while no token has reached the caller.
          const m = this.#redact(typeof j.error.message === 'string' ? j.error.message.slice(0, 300) : 'unknown error');
          const suffix = started();
          throw new AttemptError((n) => new RemoteUnavailableError(`the remote reported an error mid-stream${suffix}: ${m} (${attempts(n)})`, n), !delivered);
        }
        if (j.usage) usage = j.usage;
        const choice = j.choices?.[0];
        if (!choice) return;
        if ((choice as { finite_memory?: unknown }).finite_memory !== undefined) extra = (choice as { finite_memory?: unknown }).finite_memory;
        if (j.finite_memory !== undefined) extra = j.finite_memory;
        if (typeof choice.finish_reason === 'string') finishReason = choice.finish_reason;
        const thought = choice.delta?.reasoning_content;
        if (typeof thought === 'string' && thought.length > 0) {
          reasoning += thought;
          if (partial) partial.reasoning = reasoning;
          hand(sink.onReasoning, thought);
        }
        const deltas = choice.delta?.tool_calls;
        if (Array.isArray(deltas)) {
          for (const d of deltas as { index?: unknown; id?: unknown; function?: { name?: unknown; arguments?: unknown } }[]) {
            const at = typeof d?.index === 'number' && Number.isInteger(d.index) && d.index >= 0 && d.index < 128 ? d.index : calls.length;
            const call = (calls[at] ??= { id: '', name: '', arguments: '' });
            if (typeof d?.id === 'string') call.id = d.id;
            if (typeof d?.function?.name === 'string') call.name += d.function.name;
            if (typeof d?.function?.arguments === 'string') call.arguments += d.function.arguments;
          }
        }
        const piece = choice.delta?.content;
        if (typeof piece === 'string' && piece.length > 0) {
          text += piece;
          if (partial) partial.text = text;
          hand(sink.onToken, piece);
        }
      };
      /** A piece reached the caller (no retry after it); what its callback throws is the caller's. */
      const hand = (callback: ((piece: string) => void) | undefined, piece: string) => {
        delivered = true;
        try {
          callback?.(piece);
        } catch (e) {
          throw new CallerError(e);
        }
      };
      try {
        while (!done) {
          let chunk: Awaited<ReturnType<typeof reader.read>>;
          try {
            chunk = await reader.read();
            arm();
          } catch (err) {
            if (finishReason !== null) break;   // the reply was complete: only its [DONE] was lost
            throw err;
          }
          const { value, done: end } = chunk;
          if (end) break;
          buffer += value;
          let m: RegExpExecArray | null;
          while (!done && (m = /\r?\n\r?\n/.exec(buffer))) {
            const event = buffer.slice(0, m.index);
            buffer = buffer.slice(m.index + m[0].length);
            handle(event);
          }
        }
      } finally {
        reader.cancel().catch(() => {});
      }
      if (!done && finishReason === null) {
        throw new AttemptError((n) => new RemoteUnavailableError(`the remote's stream ended early${delivered ? ' after it had started (not retried)' : ''}`, n), !delivered);
      }
      return { text, reasoning, finishReason, toolCalls: calls.filter((c) => c !== undefined && c.name !== ''), usage, extra };
    } catch (err) {
      return fail(err);
    } finally {
      clearTimeout(deadline);
    }
  }
}
