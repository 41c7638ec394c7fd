// What a step costs as a function of the tokens in it: one llama_decode (one ubatch) of N tokens of
// one chat after 256 tokens of history, on the realistic-geometry model (Qwen2.5-0.5B's shape), N
// from 1 (a lone decode step) to 512. On the CPU the cost per token stops falling at about 32 tokens:
// past that a step's size only trades its length against the number of steps, and what decides a
// scheduler's cost is how many ubatches its steps split into (docs/memory.md, "Many chats").
//   npx tsx bench/step-cost.ts [--no-write]
import { availableParallelism } from 'node:os';
import { loadModel } from '../src/index.ts';
import { machine, median, realisticModel, writeResultsSection } from './common.ts';

const SIZES = [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512];
const REPS = 5;
const HISTORY = 256;

async function main() {
  const m = realisticModel();
  const threads = availableParallelism();
  const model = await loadModel(m.path, { threads, slots: 1 });
  const words = model.tokenize(' the cat sat on the mat and looked at the sea while the rain fell'.repeat(60));
  const times = new Map<number, number[]>(SIZES.map((n) => [n, []]));
  for (let rep = 0; rep < REPS; rep++) {
    // Sizes in a different order each repetition: this machine's speed drifts over minutes.
    const order = rep % 2 ? [...SIZES].reverse() : SIZES;
    for (const n of order) {
      const chat = model.createChat({ maxTokens: 2048, flashAttention: false, batchSize: 512, policy: 'sliding' });
      chat._internals().evaluateTokens(words.slice(0, HISTORY), HISTORY);
      const t0 = performance.now();
      chat._internals().evaluateTokens(words.slice(HISTORY, HISTORY + n), n);
      times.get(n)!.push(performance.now() - t0);
      chat.dispose();
    }
  }
  model.dispose();
  const one = median(times.get(1)!);
  const full = median(times.get(512)!) / 512;
  const rows = SIZES.map((n) => {
    const ms = median(times.get(n)!);
    return `| ${n} | ${ms.toFixed(1)} | ${(ms / n).toFixed(2)} | ${(ms / one).toFixed(2)}x | ${(ms / n / full).toFixed(2)}x |`;
  });
  const out = [
    '## What a step costs by its size (`npx tsx bench/step-cost.ts`)',
    '',
    `- machine: ${machine()}`,
    `- model: ${m.name}: ${m.about}; ${threads} threads, flash attention off, one chat with ${HISTORY} tokens of history; one llama_decode of N tokens (one ubatch), timed from JS around evaluateTokens: the scheduler round trip and every row's logits copied to JS included (a 1-token step here is 2-3 ms above a bare decode step), median of ${REPS}`,
    '',
    '| tokens in the step | ms | ms a token | vs a 1-token step | ms a token vs a 512-token step |',
    '|---|---|---|---|---|',
    ...rows,
  ].join('\n');
  console.log(out);
  if (!process.argv.includes('--no-write')) writeResultsSection('step-cost', out);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
