// Chats of one engine against chats of two engines of the same model, taking turns. Chats whose
// options need different KV geometry (kvType, budget rounding, signals, batch size) get an engine
// (llama_context) each; the scheduler runs one at a time on the model's thread budget. The engines
// share one ggml thread pool per thread count: with a pool each, the idle pool's workers kept
// polling for their next graph (ggml spins ~100 ms before sleeping) through the other engine's step.
//   npx tsx bench/engines.ts [--no-write] [--threads=N] [--rounds=N]
// Per setup two chats (policy sliding), each filled to ~900 tokens of a 1024 budget, then rounds of
// one turn each (a 50-token message, 8 greedy tokens), the two chats alternating; the setups are
// interleaved round by round. The second engine differs by batchSize only (its n_batch), which
// changes nothing a 50-token prompt computes.
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
for (let r = 0; r < ROUNDS; r++) {
  for (const s of r % 2 ? [...setups].reverse() : setups) {
    for (const c of s.chats) {
      const t = await c.send(MESSAGE, { maxNewTokens: 8, temperature: 0 });
      s.prefill.push(t.stats.prefillMs);
    }
  }
  console.log(`round ${r + 1}/${ROUNDS}`);
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
  `- ${THREADS} threads, policy sliding, maxTokens ${MAX_TOKENS}, each chat filled to ~900 tokens; ${ROUNDS} rounds, each a turn of both chats of each setup (a ${MESSAGE.split(' ').length}-word message, 8 greedy tokens), setups interleaved; the model then had ${engines.engines} engines on ${engines.threadPools} thread pool(s)`,
  '',
  '| setup | turns | prefill ms (median) | range | vs one engine |',
  '|---|---:|---:|---:|---:|',
  ...rows,
].join('\n');
console.log(body);
if (WRITE) writeResultsSection('engines', body);
