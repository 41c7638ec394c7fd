/**
 * Option types and their validation. Everything is checked here, before the native core (and
 * llama.cpp, which aborts on some misuse) sees it. Messages follow "Expected X for name but received Y".
 */
import { InvalidOptionError } from './errors.js';
import type { Telemetry } from './telemetry.js';

export type PolicyName = 'sliding' | 'importance' | 'semantic' | 'rolling_summary' | 'hybrid';
export const POLICIES: readonly PolicyName[] = ['sliding', 'importance', 'semantic', 'rolling_summary', 'hybrid'];
export type KvType = 'f16' | 'f32' | 'q8_0';

export interface LoadModelOptions {
  /** Layers to offload to the GPU: a count, or 'auto' (all when a GPU backend is active, else 0). Default 'auto'. */
  gpuLayers?: number | 'auto';
  /** CPU threads used by chats of this model unless a chat overrides it. Default: min(4, cores). */
  threads?: number;
  /** Memory-map the weights (default true). */
  useMmap?: boolean;
}

export interface ChatOptions {
  /** Which tokens leave the KV cache when the budget is full. Default 'sliding'. */
  policy?: PolicyName;
  /** Hard cap on tokens in this chat's KV cache (the context is exactly this size). Default 2048. */
  maxTokens?: number;
  /** Most recent tokens a policy keeps when anything else can go. Default maxTokens / 4. */
  windowSize?: number;
  /** First tokens of the sequence pinned as attention sinks. Default 4. */
  sinkTokens?: number;
  /** System prompt; pinned, never evicted. */
  systemPrompt?: string;
  /** CPU threads for this chat (defaults to the model's). */
  threads?: number;
  /** Max tokens per llama_decode call during prefill. Default 512. */
  batchSize?: number;
  /** KV cache element type. Default 'f16'; 'q8_0' needs flash attention. */
  kvType?: KvType;
  /**
   * Flash attention: true, false, or undefined for llama.cpp's automatic choice. `importance` and
   * `hybrid` turn it off (unless it is forced on) to read attention weights; forced on, they use the
   * key-norm proxy instead (`TurnStats.importanceSignal`).
   */
  flashAttention?: boolean;
  /** importance/hybrid: scores are multiplied by this once per turn. Default 1 (plain sum, as in H2O). */
  importanceDecay?: number;
  /** importance: evict whole low-scoring spans ('span', default: keeps local text coherent) or single tokens ('token', as in H2O). */
  importanceGranularity?: 'span' | 'token';
  /** semantic/hybrid: number of k-means clusters (topics). Default 8. */
  semanticClusters?: number;
  /** semantic/hybrid: longest span (tokens) when splitting history into spans. Default 32. */
  spanMaxTokens?: number;
  /** semantic/hybrid: k-means++ seed. Default 42. */
  policySeed?: number;
  /** rolling_summary/hybrid: longest summary in tokens; 0 turns summaries off in hybrid. Default min(48, maxTokens/8). */
  summaryTokens?: number;
  /** hybrid: share of the kept history chosen by importance; the rest by semantic representatives. Default 0.5. */
  hybridImportanceShare?: number;
  /** Latency guard: a policy that takes longer than this (ms) to choose falls back to sliding. Default 50; 0 disables. */
  maxPolicyMs?: number;
  /** @internal Test hook: makes every policy choice this slow (exercises the latency guard). */
  testPolicyDelayMs?: number;
  /** @internal Test hook: makes every generated token this slow (deterministic mid-turn aborts). */
  testTokenDelayMs?: number;
  /** Hooks called after each turn and eviction (see `Telemetry`, `createPrometheusTelemetry`). */
  telemetry?: Telemetry;
}

export interface SendOptions {
  /** Maximum tokens to generate. Default 256. */
  maxNewTokens?: number;
  /** 0 = greedy. Default 0.8. */
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
  /** 1 disables the penalty (default). */
  repeatPenalty?: number;
  repeatLastN?: number;
  /** Sampler seed (an unsigned 32-bit integer); same seed + same history = same reply. */
  seed?: number;
  /** Generation stops before the first occurrence of any of these strings. */
  stop?: string[];
  /** Receives each streamed piece of text (never a split UTF-8 character). */
  onToken?: (piece: string) => void;
  /** Aborting resolves the turn with stopReason 'abort'; the chat stays usable. */
  signal?: AbortSignal;
}

function describe(v: unknown): string {
  if (typeof v === 'string') return `string ${JSON.stringify(v.length > 40 ? v.slice(0, 40) + '…' : v)}`;
  if (typeof v === 'number') return `number ${v}`;
  if (v === null) return 'null';
  return typeof v;
}

function fail(expected: string, name: string, value: unknown): never {
  throw new InvalidOptionError(`Expected ${expected} for ${name} but received ${describe(value)}`);
}

export function checkObject(name: string, value: unknown): Record<string, unknown> {
  if (value === undefined) return {};
  if (value === null || typeof value !== 'object' || Array.isArray(value)) fail('an object', name, value);
  return value as Record<string, unknown>;
}

export function checkInt(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    fail(`an integer between ${min} and ${max}`, name, value);
  }
  return value;
}

export function checkNumber(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < min || value > max) {
    fail(`a number between ${min} and ${max}`, name, value);
  }
  return value;
}

export function checkString(name: string, value: unknown, maxLength = Number.MAX_SAFE_INTEGER): string {
  if (typeof value !== 'string') fail('a string', name, value);
  if (value.length > maxLength) fail(`a string of at most ${maxLength} characters`, name, value);
  return value;
}

function checkEnum<T extends string>(name: string, value: unknown, allowed: readonly T[]): T {
  if (typeof value !== 'string' || !(allowed as readonly string[]).includes(value)) fail(`one of ${allowed.join(', ')}`, name, value);
  return value as T;
}

function checkKnownKeys(name: string, obj: Record<string, unknown>, known: readonly string[]): void {
  for (const key of Object.keys(obj)) {
    if (!known.includes(key)) {
      throw new InvalidOptionError(`Unknown option ${name}.${key} (known: ${known.join(', ')})`);
    }
  }
}

export const MAX_CONTEXT = 1 << 20;
const MAX_MESSAGE_CHARS = 16 << 20;

export interface ResolvedModelOptions { gpuLayers: number; threads: number; useMmap: boolean }

export function resolveModelOptions(raw: unknown, defaultThreads: number): ResolvedModelOptions {
  const o = checkObject('options', raw);
  checkKnownKeys('options', o, ['gpuLayers', 'threads', 'useMmap']);
  let gpuLayers = -1;
  if (o.gpuLayers !== undefined && o.gpuLayers !== 'auto') gpuLayers = checkInt('gpuLayers', o.gpuLayers, 0, 100000);
  const threads = o.threads === undefined ? defaultThreads : checkInt('threads', o.threads, 1, 1024);
  if (o.useMmap !== undefined && typeof o.useMmap !== 'boolean') fail('a boolean', 'useMmap', o.useMmap);
  return { gpuLayers, threads, useMmap: o.useMmap !== false };
}

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
  semanticClusters: number;
  spanMaxTokens: number;
  policySeed: number;
  summaryTokens: number;
  hybridImportanceShare: number;
  maxPolicyMs: number;
  testPolicyDelayMs?: number;
  testTokenDelayMs?: number;
}

export function resolveChatOptions(raw: unknown, defaultThreads: number): ResolvedChatOptions {
  const o = checkObject('options', raw);
  checkKnownKeys('options', o, [
    'policy', 'maxTokens', 'windowSize', 'sinkTokens', 'systemPrompt', 'threads', 'batchSize', 'kvType', 'flashAttention',
    'importanceDecay', 'importanceGranularity', 'semanticClusters', 'spanMaxTokens', 'policySeed', 'summaryTokens', 'hybridImportanceShare',
    'maxPolicyMs', 'testPolicyDelayMs', 'testTokenDelayMs', 'telemetry',
  ]);
  const policy = o.policy === undefined ? 'sliding' : o.policy;
  if (typeof policy !== 'string' || !(POLICIES as readonly string[]).includes(policy)) {
    fail(`one of ${POLICIES.join(', ')}`, 'policy', policy);
  }
  const maxTokens = o.maxTokens === undefined ? 2048 : checkInt('maxTokens', o.maxTokens, 16, MAX_CONTEXT);
  const windowSize = o.windowSize === undefined ? Math.floor(maxTokens / 4) : checkInt('windowSize', o.windowSize, 0, maxTokens - 1);
  const sinkTokens = o.sinkTokens === undefined ? 4 : checkInt('sinkTokens', o.sinkTokens, 0, Math.floor(maxTokens / 2) - 1);
  const systemPrompt = o.systemPrompt === undefined ? '' : checkString('systemPrompt', o.systemPrompt, MAX_MESSAGE_CHARS);
  const threads = o.threads === undefined ? defaultThreads : checkInt('threads', o.threads, 1, 1024);
  const batchSize = o.batchSize === undefined ? 512 : checkInt('batchSize', o.batchSize, 1, 65536);
  const kvType = o.kvType === undefined ? 'f16' : o.kvType;
  if (kvType !== 'f16' && kvType !== 'f32' && kvType !== 'q8_0') fail("one of 'f16', 'f32', 'q8_0'", 'kvType', kvType);
  if (o.flashAttention !== undefined && typeof o.flashAttention !== 'boolean') fail('a boolean', 'flashAttention', o.flashAttention);
  if (kvType === 'q8_0' && o.flashAttention === false) {
    throw new InvalidOptionError("kvType 'q8_0' needs flash attention (a quantized V cache requires it)");
  }
  const out: ResolvedChatOptions = {
    policy: policy as PolicyName, maxTokens, windowSize, sinkTokens, systemPrompt, threads, batchSize, kvType,
    importanceDecay: o.importanceDecay === undefined ? 1 : checkNumber('importanceDecay', o.importanceDecay, 0, 1),
    importanceGranularity: checkEnum('importanceGranularity', o.importanceGranularity ?? 'span', ['span', 'token'] as const),
    semanticClusters: o.semanticClusters === undefined ? 8 : checkInt('semanticClusters', o.semanticClusters, 1, 4096),
    spanMaxTokens: o.spanMaxTokens === undefined ? 32 : checkInt('spanMaxTokens', o.spanMaxTokens, 1, 4096),
    policySeed: o.policySeed === undefined ? 42 : checkInt('policySeed', o.policySeed, 0, 0xffffffff),
    summaryTokens: o.summaryTokens === undefined ? Math.min(48, Math.floor(maxTokens / 8)) : checkInt('summaryTokens', o.summaryTokens, 0, Math.floor(maxTokens / 4)),
    hybridImportanceShare: o.hybridImportanceShare === undefined ? 0.5 : checkNumber('hybridImportanceShare', o.hybridImportanceShare, 0, 1),
    maxPolicyMs: o.maxPolicyMs === undefined ? 50 : checkNumber('maxPolicyMs', o.maxPolicyMs, 0, 3_600_000),
  };
  if (o.flashAttention !== undefined) out.flashAttention = o.flashAttention as boolean;
  if (o.testPolicyDelayMs !== undefined) out.testPolicyDelayMs = checkNumber('testPolicyDelayMs', o.testPolicyDelayMs, 0, 60_000);
  if (o.testTokenDelayMs !== undefined) out.testTokenDelayMs = checkNumber('testTokenDelayMs', o.testTokenDelayMs, 0, 60_000);
  return out;
}

export interface ResolvedSendOptions {
  maxNewTokens: number;
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repeatPenalty: number;
  repeatLastN: number;
  seed?: number;
  stop: string[];
  onToken?: (piece: string) => void;
  signal?: AbortSignal;
}

export function resolveSendOptions(raw: unknown): ResolvedSendOptions {
  const o = checkObject('options', raw);
  checkKnownKeys('options', o, ['maxNewTokens', 'temperature', 'topK', 'topP', 'minP', 'repeatPenalty', 'repeatLastN', 'seed', 'stop', 'onToken', 'signal']);
  const out: ResolvedSendOptions = {
    maxNewTokens: o.maxNewTokens === undefined ? 256 : checkInt('maxNewTokens', o.maxNewTokens, 0, MAX_CONTEXT),
    temperature: o.temperature === undefined ? 0.8 : checkNumber('temperature', o.temperature, 0, 100),
    topK: o.topK === undefined ? 40 : checkInt('topK', o.topK, 0, 1 << 24),
    topP: o.topP === undefined ? 0.95 : checkNumber('topP', o.topP, 0, 1),
    minP: o.minP === undefined ? 0.05 : checkNumber('minP', o.minP, 0, 1),
    repeatPenalty: o.repeatPenalty === undefined ? 1 : checkNumber('repeatPenalty', o.repeatPenalty, 0.01, 100),
    repeatLastN: o.repeatLastN === undefined ? 64 : checkInt('repeatLastN', o.repeatLastN, 0, MAX_CONTEXT),
    stop: [],
  };
  if (o.seed !== undefined) out.seed = checkInt('seed', o.seed, 0, 0xfffffffe);
  if (o.stop !== undefined) {
    if (!Array.isArray(o.stop) || o.stop.length > 64) fail('an array of at most 64 strings', 'stop', o.stop);
    out.stop = o.stop.map((s, i) => checkString(`stop[${i}]`, s, 1024)).filter((s) => s.length > 0);
  }
  if (o.onToken !== undefined) {
    if (typeof o.onToken !== 'function') fail('a function', 'onToken', o.onToken);
    out.onToken = o.onToken as (piece: string) => void;
  }
  if (o.signal !== undefined) {
    if (!(o.signal instanceof AbortSignal)) fail('an AbortSignal', 'signal', o.signal);
    out.signal = o.signal;
  }
  return out;
}

export function checkMessage(message: unknown): string {
  return checkString('message', message, MAX_MESSAGE_CHARS);
}
