/**
 * Where a request's chat comes from when the session has none in memory: a new chat holding the
 * request's earlier messages, or a stored session restored (its full checkpoint, its ledger, or
 * another model's conversation re-prefilled).
 */
import type { Chat } from '../local/chat.js';
import { readCheckpointMessages, readCheckpointSettings, type Model } from '../local/model.js';
import type { ChatOptions } from '../local/options.js';
import type { ToolDefinition } from '../shared/types.js';
import { AbortedError, CheckpointError, InvalidOptionError } from '../shared/errors.js';
import type { PrometheusTelemetry } from '../shared/prometheus.js';
import type { Telemetry } from '../shared/telemetry.js';
import type { PolicyName, Transcript } from '../shared/types.js';
import { toolExchangesOf } from '../shared/chat-surface.js';
import { SESSION_EVICTIONS_KEPT, type SessionEviction } from './sessions.js';
import type { StoredSession } from './store/backend.js';
import { badRequest, type Message, type ParsedCompletion } from './wire.js';

/** Where a restored session came from: its full checkpoint, its ledger (re-prefilled), or another model's transcript. */
export type RestoredFrom = 'full' | 'ledger' | 'transcript';

export class ChatSource {
  constructor(
    private readonly model: Model,
    private readonly chatOptions: Omit<ChatOptions, 'telemetry'>,
    private readonly telemetry: PrometheusTelemetry,
    private readonly maxHistoryTokens: number,
    private readonly log: { warn(obj: object, msg: string): void },
  ) {}

  /** A session's chat telemetry: the server's Prometheus metrics, and its evictions kept for its memory view. */
  telemetryFor(evictions: SessionEviction[] | undefined): Telemetry {
    if (!evictions) return this.telemetry;
    const prom = this.telemetry;
    return {
      onTurn: (e) => prom.onTurn?.(e),
      onEviction: (e) => {
        evictions.push({ ...e, at: Date.now() });
        if (evictions.length > SESSION_EVICTIONS_KEPT) evictions.splice(0, evictions.length - SESSION_EVICTIONS_KEPT);
        return prom.onEviction?.(e);
      },
      onError: (err, ctx) => prom.onError?.(err, ctx),
      onClose: (id) => prom.onClose?.(id),
    };
  }

  #transcript(systemPrompt: string, messages: Transcript['messages']): Transcript {
    return { format: 'finite-memory-llm/transcript', version: 1, systemPrompt, messages };
  }

  #framing: number | undefined;

  /**
   * What importing `messages` prefills, at least: their text and the template's tokens around each
   * exchange (exchangesOf: what importTranscript prefills), which an empty message has too: counting
   * text only let 30,000 empty messages through. A tool's results and calls count as text too.
   */
  #tokens(messages: readonly Message[]): number {
    this.#framing ??= this.#exchangeFraming();
    let n = 0;
    for (const { user, results, reply, calls } of toolExchangesOf(messages)) {
      const texts = [user, reply, ...results.map((r) => r.content), ...calls.map((c) => c.name + c.arguments)];
      n += texts.reduce((sum, t) => sum + this.model.tokenize(t).length, 0) + this.#framing * (1 + results.length + calls.length);
      if (n > this.maxHistoryTokens) break;
    }
    return n;
  }

  /** Tokens of an empty exchange as the template frames it (1 when it cannot be rendered: still never free). */
  #exchangeFraming(): number {
    try {
      const text = this.model.applyTemplate([{ role: 'user', content: '' }, { role: 'assistant', content: '' }]);
      return Math.max(1, this.model.tokenize(text, { special: true }).length);
    } catch {
      return 1;
    }
  }

  /**
   * A new chat holding the conversation before the last message (prefilled, not regenerated): at most
   * maxHistoryTokens of it (400 beyond), and abortable (the client left: AbortedError).
   */
  async build(parsed: ParsedCompletion, signal: AbortSignal, evictions?: SessionEviction[], own?: { policy?: PolicyName; maxTokens?: number }): Promise<Chat> {
    const systemPrompt = parsed.system ?? this.chatOptions.systemPrompt ?? '';
    const history = parsed.history;
    const opts: ChatOptions = {
      ...this.chatOptions, ...(own?.policy ? { policy: own.policy } : {}), ...(own?.maxTokens ? { maxTokens: own.maxTokens } : {}), systemPrompt,
      ...(parsed.tools ? { tools: parsed.tools as ToolDefinition[] } : {}), telemetry: this.telemetryFor(evictions),
    };
    if (opts.tools === undefined && history.some((m) => m.role === 'tool' || m.toolCalls !== undefined)) {
      throw badRequest("Tool calls and tool messages need the 'tools' they were made with", 'tools');
    }
    if (history.length === 0) return this.model.createChat(opts);
    if (this.#tokens(history) > this.maxHistoryTokens) {
      throw badRequest(`The earlier messages hold more than ${this.maxHistoryTokens} tokens, the most a new session or one-off request may bring (send only the new message with a session id, or fewer messages)`, 'messages', 'history_too_large');
    }
    if (opts.tools === undefined) return this.model.importTranscript(this.#transcript(systemPrompt, history as Transcript['messages']), { ...opts, signal });
    // With tools, each exchange is prefilled as the template renders it, calls and results included.
    const chat = this.model.createChat(opts);
    try {
      for (const e of toolExchangesOf(history)) await chat._ingestTools(e.user, e.results, e.reply, e.calls, signal);
      return chat;
    } catch (err) {
      chat.dispose();
      throw err;
    }
  }

  /**
   * A stored session's chat: its full checkpoint when it is of the latest turn, else its ledger (the
   * retained tokens prefilled once); made with another model, its conversation re-prefilled when it
   * fits maxHistoryTokens. Undefined: it cannot be restored (a newer format, corrupt, too long).
   */
  async restore(stored: StoredSession, signal: AbortSignal, evictions?: SessionEviction[]): Promise<{ chat: Chat; from: RestoredFrom } | undefined> {
    const telemetry = this.telemetryFor(evictions);
    const kinds: [RestoredFrom, Uint8Array][] = stored.full ? [['full', stored.full], ['ledger', stored.ledger]] : [['ledger', stored.ledger]];
    let otherModel = false;
    for (const [from, bytes] of kinds) {
      try {
        return { chat: await this.model.loadChat(bytes, { telemetry }), from };
      } catch (err) {
        if (!(err instanceof CheckpointError)) throw err;
        otherModel ||= err.code === 'CHECKPOINT_MODEL_MISMATCH';
        this.log.warn({ err, session: stored.id, kind: from }, 'a stored checkpoint could not be restored');
      }
    }
    if (!otherModel) return undefined;
    try {
      const messages = readCheckpointMessages(stored.ledger);
      if (this.#tokens(messages) > this.maxHistoryTokens) return undefined;
      // The session keeps what it was created with (its system prompt is fixed then, and it may have
      // chosen its own policy and budget); a budget the new model cannot hold falls back to the server's.
      const { systemPrompt, policy, maxTokens, tools } = readCheckpointSettings(stored.ledger);
      const transcript = this.#transcript(systemPrompt, messages);
      const opts = { ...this.chatOptions, systemPrompt, ...(tools !== undefined ? { tools } : {}), telemetry, signal };
      const chat = await this.model.importTranscript(transcript, { ...opts, policy, maxTokens }).catch((err: unknown) => {
        if (!(err instanceof InvalidOptionError)) throw err;
        return this.model.importTranscript(transcript, opts);
      });
      return { chat, from: 'transcript' };
    } catch (err) {
      if (err instanceof AbortedError) throw err;
      this.log.warn({ err, session: stored.id }, 'a stored conversation from another model could not be rebuilt');
      return undefined;
    }
  }
}
