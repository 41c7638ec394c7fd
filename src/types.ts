import type { NativeModelInfo } from './binding.js';
import type { PolicyName } from './options.js';

export type StopReason = 'eos' | 'maxTokens' | 'stop' | 'abort';

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
  /** From the call to the first generated token (waiting for a slot and prefill included). */
  firstTokenMs: number;
  /** Time the policy spent choosing tokens to evict. */
  policyMs: number;
  /** Time spent removing them from the KV cache and compacting positions (seq_rm + seq_add). */
  evictMs: number;
  evictedTokens: number;
  /** Eviction events during this turn (before prefill and during generation). */
  evictions: number;
  /** Tokens in the KV cache after the turn (<= maxTokens). */
  retainedTokens: number;
  latencyMs: number;
  /** True when the latency guard fell back to `sliding` in this turn. */
  fallback: boolean;
  /** rolling_summary/hybrid: time the model spent writing summaries this turn. */
  summaryMs: number;
  /** rolling_summary/hybrid: summary tokens placed in the cache this turn. */
  summaryTokens: number;
  /** importance/hybrid: where scores came from ('attention' weights, or the 'keyNorm' proxy); null for other policies. */
  importanceSignal: 'attention' | 'keyNorm' | null;
  policy: PolicyName;
}

export interface TurnResult {
  response: string;
  stopReason: StopReason;
  stats: TurnStats;
}

/** Cumulative figures since the chat was created (or last reset). */
export interface ChatStats {
  turns: number;
  /** Every token ever placed in the KV cache. */
  tokensSeen: number;
  /** Tokens in the KV cache now. */
  tokensRetained: number;
  tokensEvicted: number;
  /** tokensSeen / tokensRetained. */
  compressionRatio: number;
  evictions: number;
  fallbackCount: number;
  /** Bytes the retained tokens occupy in the KV cache (K and V, all layers). */
  kvBytes: number;
  /** rolling_summary/hybrid: the current summary's text ('' when none). */
  summary: string;
}

/** One token the chat still remembers. */
export interface MemoryEntry {
  token: number;
  position: number;
  turn: number;
  role: 'system' | 'user' | 'assistant' | 'summary';
  pinned: boolean;
  /** importance/hybrid: the token's importance score (mean attention received, or -key norm); 0 otherwise. */
  score: number;
  text: string;
}

/** What loadModel read from the GGUF and how the model runs (the native surface's fields, plus the path). */
export interface ModelInfo extends NativeModelInfo {
  path: string;
}

/** The plain conversation, portable across models (`chat.exportTranscript()`, `model.importTranscript()`). */
export interface Transcript {
  format: 'finite-memory-llm/transcript';
  version: 1;
  systemPrompt: string;
  messages: { role: 'user' | 'assistant'; content: string }[];
}
