import { getProbes, type NativeCacheState, type NativeChat, type NativeEngineStats, type NativeEvictionRecord } from './binding.js';
import { AbortedError, CallbackError, ChatBusyError, CheckpointError, DisposedError, InvalidOptionError, fromNativeError } from '../shared/errors.js';
import { checkInt, checkMessage, checkObject, checkPath, fail, toolResultFields } from '../shared/checks.js';
import { splitSendOptions, type ResolvedChatOptions, type SendOptions } from './options.js';
import { TelemetryEmitter, type EvictionEvent, type Telemetry, type TurnEvent } from '../shared/telemetry.js';
import { streamFromSend, TranscriptLog, type ChatSurface } from '../shared/chat-surface.js';
import type { ChatStats, MemoryEntry, ToolCall, ToolResult, Transcript, TurnResult } from '../shared/types.js';

let nextChatId = 1;

/**
 * Low-level hooks used by the demo, the test suite and benchmarks. Not part of the public API.
 * cacheState and countTurnTokens exist in every build; the rest are probes of the test build
 * (FML_ADDON_PATH=build/Probes/finite_memory_llm_probes.node) and throw NativeBindingError otherwise.
 * @internal
 */
export interface ChatInternals {
  cacheState(): NativeCacheState;
  countTurnTokens(message: string): number;
  /** Every engine (shared context) of the chat's model, summed; `own`: the chat's engine alone. */
  engineStats(own?: boolean): NativeEngineStats;
  probeLogits(token: number): Float32Array;
  /** A hybrid chat's recurrent state as llama.cpp saves it (empty for other models). */
  recurrentState(): Uint8Array;
  /** What a summary written now (at the next turn's start) reads before its text; empty without summaries. */
  summaryPrompt(): number[];
  /** A chat with tools: whether its exchanges are framed the fast way (the called tools alone, the template alone); null without tools. */
  toolFramesFast(): boolean | null;
  /**
   * The next turn preparations (framing, tool set-up, grammar, the fit check) wait until `release()`;
   * one still waiting after `timeoutMs` fails its turn. They run on a worker: release() from the JS
   * thread lets them go.
   */
  holdPrepare(timeoutMs: number): () => void;
  shiftPositions(delta: number): void;
  /** Saves the sliding layers' window as a turn does and restores it (no-op without such layers). */
  windowRoundTrip(): void;
  /** Teacher-forced feed in chunks (evicting as a chat would); logits after every token. */
  evaluateTokens(tokens: readonly number[], chunk: number): Float32Array;
  /** Benchmark: clears the cache and prefills the retained tokens again (naive re-prefill); returns ms. */
  replayHistory(): number;
  /** Benchmark: bare llama_decode + greedy sampling of n tokens on this context, rolled back; returns ms. */
  plainDecode(n: number): number;
}

/**
 * A conversation whose KV cache holds at most `maxTokens` tokens. One turn runs at a time: a second
 * `send` while one is running rejects with `ChatBusyError` (it is not queued, so a server decides
 * its own queueing). Other chats, even of the same model, run concurrently.
 */
export class Chat implements ChatSurface {
  readonly #native: NativeChat;
  readonly #options: ResolvedChatOptions;
  readonly #onDispose: () => void;
  readonly #telemetry: TelemetryEmitter<TurnEvent, EvictionEvent> | undefined;
  /** Identifies this chat in telemetry events. */
  readonly id = `chat-${nextChatId++}`;
  #busy = false;
  #disposed = false;
  /** The native operation in flight (a turn, a checkpoint, an import, a forget), for asyncDispose. */
  #running: Promise<unknown> | undefined;
  #lastTurn: TurnResult | undefined;
  readonly #transcript = new TranscriptLog();

  /** @internal */
  constructor(native: NativeChat, options: ResolvedChatOptions, onDispose: () => void, telemetry?: Telemetry) {
    this.#native = native;
    this.#options = options;
    this.#onDispose = onDispose;
    this.#telemetry = telemetry ? new TelemetryEmitter(telemetry, this.id) : undefined;
  }

  /** The resolved options (defaults filled in). */
  get options(): Readonly<ResolvedChatOptions> {
    return this.#options;
  }

  get busy(): boolean {
    return this.#busy;
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  /** The result of the last completed turn. */
  get lastTurn(): TurnResult | undefined {
    return this.#lastTurn;
  }

  /**
   * Sends a user message and generates the reply. Only the message's tokens are prefilled; when the
   * budget would overflow, the policy evicts tokens from the KV cache first. A chat with tools also
   * takes `{ toolResults }`: what its tools returned for the last reply's calls (`TurnResult.toolCalls`),
   * framed as the model's template frames tool results; the reply that follows is generated as usual.
   */
  send(message: string | { toolResults: ToolResult[] }, options: SendOptions = {}): Promise<TurnResult> {
    // A call refused as busy must not replace the running turn that asyncDispose waits for.
    const idle = !this.#busy;
    const turn = this.#send(message, options);
    return idle ? this.#track(turn) : turn;
  }

  async #send(message: string | { toolResults: ToolResult[] }, options: SendOptions): Promise<TurnResult> {
    this.#check();
    const results = typeof message === 'string' ? undefined : toolResultsOf(message);
    const text = results === undefined ? checkMessage(message) : '';
    const { native: nativeOpts, js: opts } = splitSendOptions(options);
    if (this.#busy) throw new ChatBusyError();
    if (opts.signal?.aborted) {
      // stats() reads under the chat's lock; cacheState() would wait on the JS thread for the scheduler's step.
      return this.#remember(abortedBeforeStart(this.#options.policy, this.#native.stats().tokensRetained));
    }
    const stack = new Error().stack;
    const onAbort = () => this.#native.abort();
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    this.#busy = true;
    const answer = this.#answerStream(opts);
    try {
      const native = await (results === undefined
        ? this.#native.send(text, nativeOpts, answer.onPiece, opts.pin)
        : this.#native.sendToolResults(results, nativeOpts, answer.onPiece, opts.pin));
      const { callbackError, ...raw } = native;
      const { evictionLog, ...stats } = raw.stats;
      const result = { ...raw, stats } as TurnResult;
      answer.finish(result.response);
      if (this.#telemetry && !this.#disposed) this.#emit(result, evictionLog);
      // A turn of tool results is no user message: the transcript (plain messages) has the reply after
      // it as more of the exchange's answer.
      if (result.stats.promptTokens > 0) {
        if (results === undefined) this.#transcript.add(text, result.response);
        else this.#transcript.addToLastReply(result.response);
      }
      this.#remember(result);
      // The turn is kept (memory, stats and transcript agree); the caller's error is reported.
      if (Object.hasOwn(native, 'callbackError')) throw new CallbackError(result, callbackError);
      return result;
    } catch (err) {
      const typed = fromNativeError(err, stack);
      this.#telemetry?.error(typed);
      throw typed;
    } finally {
      this.#busy = false;
      opts.signal?.removeEventListener('abort', onAbort);
    }
  }

  /**
   * The pieces a turn streams. A chat with tools streams the answer's text beside its calls: each
   * piece is read in the tools' format with what came before (llama.cpp's partial parse, as
   * llama-server streams), so a call's markup never reaches onToken; what the last read held back
   * (the start of what might have been a call) follows when the turn ends.
   */
  #answerStream(opts: { onToken?: (piece: string) => void; onReasoning?: (piece: string) => void }) {
    const { onToken, onReasoning } = opts;
    if (!onToken && !onReasoning) return { onPiece: undefined, finish: (_: string) => {} };
    if (this.#options.tools === undefined || !onToken) {
      return { onPiece: (piece: string, reasoning: boolean) => (reasoning ? onReasoning : onToken)?.(piece), finish: (_: string) => {} };
    }
    let reasoning = '';
    let answer = '';
    let shown = '';
    const show = (content: string) => {
      if (content.length <= shown.length || !content.startsWith(shown)) return;
      const piece = content.slice(shown.length);
      shown = content;
      onToken(piece);
    };
    return {
      onPiece: (piece: string, isReasoning: boolean) => {
        if (isReasoning) {
          reasoning += piece;
          onReasoning?.(piece);
          return;
        }
        answer += piece;
        // Blank space before what may be a call waits: the answer's content ends without it.
        show(this.#native.parseToolReply(reasoning, answer, true).content.trimEnd());
      },
      finish: (response: string) => show(response),
    };
  }

  /**
   * Streams the reply piece by piece. Breaking out of the loop aborts the turn (the chat stays
   * usable); the generator's return value is the TurnResult.
   */
  stream(message: string, options: Omit<SendOptions, 'onToken'> = {}): AsyncGenerator<string, TurnResult, undefined> {
    return streamFromSend((onToken, signal) => this.send(message, { ...options, onToken, signal }), options.signal);
  }

  /**
   * Saves the chat (KV cache, token ledger, policy state, options, counters) to `path`, atomically:
   * a crash mid-save leaves the previous file intact. Not while a turn runs (ChatBusyError).
   */
  async saveCheckpoint(path: string): Promise<void> {
    this.#check();
    checkPath('path', path);
    await this.#exclusive('save the checkpoint', () => this.#native.saveCheckpoint(path, this.#transcript.serialize()));
  }

  /**
   * The chat's checkpoint as bytes, for any store (`model.loadChat(bytes)` restores it), with the
   * integrity of a file's (format version, model fingerprint, checksum). `kind: 'full'` (default)
   * includes the KV state: a restore decodes nothing. `kind: 'ledger'` keeps the retained tokens
   * with their turns, roles, pins and scores, the counters, options and transcript (a few bytes per
   * retained token): a restore prefills the retained tokens once (at most maxTokens), at positions
   * 0..n-1, as the first steps of its next turn (in chunks beside other chats' steps, not holding
   * them up); for a hybrid model the recurrent state is then rebuilt from them alone. Not while a
   * turn runs (ChatBusyError).
   */
  async checkpoint(options: { kind?: 'full' | 'ledger' } = {}): Promise<Uint8Array> {
    this.#check();
    const { kind = 'full', ...rest } = checkObject('options', options) as { kind?: unknown };
    for (const key of Object.keys(rest)) throw new InvalidOptionError(`Unknown option options.${key} (known: kind)`);
    if (kind !== 'full' && kind !== 'ledger') fail("one of 'full', 'ledger'", 'kind', kind);
    return this.#exclusive('take the checkpoint', () => this.#native.checkpoint(kind === 'ledger', this.#transcript.serialize()));
  }

  /** @internal The transcript a restored chat's checkpoint carried. */
  _restoreTranscript(): void {
    const messages = TranscriptLog.parse(this.#native.restoredTranscript());
    if (messages === null) throw new CheckpointError('CHECKPOINT_CORRUPT', "the checkpoint's transcript is not a list of user and assistant messages");
    this.#transcript.restore(messages);
  }

  /**
   * The whole conversation as plain text messages (every turn, including what the cache has evicted),
   * portable to another model with `model.importTranscript()`.
   */
  exportTranscript(): Transcript {
    this.#check();
    return this.#transcript.export(this.#options.systemPrompt);
  }

  /** @internal Prefills a finished exchange without generating (transcript import); `signal` aborts it (AbortedError). */
  async _ingest(user: string, assistant: string, signal?: AbortSignal): Promise<void> {
    this.#check();
    if (signal?.aborted) throw new AbortedError('the transcript import was aborted');
    const onAbort = () => this.#native.abort();
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      await this.#exclusive('import', () => this.#native.ingestExchange(user, assistant));
      this.#transcript.add(user, assistant);
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  /**
   * @internal Prefills a finished exchange of a conversation with tools (the server's import of a
   * request's history): its input (`user`, or `results` when there are any) and its reply (text and
   * calls), as the model's template renders them.
   */
  async _ingestTools(user: string, results: readonly ToolResult[], reply: string, calls: readonly ToolCall[], signal?: AbortSignal): Promise<void> {
    this.#check();
    if (signal?.aborted) throw new AbortedError('the transcript import was aborted');
    const onAbort = () => this.#native.abort();
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      const triples = results.map((r): [string, string, string] => [r.toolCallId ?? '', r.name ?? '', r.content]);
      await this.#exclusive('import', () => this.#native.ingestToolExchange(user, triples, reply, calls.map((c): [string, string, string] => [c.id, c.name, c.arguments])));
      // The transcript holds plain messages: a turn of results is none, its reply more of the answer.
      if (results.length === 0) this.#transcript.add(user, reply);
      else this.#transcript.addToLastReply(reply);
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  /** Cumulative figures since creation or the last reset. */
  stats(): ChatStats {
    this.#check();
    const s = this.#native.stats();
    return { ...s, compressionRatio: s.tokensRetained > 0 ? s.tokensSeen / s.tokensRetained : 0 };
  }

  /** The tokens this chat still remembers, in order, with position, turn, role, pinned flag and text. */
  memory(): MemoryEntry[] {
    this.#check();
    return this.#native.memory();
  }

  /**
   * Pins `turn` (a number from `memory()` or `stats().turns`): its user message, and its reply with
   * `{ reply: true }` (its answer: a reply's reasoning is never pinned), stay through every eviction. Pins count against maxTokens; a pin that would
   * leave no room for the next turn throws PinLimitError and changes nothing. Returns the tokens
   * newly pinned. Not while a turn runs (ChatBusyError); a turn no longer in memory is InvalidOptionError.
   */
  pin(turn: number, options: { reply?: boolean } = {}): number {
    this.#idle('pin');
    const { reply, ...rest } = checkObject('options', options);
    if (Object.keys(rest).length > 0) throw new InvalidOptionError(`unknown option '${Object.keys(rest)[0]}' (pin takes: reply)`);
    if (reply !== undefined && typeof reply !== 'boolean') throw new InvalidOptionError(`reply must be a boolean, got ${typeof reply}`);
    return this.#call(() => this.#native.pin(checkInt('turn', turn, 0, 2 ** 32 - 1), reply === true));
  }

  /** Releases the pins of `turn` (never the system prompt's or the attention sinks'); returns the tokens released. */
  unpin(turn: number): number {
    this.#idle('unpin');
    return this.#call(() => this.#native.unpin(checkInt('turn', turn, 0, 2 ** 32 - 1)));
  }

  /** The pinned turns (the system prompt and attention sinks are always kept and not listed), oldest first. */
  pins(): { turn: number; tokens: number }[] {
    this.#check();
    return this.#native.pins();
  }

  /**
   * Evicts every token of `turn` from the KV cache now, in place (positions compacted as in any
   * eviction), pinned or not; resolves with the number of tokens evicted (0 when the turn is no
   * longer in memory). The transcript keeps the turn. Not while a turn runs (ChatBusyError). A chat
   * parked while every slot is in a turn waits for a slot, as a turn does.
   */
  async forget(turn: number): Promise<number> {
    this.#check();
    const t = checkInt('turn', turn, 0, 2 ** 32 - 1);
    return this.#exclusive('forget', async () => {
      // A parked chat needs a slot, and every one may be in a turn: it waits, as a turn would, for
      // one to end (polled: the native side must not block a worker thread for another chat's turn).
      for (let waitMs = 1; ; waitMs = Math.min(waitMs * 2, 20)) {
        const evicted = await this.#native.forget(t);
        if (evicted >= 0) return evicted;
        await new Promise((r) => setTimeout(r, waitMs));
      }
    });
  }

  /**
   * Runs one native operation that needs the chat to itself (checkpoint, import, forget): busy while
   * it runs, tracked for asyncDispose, native errors typed with the caller's stack.
   */
  async #exclusive<T>(what: string, op: () => Promise<T>): Promise<T> {
    this.#idle(what);
    const stack = new Error().stack;
    this.#busy = true;
    try {
      return await this.#track(op());
    } catch (err) {
      throw fromNativeError(err, stack);
    } finally {
      this.#busy = false;
    }
  }

  #idle(what: string): void {
    this.#check();
    if (this.#busy) throw new ChatBusyError(`a turn is running on this chat; ${what} after it`);
  }

  #call<T>(fn: () => T): T {
    try {
      return fn();
    } catch (err) {
      throw fromNativeError(err, new Error().stack);
    }
  }

  /** Forgets the conversation (the system prompt is prefilled again on the next turn). */
  reset(): void {
    this.#idle('reset');
    this.#native.reset();
    this.#lastTurn = undefined;
    this.#transcript.clear();
  }

  /** Frees the context and its KV cache. A running turn is aborted and finishes first. Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#native.dispose();
    this.#onDispose();
    this.#telemetry?.close();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /**
   * Disposes and waits for what was running to settle (a turn resolves with stopReason 'abort'):
   * `await using chat = model.createChat()` leaves nothing running behind the block.
   */
  async [Symbol.asyncDispose](): Promise<void> {
    const running = this.#running;
    this.dispose();
    await running?.catch(() => {});
  }

  #track<T>(p: Promise<T>): Promise<T> {
    this.#running = p;
    p.catch(() => {}); // the caller handles it; this copy only waits
    return p;
  }

  /** @internal */
  _internals(): ChatInternals {
    this.#check();
    const native = this.#native;
    const wrap = <T>(fn: () => T): T => {
      try {
        return fn();
      } catch (err) {
        throw fromNativeError(err);
      }
    };
    return {
      cacheState: () => wrap(() => native.cacheState()),
      countTurnTokens: (m) => wrap(() => native.countTurnTokens(m)),
      engineStats: (own) => wrap(() => getProbes().engineStats(native, own)),
      probeLogits: (t) => wrap(() => getProbes().probeLogits(native, t)),
      recurrentState: () => wrap(() => getProbes().recurrentState(native)),
      summaryPrompt: () => wrap(() => Array.from(getProbes().summaryPrompt(native))),
      toolFramesFast: () => wrap(() => getProbes().toolFramesFast(native)),
      holdPrepare: (ms) => wrap(() => getProbes().holdPrepare(native, ms)),
      shiftPositions: (d) => wrap(() => getProbes().shiftPositions(native, d)),
      windowRoundTrip: () => wrap(() => getProbes().windowRoundTrip(native)),
      evaluateTokens: (t, c) => wrap(() => getProbes().evaluateTokens(native, Int32Array.from(t), c)),
      replayHistory: () => wrap(() => getProbes().replayHistory(native)),
      plainDecode: (n) => wrap(() => getProbes().plainDecode(native, n)),
    };
  }

  #emit(result: TurnResult, log: NativeEvictionRecord[]): void {
    const chat = this.stats();
    const base = { chatId: this.id, policy: this.#options.policy, turn: chat.turns };
    const evictions: EvictionEvent[] = log.map((e) => ({ ...base, ...e }));
    this.#telemetry!.turn({ ...base, stopReason: result.stopReason, stats: result.stats, chat }, evictions);
  }

  #remember(result: TurnResult): TurnResult {
    this.#lastTurn = result;
    return result;
  }

  #check(): void {
    if (this.#disposed) throw new DisposedError('chat');
  }
}

function abortedBeforeStart(policy: ResolvedChatOptions['policy'], retained: number): TurnResult {
  return {
    response: '',
    reasoning: '',
    toolCalls: [],
    stopReason: 'abort',
    stats: {
      turn: 0, promptTokens: 0, generatedTokens: 0, prefillMs: 0, decodeMs: 0, tokensPerSecond: 0, firstTokenMs: 0, prepareMs: 0, policyMs: 0, evictMs: 0,
      evictedTokens: 0, evictions: 0, compactions: 0, compactMs: 0, retainedTokens: retained, latencyMs: 0, fallback: false, summaryMs: 0,
      summaryTokens: 0, grammarPasses: 0, grammarMs: 0, importanceSignal: null, policy,
    },
  };
}

/** `send({ toolResults })`, checked: [callId, name, content] each, as the native side takes them. */
function toolResultsOf(message: unknown): [string, string, string][] {
  return toolResultFields(message).map(({ at, toolCallId = '', name = '', content }) => {
    if (typeof toolCallId !== 'string' || toolCallId.length > 256) fail('a string of at most 256 characters', `${at}.toolCallId`, toolCallId);
    if (typeof name !== 'string' || name.length > 64) fail('a string of at most 64 characters', `${at}.name`, name);
    if (name === '' && toolCallId === '') throw new InvalidOptionError(`${at} needs toolCallId or name: which call it answers`);
    return [toolCallId, name, checkMessage(content, `${at}.content`)];
  });
}
