/**
 * The finite-memory chat API for hosted OpenAI-compatible models. The remote KV cache is out of reach,
 * so memory is managed at the message level: every request carries the system prompt, the summary (if
 * any) and the newest messages that fit in `maxTokens`.
 *
 *   const remote = connectRemote({ baseURL: 'https://api.openai.com/v1', model: 'gpt-4o-mini' });
 *   const chat = remote.createChat({ policy: 'rolling_summary', maxTokens: 4000, systemPrompt: 'Be terse.' });
 *   const r = await chat.send('Hello', { maxNewTokens: 64 });
 */
import { ChatBusyError, DisposedError, InvalidOptionError, PromptTooLargeError } from './errors.js';
import { checkInt, checkMessage, checkNumber, checkObject, checkString } from './options.js';
import { AbortedError, CircuitBreaker, Transport, type CircuitOptions, type RetryOptions } from './remote-transport.js';
import type { StopReason, Transcript } from './types.js';

export { RemoteHttpError, RemoteUnavailableError, RemoteTimeoutError, CircuitOpenError, type RetryOptions, type CircuitOptions } from './remote-transport.js';

/** What counts tokens: anything with `tokenize(text) -> token[]`, e.g. a local `Model` from `loadModel`. */
export interface RemoteTokenizer {
  tokenize(text: string): readonly unknown[];
}

export interface RemoteOptions {
  /** The API's base URL, e.g. https://api.openai.com/v1 (requests go to `${baseURL}/chat/completions`). */
  baseURL: string;
  /** Bearer token. Default: `process.env.OPENAI_API_KEY` (none when unset). Never logged or put in errors. */
  apiKey?: string;
  /** The remote model id sent as `model`. */
  model: string;
  /** Counts tokens exactly (`tokenize(text).length`); without it, the estimate ceil(chars / 4) + 4 per message. */
  tokenizer?: RemoteTokenizer;
  /** Default { retries: 2, minDelayMs: 250, maxDelayMs: 8000 }. */
  retry?: Partial<RetryOptions>;
  /** Per-attempt timeout (headers and body), ms. Default 60000. */
  timeoutMs?: number;
  /** Default { failureThreshold: 5, cooldownMs: 30000 }. Shared by the chats of this connection. */
  circuit?: Partial<CircuitOptions>;
  /** fetch implementation (default: the global one). */
  fetch?: typeof fetch;
}

export type RemotePolicyName = 'sliding' | 'rolling_summary' | 'hybrid';
const REMOTE_POLICIES: readonly RemotePolicyName[] = ['sliding', 'rolling_summary', 'hybrid'];

export interface RemoteChatOptions {
  /** Default 'sliding'. 'importance' and 'semantic' need the local KV cache and are refused. */
  policy?: RemotePolicyName;
  /** Most tokens the request's messages (system prompt, summary, history) may hold after a turn. Default 4096. */
  maxTokens?: number;
  systemPrompt?: string;
  /** rolling_summary/hybrid: longest summary (tokens, also its `max_tokens`). Default min(256, maxTokens / 8). */
  summaryTokens?: number;
  /** hybrid: when summarizing, history is cut down to this many tokens of newest messages. Default maxTokens / 2. */
  windowSize?: number;
  telemetry?: RemoteTelemetry;
}

export interface RemoteSendOptions {
  /** Sent as `max_tokens`. Default 256. */
  maxNewTokens?: number;
  temperature?: number;
  seed?: number;
  stop?: string[];
  /** Streams the reply (SSE) and receives each piece. A stream that breaks after its first piece is not retried. */
  onToken?: (piece: string) => void;
  /** Aborts at once (also during a backoff sleep); the turn resolves with stopReason 'abort'. */
  signal?: AbortSignal;
}

export interface RemoteTurnStats {
  /** Tokens of the messages sent (counted locally, see tokenCounter). */
  promptTokens: number;
  /** The server's `usage.completion_tokens`, else the reply counted locally. */
  generatedTokens: number;
  /** Tokens retained after the turn (<= maxTokens). */
  retainedTokens: number;
  evictedTokens: number;
  evictedMessages: number;
  /** Summary requests made this turn and their time. */
  summaries: number;
  summaryMs: number;
  summaryTokens: number;
  /** HTTP attempts of the turn's completion request (1 = no retry). */
  attempts: number;
  latencyMs: number;
  tokenCounter: 'model' | 'estimate';
  policy: RemotePolicyName;
}

export interface RemoteTurnResult {
  response: string;
  stopReason: StopReason;
  stats: RemoteTurnStats;
}

export interface RemoteChatStats {
  turns: number;
  tokensSeen: number;
  tokensRetained: number;
  tokensEvicted: number;
  compressionRatio: number;
  /** Eviction events (messages left the request). */
  evictions: number;
  messagesRetained: number;
  summaries: number;
  /** The current summary ('' when none). */
  summary: string;
  tokenCounter: 'model' | 'estimate';
}

/** One message the chat still sends. */
export interface RemoteMemoryEntry {
  role: 'system' | 'summary' | 'user' | 'assistant';
  content: string;
  tokens: number;
}

export interface RemoteTurnEvent {
  chatId: string;
  policy: RemotePolicyName;
  turn: number;
  stopReason: StopReason;
  stats: RemoteTurnStats;
  chat: RemoteChatStats;
}

/** Same contract as `Telemetry`: hooks run on a later tick, errors go to onError, never rethrown. */
export interface RemoteTelemetry {
  onTurn?(event: RemoteTurnEvent): void | Promise<void>;
  onError?(error: unknown, context: { chatId: string; source: 'turn' | 'onTurn' }): void;
  onClose?(chatId: string): void;
}

export interface RemoteConnection {
  createChat(options?: RemoteChatOptions): RemoteChat;
  /** Disposes every chat of this connection. */
  dispose(): void;
}

type Msg = { role: 'user' | 'assistant'; content: string; tokens: number };

export const SUMMARY_PREFIX = 'Summary of the earlier conversation: ';
export const SUMMARIZER_PROMPT =
  'You maintain a running summary of a conversation. Merge the previous summary and the new messages into one concise summary of the facts, names, decisions and open questions. Answer with the summary only.';

let nextId = 1;

export function connectRemote(options: RemoteOptions): RemoteConnection {
  const o = checkObject('options', options);
  const baseURL = checkString('baseURL', o.baseURL);
  try {
    new URL(baseURL);
  } catch {
    throw new InvalidOptionError('Expected an absolute URL for baseURL');
  }
  const model = checkString('model', o.model);
  const apiKey = o.apiKey !== undefined ? checkString('apiKey', o.apiKey) : process.env.OPENAI_API_KEY || undefined;
  const tokenizer = o.tokenizer as RemoteTokenizer | undefined;
  if (tokenizer !== undefined && typeof tokenizer?.tokenize !== 'function') throw new InvalidOptionError('Expected an object with tokenize(text) for tokenizer');
  const r = checkObject('retry', o.retry);
  const retry: RetryOptions = {
    retries: r.retries === undefined ? 2 : checkInt('retry.retries', r.retries, 0, 100),
    minDelayMs: r.minDelayMs === undefined ? 250 : checkNumber('retry.minDelayMs', r.minDelayMs, 0, 3_600_000),
    maxDelayMs: r.maxDelayMs === undefined ? 8000 : checkNumber('retry.maxDelayMs', r.maxDelayMs, 0, 3_600_000),
  };
  const c = checkObject('circuit', o.circuit);
  const circuit: CircuitOptions = {
    failureThreshold: c.failureThreshold === undefined ? 5 : checkInt('circuit.failureThreshold', c.failureThreshold, 1, 1_000_000),
    cooldownMs: c.cooldownMs === undefined ? 30_000 : checkNumber('circuit.cooldownMs', c.cooldownMs, 0, 86_400_000),
  };
  const timeoutMs = o.timeoutMs === undefined ? 60_000 : checkNumber('timeoutMs', o.timeoutMs, 1, 3_600_000);
  const fetchImpl = (o.fetch ?? globalThis.fetch) as typeof fetch;
  if (typeof fetchImpl !== 'function') throw new InvalidOptionError('Expected a function for fetch');
  const transport = new Transport({ baseURL, apiKey, retry, timeoutMs, circuit: new CircuitBreaker(circuit), fetch: fetchImpl });
  const chats = new Set<RemoteChat>();
  let disposed = false;
  return {
    createChat(chatOptions = {}) {
      if (disposed) throw new DisposedError('remote connection');
      const chat = new RemoteChat(transport, model, tokenizer, chatOptions, () => chats.delete(chat));
      chats.add(chat);
      return chat;
    },
    dispose() {
      disposed = true;
      for (const chat of [...chats]) chat.dispose();
    },
  };
}

interface ResolvedRemoteChatOptions {
  policy: RemotePolicyName;
  maxTokens: number;
  systemPrompt: string;
  summaryTokens: number;
  windowSize: number;
}

function resolveRemoteChatOptions(raw: unknown): ResolvedRemoteChatOptions & { telemetry?: RemoteTelemetry } {
  const o = checkObject('options', raw);
  for (const key of Object.keys(o)) {
    if (!['policy', 'maxTokens', 'systemPrompt', 'summaryTokens', 'windowSize', 'telemetry'].includes(key)) throw new InvalidOptionError(`Unknown option options.${key} (known: policy, maxTokens, systemPrompt, summaryTokens, windowSize, telemetry)`);
  }
  const policy = o.policy ?? 'sliding';
  if (typeof policy !== 'string' || !(REMOTE_POLICIES as readonly string[]).includes(policy)) {
    throw new InvalidOptionError(`The remote backend supports policies ${REMOTE_POLICIES.join(', ')}; ${JSON.stringify(policy)} needs the local KV cache (use loadModel)`);
  }
  const maxTokens = o.maxTokens === undefined ? 4096 : checkInt('maxTokens', o.maxTokens, 16, 1 << 24);
  const out: ResolvedRemoteChatOptions & { telemetry?: RemoteTelemetry } = {
    policy: policy as RemotePolicyName,
    maxTokens,
    systemPrompt: o.systemPrompt === undefined ? '' : checkString('systemPrompt', o.systemPrompt),
    summaryTokens: o.summaryTokens === undefined ? Math.max(8, Math.min(256, Math.floor(maxTokens / 8))) : checkInt('summaryTokens', o.summaryTokens, 1, Math.floor(maxTokens / 2)),
    windowSize: o.windowSize === undefined ? Math.floor(maxTokens / 2) : checkInt('windowSize', o.windowSize, 0, maxTokens),
  };
  if (o.telemetry !== undefined) {
    const t = checkObject('telemetry', o.telemetry);
    for (const k of ['onTurn', 'onError', 'onClose']) if (t[k] !== undefined && typeof t[k] !== 'function') throw new InvalidOptionError(`Expected a function for telemetry.${k}`);
    out.telemetry = t as RemoteTelemetry;
  }
  return out;
}

/**
 * A conversation with a remote model whose request never carries more than `maxTokens` tokens of
 * messages (counted locally). One turn at a time (a second send rejects with ChatBusyError).
 */
export class RemoteChat {
  readonly id = `remote-chat-${nextId++}`;
  readonly #transport: Transport;
  readonly #model: string;
  readonly #tokenizer: RemoteTokenizer | undefined;
  readonly #options: ResolvedRemoteChatOptions;
  readonly #telemetry: RemoteTelemetry | undefined;
  readonly #onDispose: () => void;
  readonly #systemTokens: number;
  #messages: Msg[] = [];
  #summary = '';
  #summaryTokens = 0;
  #transcript: Transcript['messages'] = [];
  #busy = false;
  #disposed = false;
  #running: AbortController | undefined;
  #totals = { turns: 0, tokensSeen: 0, tokensEvicted: 0, evictions: 0, summaries: 0 };

  /** @internal */
  constructor(transport: Transport, model: string, tokenizer: RemoteTokenizer | undefined, options: RemoteChatOptions, onDispose: () => void) {
    const { telemetry, ...resolved } = resolveRemoteChatOptions(options);
    this.#transport = transport;
    this.#model = model;
    this.#tokenizer = tokenizer;
    this.#options = resolved;
    this.#telemetry = telemetry;
    this.#onDispose = onDispose;
    this.#systemTokens = resolved.systemPrompt ? this.#count(resolved.systemPrompt) : 0;
    if (this.#systemTokens + (resolved.policy === 'sliding' ? 0 : resolved.summaryTokens + 4) >= resolved.maxTokens) {
      throw new PromptTooLargeError(`the system prompt (${this.#systemTokens} tokens) leaves no room in maxTokens ${resolved.maxTokens}`);
    }
  }

  get options(): Readonly<ResolvedRemoteChatOptions> {
    return this.#options;
  }

  get busy(): boolean {
    return this.#busy;
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  get tokenCounter(): 'model' | 'estimate' {
    return this.#tokenizer ? 'model' : 'estimate';
  }

  /** Tokens of one message: the tokenizer's count, or ceil(chars / 4); plus 4 for the message's framing. */
  #count(text: string): number {
    return (this.#tokenizer ? this.#tokenizer.tokenize(text).length : Math.ceil(text.length / 4)) + 4;
  }

  #retained(): number {
    return this.#systemTokens + (this.#summary ? this.#summaryTokens : 0) + this.#messages.reduce((n, m) => n + m.tokens, 0);
  }

  #requestMessages(extra?: Msg): { role: string; content: string }[] {
    const out: { role: string; content: string }[] = [];
    if (this.#options.systemPrompt) out.push({ role: 'system', content: this.#options.systemPrompt });
    if (this.#summary) out.push({ role: 'system', content: SUMMARY_PREFIX + this.#summary });
    for (const m of this.#messages) out.push({ role: m.role, content: m.content });
    if (extra) out.push({ role: extra.role, content: extra.content });
    return out;
  }

  /**
   * Sends a user message with the retained history. Before the request, messages leave (oldest first)
   * so that retained + the new message + room for the reply fit in maxTokens; after it, again so the
   * reply fits. With rolling_summary/hybrid, leaving messages are summarized by the remote model.
   */
  async send(message: string, options: RemoteSendOptions = {}): Promise<RemoteTurnResult> {
    this.#check();
    const text = checkMessage(message);
    const opts = resolveRemoteSendOptions(options);
    if (this.#busy) throw new ChatBusyError();
    const t0 = performance.now();
    const turn = { evictedTokens: 0, evictedMessages: 0, summaries: 0, summaryMs: 0, summaryTokens: 0 };
    const user: Msg = { role: 'user', content: text, tokens: this.#count(text) };
    const { maxTokens } = this.#options;
    const floor = this.#systemTokens + (this.#options.policy === 'sliding' ? 0 : this.#options.summaryTokens + 4);
    if (floor + user.tokens > maxTokens) {
      throw new PromptTooLargeError(`the message (${user.tokens} tokens) does not fit in maxTokens ${maxTokens} beside the system prompt${floor > this.#systemTokens ? ' and summary' : ''}`);
    }
    const abortResult = (response: string): RemoteTurnResult => ({ response, stopReason: 'abort', stats: this.#turnStats(turn, 0, 0, 0, t0) });
    if (opts.signal?.aborted) return abortResult('');

    this.#busy = true;
    const ac = new AbortController();
    this.#running = ac;
    const signal = opts.signal ? AbortSignal.any([opts.signal, ac.signal]) : ac.signal;
    const partial = { text: '' };
    // A turn that fails (or is aborted before any reply) leaves the memory as it was.
    const snapshot = { messages: [...this.#messages], summary: this.#summary, summaryTokens: this.#summaryTokens, totals: { ...this.#totals } };
    const restore = () => {
      this.#messages = snapshot.messages;
      this.#summary = snapshot.summary;
      this.#summaryTokens = snapshot.summaryTokens;
      this.#totals = snapshot.totals;
    };
    try {
      // Room for the reply: the requested tokens, but never more than half the budget.
      const reserve = Math.min(opts.maxNewTokens, Math.floor((maxTokens - floor - user.tokens) / 2));
      await this.#fit(maxTokens - user.tokens - reserve, turn, signal);
      const messages = this.#requestMessages(user);
      const promptTokens = this.#retained() + user.tokens;
      const body: Record<string, unknown> = { model: this.#model, messages, max_tokens: opts.maxNewTokens, stream: opts.onToken !== undefined };
      if (opts.temperature !== undefined) body.temperature = opts.temperature;
      if (opts.seed !== undefined) body.seed = opts.seed;
      if (opts.stop.length > 0) body.stop = opts.stop;
      const r = await this.#transport.complete(body, { signal, ...(opts.onToken ? { onToken: opts.onToken } : {}), partial });
      const reply: Msg = { role: 'assistant', content: r.text, tokens: this.#count(r.text) };
      this.#messages.push(user, reply);
      this.#transcript.push({ role: 'user', content: text }, { role: 'assistant', content: r.text });
      this.#totals.turns++;
      this.#totals.tokensSeen += user.tokens + reply.tokens + (this.#totals.turns === 1 ? this.#systemTokens : 0);
      // The reply may be longer than reserved (or counted differently): evict again.
      let stopReason: StopReason = r.finishReason === 'length' ? 'maxTokens' : 'eos';
      try {
        await this.#fit(maxTokens, turn, signal);
      } catch (err) {
        // The reply is here: a summary that failed (or was aborted) falls back to dropping messages.
        this.#fitSliding(maxTokens, turn);
        if (err instanceof AbortedError) stopReason = 'abort';
        else this.#report(err, 'turn');
      }
      const generated = typeof r.usage?.completion_tokens === 'number' ? r.usage.completion_tokens : reply.tokens - 4;
      const result: RemoteTurnResult = { response: r.text, stopReason, stats: this.#turnStats(turn, promptTokens, generated, r.attempts, t0) };
      this.#emit(result);
      return result;
    } catch (err) {
      if (err instanceof AbortedError) {
        // What was streamed before the abort stays in memory, as with a local chat; else nothing changes.
        if (!partial.text) restore();
        else {
          const reply: Msg = { role: 'assistant', content: partial.text, tokens: this.#count(partial.text) };
          this.#messages.push(user, reply);
          this.#transcript.push({ role: 'user', content: text }, { role: 'assistant', content: partial.text });
          this.#totals.turns++;
          this.#totals.tokensSeen += user.tokens + reply.tokens;
          this.#fitSliding(maxTokens, turn);
        }
        return abortResult(partial.text);
      }
      restore();
      // Typed transport errors, or the caller's own (an onToken that threw), as they are.
      this.#report(err, 'turn');
      throw err;
    } finally {
      this.#busy = false;
      this.#running = undefined;
    }
  }

  /** Streams the reply piece by piece; breaking out of the loop aborts the turn. Returns the result. */
  async *stream(message: string, options: Omit<RemoteSendOptions, 'onToken'> = {}): AsyncGenerator<string, RemoteTurnResult, undefined> {
    const queue: string[] = [];
    let wake: (() => void) | undefined;
    let finished = false;
    const ac = new AbortController();
    const signal = options.signal ? AbortSignal.any([options.signal, ac.signal]) : ac.signal;
    const turn = this.send(message, {
      ...options,
      signal,
      onToken: (piece) => {
        queue.push(piece);
        wake?.();
      },
    }).finally(() => {
      finished = true;
      wake?.();
    });
    turn.catch(() => {});
    try {
      while (true) {
        while (queue.length > 0) yield queue.shift() as string;
        if (finished) break;
        await new Promise<void>((resolve) => (wake = resolve));
        wake = undefined;
      }
      return await turn;
    } finally {
      if (!finished) {
        ac.abort();
        await turn.catch(() => {});
      }
    }
  }

  /** Messages leave (oldest first) until the retained tokens are <= limit. */
  async #fit(limit: number, turn: { evictedTokens: number; evictedMessages: number; summaries: number; summaryMs: number; summaryTokens: number }, signal: AbortSignal): Promise<void> {
    if (this.#options.policy === 'sliding') return this.#fitSliding(limit, turn);
    while (this.#retained() > limit && this.#messages.length > 0) {
      // Room the summary will take (its size is bounded by summaryTokens).
      const summaryRoom = this.#options.summaryTokens + 4;
      const target = this.#options.policy === 'hybrid' ? Math.min(limit, this.#systemTokens + summaryRoom + this.#options.windowSize) : limit;
      let keep = this.#retained() - (this.#summary ? this.#summaryTokens : 0) + summaryRoom;
      let n = 0;
      while (n < this.#messages.length && keep > target) keep -= this.#messages[n++]!.tokens;
      n = Math.max(n, 1);
      while (n < this.#messages.length && this.#messages[n]!.role === 'assistant') n++; // history starts with a user message
      const leaving = this.#messages.slice(0, n);
      const t0 = performance.now();
      const summary = await this.#summarize(leaving, signal);
      this.#messages = this.#messages.slice(n);
      const tokens = leaving.reduce((s, m) => s + m.tokens, 0);
      turn.evictedMessages += n;
      turn.evictedTokens += tokens;
      turn.summaries++;
      turn.summaryMs += performance.now() - t0;
      this.#totals.tokensEvicted += tokens;
      this.#totals.evictions++;
      this.#totals.summaries++;
      if (summary) {
        this.#summary = summary;
        this.#summaryTokens = this.#count(SUMMARY_PREFIX + summary);
        turn.summaryTokens = this.#summaryTokens;
      }
    }
  }

  #fitSliding(limit: number, turn: { evictedTokens: number; evictedMessages: number }): void {
    let n = 0;
    let tokens = 0;
    const excess = this.#retained() - limit;
    while (n < this.#messages.length && tokens < excess) tokens += this.#messages[n++]!.tokens;
    if (n === 0) return;
    // Whole exchanges leave: the history always starts with a user message.
    while (n < this.#messages.length && this.#messages[n]!.role === 'assistant') tokens += this.#messages[n++]!.tokens;
    this.#messages = this.#messages.slice(n);
    turn.evictedMessages += n;
    turn.evictedTokens += tokens;
    this.#totals.tokensEvicted += tokens;
    this.#totals.evictions++;
  }

  /** Asks the remote model for one summary of the previous summary plus the leaving messages, cut to summaryTokens. */
  async #summarize(leaving: Msg[], signal: AbortSignal): Promise<string> {
    const lines = leaving.map((m) => `${m.role}: ${m.content}`).join('\n');
    const content = `${this.#summary ? `Previous summary:\n${this.#summary}\n\n` : ''}New messages:\n${lines}\n\nWrite the updated summary.`;
    const body = {
      model: this.#model,
      messages: [{ role: 'system', content: SUMMARIZER_PROMPT }, { role: 'user', content }],
      max_tokens: this.#options.summaryTokens,
      temperature: 0,
      stream: false,
    };
    const r = await this.#transport.complete(body, { signal });
    let summary = r.text.trim();
    // The summary message must fit its room whatever the remote's tokenizer did.
    const room = this.#options.summaryTokens + 4;
    while (summary && this.#count(SUMMARY_PREFIX + summary) > room) summary = summary.slice(0, Math.floor(summary.length * 0.9)).trimEnd();
    return summary || this.#summary;
  }

  #turnStats(turn: { evictedTokens: number; evictedMessages: number; summaries: number; summaryMs: number; summaryTokens: number }, promptTokens: number, generatedTokens: number, attempts: number, t0: number): RemoteTurnStats {
    return {
      promptTokens, generatedTokens, retainedTokens: this.#retained(), ...turn, attempts,
      latencyMs: performance.now() - t0, tokenCounter: this.tokenCounter, policy: this.#options.policy,
    };
  }

  /** Cumulative figures since creation or the last reset. */
  stats(): RemoteChatStats {
    this.#check();
    const retained = this.#retained();
    return {
      ...this.#totals,
      tokensRetained: retained,
      compressionRatio: retained > 0 ? this.#totals.tokensSeen / retained : 0,
      messagesRetained: this.#messages.length,
      summary: this.#summary,
      tokenCounter: this.tokenCounter,
    };
  }

  /** The messages the next request carries, in order, with their token counts. */
  memory(): RemoteMemoryEntry[] {
    this.#check();
    const out: RemoteMemoryEntry[] = [];
    if (this.#options.systemPrompt) out.push({ role: 'system', content: this.#options.systemPrompt, tokens: this.#systemTokens });
    if (this.#summary) out.push({ role: 'summary', content: this.#summary, tokens: this.#summaryTokens });
    for (const m of this.#messages) out.push({ role: m.role, content: m.content, tokens: m.tokens });
    return out;
  }

  /** The whole conversation (including what left the memory), in the local chats' Transcript format. */
  exportTranscript(): Transcript {
    this.#check();
    return { format: 'finite-memory-llm/transcript', version: 1, systemPrompt: this.#options.systemPrompt, messages: this.#transcript.map((m) => ({ ...m })) };
  }

  /** Forgets the conversation and the summary (keeps the options). */
  reset(): void {
    this.#check();
    if (this.#busy) throw new ChatBusyError('cannot reset while a turn is running');
    this.#messages = [];
    this.#summary = '';
    this.#summaryTokens = 0;
    this.#transcript = [];
    this.#totals = { turns: 0, tokensSeen: 0, tokensEvicted: 0, evictions: 0, summaries: 0 };
  }

  /** Aborts a running turn and makes the chat unusable. Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#running?.abort();
    this.#onDispose();
    try {
      this.#telemetry?.onClose?.(this.id);
    } catch (err) {
      this.#report(err, 'onTurn');
    }
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  #emit(result: RemoteTurnResult): void {
    const hooks = this.#telemetry;
    if (!hooks?.onTurn || this.#disposed) return;
    const event: RemoteTurnEvent = { chatId: this.id, policy: this.#options.policy, turn: this.#totals.turns, stopReason: result.stopReason, stats: result.stats, chat: this.stats() };
    setImmediate(() => {
      try {
        const p = hooks.onTurn?.(event);
        if (p && typeof (p as Promise<void>).then === 'function') (p as Promise<void>).then(undefined, (err) => this.#report(err, 'onTurn'));
      } catch (err) {
        this.#report(err, 'onTurn');
      }
    });
  }

  #report(err: unknown, source: 'turn' | 'onTurn'): void {
    const hooks = this.#telemetry;
    if (!hooks?.onError) return;
    const call = () => {
      try {
        hooks.onError?.(err, { chatId: this.id, source });
      } catch {
        // nowhere left to report
      }
    };
    if (source === 'turn') setImmediate(call);
    else call();
  }

  #check(): void {
    if (this.#disposed) throw new DisposedError('chat');
  }
}

interface ResolvedRemoteSendOptions {
  maxNewTokens: number;
  temperature?: number;
  seed?: number;
  stop: string[];
  onToken?: (piece: string) => void;
  signal?: AbortSignal;
}

function resolveRemoteSendOptions(raw: unknown): ResolvedRemoteSendOptions {
  const o = checkObject('options', raw);
  for (const key of Object.keys(o)) {
    if (!['maxNewTokens', 'temperature', 'seed', 'stop', 'onToken', 'signal'].includes(key)) throw new InvalidOptionError(`Unknown option options.${key} (known: maxNewTokens, temperature, seed, stop, onToken, signal)`);
  }
  const out: ResolvedRemoteSendOptions = { maxNewTokens: o.maxNewTokens === undefined ? 256 : checkInt('maxNewTokens', o.maxNewTokens, 1, 1 << 24), stop: [] };
  if (o.temperature !== undefined) out.temperature = checkNumber('temperature', o.temperature, 0, 2);
  if (o.seed !== undefined) out.seed = checkInt('seed', o.seed, 0, Number.MAX_SAFE_INTEGER);
  if (o.stop !== undefined) {
    if (!Array.isArray(o.stop) || o.stop.length > 16) throw new InvalidOptionError('Expected an array of at most 16 strings for stop');
    out.stop = o.stop.map((s, i) => checkString(`stop[${i}]`, s, 1024)).filter((s) => s.length > 0);
  }
  if (o.onToken !== undefined) {
    if (typeof o.onToken !== 'function') throw new InvalidOptionError('Expected a function for onToken');
    out.onToken = o.onToken as (piece: string) => void;
  }
  if (o.signal !== undefined) {
    if (!(o.signal instanceof AbortSignal)) throw new InvalidOptionError('Expected an AbortSignal for signal');
    out.signal = o.signal;
  }
  return out;
}
