/**
 * The chat surface local and remote chats share. Code written against `ChatSurface` runs unchanged
 * on `loadModel(...).createChat()` and on `connectRemote(...).createChat()`; `LocalOnly` and
 * `RemoteOnly` name exactly what one of them has and the other has not.
 *
 * What is the same is written once here: streaming on top of send, and the transcript.
 */
import type { CommonChatStats, CommonSendOptions, CommonTurnResult, ToolResult, Transcript } from './types.js';

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
 * The exchanges (a user message and the reply after it) a list of messages is prefilled as. Messages
 * of one role in a row are joined by a blank line, as a template of alternating roles needs them: an
 * empty message put between them was a turn nobody said, in the memory. A reply with no user message
 * before it (a greeting) gets an empty one: a frame holds a user message and the reply it prompts.
 */
export function exchangesOf(messages: Transcript['messages']): { user: string; assistant: string }[] {
  const out: { user: string; assistant: string; replied: boolean }[] = [];
  for (const m of messages) {
    const last = out[out.length - 1];
    if (m.role === 'user') {
      if (last && !last.replied) last.user += `\n\n${m.content}`;
      else out.push({ user: m.content, assistant: '', replied: false });
    } else if (last?.replied) {
      last.assistant += `\n\n${m.content}`;
    } else if (last) {
      last.assistant = m.content;
      last.replied = true;
    } else {
      out.push({ user: '', assistant: m.content, replied: true });
    }
  }
  return out.map(({ user, assistant }) => ({ user, assistant }));
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
