// Chats of one engine against chats of two engines of the same model, taking turns. Chats whose
// options need different KV geometry (kvType, budget rounding, signals, batch size) get an engine
// (llama_context) each; the scheduler runs one at a time on the model's thread budget. The engines
// share one ggml thread pool per thread count: with a pool each, the idle pool's workers kept
// polling for their next graph (ggml spins ~100 ms before sleeping) through the other engine's step.
//   npx tsx bench/engines.ts [--no-write] [--threads=N] [--rounds=N]
// Per setup two chats (policy sliding), each filled to ~900 tokens of a 1024 budget, then turns (a
// 20-word message, 8 greedy tokens), the two chats alternating. The setups run in blocks (one, two,
// one, two), each opened by one discarded round: within a block only that setup's engines run, so
// the one-engine figures never follow another engine's step. The second engine differs by batchSize
// only (its n_batch), which changes nothing a 20-word prompt computes.
import { availableParallelism } from 'node:os';
import { loadModel, type ChatOptions } from '../src/index.ts';
import { machine, median, realisticModel, writeResultsSection } from './common.ts';

const WRITE = !process.argv.includes('--no-write');
const THREADS = Number(process.argv.find((a) => a.startsWith('--threads='))?.slice(10) ?? availableParallelism());
const ROUNDS = Number(process.argv.find((a) => a.startsWith('--rounds='))?.slice(9) ?? 8);
const MAX_TOKENS = 1024;
const MESSAGE = 'Tell me more about the little dog who liked to run in the park with her friends every single morning.';

const BASE: ChatOptions = { policy: 'sliding', maxTokens: MAX_TOKENS };
const SETUPS: { label: string; second: ChatOptions }[] = [
  { label: 'one engine (the same options)', second: BASE },
  { label: 'two engines (the second with batchSize 1024)', second: { ...BASE, batchSize: 1024 } },
];

const m = realisticModel();
const model = await loadModel(m.path, { threads: THREADS });
const setups = SETUPS.map((s) => ({ ...s, chats: [model.createChat(BASE), model.createChat(s.second)], prefill: [] as number[] }));
for (const s of setups) {
  for (const c of s.chats) {
    while (c._internals().cacheState().ledgerTokens < MAX_TOKENS - 124) {
      await c.send('Once upon a time there was a little dog who liked to run in the park with friends.', { maxNewTokens: 32, temperature: 0 });
    }
  }
}
const engines = setups[0]!.chats[0]!._internals().engineStats();
for (const block of [0, 1, 0, 1]) {
  const s = setups[block]!;
  for (let r = 0; r <= ROUNDS / 2; r++) {
    for (const c of s.chats) {
      const t = await c.send(MESSAGE, { maxNewTokens: 8, temperature: 0 });
      if (r > 0) s.prefill.push(t.stats.prefillMs); // round 0: the switch from the other block
    }
  }
  console.log(`${s.label}: block done`);
}
const one = median(setups[0]!.prefill);
const rows = setups.map((s) => `| ${s.label} | ${s.prefill.length} | ${median(s.prefill).toFixed(1)} | ${Math.min(...s.prefill).toFixed(1)} .. ${Math.max(...s.prefill).toFixed(1)} | ${(median(s.prefill) / one).toFixed(2)}x |`);
for (const s of setups) for (const c of s.chats) c.dispose();
model.dispose();

const body = [
  '## Chats of two engines taking turns (`npx tsx bench/engines.ts`)',
  '',
  `- machine: ${machine()}`,
  `- model ${m.name}: ${m.about}`,
  `- ${THREADS} threads, policy sliding, maxTokens ${MAX_TOKENS}, each chat filled to ~900 tokens; per setup two blocks of ${ROUNDS / 2} rounds (a turn of each of its chats: a ${MESSAGE.split(' ').length}-word message, 8 greedy tokens), blocks alternating between the setups, the first round of each block not counted; the model had ${engines.engines} engines on ${engines.threadPools} thread pool(s)`,
  '',
  '| setup | turns | prefill ms (median) | range | vs one engine |',
  '|---|---:|---:|---:|---:|',
  ...rows,
].join('\n');
console.log(body);
if (WRITE) writeResultsSection('engines', body);
