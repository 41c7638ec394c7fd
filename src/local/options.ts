/**
 * Option types. Their names, defaults and bounds live in one table in the native core
 * (native/engine/options.cpp): createChat, loadChat (a checkpoint's stored options) and send all validate
 * there, before llama.cpp (which aborts on some misuse) sees a value. Only what exists in JS alone is
 * checked here (telemetry hooks, onToken, an AbortSignal). Messages follow "Expected X for name but
 * received Y". The defaults below are checked against the native table by test/standalone/options.test.ts.
 */
import { getBinding } from './binding.js';
import { checkObject, fail } from '../shared/checks.js';
import { fromNativeError } from '../shared/errors.js';
import { jsonText } from './grammar.js';
import type { ToolChoice, ToolDefinition } from '../shared/types.js';

export type { ToolChoice, ToolDefinition };
import type { Telemetry } from '../shared/telemetry.js';
import type { KvType, PolicyName } from '../shared/types.js';

export interface LoadModelOptions {
  /** Hears llama.cpp's load progress, a fraction 0..1 (at most once per percent; 1 when the weights are in). */
  onProgress?: (fraction: number) => void;
  /** Layers to offload to the GPU: a count, or 'auto' (all when a GPU backend is active, else 0). Default 'auto'. */
  gpuLayers?: number | 'auto';
  /**
   * The model's CPU thread budget: every decode of its chats, batched together on one scheduler
   * thread, uses this many ggml threads, whatever the number of chats. Default the cores.
   */
  threads?: number;
  /** Memory-map the weights. Default true. */
  useMmap?: boolean;
  /**
   * Chats decoded together in one llama.cpp context (a KV stream each; the context grows to this as
   * chats arrive). More chats than slots work: idle ones are parked in host memory and restored at
   * their next turn. Default 8.
   */
  slots?: number;
  /** Prefill tokens a step may add per prefilling chat while other chats are generating (bounds their inter-token delay). Default 64. */
  prefillChunk?: number;
  /** @internal One KV buffer for all chats instead of a stream each (benchmarks compare them). */
  kvUnified?: boolean;
  /** @internal Test hook: creating a context of more slots than this fails, as when memory runs out. */
  testContextSlotLimit?: number;
  /** @internal Test hook: keys llama.cpp cannot shift right (M-RoPE, YaRN, layers without positions, some quantized caches) are not rotated, as in a build without the internals (compaction re-prefills). */
  testNoKeyRotation?: boolean;
}

export interface ChatOptions {
  /** Which tokens leave the KV cache when the budget is full. Default 'importance' on the CPU, 'sliding' on a GPU or where attention weights cannot be read (every layer slides). */
  policy?: PolicyName;
  /**
   * Hard cap on tokens in this chat's KV cache (the context is exactly this size). Default 2048. At
   * least 16; the real minimum depends on the chat template and system prompt, and createChat says
   * what does not fit below it.
   */
  maxTokens?: number;
  /** Most recent tokens a policy keeps when anything else can go (importance and hybrid count the incoming message in it, and keep the newest token). Default maxTokens / 4. */
  windowSize?: number;
  /** First tokens of the sequence pinned as attention sinks. Default 4. */
  sinkTokens?: number;
  /** System prompt; pinned, never evicted. Default ''. */
  systemPrompt?: string;
  /**
   * Tools the model may call, as OpenAI lists them (`[{ type: 'function', function: { name,
   * description?, parameters? } }]`, 1 to 128, or their JSON text). The model's own chat template
   * renders them with the system prompt (pinned, like it), and a reply's calls are read back in its
   * format (`TurnResult.toolCalls`); `send({ toolResults })` answers them. Fixed for the chat's life.
   * Needs a model whose template renders tools. Default none.
   */
  tools?: ToolDefinition[] | string;
  /** CPU threads of this chat's decodes, at most the model's; fewer than the model's puts it in a context of its own. Default the model's threads. */
  threads?: number;
  /** Most prefill tokens of this chat per step. Default 512. */
  batchSize?: number;
  /** KV cache element type; 'q8_0' needs flash attention. Default 'f16'. */
  kvType?: KvType;
  /**
   * Flash attention: true or false. Left to choose, `importance` and `hybrid` turn it off and read the
   * graph's attention weights; forced on (or for kvType 'q8_0'), they recompute the same weights from
   * the flash-attention node's inputs, a dearer step (bench/RESULTS.md "Attention weights under flash
   * attention"). Default off on the CPU, llama.cpp's choice on a GPU.
   */
  flashAttention?: boolean;
  /** importance/hybrid: scores are multiplied by this once per turn (1: a plain sum, as in H2O). Default 1. */
  importanceDecay?: number;
  /** importance: evict whole low-scoring spans ('span', default: keeps local text coherent) or single tokens ('token', as in H2O). */
  importanceGranularity?: 'span' | 'token';
  /**
   * importance/hybrid: 'mean' ranks tokens by the attention they receive per query that could see
   * them; 'peak' by the largest weight a distant query paid them (at least 32 positions later, or two
   * whole messages later when one head gave them at least 0.9, a copy: tokens the model went back for,
   * such as a fact it was asked about); 'blend' keeps a span when either ranks
   * it high among the spans (the peak only for the top quarter of spans by peak). Default 'blend'.
   */
  importanceScore?: 'mean' | 'peak' | 'blend';
  /** semantic/hybrid: number of k-means clusters (topics). Default 8. */
  semanticClusters?: number;
  /** semantic/hybrid: longest span (tokens) when splitting history into spans. Default 32. */
  spanMaxTokens?: number;
  /** semantic/hybrid: k-means++ seed. Default 42. */
  policySeed?: number;
  /** rolling_summary/hybrid: longest summary in tokens; 0 turns summaries off in hybrid. Default min(48, maxTokens / 8). */
  summaryTokens?: number;
  /**
   * rolling_summary/hybrid: an eviction that writes a summary frees at least this many tokens beyond
   * what the turn needs, room for the next turns: a summary (up to summaryTokens decodes) every few turns
   * instead of at every one once the budget is full, for less retained and lower recall (bench/RESULTS.md).
   * 0 frees only what the turn needs. Default 0.
   */
  summaryEvictTokens?: number;
  /** hybrid: share of the kept history chosen by importance; the rest by semantic representatives. Default 0.5. */
  hybridImportanceShare?: number;
  /** Latency guard: a policy that takes longer than this (ms) to choose falls back to sliding. 0 disables. Default 50. */
  maxPolicyMs?: number;
  /**
   * What an eviction does to the positions of the tokens that stay. 'keep' (default): nothing; they
   * keep their true distances (as sliding-window attention sees them) and new tokens are numbered on,
   * so an eviction is one seq_rm and never re-rotates the cache. Positions are compacted only when the
   * next one would pass `positionLimit`. 'compact': renumbered 0..n-1 at every eviction (a K-shift of
   * every cell of the context in the next decode; keys llama.cpp cannot shift right, such as M-RoPE,
   * YaRN and layers without positions, rotated at once); not where keys cannot move.
   */
  positions?: 'keep' | 'compact';
  /**
   * positions 'keep': the position the chat never reaches; when the next one would, the retained
   * tokens are compacted to 0..n-1 (a K-shift, or one re-prefill of at most maxTokens tokens where
   * keys cannot move). At most the model's trained context (`model.info.nCtxTrain`), at least
   * maxTokens plus the summary scratch. Default the model's nCtxTrain.
   */
  positionLimit?: number;
  /**
   * Earlier replies' reasoning (think blocks, gpt-oss's analysis channel; `model.info.reasoning`).
   * 'drop' (default): evicted from the KV cache when the next turn starts, as the model's own chat
   * template leaves it out of the history it renders (what the model was trained to see). 'first':
   * kept while there is room, evicted before anything the policy would choose. 'keep': tokens like
   * any other, for the policy to weigh.
   */
  pastReasoning?: 'drop' | 'first' | 'keep';
  /** @internal Test hook: makes every policy choice this slow (exercises the latency guard). */
  testPolicyDelayMs?: number;
  /** @internal Test hook: makes every generated token this slow (deterministic mid-turn aborts). */
  testTokenDelayMs?: number;
  /** @internal Test hook: a reply's next decode fails (as llama_decode can) once it has this many tokens. */
  testFailAfterTokens?: number;
  /** @internal Test hook: an unexpected error escapes the scheduler's step once a reply has this many tokens. */
  testInternalErrorAfterTokens?: number;
  /** @internal Test hook: every reply is this text's tokens (control tokens parsed) in place of sampled ones, then the end. */
  testReply?: string;
  /** @internal Test hook: after testReply's tokens the reply goes on with sampled ones (a forced start). */
  testReplyThenSample?: boolean;
  /** @internal Test hook: a reply's calls and a turn of results framed with every tool through llama.cpp's full apply, never the fast way. */
  testFullToolFrames?: boolean;
  /** @internal Test hook: every decode holding this chat's summary fails, as llama_decode can. */
  testFailSummaryDecode?: boolean;
  /** Hooks called after each turn and eviction (see `Telemetry`, `createPrometheusTelemetry`). */
  telemetry?: Telemetry;
}

export interface SendOptions {
  /** Maximum tokens to generate. Default 256. */
  maxNewTokens?: number;
  /** 0 = greedy. Default 0.8. */
  temperature?: number;
  /** Top-k sampling; 0 = off. Default 40. */
  topK?: number;
  /** Nucleus sampling; 1 = off. Default 0.95. */
  topP?: number;
  /** Min-p sampling; 0 = off. Default 0.05. */
  minP?: number;
  /** 1 disables the penalty. Default 1. */
  repeatPenalty?: number;
  /** Tokens the repetition penalty looks back over. Default 64. */
  repeatLastN?: number;
  /** Sampler seed (an unsigned 32-bit integer); same seed + same history = same reply. Default random. */
  seed?: number;
  /** Generation stops before the first occurrence of any of these strings. Default []. */
  stop?: string[];
  /** End-of-generation tokens are never sampled: the reply runs to maxNewTokens or a stop string (llama-server's ignore_eos; equal work in benchmarks). Default false. */
  ignoreEos?: boolean;
  /**
   * false: a reasoning model (`model.info.reasoning`) answers without reasoning: the reply starts with
   * an empty think block (Qwen3's template with enable_thinking false) or gpt-oss's final channel (a
   * chat with tools: an empty analysis, the channel left to the reply, which may call). No effect on
   * other models; true leaves it to the model. Default true.
   */
  thinking?: boolean;
  /**
   * A GBNF grammar (llama.cpp's, start rule `root`) the answer follows. A reasoning model's reasoning
   * stays free; the reply ends when the grammar is complete. At most 128 KiB. Default none.
   */
  grammar?: string;
  /**
   * A JSON schema the answer follows (an object, or its JSON text), converted to a grammar as
   * llama-server converts a `response_format`: `{ type: 'object' }` for any JSON object. A reasoning
   * model's reasoning stays free; the reply ends when the JSON value is complete. Default none.
   */
  jsonSchema?: object | string;
  /**
   * A chat with tools: whether the reply may call them ('auto'), must not ('none': no calls are read
   * from it) or must ('required'; `{ name }` or OpenAI's `{ type: 'function', function: { name } }`:
   * that tool). A required call holds the answer to the template's call format with a grammar
   * (llama.cpp's, as llama-server builds it); with 'auto' a call the model starts is held by it from
   * the call's first marker on. Default 'auto'.
   */
  toolChoice?: ToolChoice;
  /** A chat with tools: the reply may make several calls (false: one, a held call held to one; of a reply that wrote several, the first). Default true. */
  parallelToolCalls?: boolean;
  /** @internal Test hook: every token a grammar refuses takes the pass over the whole vocabulary (no shortcut). */
  testFullGrammarPass?: boolean;
  /** @internal Test hook: every pass of a grammar over the vocabulary takes this much longer. */
  testGrammarPassDelayMs?: number;
  /** @internal Test hook: where a grammar's pass over the vocabulary runs (default: a thread of its own when a core is spare). */
  testGrammarPassOn?: 'step' | 'thread';
  /** Receives each streamed piece of the answer (never a split UTF-8 character; reasoning goes to onReasoning). */
  onToken?: (piece: string) => void;
  /** Receives each streamed piece of a reasoning model's reasoning (`model.info.reasoning`), apart from the answer. */
  onReasoning?: (piece: string) => void;
  /** Aborting resolves the turn with stopReason 'abort'; the chat stays usable. */
  signal?: AbortSignal;
  /**
   * Keep this message through every eviction (as `chat.pin(turn)` would). Pins count against
   * maxTokens: a pin that would leave no room for the next turn rejects with PinLimitError and
   * the turn does not run. Default false.
   */
  pin?: boolean;
}

/** Resolved chat options: every option with its default filled in, as the native table resolves them. */
export interface ResolvedChatOptions {
  policy: PolicyName;
  maxTokens: number;
  windowSize: number;
  sinkTokens: number;
  systemPrompt: string;
  threads: number;
  batchSize: number;
  kvType: KvType;
  flashAttention?: boolean;
  importanceDecay: number;
  importanceGranularity: 'span' | 'token';
  importanceScore: 'mean' | 'peak' | 'blend';
  semanticClusters: number;
  spanMaxTokens: number;
  policySeed: number;
  summaryTokens: number;
  summaryEvictTokens: number;
  hybridImportanceShare: number;
  maxPolicyMs: number;
  positions: 'keep' | 'compact';
  pastReasoning: 'drop' | 'first' | 'keep';
  /** Only when given: the tools' JSON text. */
  tools?: string;
  /** Only when given (the model's trained context otherwise). */
  positionLimit?: number;
  testPolicyDelayMs?: number;
  testTokenDelayMs?: number;
  testFailAfterTokens?: number;
  testInternalErrorAfterTokens?: number;
  testReply?: string;
  testReplyThenSample?: boolean;
  testFullToolFrames?: boolean;
  testFailSummaryDecode?: boolean;
}

/** Splits off what only JS has (telemetry) and lets the native table validate the rest. */
export function splitChatOptions(raw: unknown): { native: Record<string, unknown>; telemetry: unknown } {
  const { telemetry, ...native } = checkObject('options', raw);
  if (native.tools !== undefined) native.tools = jsonText(native.tools, 'tools');
  return { native, telemetry };
}

/** Validates chat options without creating a chat (e.g. a server's, at start). */
export function resolveChatOptions(raw: unknown, defaultThreads: number): ResolvedChatOptions {
  const { native } = splitChatOptions(raw);
  try {
    return getBinding().resolveChatOptions(native, defaultThreads) as unknown as ResolvedChatOptions;
  } catch (err) {
    throw fromNativeError(err);
  }
}

/** toolChoice as the native table takes it: the word, or the tool's name. */
function toolChoiceText(choice: unknown): unknown {
  if (choice === null || typeof choice !== 'object') return choice;
  const c = choice as { name?: unknown; function?: { name?: unknown } };
  const name = c.name ?? (c.function !== null && typeof c.function === 'object' ? c.function.name : undefined);
  if (typeof name !== 'string' || ['auto', 'none', 'required'].includes(name)) {
    fail("'auto', 'none', 'required', { name } or { type: 'function', function: { name } }", 'toolChoice', choice);
  }
  return name;
}

/** send() options that exist only in JS; the rest goes to the native table as given. */
export interface JsSendOptions {
  onToken?: (piece: string) => void;
  onReasoning?: (piece: string) => void;
  signal?: AbortSignal;
  pin?: boolean;
}

export function splitSendOptions(raw: unknown): { native: Record<string, unknown>; js: JsSendOptions } {
  const { onToken, onReasoning, signal, pin, ...native } = checkObject('options', raw);
  // The native table takes a schema as JSON text (it has no objects).
  if (native.jsonSchema !== undefined) native.jsonSchema = jsonText(native.jsonSchema);
  if (native.toolChoice !== undefined) native.toolChoice = toolChoiceText(native.toolChoice);
  const js: JsSendOptions = {};
  if (pin !== undefined) {
    if (typeof pin !== 'boolean') fail('a boolean', 'pin', pin);
    js.pin = pin;
  }
  if (onToken !== undefined) {
    if (typeof onToken !== 'function') fail('a function', 'onToken', onToken);
    js.onToken = onToken as (piece: string) => void;
  }
  if (onReasoning !== undefined) {
    if (typeof onReasoning !== 'function') fail('a function', 'onReasoning', onReasoning);
    js.onReasoning = onReasoning as (piece: string) => void;
  }
  if (signal !== undefined) {
    if (!(signal instanceof AbortSignal)) fail('an AbortSignal', 'signal', signal);
    js.signal = signal;
  }
  return { native, js };
}
