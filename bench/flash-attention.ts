// Decode step time with flash attention on (forced: what llama.cpp's automatic choice picks on the CPU) and off (this
// library's CPU default since the engine rewrite), at a nearly full budget, on the realistic-geometry
// model and the two small ones. It is what the CPU default is chosen by.
//   npx tsx bench/flash-attention.ts [--no-write] [--threads=N]
// Per model and budget: one chat per setting (policy sliding), filled to maxTokens - 100 with the same
// greedy turns, then `plainDecode(32)` (bare llama_decode + greedy sampling) 7 times after one untimed
// run; the median per step is reported. The settings are interleaved run by run, the order alternating,
// so that load from other processes and the order itself hit them alike.
import { availableParallelism } from 'node:os';
import { loadModel, type Chat } from '../src/index.ts';
import { machine, median, realisticModel, smallModels, writeResultsSection } from './common.ts';

const WRITE = !process.argv.includes('--no-write');
const THREADS = Number(process.argv.find((a) => a.startsWith('--threads='))?.slice(10) ?? availableParallelism());
const RUNS = 15;
const STEPS = 32;
const SETTINGS = [
  { label: 'on (forced; llama.cpp auto picks it)', flashAttention: true },
  { label: 'off (default)', flashAttention: false },
] as const;

const models = [{ ...realisticModel(), budgets: [1024] }, ...smallModels('fml-bench-fa.gguf').map((m) => ({ ...m, budgets: [512, 2048] }))];

const rows: string[] = [];
for (const m of models) {
  const model = await loadModel(m.path, { threads: THREADS });
  for (const maxTokens of m.budgets) {
    const chats: Chat[] = [];
    for (const s of SETTINGS) {
      const chat = model.createChat({ maxTokens, policy: 'sliding', flashAttention: s.flashAttention });
      while (chat._internals().cacheState().ledgerTokens < maxTokens - 100) {
        await chat.send('Once upon a time there was a little dog who liked to run in the park with friends.', { maxNewTokens: 32, temperature: 0 });
      }
      chat._internals().plainDecode(STEPS); // untimed: warms caches, applies any pending shift
      chats.push(chat);
    }
    const times: number[][] = SETTINGS.map(() => []);
    for (let r = 0; r < RUNS; r++) {
      for (let k = 0; k < chats.length; k++) {
        const i = (k + r) % chats.length;
        times[i]!.push(chats[i]!._internals().plainDecode(STEPS) / STEPS);
      }
    }
    const med = times.map((t) => median(t));
    rows.push(`| ${m.name} | ${maxTokens} | ${chats.map((c) => c._internals().cacheState().ledgerTokens).join(' / ')} | ${med.map((v) => v.toFixed(3)).join(' | ')} | ${(med[0]! / med[1]!).toFixed(2)}x |`);
    console.log(rows.at(-1));
    chats.forEach((c) => c.dispose());
  }
  model.dispose();
}

const body = [
  '## Flash attention on the CPU (`npx tsx bench/flash-attention.ts`)',
  '',
  `- machine: ${machine()}`,
  ...models.map((m) => `- model ${m.name}: ${m.about}`),
  `- policy sliding, ${THREADS} threads, KV cache F16; each chat filled to maxTokens - 100 by the same greedy turns; plainDecode(${STEPS}) x ${RUNS} per setting, interleaved (order alternating), after one untimed run; median ms per decode step`,
  '',
  '| model | maxTokens | cached tokens (on / off) | on (forced) ms/step | off (default) ms/step | on / off |',
  '|---|---:|---:|---:|---:|---:|',
  ...rows,
  '',
  'On the CPU chats run with flash attention off unless `flashAttention: true` asks for it (kvType q8_0 needs it); on a GPU the choice stays llama.cpp\'s.',
].join('\n');
console.log(body);
if (WRITE) writeResultsSection('flash-attention', body);
