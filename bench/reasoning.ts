// A reasoning model's conversation in a finite budget: what pastReasoning keeps and what it costs.
// Every reply is the same think block and answer (the testReply hook of the test build: random
// weights reason about nothing, so the reply's tokens are fixed and each mode decodes exactly the
// same ones), on a Qwen3-0.6B-shaped model. Side by side, turn by turn round-robin (load from other
// processes hits all alike), the three modes of pastReasoning with the sliding policy:
//   - how much of the conversation the budget still holds at the end (turns whose question and answer
//     are both whole in the cache; the oldest such turn),
//   - how much of the budget earlier replies' reasoning takes,
//   - turn latency, time to first token (which includes 'drop''s eviction at the turn's start) and
//     the time spent evicting.
//   npx tsx bench/reasoning.ts [--no-write] [--turns 12]
import { availableParallelism } from 'node:os';
import { parseArgs } from 'node:util';
import { writeModel, type ModelInput } from '../src/gguf/index.ts';
import { loadModel, type Chat, type TurnResult } from '../src/index.ts';
import { cachedModel, machine, median, writeResultsSection } from './common.ts';

/** Qwen3-0.6B's geometry (28 layers, n_embd 1024, 16/8 heads x 128, FFN 3072) with this project's small vocabulary. */
const QWEN3_06B_MODEL: ModelInput = { family: 'qwen3', layers: 28, embd: 1024, heads: 16, kvHeads: 8, headDim: 128, ffn: 3072, type: 'q8_0', ctx: 40960, seed: 1 };

const { values } = parseArgs({ options: { 'no-write': { type: 'boolean' }, turns: { type: 'string' } } });
const TURNS = Number(values.turns ?? 12);
const MAX_TOKENS = 768;
const MODES = ['drop', 'first', 'keep'] as const;
const THOUGHT = 'The user asks about the weather again, so I should recall what they said before and answer in one short line. ';
const REPLY = `<think>\n${THOUGHT.repeat(5)}\n</think>\n\nIt will be sunny and warm by the sea this afternoon, and the wind stays light.`;
const QUESTIONS = ['What will the weather be like by the sea today?', 'And what about the wind this afternoon?', 'Should I take a coat with me?'];

interface Row {
  mode: (typeof MODES)[number];
  turns: TurnResult[];
  held: number;
  oldestHeld: number;
  reasoningAtEnd: number;
  retained: number;
}

/** Tokens of each role a turn had (a map turn -> count), from a chat's memory. */
function counts(chat: Chat, role: 'user' | 'assistant'): Map<number, number> {
  const m = new Map<number, number>();
  for (const e of chat.memory()) if (e.role === role) m.set(e.turn, (m.get(e.turn) ?? 0) + 1);
  return m;
}

/** Turns (counted back from `last`) whose question and answer are both whole: as many tokens as they had when complete. */
function heldTurns(chat: Chat, last: number, whole: { user: Map<number, number>; assistant: Map<number, number> }): { held: number; oldest: number } {
  const user = counts(chat, 'user');
  const assistant = counts(chat, 'assistant');
  let held = 0;
  let oldest = 0;
  for (let t = last; t >= 1; t--) {
    if (user.get(t) !== whole.user.get(t) || assistant.get(t) !== whole.assistant.get(t)) break;
    held++;
    oldest = t;
  }
  return { held, oldest };
}

async function main() {
  const path = cachedModel('qwen3-0.6b-shape-q8_0-seed1.gguf', (p) => writeModel(p, QWEN3_06B_MODEL));
  const threads = availableParallelism();
  const model = await loadModel(path, { threads, slots: MODES.length });
  const chats = MODES.map((pastReasoning) => model.createChat({ maxTokens: MAX_TOKENS, policy: 'sliding', pastReasoning, testReply: REPLY, systemPrompt: 'You are terse.' }));
  const rows: Row[] = MODES.map((mode) => ({ mode, turns: [], held: 0, oldestHeld: 0, reasoningAtEnd: 0, retained: 0 }));
  // The sizes of whole turns: a question once prefilled, an answer once its closing is in (at the
  // next turn), the largest any chat had (the same tokens in every chat; 'drop' evicts none of them).
  const whole = { user: new Map<number, number>(), assistant: new Map<number, number>() };
  const note = (into: Map<number, number>, from: Map<number, number>, turn: number) => into.set(turn, Math.max(into.get(turn) ?? 0, from.get(turn) ?? 0));
  for (let t = 0; t < TURNS; t++) {
    for (let i = 0; i < chats.length; i++) {
      const r = await chats[i]!.send(QUESTIONS[t % QUESTIONS.length]!, { maxNewTokens: 1024 });
      rows[i]!.turns.push(r);
      note(whole.user, counts(chats[i]!, 'user'), t + 1);
      note(whole.assistant, counts(chats[i]!, 'assistant'), t);
    }
    console.log(`turn ${t + 1}: ${rows.map((r) => `${r.mode} ${r.turns.at(-1)!.stats.latencyMs.toFixed(0)} ms, ${r.turns.at(-1)!.stats.retainedTokens} retained`).join('; ')}`);
  }
  for (let i = 0; i < chats.length; i++) {
    const { held, oldest } = heldTurns(chats[i]!, TURNS - 1, whole);
    const row = rows[i]!;
    row.held = held;
    row.oldestHeld = oldest;
    row.reasoningAtEnd = chats[i]!.memory().filter((e) => e.role === 'reasoning' && e.turn < TURNS).length;
    row.retained = chats[i]!.stats().tokensRetained;
  }
  const info = model.info;
  const generated = rows[0]!.turns[0]!.stats.generatedTokens;
  const thought = chats[0]!.memory().filter((e) => e.role === 'reasoning' && e.turn === TURNS).length;
  for (const c of chats) c.dispose();
  model.dispose();

  // Latency over the turns where every chat's budget was full or reasoning was being dropped (turn 4 on).
  const from = Math.min(3, TURNS - 1);
  const med = (r: Row, f: (x: TurnResult) => number) => median(r.turns.slice(from).map(f));
  const base = rows[MODES.indexOf('keep')]!;
  const lines = rows.map((r) =>
    `| ${r.mode} | ${r.held} of ${TURNS - 1} (from turn ${r.oldestHeld || '-'}) | ${r.reasoningAtEnd} | ${r.retained} | ${med(r, (x) => x.stats.latencyMs).toFixed(0)} | ` +
    `${med(r, (x) => x.stats.firstTokenMs).toFixed(0)} | ${med(r, (x) => x.stats.evictMs).toFixed(2)} | ` +
    `${(r.held / Math.max(1, base.held)).toFixed(2)}x | ${(med(r, (x) => x.stats.latencyMs) / med(base, (x) => x.stats.latencyMs)).toFixed(2)}x |`);
  const out = [
    "## A reasoning model's conversation: pastReasoning (`npx tsx bench/reasoning.ts`)",
    '',
    `- machine: ${machine()}`,
    `- model: Qwen3-0.6B geometry (28 layers, n_embd 1024, 16/8 heads x 128, FFN 3072, Q8_0, seeded random weights, this project's vocabulary: ${(info.nParams / 1e6).toFixed(0)}M parameters), ${threads} threads, ${info.backend}`,
    `- ${TURNS} turns, maxTokens ${MAX_TOKENS}, policy sliding, round-robin across the modes; every reply is the same ${generated} tokens (testReply), ${thought} of them reasoning (its think block and markers)`,
    `- held: turns whose question and answer are both whole in the cache at the end (counted back from the last finished one); latency columns: medians over turns ${from + 1}-${TURNS}`,
    '',
    '| pastReasoning | turns held | earlier reasoning tokens in the cache | retained tokens | turn ms | first token ms | evict ms / turn | held / keep | turn ms / keep |',
    '|---|---|---|---|---|---|---|---|---|',
    ...lines,
  ].join('\n');
  console.log(out);
  if (!values['no-write']) writeResultsSection('reasoning', out);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
