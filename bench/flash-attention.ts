// Decode step time with flash attention on, off, and llama.cpp's automatic choice, on the CPU, at a
// nearly full budget. Why: importance/hybrid turn flash attention off (to read attention weights) and
// decoded faster than sliding in the turn benchmark; this isolates that one setting.
//   npx tsx bench/flash-attention.ts [--no-write]
// Per model and budget: one chat per setting (policy sliding, 1 thread), filled to maxTokens - 100 with
// the same greedy turns, then `plainDecode(32)` (bare llama_decode + greedy sampling) 7 times after one
// untimed run; the median per step is reported. The settings are interleaved run by run so that load
// from other processes hits them alike.
import { loadModel, type Chat } from '../src/index.ts';
import { machine, median, smallModels, writeResultsSection } from './common.ts';

const WRITE = !process.argv.includes('--no-write');
const RUNS = 7;
const STEPS = 32;
const SETTINGS = [
  { label: 'auto (default)', flashAttention: undefined },
  { label: 'on', flashAttention: true },
  { label: 'off', flashAttention: false },
] as const;

const models = smallModels('fml-bench-fa.gguf');

const rows: string[] = [];
for (const m of models) {
  const model = await loadModel(m.path, { threads: 1 });
  for (const maxTokens of [512, 2048]) {
    const chats: Chat[] = [];
    for (const s of SETTINGS) {
      const chat = model.createChat({ maxTokens, policy: 'sliding', threads: 1, ...(s.flashAttention === undefined ? {} : { flashAttention: s.flashAttention }) });
      while (chat._internals().cacheState().ledgerTokens < maxTokens - 100) {
        await chat.send('Once upon a time there was a little dog who liked to run in the park with friends.', { maxNewTokens: 32, temperature: 0 });
      }
      chat._internals().plainDecode(STEPS); // untimed: warms caches, applies any pending shift
      chats.push(chat);
    }
    const times: number[][] = SETTINGS.map(() => []);
    for (let r = 0; r < RUNS; r++) chats.forEach((c, i) => times[i]!.push(c._internals().plainDecode(STEPS) / STEPS));
    const med = times.map((t) => median(t));
    const auto = med[0]!;
    rows.push(`| ${m.name} | ${maxTokens} | ${chats[0]!._internals().cacheState().ledgerTokens} | ${med.map((v) => v.toFixed(3)).join(' | ')} | ${(auto / med[2]!).toFixed(2)}x |`);
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
  `- policy sliding, 1 thread, KV cache F16; each chat filled to maxTokens - 100 by the same greedy turns; plainDecode(${STEPS}) x ${RUNS} per setting, interleaved, after one untimed run; median ms per decode step`,
  '',
  '| model | maxTokens | cached tokens | auto (default) ms/step | on ms/step | off ms/step | auto / off |',
  '|---|---:|---:|---:|---:|---:|---:|',
  ...rows,
  '',
  '`flashAttention` is a chat option; the default leaves the choice to llama.cpp. These are tiny models (head dim 8 and 32); ' +
    'real models have head dim 64-128, which this machine cannot measure, so the default is unchanged: measure your model with `flashAttention: false` before relying on this table.',
].join('\n');
console.log(body);
if (WRITE) writeResultsSection('flash-attention', body);
