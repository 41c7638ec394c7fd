/**
 * The native surface, declared once. Everything here is internal: the public API wraps it.
 * @internal
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { NativeBindingError } from '../shared/errors.js';
import type { EvictionEvent } from '../shared/telemetry.js';
import type { MemoryEntry, ModelInfo, ToolCall, TurnStats } from '../shared/types.js';

/** The native model's info: the public ModelInfo, which adds the path on the JS side. */
export type NativeModelInfo = Omit<ModelInfo, 'path'>;

export interface NativeSwaSide { canShift: boolean; kvBytes: number; decodeMs: number }

export interface NativeModel {
  info(): NativeModelInfo;
  tokenize(text: string, addBos: boolean, parseSpecial: boolean): Int32Array;
  detokenize(tokens: Int32Array, renderSpecial: boolean): string;
  /** messages flattened: role, content, role, content, ... */
  applyTemplate(messages: string[], addAssistant: boolean): string;
  /** Sets up a chat's tools (template, schemas, first turn, and the turn of `turn`'s send options) on a worker thread; the chat made next finds it done. */
  prepareTools(tools: string, systemPrompt: string, turn?: Record<string, unknown>): Promise<void>;
  dispose(): void;
}

/** A turn's figures as the addon reports them: the public ones, with the policy as a plain string and the turn's evictions. */
export type NativeTurnStats = Omit<TurnStats, 'policy'> & { policy: string; evictionLog: NativeEvictionRecord[] };

/** One eviction as the addon logs it: the public event without what the chat adds (its id, policy and turn). */
export type NativeEvictionRecord = Omit<EvictionEvent, 'chatId' | 'policy' | 'turn'>;

export interface NativeTurnResult {
  response: string;
  reasoning: string;
  stopReason: 'eos' | 'maxTokens' | 'stop' | 'abort';
  /** The calls the reply made (a chat with tools; [] otherwise). */
  toolCalls: ToolCall[];
  stats: NativeTurnStats;
  /** What onToken threw (the turn stopped there and is kept). */
  callbackError?: unknown;
}

export interface NativeChatStats {
  turns: number;
  tokensSeen: number;
  tokensRetained: number;
  tokensEvicted: number;
  evictions: number;
  fallbackCount: number;
  compactions: number;
  kvBytes: number;
  summary: string;
}

export interface NativeCacheState {
  ledgerTokens: number;
  pinnedTokens: number;
  /** llama.cpp's own view of the chat's sequence (the ledger's when the chat is parked). */
  cachePosMin: number;
  cachePosMax: number;
  /** The ledger's positions are 0..n-1 (never evicted with positions kept, or just compacted). */
  positionsContiguous: boolean;
  /** The ledger's positions are non-negative and strictly increasing (always). */
  positionsIncreasing: boolean;
  /** The ledger's first and last positions (-1: empty): the cache's must equal them. */
  ledgerPosFirst: number;
  ledgerPosLast: number;
  /** Positions stay below this; the next one past it compacts. */
  positionLimit: number;
  /** KV cells of the chat's stream (its budget plus summary scratch, rounded up). */
  contextSize: number;
  carriedTokens: number;
  pendingSystemTokens: number;
  /** The chat's slot (sequence id) in its engine, -1 when it has none. */
  slot: number;
  /** Its KV state is in host memory until its next turn. */
  parked: boolean;
  /**
   * Sliding-window layers hold exactly the ledger's tokens the next token sees (true without such
   * layers). A compaction can make it false by design: tokens that had left the window stay out.
   */
  windowIntact: boolean;
  /** Times the chat decoded its window's tokens again (repair_window): the end of the conversation moved back. */
  windowRepairs: number;
  /** Attention rows read and weights found after their query (must be 0), for the chat's whole engine. */
  attentionRowsChecked: number;
  causalViolations: number;
  /** Decodes whose signal tensors did not have the layout the engine planned (must be 0). */
  signalLayoutMismatches: number;
  /** Highest cached position beyond the ledger (-1: none; summary scratch must not stay behind). */
  scratchPosMax: number;
  kvBytes: number;
}

/** Raw options as the caller gave them: the native option table (native/engine/options.cpp) validates them. */
export type NativeRawOptions = Record<string, unknown>;

/** One row of the native option table. */
export interface NativeOptionDoc {
  scope: 'model' | 'chat' | 'send';
  name: string;
  type: string;
  default: string;
  range: string;
  description: string;
  internal: boolean;
}

export interface NativeChat {
  send(message: string, options: NativeRawOptions, onPiece?: (piece: string, reasoning: boolean) => void, pin?: boolean): Promise<NativeTurnResult>;
  /** A turn of tool results ([callId, name, content] each) after a reply's calls: a chat with tools. */
  sendToolResults(results: [string, string, string][], options: NativeRawOptions, onPiece?: (piece: string, reasoning: boolean) => void, pin?: boolean): Promise<NativeTurnResult>;
  /** Prefills a finished exchange with tools: `user` or `results` ([callId, name, content]), then the reply and its calls ([id, name, arguments]); resolves with the prompt tokens. */
  ingestToolExchange(user: string, results: [string, string, string][], reply: string, calls: [string, string, string][]): Promise<number>;
  /** The running (or last) turn's reply read in the tools' format; `partial` while it is written. */
  parseToolReply(reasoning: string, answer: string, partial: boolean): { content: string; toolCalls: ToolCall[] };
  abort(): void;
  /** Pins the user message of `turn` (and its reply with withReply); returns the tokens newly pinned. Throws PIN_LIMIT / INVALID_OPTION. */
  pin(turn: number, withReply?: boolean): number;
  /** Releases the pins of `turn`; returns the tokens released. */
  unpin(turn: number): number;
  /** Turns with pinned tokens (system prompt and attention sinks excluded). */
  pins(): { turn: number; tokens: number }[];
  /** Evicts every token of `turn` in place; resolves with the number evicted, or -1 when the chat is parked and every slot of its engine is in a turn (try again). */
  forget(turn: number): Promise<number>;
  stats(): NativeChatStats;
  memory(): MemoryEntry[];
  /** Waits for the scheduler between steps (diagnostics: the demo, tests). */
  cacheState(): NativeCacheState;
  countTurnTokens(message: string): number;
  reset(): void;
  dispose(): void;
  /** `transcript`: the JS side's messages (JSON), kept in the checkpoint. */
  saveCheckpoint(path: string, transcript?: string): Promise<void>;
  /** The checkpoint as bytes: full (KV state included) or ledger-only. */
  checkpoint(ledgerOnly: boolean, transcript?: string): Promise<Uint8Array>;
  /** The transcript JSON the checkpoint this chat was restored from carried ('' otherwise). */
  restoredTranscript(): string;
  ingestExchange(user: string, assistant: string): Promise<number>;
  resolvedOptions(): Record<string, unknown>;
}

/** Figures of every engine (shared context) of a model, summed. */
export interface NativeEngineStats {
  steps: number;
  /** llama_decode calls (one ubatch each). */
  decodes: number;
  /** Decodes that held tokens of two chats or more. */
  sharedDecodes: number;
  tokens: number;
  parked: number;
  restored: number;
  /** Times a context was rebuilt with more slots. */
  grown: number;
  /** Steps that paid a K-shift. */
  shiftSteps: number;
  /** Position moves (compactions, summaries moved) llama.cpp's K-shift applies in a later decode. */
  deferredMoves: number;
  /** Position moves whose keys this library rotated at once (M-RoPE, YaRN, NoPE layers, quantized keys llama.cpp's shift gets wrong). */
  rotatedMoves: number;
  /** Tokens decoded outside the scheduler's steps: compaction re-prefills, window repairs, K-shift flushes. */
  sideTokens: number;
  slots: number;
  /** Engines (llama contexts) of the model, and the ggml thread pools they share (one per thread count). */
  engines: number;
  threadPools: number;
}

/** Only in the test build (build/Probes/finite_memory_llm_probes.node; FML_ADDON_PATH selects it). */
export interface NativeProbes {
  probeLogits(chat: NativeChat, token: number): Float32Array;
  /** A hybrid chat's recurrent state as llama.cpp saves it (empty for other models). */
  recurrentState(chat: NativeChat): Uint8Array;
  /** What a summary written now (at the next turn's start) reads before its text; empty without summaries. */
  summaryPrompt(chat: NativeChat): Int32Array;
  /** A chat with tools: whether its exchanges are framed the fast way (the called tools alone); null without tools. */
  toolFramesFast(chat: NativeChat): boolean | null;
  /** The chat's next turn preparations wait until `release()`; one still waiting after `timeoutMs` fails its turn (INTERNAL). */
  holdPrepare(chat: NativeChat, timeoutMs: number): () => void;
  shiftPositions(chat: NativeChat, delta: number): void;
  /** Saves the sliding layers' window as a turn does and restores it (no-op without such layers). */
  windowRoundTrip(chat: NativeChat): void;
  evaluateTokens(chat: NativeChat, tokens: Int32Array, chunk: number): Float32Array;
  replayHistory(chat: NativeChat): number;
  plainDecode(chat: NativeChat, n: number): number;
  engineStats(chat: NativeChat, own?: boolean): NativeEngineStats;
  planEviction(options: NativeRawOptions, entries: SyntheticLedgerEntry[], need: number, want: number): { ranges: [number, number][]; summarize: boolean };
  benchEvict(model: NativeModel, context: number, evictCounts: number[], reps: number, threads: number): Promise<NativeEvictBench>;
  benchPolicyPlan(options: NativeRawOptions, n: number, want: number, embdDim: number, reps: number): number;
  benchMemcpy(bytes: number, reps: number): number;
  /** Sliding-window cache at the window's size (off) vs the full budget (on): KV allocated, decode ms per token (interleaved). */
  swaCost(model: NativeModel, context: number, steps: number, threads: number): Promise<{ context: number; filled: number; off: NativeSwaSide; on: NativeSwaSide; windowBytes: number; windowSaveMs: number; windowRestoreMs: number; prefillTokens: number; prefillMs: number }>;
  liveObjects(): { chats: number; models: number; runtimes: number };
}

export interface NativeBinding {
  /** `onProgress` hears llama.cpp's load progress (0..1), at most once per percent, then -1 once every earlier call has run (the promise may settle before). */
  loadModel(path: string, options: unknown, onProgress?: (fraction: number) => void): Promise<NativeModel>;
  NativeChat: new (model: NativeModel, options: NativeRawOptions) => NativeChat;
  /** From a file or the checkpoint's bytes; `threads` (raw) overrides the checkpoint's. */
  loadChat(model: NativeModel, source: string | Uint8Array, threads?: unknown): Promise<NativeChat>;
  resolveChatOptions(options: NativeRawOptions, defaultThreads: number): Record<string, unknown>;
  optionDocs(): NativeOptionDoc[];
  /** The GBNF a JSON schema (its JSON text) becomes: what send's jsonSchema holds an answer to. */
  jsonSchemaToGrammar(schema: string): string;
  /** The same, converted on a worker thread. */
  jsonSchemaToGrammarAsync(schema: string): Promise<string>;
  /** Deletes `*.tmp-<pid>-<n>` files of checkpoint saves whose process died; returns how many. */
  removeStaleCheckpointTemps(dir: string): number;
  /** The transcript (JSON; '' when none) a checkpoint of any model carries, after its integrity checks. */
  checkpointTranscript(bytes: Uint8Array): string;
  /** What the chat of a checkpoint (of any model) was created with. */
  checkpointSettings(bytes: Uint8Array): { systemPrompt: string; policy: string; maxTokens: number; tools: string };
  gpuDeviceCount(): number;
  systemInfo(): string;
  llamaCppVersion: string;
  /** Every error code the core throws (native/util/error.h, FML_ERROR_CODES). */
  errorCodes: string[];
  probes?: NativeProbes;
}

export interface NativeEvictBench {
  context: number;
  fillMs: number;
  kvBytes: number;
  kBytes: number;
  cases: { pattern: 'contiguous' | 'scattered'; positions: 'keep' | 'compact'; evicted: number; rmAddMs: number; nextDecodeMs: number; plainDecodeMs: number; seqRmCalls: number; seqAddCalls: number }[];
}

/** A ledger entry for planEviction (policies on synthetic ledgers). role: 0 system, 1 user, 2 assistant, 3 summary. */
export interface SyntheticLedgerEntry {
  pinned: boolean;
  role?: number;
  turn?: number;
  token?: number;
  score?: number;
  sentenceEnd?: boolean;
  embedding?: number[];
}

let cached: NativeBinding | undefined;
let loadedFrom: { path: string; variant: 'cpu' | 'cuda' } | undefined;

/** Which binary is in use (after the first load). */
export function loadedBinary(): { path: string; variant: 'cpu' | 'cuda' } | undefined {
  return loadedFrom;
}

function gpuDriverPresent(): boolean {
  if (process.env.FML_ASSUME_NVIDIA_DRIVER === '1') return true; // test hook: pretend a driver is there
  return existsSync('/proc/driver/nvidia/version') || existsSync('/dev/nvidia0');
}

/** The probes of the test build; a clear error with the shipped addon. @internal */
export function getProbes(): NativeProbes {
  const probes = getBinding().probes;
  if (!probes) {
    throw new NativeBindingError(
      `this build of the addon (${loadedFrom?.path}) has no probes: tests and benchmarks load the test build with FML_ADDON_PATH=build/Probes/finite_memory_llm_probes.node`,
    );
  }
  return probes;
}

/**
 * Loads the addon. Order:
 *   FML_ADDON_PATH (an explicit file), else
 *   the CUDA variant (prebuilds/<platform>-<arch>-cuda/, or build-cuda/ in a checkout) when
 *   FINITE_MEMORY_BACKEND=cuda, or when it is unset and an NVIDIA driver is present; if it cannot load
 *   (no libcuda/cuBLAS, no device), the CPU variant is used instead, unless cuda was forced;
 *   the CPU variant via node-gyp-build (prebuilds/ first, then build/).
 */
export function getBinding(): NativeBinding {
  if (cached) return cached;
  const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..'); // the package root, from src/local or dist/local
  const require = createRequire(import.meta.url);
  const override = process.env.FML_ADDON_PATH;
  if (override) {
    try {
      cached = require(override) as NativeBinding;
      loadedFrom = { path: override, variant: cached.gpuDeviceCount() > 0 ? 'cuda' : 'cpu' };
      return cached;
    } catch (err) {
      throw new NativeBindingError(`could not load FML_ADDON_PATH=${override}: ${(err as Error).message}`, err);
    }
  }
  const backend = process.env.FINITE_MEMORY_BACKEND;
  if (backend !== undefined && backend !== 'cpu' && backend !== 'cuda') {
    throw new NativeBindingError(`FINITE_MEMORY_BACKEND must be 'cpu' or 'cuda', not '${backend}'`);
  }
  const tried: string[] = [];
  if (backend === 'cuda' || (backend === undefined && gpuDriverPresent())) {
    const cudaPaths = [
      process.env.FML_CUDA_ADDON_PATH,
      join(root, 'prebuilds', `${process.platform}-${process.arch}-cuda`, 'finite-memory-llm.node'),
      join(root, 'build-cuda', 'Release', 'finite_memory_llm.node'),
    ].filter((p): p is string => !!p && existsSync(p));
    for (const path of cudaPaths) {
      try {
        const b = require(path) as NativeBinding;
        if (b.gpuDeviceCount() > 0) {
          cached = b;
          loadedFrom = { path, variant: 'cuda' };
          return cached;
        }
        tried.push(`${path}: loaded, but no CUDA device is usable`);
      } catch (err) {
        tried.push(`${path}: ${(err as Error).message.split('\n')[0]}`);
      }
    }
    if (cudaPaths.length === 0) tried.push('no CUDA variant found (prebuilds/<platform>-<arch>-cuda/ or build-cuda/)');
    if (backend === 'cuda') {
      throw new NativeBindingError(`FINITE_MEMORY_BACKEND=cuda but the CUDA variant cannot be used:\n  - ${tried.join('\n  - ')}`);
    }
  }
  try {
    const load = require('node-gyp-build') as { (dir: string): NativeBinding; path(dir: string): string };
    cached = load(root);
    loadedFrom = { path: load.path(root), variant: 'cpu' };
  } catch (err) {
    throw new NativeBindingError(
      `could not load the finite-memory-llm native addon from ${root}: ${(err as Error).message}. ` +
        'Build it with `npm run build` (needs cmake, a C++17 compiler and the node-llama-cpp devDependency for the llama.cpp source).' +
        (tried.length ? `\nCUDA variant: ${tried.join('; ')}` : ''),
      err,
    );
  }
  return cached;
}
