/**
 * The chat surface local and remote chats share. Code written against `ChatSurface` runs unchanged
 * on `loadModel(...).createChat()` and on `connectRemote(...).createChat()`; `LocalOnly` and
 * `RemoteOnly` name exactly what one of them has and the other has not.
 *
 * What is the same is written once here: streaming on top of send, and the transcript.
 */
import type { CommonChatStats, CommonSendOptions, CommonTurnResult, ConversationMessage, ToolCall, ToolResult, Transcript } from './types.js';

export type { CommonChatStats, CommonSendOptions, CommonTurnResult };

export interface ChatSurface {
  readonly id: string;
  readonly busy: boolean;
  readonly disposed: boolean;
  /** A user message, or (a chat with tools) the results of the last reply's calls. */
  send(message: string | { toolResults: ToolResult[] }, options?: CommonSendOptions): Promise<CommonTurnResult>;
  /** Streams the reply piece by piece; breaking out of the loop aborts the turn. Returns the result. */
  stream(message: string, options?: Omit<CommonSendOptions, 'onToken'>): AsyncGenerator<string, CommonTurnResult, undefined>;
  stats(): CommonChatStats;
  /** The whole conversation, including what left the memory. */
  exportTranscript(): Transcript;
  /** Forgets the conversation (keeps the options). */
  reset(): void;
  dispose(): void;
  [Symbol.dispose](): void;
  /** Disposes and waits for a running turn to settle. */
  [Symbol.asyncDispose](): Promise<void>;
}

/**
 * A reply as an async generator of pieces, on top of a send that takes onToken and a signal. Leaving
 * the loop early aborts the turn and waits for it to settle, so the chat is idle afterwards.
 */
export async function* streamFromSend<R>(
  send: (onToken: (piece: string) => void, signal: AbortSignal) => Promise<R>,
  callerSignal: AbortSignal | undefined,
): AsyncGenerator<string, R, undefined> {
  const queue: string[] = [];
  let wake: (() => void) | undefined;
  let finished = false;
  const ac = new AbortController();
  const signal = callerSignal ? AbortSignal.any([callerSignal, ac.signal]) : ac.signal;
  const turn = send((piece) => {
    queue.push(piece);
    wake?.();
  }, signal).finally(() => {
    finished = true;
    wake?.();
  });
  turn.catch(() => {}); // rethrown by the await below
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

/** The plain conversation a chat keeps for exportTranscript(): what was said, not what memory still holds. */
/**
 * The exchanges (an input and the reply after it) a list of messages is prefilled as: the input is
 * user messages or a run of tool results. Messages of one role in a row are joined by a blank line,
 * as a template of alternating roles needs them: an empty message put between them was a turn nobody
 * said, in the memory. A reply with no input before it (a greeting) gets an empty user message: a
 * frame holds a user message and the reply it prompts.
 */
export function toolExchangesOf(messages: readonly ConversationMessage[]): { user: string; results: ToolResult[]; reply: string; calls: ToolCall[] }[] {
  const out: { user: string; results: ToolResult[]; reply: string; calls: ToolCall[]; replied: boolean }[] = [];
  for (const m of messages) {
    const last = out.at(-1);
    if (m.role === 'assistant') {
      if (last && !last.replied) Object.assign(last, { reply: m.content, calls: [...(m.toolCalls ?? [])], replied: true });
      else if (last) {
        last.reply += `\n\n${m.content}`;
        last.calls.push(...(m.toolCalls ?? []));
      } else out.push({ user: '', results: [], reply: m.content, calls: [...(m.toolCalls ?? [])], replied: true });
    } else if (m.role === 'tool') {
      const result = { toolCallId: m.toolCallId ?? '', name: m.name ?? '', content: m.content };
      if (last && !last.replied && last.results.length > 0) last.results.push(result);
      else out.push({ user: '', results: [result], reply: '', calls: [], replied: false });
    } else if (last && !last.replied && last.results.length === 0) {
      last.user += `\n\n${m.content}`;
    } else {
      out.push({ user: m.content, results: [], reply: '', calls: [], replied: false });
    }
  }
  return out.map(({ user, results, reply, calls }) => ({ user, results, reply, calls }));
}

/** Calls as OpenAI's chat completions write them in a message's `tool_calls` (a server's reply, a remote request's history). */
export const openAiToolCalls = (calls: readonly ToolCall[]) =>
  calls.map((c) => ({ id: c.id, type: 'function' as const, function: { name: c.name, arguments: c.arguments } }));

/** A plain conversation's exchanges (toolExchangesOf without tools): what importTranscript prefills. */
export function exchangesOf(messages: Transcript['messages']): { user: string; assistant: string }[] {
  return toolExchangesOf(messages).map(({ user, reply }) => ({ user, assistant: reply }));
}

export class TranscriptLog {
  #messages: Transcript['messages'] = [];

  /** The messages as a checkpoint keeps them (JSON). */
  serialize(): string {
    return JSON.stringify(this.#messages);
  }

  /** The messages a checkpoint kept ('' for a checkpoint written before transcripts were kept); null when they are not a message list. */
  static parse(json: string): Transcript['messages'] | null {
    if (json === '') return [];
    let value: unknown;
    try {
      value = JSON.parse(json);
    } catch {
      return null;
    }
    const ok = Array.isArray(value) && value.every((m, i) =>
      typeof m === 'object' && m !== null && m.role === (i % 2 ? 'assistant' : 'user') && typeof m.content === 'string' && Object.keys(m).length === 2);
    return ok && (value as unknown[]).length % 2 === 0 ? (value as Transcript['messages']) : null;
  }

  restore(messages: Transcript['messages']): void {
    this.#messages = messages.map((m) => ({ ...m }));
  }

  add(user: string, assistant: string): void {
    this.#messages.push({ role: 'user', content: user }, { role: 'assistant', content: assistant });
  }

  /**
   * A reply that followed no user message (a turn of tool results): its text joins the last reply, as
   * the exchange's plain-text answer (the transcript holds user and assistant messages only).
   */
  addToLastReply(text: string): void {
    const last = this.#messages.at(-1);
    if (last === undefined || text === '') return;
    last.content = last.content === '' ? text : `${last.content}\n\n${text}`;
  }

  clear(): void {
    this.#messages = [];
  }

  export(systemPrompt: string): Transcript {
    return { format: 'finite-memory-llm/transcript', version: 1, systemPrompt, messages: this.#messages.map((m) => ({ ...m })) };
  }
}
