import { getBinding, type NativeChat, type NativeModel } from './binding.js';
import { Chat } from './chat.js';
import { CallbackError, CheckpointError, DisposedError, fromNativeError, InvalidOptionError } from '../shared/errors.js';
import { exchangesOf, TranscriptLog } from '../shared/chat-surface.js';
import { checkTelemetry, type Telemetry } from '../shared/telemetry.js';
import { checkObject, checkPath, checkString } from '../shared/checks.js';
import { splitChatOptions, splitSendOptions, type ChatOptions, type LoadModelOptions, type ResolvedChatOptions, type SendOptions, type ToolDefinition } from './options.js';
import { jsonText } from './grammar.js';
import type { ModelInfo, PolicyName, Transcript } from '../shared/types.js';

/** The send options that choose a turn's tool set-up (its grammar and parser). */
const TURN_SET_UP_OPTIONS = ['toolChoice', 'parallelToolCalls', 'thinking'] as const;

/** model.prepareTools's options: the chat's system prompt, and the turn to set up beside the first. */
export type PrepareToolsOptions = { systemPrompt?: string } & Pick<SendOptions, (typeof TURN_SET_UP_OPTIONS)[number]>;

const resolveTelemetry = (telemetry: unknown): Telemetry | undefined => checkTelemetry<Telemetry>(telemetry);

const chatRegistry = new FinalizationRegistry<{ chats: Set<WeakRef<Chat>>; ref: WeakRef<Chat> }>(({ chats, ref }) => chats.delete(ref));

/** importTranscript(): the new chat's options, and a signal that aborts the import (AbortedError). */
export interface ImportTranscriptOptions extends ChatOptions {
  signal?: AbortSignal;
}

/** A loaded GGUF model. Chats created from it share its weights; each has its own bounded KV cache. */
export class Model {
  readonly #native: NativeModel;
  // Weak, so a chat dropped without dispose() can still be garbage-collected (its native finalizer
  // frees the context); model.dispose() disposes the ones still alive.
  readonly #chats = new Set<WeakRef<Chat>>();
  readonly #info: ModelInfo;
  #disposed = false;

  /** @internal */
  constructor(native: NativeModel, path: string) {
    this.#native = native;
    this.#info = { path, ...native.info() };
  }

  get info(): ModelInfo {
    return this.#info;
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  tokenize(text: string, options: { addBos?: boolean; special?: boolean } = {}): number[] {
    this.#check();
    checkString('text', text);
    try {
      return Array.from(this.#native.tokenize(text, options.addBos ?? false, options.special ?? false));
    } catch (err) {
      throw fromNativeError(err);
    }
  }

  detokenize(tokens: readonly number[], options: { special?: boolean } = {}): string {
    this.#check();
    if (!Array.isArray(tokens) || tokens.some((t) => !Number.isInteger(t))) {
      throw fromNativeError({ code: 'INVALID_OPTION', message: 'Expected an array of integer token ids for tokens' });
    }
    try {
      return this.#native.detokenize(Int32Array.from(tokens), options.special ?? false);
    } catch (err) {
      throw fromNativeError(err);
    }
  }

  /**
   * The conversation as the model's chat template renders it (llama.cpp's formatter for the
   * template in the GGUF; see `info.framing`). A chat's cache holds the tokens of exactly this text,
   * message by message; `addAssistant` appends the assistant's generation prompt.
   */
  applyTemplate(messages: readonly { role: 'system' | 'user' | 'assistant'; content: string }[], options: { addAssistant?: boolean } = {}): string {
    this.#check();
    if (!Array.isArray(messages) || messages.some((m) => !m || !['system', 'user', 'assistant'].includes(m.role) || typeof m.content !== 'string')) {
      throw fromNativeError({ code: 'INVALID_OPTION', message: 'Expected an array of { role: "system" | "user" | "assistant", content: string } for messages' });
    }
    // llama.cpp's template API takes C strings: the text after a NUL was dropped from the rendering.
    if (messages.some((m) => m.content.includes('\0'))) throw new InvalidOptionError('A message given to applyTemplate contains a NUL character');
    try {
      return this.#native.applyTemplate(messages.flatMap((m) => [m.role, m.content]), options.addAssistant ?? false);
    } catch (err) {
      throw fromNativeError(err);
    }
  }

  /**
   * Sets up what a chat with these `tools` (and this system prompt) needs, on a worker thread: reading
   * the chat template, checking each tool's schema and setting up a turn take milliseconds of the
   * calling thread in `createChat` (0.49 s for 128 tools of an agent's size the first time: bench/tools.ts), so a server does it here
   * first and the chat made next finds it done (the 16 most recent set-ups are kept, and a live chat's).
   * A turn with other `toolChoice`, `parallelToolCalls` or `thinking` than send's defaults has a set-up
   * of its own (its grammar and parser), made as its first `send` is prepared (on a worker: it delays
   * that turn, not the event loop) unless prepared here with them.
   * Rejects as `createChat` would refuse the tools, or `send` the options.
   */
  async prepareTools(tools: ToolDefinition[] | string, options: PrepareToolsOptions = {}): Promise<void> {
    this.#check();
    const { systemPrompt = '', ...turn } = checkObject('options', options) as PrepareToolsOptions;
    const text = jsonText(tools, 'tools');
    if (typeof text !== 'string' || typeof systemPrompt !== 'string') throw new InvalidOptionError('Expected tools (an array, or its JSON text) and a string systemPrompt');
    const unknown = Object.keys(turn).filter((k) => !(TURN_SET_UP_OPTIONS as readonly string[]).includes(k));
    if (unknown.length > 0) throw new InvalidOptionError(`Unknown option options.${unknown[0]} (known: systemPrompt, ${TURN_SET_UP_OPTIONS.join(', ')})`);
    const { native } = splitSendOptions(turn);
    try {
      await this.#native.prepareTools(text, systemPrompt, native);
    } catch (err) {
      throw fromNativeError(err);
    }
  }

  /** Creates a chat whose KV cache never holds more than `maxTokens` tokens. */
  createChat(options: ChatOptions = {}): Chat {
    this.#check();
    const split = splitChatOptions(options);
    const telemetry = resolveTelemetry(split.telemetry);
    let native;
    try {
      native = new (getBinding().NativeChat)(this.#native, split.native);
    } catch (err) {
      throw fromNativeError(err);
    }
    return this.#track(native, native.resolvedOptions() as unknown as ResolvedChatOptions, telemetry);
  }

  #track(native: NativeChat, resolved: ResolvedChatOptions, telemetry: Telemetry | undefined): Chat {
    const ref = { current: undefined as WeakRef<Chat> | undefined };
    const chat = new Chat(native, resolved, () => ref.current && this.#chats.delete(ref.current), telemetry);
    ref.current = new WeakRef(chat);
    this.#chats.add(ref.current);
    chatRegistry.register(chat, { chats: this.#chats, ref: ref.current });
    return chat;
  }

  /**
   * Restores a chat on this model (same fingerprint) from a file (`chat.saveCheckpoint(path)`) or
   * from bytes (`chat.checkpoint()`), with its memory, counters and transcript. Its options come from
   * the checkpoint; `threads` may be overridden.
   */
  async loadChat(source: string | Uint8Array, options: { threads?: number; telemetry?: Telemetry } = {}): Promise<Chat> {
    this.#check();
    if (!(source instanceof Uint8Array)) checkPath('path', source);
    const { telemetry: rawTelemetry, threads, ...rest } = checkObject('options', options);
    for (const key of Object.keys(rest)) throw new InvalidOptionError(`Unknown option options.${key} (known: threads, telemetry)`);
    const telemetry = resolveTelemetry(rawTelemetry);
    const stack = new Error().stack;
    let native: NativeChat;
    try {
      native = await getBinding().loadChat(this.#native, source, threads);
    } catch (err) {
      throw fromNativeError(err, stack);
    }
    if (this.#disposed) {
      // Disposed while the checkpoint loaded: the chat it made holds a slot, the scheduler and the
      // weights, and nothing else would free it before a garbage collection.
      native.dispose();
      this.#check();
    }
    const chat = this.#track(native, native.resolvedOptions() as unknown as ResolvedChatOptions, telemetry);
    try {
      chat._restoreTranscript();
    } catch (err) {
      chat.dispose();
      throw err;
    }
    return chat;
  }

  /**
   * Creates a chat from a transcript (`chat.exportTranscript()`, possibly from another model): every
   * exchange is prefilled in order, with eviction as the budget requires; nothing is generated.
   */
  async importTranscript(transcript: Transcript, options: ImportTranscriptOptions = {}): Promise<Chat> {
    this.#check();
    const { signal, ...chatOptions } = checkObject('options', options) as ImportTranscriptOptions;
    if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidOptionError('Expected an AbortSignal for signal');
    const t = checkObject('transcript', transcript);
    if (t.format !== 'finite-memory-llm/transcript' || t.version !== 1 || !Array.isArray(t.messages)) {
      throw new InvalidOptionError("Expected a transcript with format 'finite-memory-llm/transcript', version 1 and a messages array");
    }
    const messages: Transcript['messages'] = t.messages.map((m: unknown, i: number) => {
      const msg = checkObject(`messages[${i}]`, m);
      if (msg.role !== 'user' && msg.role !== 'assistant') throw new InvalidOptionError(`messages[${i}].role must be 'user' or 'assistant'`);
      return { role: msg.role as 'user' | 'assistant', content: checkString(`messages[${i}].content`, msg.content) };
    });
    const systemPrompt = chatOptions.systemPrompt ?? (typeof t.systemPrompt === 'string' ? t.systemPrompt : '');
    const chat = this.createChat({ ...chatOptions, systemPrompt });
    try {
      for (const { user, assistant } of exchangesOf(messages)) {
        await chat._ingest(user, assistant, signal);
      }
    } catch (err) {
      chat.dispose();
      throw err;
    }
    return chat;
  }

  /** Disposes every chat of this model, then releases the weights. Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    for (const ref of [...this.#chats]) ref.deref()?.dispose();
    this.#disposed = true;
    this.#native.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** Disposes every chat, waits for their running operations to settle, then releases the weights. */
  async [Symbol.asyncDispose](): Promise<void> {
    const chats = [...this.#chats].flatMap((ref) => ref.deref() ?? []);
    await Promise.all(chats.map((chat) => chat[Symbol.asyncDispose]()));
    this.dispose();
  }

  /** @internal The native handle, for benchmark hooks. */
  _native(): NativeModel {
    this.#check();
    return this.#native;
  }

  #check(): void {
    if (this.#disposed) throw new DisposedError('model');
  }
}

/** Loads a GGUF model off the event loop. The file is validated before llama.cpp reads it. */
export async function loadModel(path: string, options: LoadModelOptions = {}): Promise<Model> {
  const stack = new Error().stack;
  try {
    checkPath('path', path);
    const { onProgress, ...nativeOptions } = checkObject('options', options) as LoadModelOptions;
    if (onProgress !== undefined && typeof onProgress !== 'function') throw new InvalidOptionError('Expected a function for onProgress');
    // A callback that throws is not called again; the load finishes, then fails with its error as cause.
    // loadModel resolves only after every progress call has run (the native side ends them with -1).
    let thrown: { error: unknown } | undefined;
    let reported = (): void => {};
    const allReported = new Promise<void>((resolve) => (reported = resolve));
    const report = onProgress && ((fraction: number) => {
      if (fraction < 0) return reported();
      if (thrown) return;
      try {
        onProgress(fraction);
      } catch (error) {
        thrown = { error };
      }
    });
    const native = await getBinding().loadModel(path, nativeOptions, report);
    if (report) await allReported;
    if (thrown) {
      native.dispose();
      throw new CallbackError(undefined, thrown.error);
    }
    return new Model(native, path);
  } catch (err) {
    throw fromNativeError(err, stack);
  }
}

/**
 * The conversation (user and assistant messages) a checkpoint of any model carries, after its
 * integrity checks: how a chat is rebuilt (`model.importTranscript`) when its checkpoint was made with
 * another model and cannot be restored as it is. Throws CheckpointError (corrupt, newer format).
 */
/** What `read` takes from a checkpoint of any model, after its integrity checks (errors typed, the caller's stack). */
function readAnyCheckpoint<T>(bytes: Uint8Array, read: (bytes: Uint8Array) => T): T {
  if (!(bytes instanceof Uint8Array)) throw new InvalidOptionError('Expected the checkpoint as a Uint8Array');
  const stack = new Error().stack;
  try {
    return read(bytes);
  } catch (err) {
    throw fromNativeError(err, stack);
  }
}

export function readCheckpointMessages(bytes: Uint8Array): Transcript['messages'] {
  const json = readAnyCheckpoint(bytes, (b) => getBinding().checkpointTranscript(b));
  const messages = TranscriptLog.parse(json);
  if (!messages) throw new CheckpointError('CHECKPOINT_CORRUPT', 'The checkpoint holds a malformed transcript');
  return messages;
}

/**
 * The system prompt, policy and budget a checkpoint's chat (of any model) was created with, after the
 * same integrity checks as readCheckpointMessages: a conversation rebuilt on another model keeps them.
 */
export function readCheckpointSettings(bytes: Uint8Array): { systemPrompt: string; policy: PolicyName; maxTokens: number; tools: string | undefined } {
  const s = readAnyCheckpoint(bytes, (b) => getBinding().checkpointSettings(b));
  return { systemPrompt: s.systemPrompt, policy: s.policy as PolicyName, maxTokens: s.maxTokens, tools: s.tools === '' ? undefined : s.tools };
}
