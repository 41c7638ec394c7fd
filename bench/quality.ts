// Quality benchmark: how much does each policy change the model's next-token distribution?
// Teacher-forced feed of a long story in 16-token chunks (as turns would arrive), with the budget at
// 15/25/50/75% of the text; mean KL(full || budgeted) and top-1 agreement over the same positions (the last
// quarter of the text, where every budget has been evicting for a while). Every policy runs with
// positions kept (the default) and compacted at every eviction, side by side; a second table feeds a
// text longer than the model was trained on, to show what the position limit is for.
//   npm run bench:quality            (writes the table into bench/RESULTS.md)
//   npx tsx bench/quality.ts --contenders '[{"policy":"hybrid","hybridImportanceShare":1}]'
//     sliding and these options instead of the table's contenders (a quick comparison; writes nothing)
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeLlamaModel } from '../src/gguf/index.ts';
import { loadModel, type ChatOptions, type Model } from '../src/index.ts';
import { POLICY_CONTENDERS, contenderOptions, contendersFromJson, type Contender, machine, SHARED_MODELS, writeResultsSection } from './common.ts';

const CHUNK = 16;
const WINDOW_SHARE = Number(process.env.FML_WINDOW_SHARE ?? 0.5);
const BUDGETS = [0.15, 0.25, 0.5, 0.75];

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

type Positions = 'keep' | 'compact';
const POSITIONS: Positions[] = ['keep', 'compact'];
interface Row { model: string; policy: string; positions: Positions; budget: number; maxTokens: number; kl: number; top1: number; evicted: number; fallbacks: number; compactions: number; nll: number; refNll: number }

/** Mean negative log-likelihood (nats) of the text's own next tokens at positions [from, tokens.length - 1). */
function meanNll(logits: Float32Array, tokens: number[], from: number, nVocab: number): number {
  let sum = 0;
  for (let p = from; p < tokens.length - 1; p++) sum -= Math.log(Math.max(softmax(logits, p * nVocab, nVocab)[tokens[p + 1]!]!, 1e-30));
  return sum / (tokens.length - 1 - from);
}

// Several texts: the story's sentences rotated, so each run has different content at the scored positions.
const SENTENCES = STORY.match(/[^.!?]+[.!?]"?/g)!.map((x) => x.trim());
const TEXTS = [0, 7, 14, 21].map((k) => [...SENTENCES.slice(k), ...SENTENCES.slice(0, k)].join(' '));

const EXTRA = process.argv.includes('--contenders') ? process.argv[process.argv.indexOf('--contenders') + 1] : undefined;
const CHOSEN: readonly Contender[] = EXTRA
  ? [POLICY_CONTENDERS[0]!, ...contendersFromJson(EXTRA)]
  : POLICY_CONTENDERS;

async function evaluate(model: Model, label: string, length: number, contenders = CHOSEN, budgets = BUDGETS, positions: { label: Positions; options: ChatOptions }[] = POSITIONS.map((p) => ({ label: p, options: { positions: p } }))): Promise<Row[]> {
  const all: Row[][] = [];
  for (const text of TEXTS) all.push(await evaluateText(model, label, length, text, contenders, budgets, positions));
  // Mean over texts, row by row (same contender and budget order in each).
  return all[0]!.map((row, i) => ({
    ...row,
    kl: all.reduce((s, rows) => s + rows[i]!.kl, 0) / all.length,
    top1: all.reduce((s, rows) => s + rows[i]!.top1, 0) / all.length,
    evicted: all.reduce((s, rows) => s + rows[i]!.evicted, 0) / all.length,
    compactions: all.reduce((s, rows) => s + rows[i]!.compactions, 0) / all.length,
    nll: all.reduce((s, rows) => s + rows[i]!.nll, 0) / all.length,
    refNll: all.reduce((s, rows) => s + rows[i]!.refNll, 0) / all.length,
  }));
}

async function evaluateText(model: Model, label: string, length: number, text: string, contenders: readonly Contender[], budgets: number[], positions: { label: Positions; options: ChatOptions }[]): Promise<Row[]> {
  let tokens = model.tokenize(text, { addBos: true });
  while (tokens.length < length) tokens = tokens.concat(model.tokenize(' ' + text));
  tokens = tokens.slice(0, length);
  const nVocab = model.info.nVocab;
  const common = { threads: 2, flashAttention: false, sinkTokens: 4, maxPolicyMs: 0 } as const;
  const refChat = model.createChat({ ...common, policy: 'sliding', maxTokens: length + 64 });
  const ref = refChat._internals().evaluateTokens(tokens, CHUNK);
  refChat.dispose();
  const from = Math.floor(length * 0.75);
  const refNll = meanNll(ref, tokens, from, nVocab);
  const rows: Row[] = [];
  for (const budget of budgets) {
    const maxTokens = Math.floor(length * budget);
    for (const contender of contenders) {
      const policy = contender.label;
      for (const { label: pos, options: posOptions } of positions) {
      const chat = model.createChat({ ...common, ...contenderOptions(contender, maxTokens), ...posOptions, windowSize: Math.floor(maxTokens * WINDOW_SHARE) });
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
      rows.push({ model: label, policy, positions: pos, budget, maxTokens, kl: kl / (length - from), top1: agree / (length - from), evicted: s.tokensEvicted, fallbacks: s.fallbackCount, compactions: s.compactions, nll: meanNll(got, tokens, from, nVocab), refNll });
      chat.dispose();
      }
    }
  }
  return rows;
}

async function main() {
  const setup: string[] = [`machine: ${machine()}`, `chunk ${CHUNK} tokens, flash attention off, F16 KV, window = ${WINDOW_SHARE} x budget, 4 sinks, positions scored: last 25% of each text, mean over ${TEXTS.length} texts (the story's sentences rotated)`];
  const rows: Row[] = [];
  const longRows: Row[] = [];
  const stories = join(SHARED_MODELS, 'stories260K.gguf');
  if (existsSync(stories)) {
    const m = await loadModel(stories, { threads: 2 });
    setup.push(`stories260K: ${m.info.nLayer} layers, ${m.info.nHead} heads / ${m.info.nHeadKv} KV heads, n_embd ${m.info.nEmbd}, vocab ${m.info.nVocab}; text length 512 tokens (it was trained with 512-token sequences; its GGUF says 2048)`);
    rows.push(...(await evaluate(m, 'stories260K', 512)));
    // Past the trained length: 1024 tokens, so kept positions run to 1023 unless the limit says 512.
    longRows.push(...(await evaluate(m, 'stories260K', 1024, POLICY_CONTENDERS.slice(0, 1), [0.25, 0.5], [
      { label: 'keep', options: { positions: 'keep' } },
      { label: 'keep', options: { positions: 'keep', positionLimit: 512 } },
      { label: 'compact', options: { positions: 'compact' } },
    ])));
    m.dispose();
  } else {
    setup.push(`stories260K not found at ${stories}: skipped`);
  }
  const tiny = join(SHARED_MODELS, 'TinyStories-656K.f16.gguf');
  if (existsSync(tiny)) {
    const m = await loadModel(tiny, { threads: 2 });
    setup.push(`TinyStories-656K: ${m.info.nLayer} layers, ${m.info.nHead} heads / ${m.info.nHeadKv} KV heads, n_embd ${m.info.nEmbd}, vocab ${m.info.nVocab}; text length 512 tokens`);
    rows.push(...(await evaluate(m, 'TinyStories-656K', 512)));
    m.dispose();
  } else {
    setup.push(`TinyStories-656K not found at ${tiny}: skipped`);
  }
  const dir = mkdtempSync(join(tmpdir(), 'fml-quality-'));
  const gen = join(dir, 'generated.gguf');
  writeLlamaModel(gen, { layers: 4, embd: 128, heads: 4, kvHeads: 2, headDim: 32, ffn: 256, seed: 11 });
  const g = await loadModel(gen, { threads: 2 });
  setup.push(`generated: 4 layers, 4 heads / 2 KV heads, n_embd 128, vocab ${g.info.nVocab}, seeded random weights; text length 512 tokens`);
  rows.push(...(await evaluate(g, 'generated', 512)));
  g.dispose();

  const pairs = rows.filter((r) => r.positions === 'keep').map((keep) => ({ keep, compact: rows.find((r) => r.positions === 'compact' && r.model === keep.model && r.budget === keep.budget && r.policy === keep.policy)! }));
  const lines = [
    '## Quality: next-token distribution against the full cache (`npm run bench:quality`)',
    '',
    ...setup.map((s) => `- ${s}`),
    '',
    'Each policy with positions kept (the default: an eviction leaves the retained tokens where they were) and compacted',
    '(renumbered 0..n-1 at every eviction); KL ratio = kept / compacted.',
    '',
    '| model | budget | maxTokens | policy | mean KL, kept | mean KL, compacted | KL ratio | top-1, kept | top-1, compacted | tokens evicted |',
    '|---|---|---|---|---|---|---|---|---|---|',
    ...pairs.map(({ keep: k, compact: c }) => `| ${k.model} | ${k.budget * 100}% | ${k.maxTokens} | ${k.policy} | ${k.kl.toFixed(4)} | ${c.kl.toFixed(4)} | ${(k.kl / c.kl).toFixed(2)}x | ${(k.top1 * 100).toFixed(1)}% | ${(c.top1 * 100).toFixed(1)}% | ${Math.round(k.evicted)} |`),
  ];
  const byModel = (model: string, positions: Positions) => pairs.filter((p) => p.keep.model === model).map((p) => p[positions].kl);
  const geo = (xs: number[]) => Math.exp(xs.reduce((a, x) => a + Math.log(x), 0) / xs.length);
  const verdict: string[] = [];
  for (const model of new Set(rows.map((r) => r.model))) {
    const ratios = pairs.filter((p) => p.keep.model === model).map((p) => p.keep.kl / p.compact.kl);
    const better = ratios.filter((r) => r < 1).length;
    verdict.push(`- ${model}: kept positions' KL is ${geo(ratios).toFixed(2)}x compacted's (geometric mean over ${ratios.length} policy x budget rows; lower in ${better} of them); geometric mean KL ${geo(byModel(model, 'keep')).toFixed(4)} kept vs ${geo(byModel(model, 'compact')).toFixed(4)} compacted`);
  }
  lines.push('', ...verdict);
  if (longRows.length) {
    lines.push(
      '',
      'Past the trained length: stories260K was trained on 512-token sequences (its GGUF says 2048, so that is the default',
      'positionLimit). A 1024-token text, sliding, scored on its last 256 positions. The full cache itself then reads',
      'positions up to 1023, so besides KL against it, NLL is the mean negative log-likelihood of the text\'s own next',
      `tokens (the full cache's: ${longRows[0]!.refNll.toFixed(3)} nats):`,
      '',
      '| budget | maxTokens | positions | positionLimit | mean KL | top-1 agreement | NLL (nats) | compactions |',
      '|---|---|---|---|---|---|---|---|',
      ...longRows.map((r, i) => `| ${r.budget * 100}% | ${r.maxTokens} | ${r.positions} | ${r.positions === 'compact' ? '-' : i % 3 === 1 ? '512' : 'default (2048)'} | ${r.kl.toFixed(4)} | ${(r.top1 * 100).toFixed(1)}% | ${r.nll.toFixed(3)} | ${r.compactions.toFixed(1)} |`),
    );
  }
  const best: string[] = [];
  for (const model of new Set(rows.map((r) => r.model))) {
    for (const budget of BUDGETS) {
      const group = rows.filter((r) => r.model === model && r.budget === budget && r.positions === 'keep').sort((a, b) => a.kl - b.kl);
      const sliding = group.find((r) => r.policy === 'sliding')!;
      best.push(`- ${model} at ${budget * 100}%: best ${group[0]!.policy} (KL ${group[0]!.kl.toFixed(4)}); sliding ${sliding.kl.toFixed(4)}; ` +
        group.filter((r) => r.policy !== 'sliding').map((r) => `${r.policy} ${(r.kl / sliding.kl).toFixed(2)}x`).join(', ') + ' of sliding\'s KL');
    }
  }
  lines.push('', 'Policies against sliding, positions kept:', '', ...best);
  const out = lines.join('\n');
  console.log(out);
  if (!process.argv.includes('--no-write') && !EXTRA) writeResultsSection('quality', out);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
