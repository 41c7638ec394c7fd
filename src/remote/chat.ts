/**
 * A chat with a remote OpenAI-compatible model (see connect.ts). The remote KV cache is out of reach,
 * so memory is managed at the message level: every request carries the system prompt, the summary (if
 * any) and the newest messages that fit in `maxTokens`.
 */
import { ChatBusyError, DisposedError, InvalidOptionError, PromptTooLargeError } from '../shared/errors.js';
import { streamFromSend, TranscriptLog, type ChatSurface } from '../shared/chat-surface.js';
import { checkInt, checkKnownKeys, checkMessage, checkNumber, checkObject, checkString } from '../shared/checks.js';
import { checkTelemetry, TelemetryEmitter, type TelemetryHooks } from '../shared/telemetry.js';
import { AbortedError, type Transport } from './transport.js';
import type { RemoteTokenizer } from './connect.js';
import type { CommonChatStats, CommonSendOptions, CommonTurnResult, StopReason, Transcript } from '../shared/types.js';

export type RemotePolicyName = 'sliding' | 'rolling_summary' | 'hybrid';
const REMOTE_POLICIES: readonly RemotePolicyName[] = ['sliding', 'rolling_summary', 'hybrid'];

export interface RemoteChatOptions {
  /** Default 'sliding'. 'importance' and 'semantic' need the local KV cache and are refused. */
  policy?: RemotePolicyName;
  /** Most tokens the request's messages (system prompt, summary, history) may hold after a turn. Default 4096. */
  maxTokens?: number;
  systemPrompt?: string;
  /** rolling_summary/hybrid: longest summary (tokens, also its `max_tokens`). Default max(8, min(256, maxTokens / 8)). */
  summaryTokens?: number;
  /** hybrid: when summarizing, history is cut down to this many tokens of newest messages. Default maxTokens / 2. */
  windowSize?: number;
  telemetry?: RemoteTelemetry;
}

/** The common send() options (temperature, seed and stop are sent as they are); what differs is documented here. */
export interface RemoteSendOptions extends CommonSendOptions {
  /** Sent as `max_tokens`. Default 256. */
  maxNewTokens?: number;
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

export interface RemoteTurnResult extends CommonTurnResult {
  stats: RemoteTurnStats;
}

export interface RemoteChatStats extends CommonChatStats {
  messagesRetained: number;
  summaries: number;
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

/** Same hooks and contract as a local chat's `Telemetry` (one emitter runs both); no eviction events. */
export type RemoteTelemetry = Omit<TelemetryHooks<RemoteTurnEvent>, 'onEviction'>;

type Msg = { role: 'user' | 'assistant'; content: string; tokens: number };

export const SUMMARY_PREFIX = 'Summary of the earlier conversation: ';
export const SUMMARIZER_PROMPT =
  'You maintain a running summary of a conversation. Merge the previous summary and the new messages into one concise summary of the facts, names, decisions and open questions. Answer with the summary only.';

let nextId = 1;

interface ResolvedRemoteChatOptions {
  policy: RemotePolicyName;
  maxTokens: number;
  systemPrompt: string;
  summaryTokens: number;
  windowSize: number;
}

/**
 * The remote chat's defaults. Where one differs from the local chat's (native/engine/options.cpp),
 * `differs` says why; a test checks that every other shared option has the local default, and that
 * docs/remote.md gives each reason.
 */
export const REMOTE_CHAT_DEFAULTS = {
  policy: { value: (): RemotePolicyName => 'sliding' },
  systemPrompt: { value: () => '' },
  maxTokens: {
    value: () => 4096,
    differs: 'a hosted model\'s context is larger, and the budget counts the tokens each request resends, not a KV cache kept between turns',
  },
  summaryTokens: {
    value: (maxTokens: number) => Math.max(8, Math.min(256, Math.floor(maxTokens / 8))),
    differs: 'the summary is written by the hosted model in its own request (its max_tokens), so it may be longer; at least 8 tokens to say anything',
  },
  windowSize: {
    value: (maxTokens: number) => Math.floor(maxTokens / 2),
    differs: 'for hybrid it is the newest history kept verbatim when summarizing, in messages rather than tokens of a cache: half the budget keeps whole recent exchanges',
  },
} as const;

function resolveRemoteChatOptions(raw: unknown): ResolvedRemoteChatOptions & { telemetry?: RemoteTelemetry } {
  const o = checkObject('options', raw);
  checkKnownKeys('options', o, ['policy', 'maxTokens', 'systemPrompt', 'summaryTokens', 'windowSize', 'telemetry']);
  const d = REMOTE_CHAT_DEFAULTS;
  const policy = o.policy ?? d.policy.value();
  if (typeof policy !== 'string' || !(REMOTE_POLICIES as readonly string[]).includes(policy)) {
    throw new InvalidOptionError(`The remote backend supports policies ${REMOTE_POLICIES.join(', ')}; ${JSON.stringify(policy)} needs the local KV cache (use loadModel)`);
  }
  const maxTokens = o.maxTokens === undefined ? d.maxTokens.value() : checkInt('maxTokens', o.maxTokens, 16, 1 << 24);
  const out: ResolvedRemoteChatOptions & { telemetry?: RemoteTelemetry } = {
    policy: policy as RemotePolicyName,
    maxTokens,
    systemPrompt: o.systemPrompt === undefined ? d.systemPrompt.value() : checkString('systemPrompt', o.systemPrompt),
    summaryTokens: o.summaryTokens === undefined ? d.summaryTokens.value(maxTokens) : checkInt('summaryTokens', o.summaryTokens, 1, Math.floor(maxTokens / 2)),
    windowSize: o.windowSize === undefined ? d.windowSize.value(maxTokens) : checkInt('windowSize', o.windowSize, 0, maxTokens),
  };
  const telemetry = checkTelemetry<RemoteTelemetry>(o.telemetry, ['onTurn', 'onError', 'onClose']);
  if (telemetry) out.telemetry = telemetry;
  return out;
}

/**
 * A conversation with a remote model whose request never carries more than `maxTokens` tokens of
 * messages (counted locally). One turn at a time (a second send rejects with ChatBusyError).
 */
export class RemoteChat implements ChatSurface {
  readonly id = `remote-chat-${nextId++}`;
  readonly #transport: Transport;
  readonly #model: string;
  readonly #tokenizer: RemoteTokenizer | undefined;
  readonly #options: ResolvedRemoteChatOptions;
  readonly #telemetry: TelemetryEmitter<RemoteTurnEvent> | undefined;
  readonly #onDispose: () => void;
  readonly #systemTokens: number;
  #messages: Msg[] = [];
  #summary = '';
  #summaryTokens = 0;
  readonly #transcript = new TranscriptLog();
  #busy = false;
  #disposed = false;
  #running: AbortController | undefined;
  /** The turn in flight, for asyncDispose. */
  #turn: Promise<unknown> | undefined;
  #totals = { turns: 0, tokensSeen: 0, tokensEvicted: 0, evictions: 0, summaries: 0 };

  /** @internal */
  constructor(transport: Transport, model: string, tokenizer: RemoteTokenizer | undefined, options: RemoteChatOptions, onDispose: () => void) {
    const { telemetry, ...resolved } = resolveRemoteChatOptions(options);
    this.#transport = transport;
    this.#model = model;
    this.#tokenizer = tokenizer;
    this.#options = resolved;
    this.#telemetry = telemetry ? new TelemetryEmitter(telemetry, this.id) : undefined;
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
  send(message: string, options: RemoteSendOptions = {}): Promise<RemoteTurnResult> {
    const turn = this.#send(message, options);
    this.#turn = turn;
    return turn;
  }

  async #send(message: string, options: RemoteSendOptions): Promise<RemoteTurnResult> {
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
      this.#transcript.add(text, r.text);
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
        else this.#telemetry?.error(err);
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
          this.#transcript.add(text, partial.text);
          this.#totals.turns++;
          this.#totals.tokensSeen += user.tokens + reply.tokens;
          this.#fitSliding(maxTokens, turn);
        }
        // Telemetry sees an aborted turn as a local chat's does: a turn with stopReason 'abort'.
        const result = abortResult(partial.text);
        if (partial.text) this.#emit(result);
        return result;
      }
      restore();
      // Typed transport errors, or the caller's own (an onToken that threw), as they are.
      this.#telemetry?.error(err);
      throw err;
    } finally {
      this.#busy = false;
      this.#running = undefined;
    }
  }

  /** Streams the reply piece by piece; breaking out of the loop aborts the turn. Returns the result. */
  stream(message: string, options: Omit<RemoteSendOptions, 'onToken'> = {}): AsyncGenerator<string, RemoteTurnResult, undefined> {
    return streamFromSend((onToken, signal) => this.send(message, { ...options, onToken, signal }), options.signal);
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
    return this.#transcript.export(this.#options.systemPrompt);
  }

  /** Forgets the conversation and the summary (keeps the options). */
  reset(): void {
    this.#check();
    if (this.#busy) throw new ChatBusyError('cannot reset while a turn is running');
    this.#messages = [];
    this.#summary = '';
    this.#summaryTokens = 0;
    this.#transcript.clear();
    this.#totals = { turns: 0, tokensSeen: 0, tokensEvicted: 0, evictions: 0, summaries: 0 };
  }

  /** Aborts a running turn and makes the chat unusable. Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#running?.abort();
    this.#onDispose();
    this.#telemetry?.close();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** Disposes and waits for a running turn to settle (it resolves with stopReason 'abort'). */
  async [Symbol.asyncDispose](): Promise<void> {
    const turn = this.#turn;
    this.dispose();
    await turn?.catch(() => {});
  }

  #emit(result: RemoteTurnResult): void {
    if (!this.#telemetry || this.#disposed) return;
    this.#telemetry.turn({ chatId: this.id, policy: this.#options.policy, turn: this.#totals.turns, stopReason: result.stopReason, stats: result.stats, chat: this.stats() });
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
  checkKnownKeys('options', o, ['maxNewTokens', 'temperature', 'seed', 'stop', 'onToken', 'signal']);
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
