// Quality benchmark: how much does each policy change the model's next-token distribution?
// Teacher-forced feed of a long story in 16-token chunks (as turns would arrive), with the budget at
// 25/50/75% of the text; mean KL(full || budgeted) and top-1 agreement over the same positions (the last
// quarter of the text, where every budget has been evicting for a while).
//   npm run bench:quality            (writes the table into bench/RESULTS.md)
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeLlamaModel } from '../src/gguf/index.ts';
import { loadModel, type ChatOptions, type Model } from '../src/index.ts';
import { machine, SHARED_MODELS, writeResultsSection } from './common.ts';

const CHUNK = 16;
const WINDOW_SHARE = Number(process.env.FML_WINDOW_SHARE ?? 0.5);
const BUDGETS = [0.25, 0.5, 0.75];

// A TinyStories-style text with characters and objects that come back much later.
const STORY = [
  'Once upon a time, there was a little girl named Lily. She had a red ball and a small dog named Max.',
  'Lily and Max liked to play in the park near their house. One day, Lily saw a big tree with a swing.',
  'She said, "Max, let us go on the swing!" Max barked and ran to the tree. Lily sat on the swing and laughed.',
  'Then a boy named Tom came to the park. Tom had a blue kite. He wanted to fly it high in the sky.',
  'Lily said, "Hi Tom! Can I help you fly your kite?" Tom smiled and said, "Yes, Lily. We can fly it together."',
  'The wind was strong. The kite went up, up, up. Max jumped and barked at the kite. Lily and Tom were very happy.',
  'After a while, the sun went down. Mom called, "Lily, it is time to come home!" Lily said goodbye to Tom.',
  'At home, Lily ate soup with her mom. She told her mom about the swing, the kite and her new friend Tom.',
  'The next day, it was raining. Lily could not go to the park. She was sad. Max sat next to her by the window.',
  'Mom gave Lily a box of crayons. Lily drew a picture of the big tree, the blue kite, Tom and Max.',
  'When the rain stopped, Lily ran to the park with her picture. Tom was there with his kite.',
  'Lily showed Tom the picture. Tom said, "Wow, Lily! That is our kite and the big tree!" Max wagged his tail.',
  'They played with the red ball. Tom threw the ball and Max ran after it. The ball rolled under the swing.',
  'Max found the ball and brought it back to Lily. Lily hugged Max and said, "Good dog, Max!"',
  'Then an old man named Ben came to the park. He had a little bird in a cage. The bird sang a happy song.',
  'Ben said, "This bird is named Sunny. She likes children who are kind." Lily and Tom said hello to Sunny.',
  'Sunny sang again. Max looked at the bird and sat very still. Ben laughed and said Max was a good dog.',
  'Lily asked Ben, "Can Sunny fly like the kite?" Ben opened the cage a little. Sunny flew to the big tree.',
  'Sunny sat on a branch above the swing. She sang the happy song. Then she flew back to Ben.',
  'It was time to go home again. Lily waved to Tom and Ben. She walked home with Max and the red ball.',
  'That night, Lily thought about her day. She remembered the swing, the blue kite, Tom, Ben and Sunny the bird.',
  'She smiled and fell asleep. Max slept at the end of her bed. In her dream, Lily flew high like the kite.',
].join(' ');

function softmax(logits: Float32Array, offset: number, n: number): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < n; i++) max = Math.max(max, logits[offset + i]!);
  const p = new Float64Array(n);
  let sum = 0;
  for (let i = 0; i < n; i++) sum += p[i] = Math.exp(logits[offset + i]! - max);
  for (let i = 0; i < n; i++) p[i]! /= sum;
  return p;
}

function argmax(logits: Float32Array, offset: number, n: number): number {
  let best = 0;
  for (let i = 1; i < n; i++) if (logits[offset + i]! > logits[offset + best]!) best = i;
  return best;
}

// One row per contender: every policy with its defaults, plus variants that explain the results.
const CONTENDERS: { label: string; options: ChatOptions }[] = [
  { label: 'sliding', options: { policy: 'sliding' } },
  { label: 'importance', options: { policy: 'importance' } },
  { label: 'importance (token granularity, H2O-style)', options: { policy: 'importance', importanceGranularity: 'token' } },
  { label: "importance (importanceScore 'peak')", options: { policy: 'importance', importanceScore: 'peak' } },
  { label: 'semantic', options: { policy: 'semantic' } },
  { label: 'rolling_summary', options: { policy: 'rolling_summary' } },
  { label: 'hybrid', options: { policy: 'hybrid' } },
  { label: 'hybrid (no summary)', options: { policy: 'hybrid', summaryTokens: 0 } },
  { label: "hybrid (importanceScore 'peak')", options: { policy: 'hybrid', importanceScore: 'peak' } },
];

interface Row { model: string; policy: string; budget: number; maxTokens: number; kl: number; top1: number; evicted: number; fallbacks: number }

// Several texts: the story's sentences rotated, so each run has different content at the scored positions.
const SENTENCES = STORY.match(/[^.!?]+[.!?]"?/g)!.map((x) => x.trim());
const TEXTS = [0, 7, 14, 21].map((k) => [...SENTENCES.slice(k), ...SENTENCES.slice(0, k)].join(' '));

async function evaluate(model: Model, label: string, length: number): Promise<Row[]> {
  const all: Row[][] = [];
  for (const text of TEXTS) all.push(await evaluateText(model, label, length, text));
  // Mean over texts, row by row (same contender and budget order in each).
  return all[0]!.map((row, i) => ({
    ...row,
    kl: all.reduce((s, rows) => s + rows[i]!.kl, 0) / all.length,
    top1: all.reduce((s, rows) => s + rows[i]!.top1, 0) / all.length,
    evicted: all.reduce((s, rows) => s + rows[i]!.evicted, 0) / all.length,
  }));
}

async function evaluateText(model: Model, label: string, length: number, text: string): Promise<Row[]> {
  let tokens = model.tokenize(text, { addBos: true });
  while (tokens.length < length) tokens = tokens.concat(model.tokenize(' ' + text));
  tokens = tokens.slice(0, length);
  const nVocab = model.info.nVocab;
  const common = { threads: 2, flashAttention: false, sinkTokens: 4, maxPolicyMs: 0 } as const;
  const refChat = model.createChat({ ...common, policy: 'sliding', maxTokens: length + 64 });
  const ref = refChat._internals().evaluateTokens(tokens, CHUNK);
  refChat.dispose();
  const from = Math.floor(length * 0.75);
  const rows: Row[] = [];
  for (const budget of BUDGETS) {
    const maxTokens = Math.floor(length * budget);
    for (const { label: policy, options } of CONTENDERS) {
      const chat = model.createChat({ ...common, ...options, maxTokens, windowSize: Math.floor(maxTokens * WINDOW_SHARE) });
      const got = chat._internals().evaluateTokens(tokens, CHUNK);
      let kl = 0;
      let agree = 0;
      for (let p = from; p < length; p++) {
        const P = softmax(ref, p * nVocab, nVocab);
        const Q = softmax(got, p * nVocab, nVocab);
        for (let i = 0; i < nVocab; i++) if (P[i]! > 0) kl += P[i]! * Math.log(P[i]! / Math.max(Q[i]!, 1e-30));
        agree += argmax(ref, p * nVocab, nVocab) === argmax(got, p * nVocab, nVocab) ? 1 : 0;
      }
      const s = chat.stats();
      rows.push({ model: label, policy, budget, maxTokens, kl: kl / (length - from), top1: agree / (length - from), evicted: s.tokensEvicted, fallbacks: s.fallbackCount });
      chat.dispose();
    }
  }
  return rows;
}

async function main() {
  const setup: string[] = [`machine: ${machine()}`, `chunk ${CHUNK} tokens, flash attention off, F16 KV, window = ${WINDOW_SHARE} x budget, 4 sinks, positions scored: last 25% of each text, mean over ${TEXTS.length} texts (the story's sentences rotated)`];
  const rows: Row[] = [];
  const stories = join(SHARED_MODELS, 'stories260K.gguf');
  if (existsSync(stories)) {
    const m = await loadModel(stories, { threads: 2 });
    setup.push(`stories260K: ${m.info.nLayer} layers, ${m.info.nHead} heads / ${m.info.nHeadKv} KV heads, n_embd ${m.info.nEmbd}, vocab ${m.info.nVocab}; text length 512 tokens (it was trained with 512-token sequences; its GGUF says 2048)`);
    rows.push(...(await evaluate(m, 'stories260K', 512)));
    m.dispose();
  } else {
    setup.push(`stories260K not found at ${stories}: skipped`);
  }
  const dir = mkdtempSync(join(tmpdir(), 'fml-quality-'));
  const gen = join(dir, 'generated.gguf');
  writeLlamaModel(gen, { layers: 4, embd: 128, heads: 4, kvHeads: 2, headDim: 32, ffn: 256, seed: 11 });
  const g = await loadModel(gen, { threads: 2 });
  setup.push(`generated: 4 layers, 4 heads / 2 KV heads, n_embd 128, vocab ${g.info.nVocab}, seeded random weights; text length 512 tokens`);
  rows.push(...(await evaluate(g, 'generated', 512)));
  g.dispose();

  const lines = [
    '## Quality: next-token distribution against the full cache (`npm run bench:quality`)',
    '',
    ...setup.map((s) => `- ${s}`),
    '',
    '| model | budget | maxTokens | policy | mean KL (nats) | top-1 agreement | tokens evicted |',
    '|---|---|---|---|---|---|---|',
    ...rows.map((r) => `| ${r.model} | ${r.budget * 100}% | ${r.maxTokens} | ${r.policy} | ${r.kl.toFixed(4)} | ${(r.top1 * 100).toFixed(1)}% | ${Math.round(r.evicted)} |`),
  ];
  const best: string[] = [];
  for (const model of new Set(rows.map((r) => r.model))) {
    for (const budget of BUDGETS) {
      const group = rows.filter((r) => r.model === model && r.budget === budget).sort((a, b) => a.kl - b.kl);
      const sliding = group.find((r) => r.policy === 'sliding')!;
      best.push(`- ${model} at ${budget * 100}%: best ${group[0]!.policy} (KL ${group[0]!.kl.toFixed(4)}); sliding ${sliding.kl.toFixed(4)}; ` +
        group.filter((r) => r.policy !== 'sliding').map((r) => `${r.policy} ${(r.kl / sliding.kl).toFixed(2)}x`).join(', ') + ' of sliding\'s KL');
    }
  }
  lines.push('', ...best);
  const out = lines.join('\n');
  console.log(out);
  if (!process.argv.includes('--no-write')) writeResultsSection('quality', out);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
