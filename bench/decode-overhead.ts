// Per-step decode cost of a turn (ledger, streaming, policy checks) vs bare llama_decode, measured
// interleaved on the same chat so both see the same cache, context fill and machine state.
//   npx tsx bench/decode-overhead.ts [--no-write] [--threads=N]
// Why: the turn benchmark's goal-3 column compares against plain runs taken before and after all the
// measured turns, and gave contradicting signs across models (RESULTS.md). Here each pair is
// plainDecode(32) and one turn of 32 generated tokens (which goes first alternates) (greedy, onToken streaming to a no-op callback)
// on the same chat with the budget full; the turn's per-step time is decodeMs / (generated - 1).
import { availableParallelism } from 'node:os';
import { loadModel, type PolicyName } from '../src/index.ts';
import { machine, median, realisticModel, smallModels, writeResultsSection } from './common.ts';

const WRITE = !process.argv.includes('--no-write');
const THREADS = Number(process.argv.find((a) => a.startsWith('--threads='))?.slice(10) ?? availableParallelism());
const PAIRS = 20;
const STEPS = 32;
const POLICIES: PolicyName[] = ['sliding', 'importance'];

// The realistic-geometry model at 1024 (a decode step costs what users pay), the small ones at 2048.
const models = [{ ...realisticModel(), maxTokens: 1024 }, ...smallModels('fml-bench-overhead.gguf').map((m) => ({ ...m, maxTokens: 2048 }))];

const rows: string[] = [];
for (const m of models) {
  const model = await loadModel(m.path, { threads: THREADS });
  const MAX_TOKENS = m.maxTokens;
  for (const policy of POLICIES) {
    const chat = model.createChat({ maxTokens: MAX_TOKENS, policy });
    const internals = chat._internals();
    while (internals.cacheState().ledgerTokens < MAX_TOKENS - 100) {
      await chat.send('Once upon a time there was a little dog who liked to run in the park.', { maxNewTokens: STEPS, temperature: 0 });
    }
    internals.plainDecode(STEPS); // untimed
    const plain: number[] = [];
    const turn: number[] = [];
    const ratios: number[] = [];
    for (let k = 0; k < PAIRS; k++) {
      // Alternate which goes first, so a slow stretch of the machine does not always land on one side.
      const turnFirst = k % 2 === 1;
      const send = () => chat.send('Tell me more about the dog.', { maxNewTokens: STEPS, temperature: 0, onToken: () => {} });
      const r0 = turnFirst ? await send() : undefined;
      const p = internals.plainDecode(STEPS) / STEPS;
      const r = r0 ?? (await send());
      const steps = r.stopReason === 'eos' ? r.stats.generatedTokens : r.stats.generatedTokens - 1;
      if (steps < 8) continue; // an early end of turn: too few steps to time
      const t = r.stats.decodeMs / steps;
      plain.push(p);
      turn.push(t);
      ratios.push(t / p - 1);
    }
    const pct = (x: number) => `${(x * 100).toFixed(1)}%`;
    const sortedRatios = [...ratios].sort((a, b) => a - b);
    rows.push(
      `| ${m.name} | ${MAX_TOKENS} | ${policy} | ${plain.length} | ${median(plain).toFixed(3)} | ${median(turn).toFixed(3)} | ${pct(median(turn) / median(plain) - 1)} | ${pct(median(ratios))} | ${pct(sortedRatios[0] ?? NaN)} .. ${pct(sortedRatios.at(-1) ?? NaN)} |`,
    );
    console.log(rows.at(-1));
    chat.dispose();
  }
  model.dispose();
}

const body = [
  '## Decode overhead, interleaved (`npx tsx bench/decode-overhead.ts`)',
  '',
  `- machine: ${machine()}`,
  ...models.map((m) => `- model ${m.name}: ${m.about}`),
  `- budget full (filled to maxTokens - 100 first, then every turn evicts), ${THREADS} threads, KV F16, flash attention off (the CPU default)`,
  `- ${PAIRS} pairs per row (order alternating): plainDecode(${STEPS}) (bare llama_decode + greedy sampling) and one turn of ${STEPS} greedy tokens with onToken streaming; turn per step = decodeMs / decode steps`,
  '',
  '| model | maxTokens | policy | pairs | plain ms/step | turn ms/step | overhead (medians) | overhead (median of pairs) | pair range |',
  '|---|---:|---|---:|---:|---:|---:|---:|---:|',
  ...rows,
].join('\n');
console.log(body);
if (WRITE) writeResultsSection('decode-overhead', body);
