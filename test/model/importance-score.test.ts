// importanceScore 'peak': a token's score is the largest attention weight a query at least 32
// positions later paid it, so the most recent 32 tokens have none yet and older ones do; the
// policy then evicts by it like any score, within the budget.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidOptionError, loadModel, type Model } from '../../src/index.ts';
import { SUMMARY_INSTRUCTION } from '../../scripts/recall/dialogues.ts';
import { THREADS, checkCache, testModelPath } from '../helpers.ts';

const PEAK_MIN_DISTANCE = 32;

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

  it('every scoring keeps the cache within budget; the default is blend', async () => {
    const byDefault = model.createChat({ policy: 'importance' });
    expect(byDefault.options.importanceScore).toBe('blend');
    byDefault.dispose();
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

it('the recall dialogues ask for summaries with the instruction rolling_summary sends', () => {
  const source = readFileSync(join(import.meta.dirname, '..', '..', 'native', 'chat', 'chat.cpp'), 'utf8');
  expect(source).toContain(`SUMMARY_INSTRUCTION = "${SUMMARY_INSTRUCTION}"`);
});
