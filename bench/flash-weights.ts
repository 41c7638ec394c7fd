// What reading attention costs with flash attention on (weights recomputed from the flash node's
// inputs, engine/flash-weights.h) against reading the non-flash graph's own weights, each next to
// sliding with the same attention setting, on the realistic-geometry model with the budget full.
//   npx tsx bench/flash-weights.ts [--no-write] [--threads=N] [--rounds=N] [--quick]
// (--quick: maxTokens 256 and 2 rounds, a smoke run: the GPU check's rehearsal; implies --no-write.)
// The model runs where loadModel puts it by default (every layer on a GPU in a CUDA build).
// Per contender one chat, filled to maxTokens - 100 by the same greedy turns; then rounds of one turn
// each (a 20-word message, 32 greedy tokens), contenders interleaved round by round so that load
// from other processes hits them alike. Reported: medians of prefill ms per prompt token and of
// decode ms per step, and each importance row over its sliding row.
import { availableParallelism } from 'node:os';
import { loadModel, type ChatOptions } from '../src/index.ts';
import { machine, median, realisticModel, writeResultsSection } from './common.ts';

const QUICK = process.argv.includes('--quick');
const WRITE = !process.argv.includes('--no-write') && !QUICK;
const THREADS = Number(process.argv.find((a) => a.startsWith('--threads='))?.slice(10) ?? availableParallelism());
const ROUNDS = Number(process.argv.find((a) => a.startsWith('--rounds='))?.slice(9) ?? (QUICK ? 2 : 8));
const MAX_TOKENS = QUICK ? 256 : 1024;
const STEPS = 32;
const MESSAGE = 'Tell me more about the little dog who liked to run in the park with her friends every single morning.';

// Pairs: a sliding baseline and importance with the same flash-attention setting and KV type.
const SETTINGS: { label: string; options: ChatOptions }[] = [
  { label: 'flash on, F16 KV (weights recomputed)', options: { flashAttention: true } },
  { label: 'flash on, Q8_0 KV (weights recomputed)', options: { kvType: 'q8_0' } },
  { label: 'flash off, F16 KV (graph weights)', options: { flashAttention: false } },
];

const m = realisticModel();
const model = await loadModel(m.path, { threads: THREADS });
const where = `${model.info.backend} (${model.info.device})`;
const chats = SETTINGS.flatMap((s) =>
  (['sliding', 'importance'] as const).map((policy) => ({ setting: s.label, policy, chat: model.createChat({ ...s.options, policy, maxTokens: MAX_TOKENS }), prefill: [] as number[], decode: [] as number[], signal: '-' })),
);
for (const c of chats) {
  while (c.chat._internals().cacheState().ledgerTokens < MAX_TOKENS - 100) {
    await c.chat.send('Once upon a time there was a little dog who liked to run in the park with friends.', { maxNewTokens: STEPS, temperature: 0 });
  }
}
for (let r = 0; r < ROUNDS; r++) {
  for (const c of r % 2 ? [...chats].reverse() : chats) {
    const t = await c.chat.send(MESSAGE, { maxNewTokens: STEPS, temperature: 0 });
    c.prefill.push(t.stats.prefillMs / t.stats.promptTokens);
    if (c.policy === 'importance') {
      // The weights were read: the signal names the configuration, these say it worked.
      const cache = c.chat._internals().cacheState();
      if (!(cache.attentionRowsChecked > 0) || cache.signalLayoutMismatches !== 0 || cache.causalViolations !== 0) {
        throw new Error(`${c.setting}: attention weights not read (${JSON.stringify({ rows: cache.attentionRowsChecked, layout: cache.signalLayoutMismatches, causal: cache.causalViolations })})`);
      }
    }
    c.signal = t.stats.importanceSignal ?? '-';
    const steps = t.stopReason === 'eos' ? t.stats.generatedTokens : t.stats.generatedTokens - 1;
    if (steps >= 8) c.decode.push(t.stats.decodeMs / steps);
  }
  console.log(`round ${r + 1}/${ROUNDS}`);
}
const rows: string[] = [];
for (let i = 0; i < chats.length; i += 2) {
  const [sliding, importance] = [chats[i]!, chats[i + 1]!];
  const pf = [median(sliding.prefill), median(importance.prefill)];
  const dc = [median(sliding.decode), median(importance.decode)];
  rows.push(`| ${sliding.setting} | ${importance.signal} | ${pf[0]!.toFixed(2)} | ${pf[1]!.toFixed(2)} | ${(pf[1]! / pf[0]!).toFixed(2)}x | ${dc[0]!.toFixed(2)} | ${dc[1]!.toFixed(2)} | ${(dc[1]! / dc[0]!).toFixed(2)}x |`);
}
for (const c of chats) c.chat.dispose();
model.dispose();

const body = [
  '## Attention weights under flash attention (`npx tsx bench/flash-weights.ts`)',
  '',
  `- machine: ${machine()}`,
  `- model ${m.name}: ${m.about}; on ${where}`,
  `- maxTokens ${MAX_TOKENS}, budget full (filled to maxTokens - 100, then every turn evicts), ${THREADS} threads; ${ROUNDS} rounds of one turn per chat (a ${MESSAGE.split(' ').length}-word message, ${STEPS} greedy tokens), interleaved; medians`,
  '',
  '| setting | importance signal | sliding prefill ms/token | importance prefill ms/token | ratio | sliding decode ms/step | importance decode ms/step | ratio |',
  '|---|---|---:|---:|---:|---:|---:|---:|',
  ...rows,
].join('\n');
console.log(body);
if (WRITE) writeResultsSection('flash-weights', body);
