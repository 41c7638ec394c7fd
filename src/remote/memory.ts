/**
 * A remote chat's memory, at the message level: the messages the next request carries, the running
 * summary, and the figures of what left. Messages leave oldest first, in whole exchanges (the history
 * always starts with a user message, so a reply's calls and their results leave together); with
 * rolling_summary/hybrid what leaves is summarized first.
 */
import { openAiToolCalls } from '../shared/chat-surface.js';
import type { ToolCall } from '../shared/types.js';
import type { RemoteMemoryEntry } from './types.js';
import type { ResolvedRemoteChatOptions } from './options.js';

/** A message of the history: text, and (tools) an assistant's calls or a tool's result. */
export type Msg = { role: 'user' | 'assistant' | 'tool'; content: string; tokens: number; toolCalls?: ToolCall[]; toolCallId?: string };

/** What a turn's evictions did (its stats). */
export interface TurnEvictions { evictedTokens: number; evictedMessages: number; summaries: number; summaryMs: number; summaryTokens: number }

export const SUMMARY_PREFIX = 'Summary of the earlier conversation: ';

const noFigures = () => ({ turns: 0, tokensSeen: 0, tokensEvicted: 0, evictions: 0, summaries: 0 });

export class MessageMemory {
  messages: Msg[] = [];
  summary = '';
  summaryTokens = 0;
  totals = noFigures();

  constructor(
    private readonly options: ResolvedRemoteChatOptions,
    readonly systemTokens: number,
    /** Tokens the summary message may take (its prefix and summaryTokens of summary; 0 for sliding). */
    readonly summaryRoom: number,
    private readonly count: (text: string) => number,
  ) {}

  /** Tokens the next request carries before its new message. */
  retained(): number {
    return this.systemTokens + (this.summary ? this.summaryTokens : 0) + this.messages.reduce((n, m) => n + m.tokens, 0);
  }

  /** The request's messages: system prompt, summary, history, then `extra` (the new messages). */
  requestMessages(extra: readonly Msg[] = []): Record<string, unknown>[] {
    const out: Record<string, unknown>[] = [];
    if (this.options.systemPrompt) out.push({ role: 'system', content: this.options.systemPrompt });
    if (this.summary) out.push({ role: 'system', content: SUMMARY_PREFIX + this.summary });
    for (const m of [...this.messages, ...extra]) out.push(wireMessage(m));
    return out;
  }

  /** A finished exchange joins the history: its input (a user message, or tool results) and the reply. */
  add(input: readonly Msg[], reply: Msg): void {
    this.messages.push(...input, reply);
    this.totals.turns++;
    this.totals.tokensSeen += input.reduce((n, m) => n + m.tokens, 0) + reply.tokens + (this.totals.turns === 1 ? this.systemTokens : 0);
  }

  /** The memory as it is now; calling the result puts it back (a turn that fails leaves nothing behind). */
  snapshot(): () => void {
    const saved = { messages: [...this.messages], summary: this.summary, summaryTokens: this.summaryTokens, totals: { ...this.totals } };
    return () => {
      this.messages = saved.messages;
      this.summary = saved.summary;
      this.summaryTokens = saved.summaryTokens;
      this.totals = saved.totals;
    };
  }

  /**
   * Messages leave (oldest first) until the retained tokens are <= limit; with rolling_summary/hybrid
   * they are summarized first by `summarize` (the previous summary plus the leaving messages).
   */
  async fit(limit: number, turn: TurnEvictions, signal: AbortSignal, summarize: (leaving: Msg[], signal: AbortSignal) => Promise<string>): Promise<void> {
    if (this.options.policy === 'sliding') return this.fitSliding(limit, turn);
    while (this.retained() > limit && this.messages.length > 0) {
      const summaryRoom = this.summaryRoom;
      const target = this.options.policy === 'hybrid' ? Math.min(limit, this.systemTokens + summaryRoom + this.options.windowSize) : limit;
      let keep = this.retained() - (this.summary ? this.summaryTokens : 0) + summaryRoom;
      let n = 0;
      while (n < this.messages.length && keep > target) keep -= this.messages[n++]!.tokens;
      n = Math.max(n, 1);
      while (n < this.messages.length && this.messages[n]!.role !== 'user') n++; // history starts with a user message
      const leaving = this.messages.slice(0, n);
      const t0 = performance.now();
      const summary = await summarize(leaving, signal);
      this.messages = this.messages.slice(n);
      const tokens = leaving.reduce((s, m) => s + m.tokens, 0);
      turn.evictedMessages += n;
      turn.evictedTokens += tokens;
      turn.summaries++;
      turn.summaryMs += performance.now() - t0;
      this.totals.tokensEvicted += tokens;
      this.totals.evictions++;
      this.totals.summaries++;
      if (summary) {
        this.summary = summary;
        this.summaryTokens = this.count(SUMMARY_PREFIX + summary);
        turn.summaryTokens = this.summaryTokens;
      }
    }
  }

  /** Whole exchanges leave, oldest first, until the retained tokens are <= limit; no summary. */
  fitSliding(limit: number, turn: Pick<TurnEvictions, 'evictedTokens' | 'evictedMessages'>): void {
    let n = 0;
    let tokens = 0;
    const excess = this.retained() - limit;
    while (n < this.messages.length && tokens < excess) tokens += this.messages[n++]!.tokens;
    if (n === 0) return;
    while (n < this.messages.length && this.messages[n]!.role !== 'user') tokens += this.messages[n++]!.tokens;
    this.messages = this.messages.slice(n);
    turn.evictedMessages += n;
    turn.evictedTokens += tokens;
    this.totals.tokensEvicted += tokens;
    this.totals.evictions++;
  }

  /** The messages the next request carries, in order, with their token counts. */
  entries(): RemoteMemoryEntry[] {
    const out: RemoteMemoryEntry[] = [];
    if (this.options.systemPrompt) out.push({ role: 'system', content: this.options.systemPrompt, tokens: this.systemTokens });
    if (this.summary) out.push({ role: 'summary', content: this.summary, tokens: this.summaryTokens });
    for (const m of this.messages) out.push({ role: m.role, content: m.content, tokens: m.tokens });
    return out;
  }

  clear(): void {
    this.messages = [];
    this.summary = '';
    this.summaryTokens = 0;
    this.totals = noFigures();
  }
}

/** A message as the chat completions API takes it: an assistant's calls, a tool result's call id. */
export function wireMessage(m: Msg): Record<string, unknown> {
  if (m.role === 'tool') return { role: 'tool', tool_call_id: m.toolCallId ?? '', content: m.content };
  if (m.toolCalls?.length) {
    return { role: 'assistant', content: m.content === '' ? null : m.content, tool_calls: openAiToolCalls(m.toolCalls) };
  }
  return { role: m.role, content: m.content };
}

/** A message's text as a summary reads it (a reply's calls written out). */
export function messageText(m: Msg): string {
  const calls = (m.toolCalls ?? []).map((c) => ` [called ${c.name}(${c.arguments})]`).join('');
  return `${m.role}: ${m.content}${calls}`;
}
