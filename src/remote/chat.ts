/**
 * A chat with a remote OpenAI-compatible model (see connect.ts). The remote KV cache is out of reach,
 * so memory is managed at the message level: every request carries the system prompt, the summary (if
 * any) and the newest messages that fit in `maxTokens`.
 */
import { CallbackError, ChatBusyError, DisposedError, InvalidOptionError, PromptTooLargeError } from '../shared/errors.js';
import { streamFromSend, TranscriptLog, type ChatSurface } from '../shared/chat-surface.js';
import { checkMessage, toolResultFields } from '../shared/checks.js';
import { TelemetryEmitter } from '../shared/telemetry.js';
import type { StopReason, ToolResult, Transcript } from '../shared/types.js';
import { AbortedError, CallerError, type Transport } from './transport.js';
import type { RemoteTokenizer } from './connect.js';
import { MessageMemory, messageText, SUMMARY_PREFIX, type Msg, type TurnEvictions } from './memory.js';
import { resolveRemoteChatOptions, resolveRemoteSendOptions, type ResolvedRemoteChatOptions } from './options.js';
import type { RemoteChatOptions, RemoteChatStats, RemoteMemoryEntry, RemoteSendOptions, RemoteTurnEvent, RemoteTurnResult, RemoteTurnStats } from './types.js';

export * from './types.js';
export { REMOTE_CHAT_DEFAULTS } from './options.js';
export { SUMMARY_PREFIX } from './memory.js';

export const SUMMARIZER_PROMPT =
  'You maintain a running summary of a conversation. Merge the previous summary and the new messages into one concise summary of the facts, names, decisions and open questions. Answer with the summary only.';

let nextId = 1;

/**
 * Tokens of `text` without a tokenizer: ceil(ASCII characters / 4), plus one per other character. A
 * BPE vocabulary spends about a token per CJK character and more than one per emoji; chars / 4 for
 * every script undercounted Chinese text 2-4x, and the remote then refused a context that the budget
 * said fit, on every turn until reset().
 */
export function estimateTokens(text: string): number {
  let ascii = 0;
  let other = 0;
  for (const ch of text) {
    if (ch.charCodeAt(0) < 0x80) ascii++;
    else other++;
  }
  return Math.ceil(ascii / 4) + other;
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
  readonly #memory: MessageMemory;
  readonly #transcript = new TranscriptLog();
  #busy = false;
  #disposed = false;
  #running: AbortController | undefined;
  /** The turn in flight, for asyncDispose. */
  #turn: Promise<unknown> | undefined;

  /** @internal */
  constructor(transport: Transport, model: string, tokenizer: RemoteTokenizer | undefined, options: RemoteChatOptions, onDispose: () => void) {
    const { telemetry, ...resolved } = resolveRemoteChatOptions(options);
    this.#transport = transport;
    this.#model = model;
    this.#tokenizer = tokenizer;
    this.#options = resolved;
    this.#telemetry = telemetry ? new TelemetryEmitter(telemetry, this.id) : undefined;
    this.#onDispose = onDispose;
    const systemTokens = resolved.systemPrompt ? this.#count(resolved.systemPrompt) : 0;
    // The summary message: summaryTokens of summary after its prefix (the prefix was counted inside
    // summaryTokens, which left a default summary of 8 tokens no room at all).
    const summaryRoom = resolved.policy === 'sliding' ? 0 : resolved.summaryTokens + this.#count(SUMMARY_PREFIX);
    if (systemTokens + summaryRoom >= resolved.maxTokens) {
      throw new PromptTooLargeError(`the system prompt (${systemTokens} tokens) leaves no room in maxTokens ${resolved.maxTokens}`);
    }
    this.#memory = new MessageMemory(resolved, systemTokens, summaryRoom, (text) => this.#count(text));
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

  /** Tokens of one message: the tokenizer's count, or the estimate (estimateTokens); plus 4 for the message's framing. */
  #count(text: string): number {
    return (this.#tokenizer ? this.#tokenizer.tokenize(text).length : estimateTokens(text)) + 4;
  }

  /**
   * Sends a user message with the retained history. Before the request, messages leave (oldest first)
   * so that retained + the new message + room for the reply fit in maxTokens; after it, again so the
   * reply fits. With rolling_summary/hybrid, leaving messages are summarized by the remote model.
   */
  send(message: string | { toolResults: ToolResult[] }, options: RemoteSendOptions = {}): Promise<RemoteTurnResult> {
    // A call refused as busy must not replace the running turn that asyncDispose waits for.
    const idle = !this.#busy;
    const turn = this.#send(message, options);
    if (idle) this.#turn = turn;
    return turn;
  }

  async #send(message: string | { toolResults: ToolResult[] }, options: RemoteSendOptions): Promise<RemoteTurnResult> {
    this.#check();
    const input = this.#inputOf(message);
    const text = typeof message === 'string' ? input[0]!.content : undefined;
    const opts = resolveRemoteSendOptions(options);
    if ((opts.toolChoice !== undefined || text === undefined) && this.#options.tools === undefined) {
      throw new InvalidOptionError('toolChoice and tool results need a chat created with tools');
    }
    if (this.#busy) throw new ChatBusyError();
    const t0 = performance.now();
    const turn: TurnEvictions = { evictedTokens: 0, evictedMessages: 0, summaries: 0, summaryMs: 0, summaryTokens: 0 };
    const inputTokens = input.reduce((n, m) => n + m.tokens, 0);
    const { maxTokens } = this.#options;
    const memory = this.#memory;
    const floor = memory.systemTokens + memory.summaryRoom;
    if (floor + inputTokens > maxTokens) {
      throw new PromptTooLargeError(`the message (${inputTokens} tokens) does not fit in maxTokens ${maxTokens} beside the system prompt${floor > memory.systemTokens ? ' and summary' : ''}`);
    }
    const abortResult = (response: string, reasoning = ''): RemoteTurnResult => ({ response, reasoning, toolCalls: [], stopReason: 'abort', stats: this.#turnStats(turn, 0, 0, 0, t0) });
    if (opts.signal?.aborted) return abortResult('');

    this.#busy = true;
    const ac = new AbortController();
    this.#running = ac;
    const signal = opts.signal ? AbortSignal.any([opts.signal, ac.signal]) : ac.signal;
    const partial = { text: '', reasoning: '' };
    // A turn that fails (or is aborted before any reply) leaves the memory as it was.
    const restore = memory.snapshot();
    const summarize = (leaving: Msg[], s: AbortSignal) => this.#summarize(leaving, s);
    try {
      // Room for the reply: the requested tokens, but never more than half the budget.
      const reserve = Math.min(opts.maxNewTokens, Math.floor((maxTokens - floor - inputTokens) / 2));
      await memory.fit(maxTokens - inputTokens - reserve, turn, signal, summarize);
      const messages = memory.requestMessages(input);
      const promptTokens = memory.retained() + inputTokens;
      const streamed = opts.onToken !== undefined || opts.onReasoning !== undefined;
      const body: Record<string, unknown> = { model: this.#model, messages, max_tokens: opts.maxNewTokens, stream: streamed };
      // A stream carries the remote's token counts only when asked (OpenAI, this project's server).
      if (streamed) body.stream_options = { include_usage: true };
      if (opts.temperature !== undefined) body.temperature = opts.temperature;
      if (opts.seed !== undefined) body.seed = opts.seed;
      if (opts.stop.length > 0) body.stop = opts.stop;
      if (opts.thinking === false) body.chat_template_kwargs = { enable_thinking: false };
      // OpenAI's structured outputs (strict: the answer follows the schema, for the subset it takes).
      if (opts.jsonSchema !== undefined) body.response_format = { type: 'json_schema', json_schema: { name: 'response', schema: opts.jsonSchema, strict: true } };
      if (this.#options.tools !== undefined) {
        body.tools = this.#options.tools;
        if (opts.toolChoice !== undefined) body.tool_choice = opts.toolChoice;
        if (opts.parallelToolCalls !== undefined) body.parallel_tool_calls = opts.parallelToolCalls;
      }
      const r = await this.#transport.complete(body, { signal, onToken: opts.onToken, onReasoning: opts.onReasoning, partial });
      // A call without an id (some servers) gets one: its result must name it.
      const toolCalls = r.toolCalls.map((c, i) => ({ ...c, id: c.id || `call_${Date.now().toString(36)}_${i}` }));
      const reply: Msg = { role: 'assistant', content: r.text, tokens: this.#count(r.text + toolCalls.map((c) => c.name + c.arguments).join('')), ...(toolCalls.length ? { toolCalls } : {}) };
      memory.add(input, reply);
      if (text !== undefined) this.#transcript.add(text, r.text);
      else this.#transcript.addToLastReply(r.text);
      // The reply may be longer than reserved (or counted differently): evict again.
      // OpenAI's finish_reason 'stop' covers both an end of turn and a stop string; this project's
      // server says which (finite_memory.stop_reason), as a local chat would.
      const told = (r.extra as { stop_reason?: unknown } | undefined)?.stop_reason;
      let stopReason: StopReason = told === 'eos' || told === 'maxTokens' || told === 'stop' ? told : r.finishReason === 'length' ? 'maxTokens' : 'eos';
      try {
        await memory.fit(maxTokens, turn, signal, summarize);
      } catch (err) {
        // The reply is here: a summary that failed (or was aborted) falls back to dropping messages.
        memory.fitSliding(maxTokens, turn);
        if (err instanceof AbortedError) stopReason = 'abort';
        else this.#telemetry?.error(err);
      }
      const generated = typeof r.usage?.completion_tokens === 'number' ? r.usage.completion_tokens : reply.tokens - 4;
      // The reasoning is not kept in the history sent next time: chat templates leave it out.
      const result: RemoteTurnResult = { response: r.text, reasoning: r.reasoning, toolCalls, stopReason, stats: this.#turnStats(turn, promptTokens, generated, r.attempts, t0) };
      this.#emit(result);
      return result;
    } catch (err) {
      if (err instanceof AbortedError || err instanceof CallerError) {
        // What was streamed before the abort stays in memory, as with a local chat; else nothing changes.
        // An onToken that threw ends the turn there too: kept, and its error reported (CallbackError).
        if (!partial.text) restore();
        else {
          const reply: Msg = { role: 'assistant', content: partial.text, tokens: this.#count(partial.text) };
          memory.add(input, reply);
          if (text !== undefined) this.#transcript.add(text, partial.text);
          else this.#transcript.addToLastReply(partial.text);
          memory.fitSliding(maxTokens, turn);
        }
        // Telemetry sees an aborted turn as a local chat's does: a turn with stopReason 'abort'.
        const result = abortResult(partial.text, partial.reasoning);
        if (partial.text) this.#emit(result);
        if (err instanceof CallerError) throw new CallbackError(result, err.error);
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

  /** The turn's new messages: the user's, or a tool message per result (each naming its call). */
  #inputOf(message: string | { toolResults: ToolResult[] }): Msg[] {
    if (typeof message === 'string') {
      const text = checkMessage(message);
      return [{ role: 'user', content: text, tokens: this.#count(text) }];
    }
    return toolResultFields(message).map(({ at, toolCallId, content: raw }) => {
      if (typeof toolCallId !== 'string' || toolCallId === '') throw new InvalidOptionError(`Expected the call's id (a string) for ${at}.toolCallId: a remote needs it`);
      const content = checkMessage(raw, `${at}.content`);
      return { role: 'tool' as const, content, toolCallId, tokens: this.#count(content) };
    });
  }

  /** Streams the reply piece by piece; breaking out of the loop aborts the turn. Returns the result. */
  stream(message: string, options: Omit<RemoteSendOptions, 'onToken'> = {}): AsyncGenerator<string, RemoteTurnResult, undefined> {
    return streamFromSend((onToken, signal) => this.send(message, { ...options, onToken, signal }), options.signal);
  }

  /** Asks the remote model for one summary of the previous summary plus the leaving messages, cut to summaryTokens. */
  async #summarize(leaving: Msg[], signal: AbortSignal): Promise<string> {
    const lines = leaving.map(messageText).join('\n');
    const previous = this.#memory.summary;
    const content = `${previous ? `Previous summary:\n${previous}\n\n` : ''}New messages:\n${lines}\n\nWrite the updated summary.`;
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
    const room = this.#memory.summaryRoom;
    while (summary && this.#count(SUMMARY_PREFIX + summary) > room) summary = summary.slice(0, Math.floor(summary.length * 0.9)).trimEnd();
    return summary || previous;
  }

  #turnStats(turn: TurnEvictions, promptTokens: number, generatedTokens: number, attempts: number, t0: number): RemoteTurnStats {
    return {
      promptTokens, generatedTokens, retainedTokens: this.#memory.retained(), ...turn, attempts,
      latencyMs: performance.now() - t0, tokenCounter: this.tokenCounter, policy: this.#options.policy,
    };
  }

  /** Cumulative figures since creation or the last reset. */
  stats(): RemoteChatStats {
    this.#check();
    const m = this.#memory;
    const retained = m.retained();
    return {
      ...m.totals,
      tokensRetained: retained,
      compressionRatio: retained > 0 ? m.totals.tokensSeen / retained : 0,
      messagesRetained: m.messages.length,
      summary: m.summary,
      tokenCounter: this.tokenCounter,
    };
  }

  /** The messages the next request carries, in order, with their token counts. */
  memory(): RemoteMemoryEntry[] {
    this.#check();
    return this.#memory.entries();
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
    this.#memory.clear();
    this.#transcript.clear();
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
    this.#telemetry.turn({ chatId: this.id, policy: this.#options.policy, turn: this.#memory.totals.turns, stopReason: result.stopReason, stats: result.stats, chat: this.stats() });
  }

  #check(): void {
    if (this.#disposed) throw new DisposedError('chat');
  }
}
