// Shared helpers for benchmarks: setup printing, medians, RESULTS.md sections.
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { writeLlamaModel, writeModel, type LlamaModelInput, type ModelInput } from '../src/gguf/index.ts';
import type { ChatOptions } from '../src/index.ts';

export const ROOT = join(import.meta.dirname, '..');
// Benchmarks use the test build of the addon (the shipped one plus probes); the binding loads lazily.
process.env.FML_ADDON_PATH ??= join(ROOT, 'build', 'Probes', 'finite_memory_llm_probes.node');
export const SHARED_MODELS = process.env.FML_SHARED_MODELS ?? join(ROOT, '..', 'shared', 'models');

/** The benchmarks' generated model: big enough that attention and matmuls dominate a step, seeded. */
export const GENERATED_MODEL: LlamaModelInput = { layers: 8, embd: 256, heads: 8, kvHeads: 4, headDim: 32, ffn: 512, type: 'f16', ctx: 4096, seed: 1 };

/**
 * Realistic geometry: Qwen2.5-0.5B's shape (24 layers, n_embd 896, 14 query / 2 KV heads x 64, FFN
 * 4864, Q8_0; ~360M parameters with this vocabulary), seeded random weights. On a 5M-parameter model
 * a turn is all overhead; this one costs what users pay per token.
 */
export const REALISTIC_MODEL: LlamaModelInput = { layers: 24, embd: 896, heads: 14, kvHeads: 2, headDim: 64, ffn: 4864, type: 'q8_0', ctx: 32768, seed: 1 };

/**
 * A hybrid with Qwen3.5-2B's shape (its published config: 24 layers, n_embd 2048, every 4th layer gated
 * attention with 8 query / 2 KV heads x 256 and 64 rotary dims (interleaved M-RoPE), the others Gated
 * DeltaNet with 16 key and 16 value heads of 128, FFN 6144, Q8_0), seeded random weights and this
 * project's small vocabulary (Qwen's 248k-token output layer would add 0.5B parameters).
 */
export const QWEN35_2B_MODEL: ModelInput = {
  family: 'qwen35', layers: 24, embd: 2048, heads: 8, kvHeads: 2, headDim: 256, ropeDims: 64, ffn: 6144, attentionInterval: 4,
  ssmStateSize: 128, ssmGroups: 16, ssmHeads: 16, convKernel: 4, type: 'q8_0', ctx: 262144, seed: 1,
};

/** Writes (once; about a minute) the Qwen3.5-2B-shaped hybrid into the git-ignored .cache/ and returns its path. */
export function qwen35Model(): { name: string; path: string; about: string } {
  const path = cachedModel('qwen3.5-2b-shape-q8_0-seed1.gguf', (p) => writeModel(p, QWEN35_2B_MODEL));
  return {
    name: 'qwen3.5-2b-shape',
    path,
    about: '24 layers (18 Gated DeltaNet + 6 gated attention, 8/2 heads x 256, 64 rotary dims, IMROPE), n_embd 2048, DeltaNet 16/16 heads x 128, FFN 6144, Q8_0, seeded random weights (Qwen3.5-2B geometry)',
  };
}

/** A generated model written once into the git-ignored .cache/models/ (by `write`), its path. */
export function cachedModel(file: string, write: (path: string) => void): string {
  const path = join(ROOT, '.cache', 'models', file);
  if (!existsSync(path)) {
    mkdirSync(dirname(path), { recursive: true });
    const t0 = performance.now();
    write(`${path}.tmp`);
    renameSync(`${path}.tmp`, path);
    console.log(`wrote ${path} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  }
  return path;
}

/** Writes (once; ~20 s) the realistic-geometry model into the git-ignored .cache/ and returns its path. */
export function realisticModel(): { name: string; path: string; about: string } {
  const path = cachedModel('qwen2.5-0.5b-shape-q8_0-seed1.gguf', (p) => writeLlamaModel(p, REALISTIC_MODEL));
  return { name: 'qwen2.5-0.5b-shape', path, about: '24 layers, n_embd 896, 14/2 heads x 64, FFN 4864, Q8_0, seeded random weights (Qwen2.5-0.5B geometry)' };
}

/**
 * The two small models the CPU benchmarks compare on: the generated one (written to the temp dir as
 * `file`) and the trained stories260K when ../shared/models has it (skipped with a message otherwise).
 */
export function smallModels(file: string): { name: string; path: string; about: string }[] {
  const models: { name: string; path: string; about: string }[] = [];
  const path = join(tmpdir(), file);
  writeLlamaModel(path, GENERATED_MODEL);
  const g = GENERATED_MODEL;
  models.push({ name: 'generated', path, about: `${g.layers} layers, ${g.kvHeads} KV heads x head dim ${g.headDim}, ${g.type?.toUpperCase()}, seeded random weights` });
  const stories = join(SHARED_MODELS, 'stories260K.gguf');
  if (existsSync(stories)) models.push({ name: 'stories260K', path: stories, about: '5 layers, 4 KV heads x head dim 8, trained' });
  else console.log(`stories260K skipped: ${stories} not found`);
  return models;
}

export function machine(): string {
  const cpu = cpus()[0]?.model ?? 'unknown CPU';
  let commit = 'uncommitted';
  try {
    commit = execFileSync('git', ['-C', ROOT, 'rev-parse', '--short', 'HEAD']).toString().trim();
  } catch {}
  return `${cpus().length} x ${cpu}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, node ${process.version}, llama.cpp v0.4.0 (80fb11a), finite-memory-llm ${commit}`;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

/** Replaces (or appends) the section between <!-- name:start --> and <!-- name:end --> in bench/RESULTS.md. */
export function writeResultsSection(name: string, body: string): void {
  const file = join(ROOT, 'bench', 'RESULTS.md');
  let text = existsSync(file) ? readFileSync(file, 'utf8') : '# Benchmark results\n\nEvery table here is written by the command shown above it; rerun it to reproduce.\n';
  const start = `<!-- ${name}:start -->`;
  const end = `<!-- ${name}:end -->`;
  const block = `${start}\n${body.trim()}\n${end}`;
  const a = text.indexOf(start);
  const b = text.indexOf(end);
  text = a >= 0 && b > a ? text.slice(0, a) + block + text.slice(b + end.length) : `${text.trimEnd()}\n\n${block}\n`;
  writeFileSync(file, text);
}

/** A chat configuration a benchmark compares, under the label its tables print. */
export interface Contender {
  label: string;
  options: ChatOptions;
  /** Options that scale with the budget a bench gives the chat (added to `options`). */
  perBudget?: (maxTokens: number) => ChatOptions;
}

/** The contender's options at a budget. */
export const contenderOptions = (c: Contender, maxTokens: number): ChatOptions => ({ ...c.options, ...c.perBudget?.(maxTokens), maxTokens });

/**
 * summaryEvictTokens maxTokens / 4: a summary every few turns instead of at every one. The summarizing
 * policies run with it too in bench:recall and bench:quality (what it costs) and bench/turns.ts (what it buys).
 */
export const SUMMARY_EVICT_VARIANT = { label: '(summaryEvictTokens maxTokens / 4)', perBudget: (maxTokens: number): ChatOptions => ({ summaryEvictTokens: Math.floor(maxTokens / 4) }) };
export const SUMMARY_EVICT_POLICIES = ['rolling_summary', 'hybrid'] as const;
const summaryEvery = (policy: (typeof SUMMARY_EVICT_POLICIES)[number]): Contender =>
  ({ label: `${policy} ${SUMMARY_EVICT_VARIANT.label}`, options: { policy }, perBudget: SUMMARY_EVICT_VARIANT.perBudget });

/**
 * What bench:recall and bench:quality compare (sliding first: the baseline of their ratios): every
 * policy with its defaults, plus the variants that explain the results.
 */
export const POLICY_CONTENDERS: readonly Contender[] = [
  { label: 'sliding', options: { policy: 'sliding' } },
  { label: 'importance', options: { policy: 'importance' } },
  { label: "importance (importanceScore 'mean')", options: { policy: 'importance', importanceScore: 'mean' } },
  { label: "importance (importanceScore 'peak')", options: { policy: 'importance', importanceScore: 'peak' } },
  { label: 'importance (token granularity, H2O-style)', options: { policy: 'importance', importanceGranularity: 'token' } },
  { label: 'semantic', options: { policy: 'semantic' } },
  { label: 'rolling_summary', options: { policy: 'rolling_summary' } },
  summaryEvery('rolling_summary'),
  { label: 'hybrid', options: { policy: 'hybrid' } },
  { label: "hybrid (importanceScore 'mean')", options: { policy: 'hybrid', importanceScore: 'mean' } },
  { label: "hybrid (importanceScore 'peak')", options: { policy: 'hybrid', importanceScore: 'peak' } },
  { label: 'hybrid (no summary)', options: { policy: 'hybrid', summaryTokens: 0 } },
  summaryEvery('hybrid'),
];

/** A `--contenders '[{...}, ...]'` argument: chat options, each labelled by its JSON (quick comparisons). */
export function contendersFromJson(json: string): Contender[] {
  return (JSON.parse(json) as ChatOptions[]).map((options) => ({ label: JSON.stringify(options), options }));
}
