// The recall-trained model (npm run make-recall-model; git-ignored .cache/models/). Skipped with a
// message when it has not been built: training takes about 12 minutes, too long for npm test.
// FML_RECALL_MODEL=FILE runs it on another one (an experiment written with make-recall-model --check 0).
import { existsSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { loadModel } from '../../src/index.ts';
import { defaultRecallModelPath } from '../../scripts/make-recall-model.ts';
import { RECALL_SYSTEM_PROMPT, benchConversation, factTurn, isCorrectAnswer, questionTurn } from '../../scripts/recall/dialogues.ts';
import { THREADS } from '../helpers.ts';

const path = process.env.FML_RECALL_MODEL ?? defaultRecallModelPath();
const present = existsSync(path);
if (!present) console.warn(`[recall-model] skipping: ${path} not built (npm run make-recall-model)`);

const GREEDY = { temperature: 0, maxNewTokens: 8 } as const;

describe.skipIf(!present)('the recall model', () => {
  it('a pinned fact outlives sliding eviction and is recalled; unpinned, it is gone', async () => {
    const model = await loadModel(path, { threads: THREADS });
    const c = benchConversation(123_456, { facts: 2, asked: 0, askedTimes: 0, fillers: 12, tailFillers: 0 });
    const fact = c.facts[0]!;
    const run = async (pin: boolean) => {
      const chat = model.createChat({ maxTokens: 128, systemPrompt: RECALL_SYSTEM_PROMPT, policy: 'sliding' });
      const first = await chat.send(c.turns[0]!.user, { ...GREEDY, pin });
      for (const turn of c.turns.slice(1).filter((t) => t.kind !== 'question')) await chat.send(turn.user, GREEDY);
      const inMemory = chat.memory().some((e) => e.turn === first.stats.turn && e.role === 'user');
      const answer = await chat.send(questionTurn(fact, 0).user, GREEDY);
      chat.dispose();
      return { inMemory, correct: isCorrectAnswer(answer.response, fact) };
    };
    const pinned = await run(true);
    expect(pinned.inMemory).toBe(true);
    expect(pinned.correct).toBe(true);
    const unpinned = await run(false);
    expect(unpinned.inMemory).toBe(false);
    model.dispose();
  });

  it('a reply copying a fact stated just before the question marks it, inside 32 positions; its neighbours not', async () => {
    // importanceScore 'peak' shows the peak itself: the largest weight a distant query paid a token,
    // where a query two whole messages later is distant when one head gave the key >= 0.9 (a copy).
    const model = await loadModel(path, { threads: THREADS });
    const facts = [{ name: 'Ezra', code: '9743' }, { name: 'Vera', code: '4013' }];
    const chat = model.createChat({ maxTokens: 512, systemPrompt: RECALL_SYSTEM_PROMPT, policy: 'importance', importanceScore: 'peak' });
    for (const [i, f] of facts.entries()) await chat.send(factTurn(f, i).user, GREEDY);
    const answer = await chat.send(questionTurn(facts[1]!, 1).user, GREEDY);
    expect(isCorrectAnswer(answer.response, facts[1]!)).toBe(true);
    const memory = chat.memory();
    const last = memory.at(-1)!.position;
    const factTokens = memory.filter((e) => e.turn === 2 && e.role === 'user' && /\d/.test(e.text));
    expect(factTokens.length).toBeGreaterThan(0);
    expect(factTokens.every((e) => last - e.position < 32)).toBe(true);   // no query was 32 positions away
    expect(Math.max(...factTokens.map((e) => e.score))).toBeGreaterThanOrEqual(0.9);
    // The reply before the question and the question: read by every query after them, never a peak.
    const neighbours = memory.filter((e) => (e.turn === 2 && e.role === 'assistant') || e.turn === 3);
    expect(neighbours.every((e) => e.score === 0)).toBe(true);
    chat.dispose();
    model.dispose();
  });
});
