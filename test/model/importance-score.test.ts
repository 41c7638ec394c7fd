// importanceScore 'peak': a token's score is the largest attention weight a distant query paid it:
// one at least 32 positions later, or with two whole messages between them when one head gave it at
// least 0.9 (engine/signals.h). So
// the recent tokens of the last three messages have none yet and older ones do; the policy then
// evicts by it like any score, within the budget.
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeModel, type ModelInput } from '../../src/gguf/index.ts';
import { InvalidOptionError, loadModel, type ChatOptions, type MemoryEntry, type Model } from '../../src/index.ts';
import { SUMMARY_INSTRUCTION } from '../../scripts/recall/dialogues.ts';
import { THREADS, checkCache, testDir, testModelPath } from '../helpers.ts';

const PEAK_MIN_DISTANCE = 32;
const PEAK_MESSAGES_BETWEEN = 2;
const PEAK_NEAR_LOOKUP_WEIGHT = 0.9;

/** Each entry's message (a run of one turn and role), numbered from 0. */
const messageOf = (memory: MemoryEntry[]): number[] => {
  let n = -1;
  return memory.map((e, i) => (i === 0 || e.turn !== memory[i - 1]!.turn || e.role !== memory[i - 1]!.role ? ++n : n));
};

let model: Model;
beforeAll(async () => {
  model = await loadModel(testModelPath(), { threads: THREADS });
});
afterAll(() => model?.dispose());

describe("importanceScore: 'peak'", () => {
  it('scores only what a distant query attended to, with the 32-position rule', async () => {
    const chat = model.createChat({ policy: 'importance', importanceScore: 'peak', maxTokens: 1024, threads: THREADS });
    for (let i = 0; i < 6; i++) await chat.send(`message ${i}: the river runs past the old mill and the bridge`, { temperature: 0, maxNewTokens: 8 });
    const memory = chat.memory();
    // The last token in memory was the last query (the final sampled token is carried, not decoded).
    const lastQuery = memory.length - 1;
    const young = memory.filter((e) => lastQuery - e.position < PEAK_MIN_DISTANCE);
    const old = memory.filter((e) => lastQuery - e.position > PEAK_MIN_DISTANCE);
    expect(young.length).toBeGreaterThan(10);
    expect(young.every((e) => e.score === 0)).toBe(true);
    expect(old.filter((e) => e.score > 0).length).toBeGreaterThan(old.length * 0.9);
    // A weight is at most 1.
    expect(Math.max(...memory.map((e) => e.score))).toBeLessThanOrEqual(1);
    expect(chat.options.importanceScore).toBe('peak');
    chat.dispose();
  });

  it('a query two whole messages later counts inside 32 positions only for a copy (one head >= 0.9); nearer ones never', async () => {
    const chat = model.createChat({ policy: 'importance', importanceScore: 'peak', maxTokens: 1024, threads: THREADS });
    for (let i = 0; i < 12; i++) await chat.send(`note ${i}`, { temperature: 0, maxNewTokens: 2 });
    const memory = chat.memory();
    const message = messageOf(memory);
    const lastQuery = memory.length - 1;
    const young = memory.map((e, i) => ({ e, m: message[i]! })).filter(({ e }) => lastQuery - e.position < PEAK_MIN_DISTANCE);
    // The last query's message and the two before it: neighbours, no peak.
    const near = young.filter(({ m }) => message[lastQuery]! - m <= PEAK_MESSAGES_BETWEEN);
    // Older messages inside 32 positions: a peak only where a query two whole messages later copied
    // (on this random model, none; test/model/recall-model.test.ts has a reply that copies a fact).
    const past = young.filter(({ m }) => message[lastQuery]! - m > PEAK_MESSAGES_BETWEEN);
    expect(near.length).toBeGreaterThan(4);
    expect(past.length).toBeGreaterThan(4);
    expect(near.every(({ e }) => e.score === 0)).toBe(true);
    expect(past.every(({ e }) => e.score === 0 || e.score >= PEAK_NEAR_LOOKUP_WEIGHT)).toBe(true);
    chat.dispose();
  });

  it('every scoring keeps the cache within budget; the default is importance with blend', async () => {
    const byDefault = model.createChat();
    // importance on the CPU; sliding on a GPU (a CUDA build offloads by default).
    expect(byDefault.options.policy).toBe(model.info.backend === 'cpu' ? 'importance' : 'sliding');
    expect(byDefault.options.importanceScore).toBe('blend');
    byDefault.dispose();
    // With flash attention on too: its weights are recomputed (the same recall: RESULTS "Recall, contenders compared").
    const on = model.createChat({ flashAttention: true });
    expect(on.options.policy).toBe(model.info.backend === 'cpu' ? 'importance' : 'sliding');
    on.dispose();
    const off = model.createChat({ flashAttention: false });
    expect(off.options.policy).toBe(model.info.backend === 'cpu' ? 'importance' : 'sliding');
    off.dispose();
    for (const importanceScore of ['mean', 'peak', 'blend'] as const) {
      const chat = model.createChat({ policy: 'hybrid', importanceScore, maxTokens: 128, windowSize: 32, threads: THREADS });
      for (let i = 0; i < 20; i++) await chat.send(`turn ${i} about lanterns and rivers`, { temperature: 0, maxNewTokens: 6 });
      checkCache(chat, 128);
      expect(chat.stats().tokensEvicted).toBeGreaterThan(0);
      chat.dispose();
    }
    expect(() => model.createChat({ importanceScore: 'max' as never })).toThrow(InvalidOptionError);
  });
});

/** Writes `input` into the tests' temp dir and loads it for `body`; disposes and deletes it after. */
async function withWrittenModel(file: string, input: ModelInput, body: (m: Model) => Promise<void>): Promise<void> {
  const path = join(testDir, file);
  writeModel(path, input);
  const m = await loadModel(path, { threads: THREADS });
  try {
    await body(m);
  } finally {
    m.dispose();
    rmSync(path, { force: true });
  }
}

/** Ten importance turns past a 64-token budget, each scored by `signal`: the unpinned tokens' scores. */
async function tenImportanceTurns(m: Model, options: ChatOptions, signal: 'attention' | 'keyNorm'): Promise<number[]> {
  const chat = m.createChat({ policy: 'importance', maxTokens: 64, windowSize: 16, ...options });
  for (let i = 0; i < 10; i++) {
    const r = await chat.send(`turn ${i} about lanterns and rivers`, { maxNewTokens: 6, temperature: 0 });
    expect(r.stats.importanceSignal).toBe(signal);
  }
  checkCache(chat, 64);
  expect(chat.stats().evictions).toBeGreaterThan(0);
  const scores = chat.memory().filter((e) => !e.pinned).map((e) => e.score);
  chat.dispose();
  return scores;
}

it("importance with kvType 'q8_0' reads attention weights (recomputed under the flash attention it needs)", async () => {
  await withWrittenModel('heads32.gguf', { family: 'llama', headDim: 32, seed: 3 }, async (heads32) => {
    // Attention received: at least zero, some above.
    const scores = await tenImportanceTurns(heads32, { kvType: 'q8_0' }, 'attention');
    expect(scores.every((x) => x >= 0)).toBe(true);
    expect(scores.some((x) => x > 0)).toBe(true);
  });
});

it('a model whose every attention layer slides scores by key norms (its weights index the window cache)', async () => {
  // llama.cpp: layer il slides unless il % pattern == pattern - 1; a pattern past the last layer slides them all.
  await withWrittenModel('gemma3-all-sliding.gguf', { family: 'gemma3', swaPattern: 64, seed: 3 }, async (allSliding) => {
    // Key norms are negated (low norm = high score): the scores are below zero, attention sums are not.
    const scores = await tenImportanceTurns(allSliding, {}, 'keyNorm');
    expect(scores.every((x) => x <= 0)).toBe(true);
    // importanceDecay ages attention only: a decayed key norm moved toward 0, the best score.
    expect(await tenImportanceTurns(allSliding, { importanceDecay: 0.5 }, 'keyNorm')).toEqual(scores);
    // Not by default: the proxy kept fewer facts than sliding (docs/models.md).
    const byDefault = allSliding.createChat();
    expect(byDefault.options.policy).toBe('sliding');
    byDefault.dispose();
  });
});

it('the recall dialogues ask for summaries with the instruction rolling_summary sends', () => {
  const source = readFileSync(join(import.meta.dirname, '..', '..', 'native', 'chat', 'chat.cpp'), 'utf8');
  expect(source).toContain(`SUMMARY_INSTRUCTION = "${SUMMARY_INSTRUCTION}"`);
});
