export type PolicyName = 'sliding' | 'importance' | 'semantic' | 'rolling_summary' | 'hybrid';
export const POLICIES: readonly PolicyName[] = ['sliding', 'importance', 'semantic', 'rolling_summary', 'hybrid'];
export type KvType = 'f16' | 'f32' | 'q8_0';

export type StopReason = 'eos' | 'maxTokens' | 'stop' | 'abort';

/** A tool as OpenAI lists it (`createChat({ tools })` of both kinds of chat). */
export interface ToolDefinition {
  type: 'function';
  function: { name: string; description?: string; parameters?: Record<string, unknown> };
}

/** Whether a reply may, must not or must call tools (OpenAI's tool_choice; `{ name }`: that tool). */
export type ToolChoice = 'auto' | 'none' | 'required' | { name: string } | { type: 'function'; function: { name: string } };

/** send() options both kinds of chat take (the local chat takes more sampling options). */
export interface CommonSendOptions {
  maxNewTokens?: number;
  temperature?: number;
  seed?: number;
  stop?: string[];
  onToken?: (piece: string) => void;
  onReasoning?: (piece: string) => void;
  /** false: a reasoning model answers without reasoning (the remote gets `chat_template_kwargs.enable_thinking: false`). */
  thinking?: boolean;
  /**
   * A JSON schema the answer follows (local: enforced by a grammar; remote: sent as `response_format`
   * json_schema with `strict: true`, which OpenAI takes for a subset of JSON Schema).
   */
  jsonSchema?: object | string;
  /** A chat with tools: 'auto' (default), 'none', 'required' or a tool (local: held by the template's grammar; remote: sent as tool_choice). */
  toolChoice?: ToolChoice;
  /** A chat with tools: several calls in a reply (false: one). Default true. */
  parallelToolCalls?: boolean;
  signal?: AbortSignal;
}

/** What a turn returns on both (each adds its own `stats`). */
export interface CommonTurnResult {
  /** The answer (a reasoning model's reasoning is apart, in `reasoning`; a chat with tools: the text beside its calls). */
  response: string;
  /** A chat with tools: the calls the reply made; [] when none. */
  toolCalls: ToolCall[];
  /** A reasoning model's reasoning in this reply (its think block, gpt-oss's analysis channel); '' when none. */
  reasoning: string;
  stopReason: StopReason;
}

/** Cumulative figures both report (each adds its own). */
export interface CommonChatStats {
  turns: number;
  /** Every token the chat has taken in (local: placed in the KV cache; remote: counted in the messages). */
  tokensSeen: number;
  /** Tokens the chat keeps now (local: in the KV cache; remote: in the messages it sends). */
  tokensRetained: number;
  tokensEvicted: number;
  /** tokensSeen / tokensRetained. */
  compressionRatio: number;
  evictions: number;
  /** rolling_summary/hybrid: the current summary's text ('' when none). */
  summary: string;
}

/** What one turn cost and what it left in memory. */
export interface TurnStats {
  /** This turn's number, as in `memory()` (what `pin`, `unpin` and `forget` take); 0 when the turn never got into memory (aborted before its prompt was in). */
  turn: number;
  /** Tokens prefilled this turn: the new message (plus the previous reply's end-of-turn tokens), never the history. */
  promptTokens: number;
  generatedTokens: number;
  prefillMs: number;
  decodeMs: number;
  tokensPerSecond: number;
  /** From the call to the first generated token (the preparation, waiting for a slot and prefill included). */
  firstTokenMs: number;
  /**
   * The turn's preparation on a worker thread before it runs: the message framed and tokenized (a turn
   * of tool results framed), a tool turn set up, a grammar compiled, the fit checked.
   */
  prepareMs: number;
  /** Time the policy spent choosing tokens to evict. */
  policyMs: number;
  /** Time spent removing them from the KV cache (seq_rm; compactions are counted apart). */
  evictMs: number;
  evictedTokens: number;
  /** Eviction events during this turn (before prefill and during generation). */
  evictions: number;
  /**
   * Times this turn numbered the retained tokens' positions 0..n-1 again: at every eviction with
   * positions 'compact'; with 'keep', only when the next position would pass `positionLimit`.
   */
  compactions: number;
  /** Time those compactions took: this library's rotation of the keys (keys llama.cpp cannot shift right (M-RoPE, YaRN, layers without positions, some quantized caches)), or a re-prefill's decodes where they cannot move; for llama.cpp's K-shift only its bookkeeping (the shift itself runs inside the next decode). */
  compactMs: number;
  /** Tokens in the KV cache after the turn (<= maxTokens). */
  retainedTokens: number;
  /** From the call to the turn's end (its preparation included). */
  latencyMs: number;
  /**
   * True when the latency guard fell back to `sliding` in this turn, or a summary could not be
   * written (its decode failed) and the eviction it was for went ahead without it.
   */
  fallback: boolean;
  /** rolling_summary/hybrid: time the model spent writing summaries this turn. */
  summaryMs: number;
  /** rolling_summary/hybrid: summary tokens placed in the cache this turn. */
  summaryTokens: number;
  /**
   * send's grammar / jsonSchema: passes over the vocabulary this turn (a token the sampler chose did
   * not fit and its shortcuts could not decide), and the time they took. 0 without a grammar.
   */
  grammarPasses: number;
  grammarMs: number;
  /**
   * importance/hybrid: where this turn's scores came from ('attention' weights, or the 'keyNorm' proxy);
   * null for other policies, and where no decode of the turn gave a signal (a turn aborted before its
   * first decode; decodes whose signal tensors were not read: `signalLayoutMismatches` counts them).
   */
  importanceSignal: 'attention' | 'keyNorm' | null;
  policy: PolicyName;
}

/** A call a reply made to one of the chat's tools. */
export interface ToolCall {
  /** The format's id, or a fresh one (9 letters and digits): what the result's `toolCallId` names. */
  id: string;
  name: string;
  /** The arguments as the model wrote them: JSON text (held to the tool's schema when the call was required). */
  arguments: string;
}

/** A message of an OpenAI conversation: text, and (tools) an assistant's calls or a tool's result. */
export interface ConversationMessage {
  role: 'user' | 'assistant' | 'tool';
  content: string;
  toolCalls?: ToolCall[];
  toolCallId?: string;
  name?: string;
}

/** What a tool returned, answering a call of the last reply (`send({ toolResults })`). */
export interface ToolResult {
  /** The call's id (`ToolCall.id`). */
  toolCallId?: string;
  /** The tool's name (default: the name of the call `toolCallId` names). */
  name?: string;
  content: string;
}

export interface TurnResult extends CommonTurnResult {
  stats: TurnStats;
}

/** Cumulative figures since the chat was created (or last reset). */
export interface ChatStats extends CommonChatStats {
  fallbackCount: number;
  /** Times positions were compacted (see `TurnStats.compactions`). */
  compactions: number;
  /** Bytes the retained tokens occupy in the KV cache (K and V of every attention layer; a hybrid model's recurrent state is extra: `ModelInfo.recurrentBytes`). */
  kvBytes: number;
}

/** One token the chat still remembers. */
export interface MemoryEntry {
  token: number;
  position: number;
  turn: number;
  /** 'reasoning': a reply's reasoning (see `pastReasoning`). */
  role: 'system' | 'user' | 'assistant' | 'reasoning' | 'summary';
  pinned: boolean;
  /** importance/hybrid: the token's importance score (mean attention received, or -key norm); 0 otherwise. */
  score: number;
  text: string;
}

/** What loadModel read from the GGUF and how the model runs. */
export interface ModelInfo {
  path: string;
  architecture: string;
  description: string;
  chatTemplate: string | null;
  /** 'cpu', or the GPU backend ('cuda') when layers are offloaded to it. */
  backend: string;
  /** The device doing the work: the GPU's name (e.g. "NVIDIA H100 80GB HBM3") or the CPU's. */
  device: string;
  nCtxTrain: number;
  nEmbd: number;
  nLayer: number;
  nHead: number;
  nHeadKv: number;
  /** Key/value head dimension (can differ from nEmbd / nHead). */
  headDim: number;
  nVocab: number;
  sizeBytes: number;
  nParams: number;
  gpuLayers: number;
  /** Hash of the GGUF's metadata and tensor layout; checkpoints only load into a model with the same one. */
  fingerprint: string;
  /** How messages are framed: the model's template, ChatML (a template llama.cpp does not know) or plain "User: / Assistant:" (no template). */
  framing: 'template' | 'chatml' | 'plain';
  /** The model's memory: a KV cache ('kv'), one with sliding-window layers ('kv-swa'), a recurrent state, or both ('hybrid'). */
  memory: 'kv' | 'kv-swa' | 'recurrent' | 'hybrid';
  /** Window of the sliding-window layers in tokens (0: none), counted in positions: with positions 'keep' a token leaves them at its true distance. */
  slidingWindow: number;
  /** Layers with a KV cache: what `maxTokens` bounds (for a hybrid model, its attention layers only). */
  kvLayers: number;
  /** Bytes of one chat's recurrent state (hybrid models; 0 otherwise): fixed-size, never evicted, the model's own memory of everything it saw. */
  recurrentBytes: number;
  /** Whether keys can be moved to new positions: llama.cpp's K-shift, or for keys llama.cpp cannot shift right (M-RoPE, YaRN, layers without positions, some quantized caches) this library's rotation of them (false where neither can: a build without llama.cpp's internals, or rope factor tensors; those chats re-prefill the retained tokens to compact). */
  canShift: boolean;
  /** The model's RoPE kind: 'norm', 'neox', 'mrope', 'imrope' (interleaved M-RoPE), 'vision' or 'none'. */
  rope: string;
  /**
   * How its replies carry reasoning, told from its vocabulary: 'think' (a block between markers:
   * `<think>`...`</think>` for Qwen3, Qwen3.5, DeepSeek-R1, SmolLM3, GLM, Nemotron, LFM2.5;
   * `[THINK]`...`[/THINK]` for Magistral; Gemma 4's `<|channel>thought`...`<channel|>`), 'harmony'
   * (gpt-oss's analysis channel) or 'none'. Replies then have it apart (`TurnResult.reasoning`, `onReasoning`), and memory keeps it
   * as `pastReasoning` says. A model that shares a reasoning model's vocabulary but does not think
   * (Qwen3-Instruct-2507; Mistral instruct models whose vocabulary has `[THINK]`) says 'think' too: its
   * replies have no reasoning, and `thinking: false` gives it an empty think block it was not trained on.
   */
  reasoning: 'think' | 'harmony' | 'none';
  /** Whether chats can evict in place on this model; createChat throws UnsupportedModelError otherwise. */
  inPlaceEviction: boolean;
  /** Why not, naming the architecture (null when supported). */
  unsupportedReason: string | null;
  /** The model's CPU thread budget: every decode of its chats, batched together, uses this many threads. */
  threads: number;
  /** Chats decoded together in one context; more are parked while idle. */
  slots: number;
  /** Prefill tokens a step may add while other chats generate. */
  prefillChunk: number;
}

/** The plain conversation, portable across models (`chat.exportTranscript()`, `model.importTranscript()`). */
export interface Transcript {
  format: 'finite-memory-llm/transcript';
  version: 1;
  systemPrompt: string;
  messages: { role: 'user' | 'assistant'; content: string }[];
}
