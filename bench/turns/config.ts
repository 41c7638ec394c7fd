// bench/turns.ts: its flags, the fixed parameters of a run, the prompts, result types and small helpers.
import { GENERATED_MODEL } from '../common.ts';
import type { LlamaModelInput } from '../../src/gguf/index.ts';
import { type PolicyName } from '../../src/index.ts';


export const args = process.argv.slice(2);
export const QUICK = args.includes('--quick');
export const WRITE = !args.includes('--no-write') && !QUICK && !args.some((a) => a.startsWith('--model='));
/** --model=generated|stories260K runs one model only (for development; implies --no-write). */
export const ONLY_MODEL = args.find((a) => a.startsWith('--model='))?.slice('--model='.length);

/**
 * --threads=N sets the thread count of every contender (default 1). Why 1: on this 2-vCPU VM, 2 threads
 * stall in ggml's spin barrier so often that a run on 2026-11-25 redid 336 of 672 measured turns (223
 * kept anyway), while a 1-thread run the same afternoon redid 39 of 375 and kept none dirty.
 */
export const THREADS = Number(args.find((a) => a.startsWith('--threads='))?.slice('--threads='.length) ?? 1);
if (!Number.isInteger(THREADS) || THREADS < 1) throw new Error(`--threads must be a positive integer, got ${THREADS}`);
export const MAX_NEW = 32;
export const BUDGETS = QUICK ? [512] : [2048, 512];
export const MEASURED = QUICK ? 3 : 12;
export const WARMUP_AFTER_EVICT = QUICK ? 1 : 3;
export const MAX_WARMUP = 400;
export const PLAIN_RUNS = QUICK ? 3 : 7;
/** A measured turn (or plain-decode run) is redone when other processes used more than this share of the machine's CPU... */
export const MAX_OTHER_CPU = 0.05;
export const MAX_REDOS_PER_CONTENDER = MEASURED;
/** ...or when the calibration probe around it ran this much slower than its best (see Calibrator). */
export const SLOW_FACTOR = 2;
export const SYSTEM_PROMPT = 'You are a helpful assistant. Answer briefly and stay on topic.';
export const NLC_VERSION = '3.21.1';

export const GENERATED: LlamaModelInput = GENERATED_MODEL;

// User messages, cycled in order (turn i gets PROMPTS[i % PROMPTS.length]); similar lengths on purpose.
export const PROMPTS = [
  'Tell me about the weather in Paris in the spring and what to wear when walking along the river.',
  'What are three good books about the history of science, and why should I read each of them?',
  'My tomato plants have yellow leaves at the bottom. What could cause that and how do I fix it?',
  'Explain the difference between a list and a set in Python, with a short example of each one.',
  'I want to run five kilometres without stopping by the end of next month. How should I train?',
  'Write a short story about a robot who learns to paint the sea at night in a small fishing town.',
  'Which is better for a small team, a monorepo or many small repositories? Give the main trade-offs.',
  'How do I make a simple bread at home with flour, water, salt and yeast, and how long does it rise?',
  'Summarise what we have talked about so far, then suggest one new topic that we have not covered.',
  'What should I pack for a three day hiking trip in the mountains in autumn when it may rain a lot?',
  'Explain how a heat pump can warm a house in winter when the air outside is colder than inside.',
  'Give me a plan for learning to play the guitar, thirty minutes a day, for the next eight weeks.',
];

// ---------------------------------------------------------------------------------------------------
// Result types

export interface Turn {
  ms: number;
  /** Time to the first generated token: eviction + prefill (+ replay for re-prefill) + first sample. */
  ttftMs: number;
  promptTokens: number;
  generated: number;
  /** ours: decode steps (llama_decode calls) in decodeMs; generation ms for the decode comparison. */
  decodeSteps?: number;
  decodeMs?: number;
  wallMs?: number;
  /** node-llama-cpp: the turn re-evaluated the history after a context shift. */
  shifted?: boolean;
}

export interface DecodeCheck {
  oursMsPerStep: number;
  plainMsPerStep: number;
  /** generated tokens / decodeMs, as TurnStats.tokensPerSecond reports it (one fewer decode than tokens on maxTokens stops). */
  oursReportedTps: number;
  /** (max - min) / median of the plain runs: how noisy the machine was. */
  plainSpread: number;
}

export interface Result {
  model: string;
  contender: string;
  kind: 'ours' | 'reprefill' | 'nlc';
  policy?: PolicyName;
  /** A policy's non-default options, as the tables print them after its name (e.g. "(summaryEvictTokens 512)"). */
  variant?: string;
  maxTokens: number;
  warmupTurns: number;
  turns: Turn[];
  decode?: DecodeCheck;
  decodeError?: string;
  note?: string;
  error?: string;
}

/** The policy as a table row names it: with its variant's options. */
export const policyLabel = (r: Result): string => `${r.policy}${r.variant ? ` ${r.variant}` : ''}`;

export interface ModelSpec {
  name: string;
  path: string;
  shape: string;
  /** Budgets for this model (default BUDGETS). */
  budgets?: number[];
}

// ---------------------------------------------------------------------------------------------------
// Small helpers

export function p90(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s[Math.max(0, Math.ceil(0.9 * s.length) - 1)]!;
}

export function mean(xs: number[]): number {
  return xs.length === 0 ? NaN : xs.reduce((a, b) => a + b, 0) / xs.length;
}

export function fmt(v: number, digits = 1): string {
  return Number.isFinite(v) ? v.toFixed(digits) : 'n/a';
}

export function errorText(err: unknown): string {
  const e = err as { code?: string; message?: string };
  return `${e?.code ? e.code + ': ' : ''}${e?.message ?? String(err)}`.split('\n')[0]!;
}

export function prompt(i: number): string {
  return PROMPTS[i % PROMPTS.length]!;
}

export function log(msg: string): void {
  process.stderr.write(msg + '\n');
}

