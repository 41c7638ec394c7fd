// What structured output costs per token: send's jsonSchema (llama.cpp's grammar sampler, a schema
// converted by its converter) against free sampling, the same number of tokens each, on a
// Qwen2.5-0.5B-shaped model with a vocabulary as large as Qwen's (~152k: the grammar's work grows with
// the vocabulary, and this project's small generated vocabulary would hide it). Side by side, turn by
// turn round-robin (load from other processes hits all alike):
//   - free: 64 tokens (ignoreEos), no grammar;
//   - schema: 64 tokens under a schema whose replies run on (at least 50 strings in an array), so
//     every token is the grammar's: checked when the sampler's own choice fits (the common case of a
//     trained model, and of this one inside a string), a pass over the whole vocabulary when it does
//     not (this one, outside strings);
//   - digits: 64 tokens of a grammar the sampler's own choice almost never fits: the pass over the
//     whole vocabulary at nearly every token (the worst case);
//   - no letter e: a grammar the sampler's choice often misses by little: sampling passes over the
//     whole vocabulary then, greedy decoding checks the best 64 candidates first;
//   - an enum of 100 values of one start: 100 alternatives alive at each token, each pass that much dearer;
//   - each grammar case sampled (against free sampling) and greedy (against free greedy decoding),
//     and two without the shortcuts (whole pass at every refusal, as llama.cpp's common sampler);
//   - and what it costs to turn a schema into a grammar (jsonSchemaToGrammar, on the calling thread).
//   npx tsx bench/structured.ts [--no-write] [--turns 6]
import { availableParallelism } from 'node:os';
import { parseArgs } from 'node:util';
import { writeLlamaModel } from '../src/gguf/index.ts';
import { jsonSchemaToGrammar, loadModel, type SendOptions, type TurnResult } from '../src/index.ts';
import { cachedModel, machine, median, REALISTIC_MODEL, writeResultsSection } from './common.ts';

const { values } = parseArgs({ options: { 'no-write': { type: 'boolean' }, turns: { type: 'string' } } });
const TURNS = Number(values.turns ?? 6);
const TOKENS = 64;
/** Qwen2.5's vocabulary is 151,936 tokens: the generated one (~930) plus as many lowercase pieces. */
const VOCAB_EXTRA = 151_000;
/** At least 50 notes: no reply can complete within TOKENS, so every case decodes as many. */
const NOTES_SCHEMA = { type: 'object', properties: { notes: { type: 'array', items: { type: 'string' }, minItems: 50 } }, required: ['notes'] };
/** A schema the size of a form (30 typed fields, enums, nested objects): what converting one costs. */
const FORM_SCHEMA = {
  type: 'object',
  properties: Object.fromEntries(Array.from({ length: 30 }, (_, i) => [
    `field_${i}`,
    i % 3 === 0 ? { type: 'string', maxLength: 40 } : i % 3 === 1 ? { enum: ['low', 'medium', 'high'] } : { type: 'object', properties: { value: { type: 'integer' }, ok: { type: 'boolean' } }, required: ['value'] },
  ])),
  required: ['field_0', 'field_1'],
  additionalProperties: false,
};

const DIGITS = 'root ::= [0-9]{200,}';
const NO_E = 'root ::= [^e]{400,}';
/** 100 values of one start, repeated: no reply completes within TOKENS. */
const ENUM_100 = { type: 'array', minItems: 50, items: { enum: Array.from({ length: 100 }, (_, i) => `value number ${i} of the list`) } };
/** `base`: the case a row is compared with (free sampling, or free greedy decoding). */
const CASES: { label: string; options: SendOptions; base?: number }[] = [
  { label: 'free', options: { maxNewTokens: TOKENS, ignoreEos: true } },
  { label: 'jsonSchema (array of strings)', options: { maxNewTokens: TOKENS, ignoreEos: true, jsonSchema: NOTES_SCHEMA } },
  // Digits only: the sampler's own choice (a random model's) almost never fits, so almost every
  // token takes the pass over the whole vocabulary: the worst case.
  { label: 'grammar (digits only)', options: { maxNewTokens: TOKENS, ignoreEos: true, grammar: DIGITS } },
  // No letter e: the sampler's choice often does not fit, but a token near it does (as for a trained
  // model at a grammar's turn): sampling takes the whole pass then, greedy decoding checks the best 64.
  { label: "grammar (no letter 'e')", options: { maxNewTokens: TOKENS, ignoreEos: true, grammar: NO_E } },
  // A wide grammar: 100 values with a common start keep 100 alternatives alive at every token, and
  // a pass costs in proportion (what a model that keeps missing it pays at each token).
  { label: 'jsonSchema (enum of 100 values)', options: { maxNewTokens: TOKENS, ignoreEos: true, jsonSchema: ENUM_100 } },
  // The same two without the shortcuts (the test hook testFullGrammarPass): every refusal takes the
  // whole pass, as llama.cpp's common sampler does. Fewer tokens: the per-token figure is the point.
  { label: "grammar (no letter 'e'), whole pass", options: { maxNewTokens: 16, ignoreEos: true, grammar: NO_E, testFullGrammarPass: true } },
  { label: 'jsonSchema (enum of 100 values), whole pass', options: { maxNewTokens: 16, ignoreEos: true, jsonSchema: ENUM_100, testFullGrammarPass: true } },
  { label: 'free, greedy', options: { maxNewTokens: TOKENS, ignoreEos: true, temperature: 0 }, base: 7 },
  { label: 'jsonSchema (array of strings), greedy', options: { maxNewTokens: TOKENS, ignoreEos: true, temperature: 0, jsonSchema: NOTES_SCHEMA }, base: 7 },
  { label: "grammar (no letter 'e'), greedy", options: { maxNewTokens: TOKENS, ignoreEos: true, temperature: 0, grammar: NO_E }, base: 7 },
];

async function main() {
  const path = cachedModel('qwen2.5-0.5b-shape-vocab152k-q8_0-seed1.gguf', (p) => writeLlamaModel(p, { ...REALISTIC_MODEL, vocabExtra: VOCAB_EXTRA }));
  const threads = availableParallelism();
  const model = await loadModel(path, { threads, slots: CASES.length });
  const chats = CASES.map(() => model.createChat({ maxTokens: 1024, policy: 'sliding', systemPrompt: 'You are terse.' }));
  const turns: TurnResult[][] = CASES.map(() => []);
  for (let t = 0; t < TURNS; t++) {
    for (let i = 0; i < CASES.length; i++) {
      const r = await chats[i]!.send(`Note ${t}: list what you remember.`, { ...CASES[i]!.options, seed: t });
      turns[i]!.push(r);
    }
    console.log(`turn ${t + 1}: ${CASES.map((c, i) => `${c.label} ${turns[i]!.at(-1)!.stats.decodeMs.toFixed(0)} ms / ${turns[i]!.at(-1)!.stats.generatedTokens} tokens`).join('; ')}`);
  }
  const sample = turns[1]!.at(-1)!.response;
  const digits = turns[2]!.at(-1)!.response;
  const noE = turns[9]!.at(-1)!.response;
  const info = model.info;
  for (const c of chats) c.dispose();
  model.dispose();

  const perToken = (rs: TurnResult[]) => median(rs.map((r) => r.stats.decodeMs / Math.max(1, r.stats.generatedTokens)));

  // Beside a chat under a wide grammar: a free chat's turns alone, then with the enum chat's turns
  // running at the same time, its passes in the step (holding it for both) or on a thread of their
  // own (the steps go on without that chat), with every core decoding and with one spare.
  const beside: string[] = [];
  for (const budget of [threads, Math.max(1, threads - 1)]) {
    const m = await loadModel(path, { threads: budget, slots: 2 });
    const free = m.createChat({ maxTokens: 1024, policy: 'sliding', systemPrompt: 'You are terse.' });
    const wide = m.createChat({ maxTokens: 1024, policy: 'sliding', systemPrompt: 'You are terse.' });
    const rows = { alone: [] as TurnResult[], step: [] as TurnResult[], thread: [] as TurnResult[], wideStep: [] as TurnResult[], wideThread: [] as TurnResult[] };
    for (let t = 0; t < TURNS; t++) {
      rows.alone.push(await free.send(`Alone ${t}`, { maxNewTokens: TOKENS, ignoreEos: true, seed: t }));
      for (const on of ['step', 'thread'] as const) {
        const [f, w] = await Promise.all([
          free.send(`Beside ${t}`, { maxNewTokens: TOKENS, ignoreEos: true, seed: t }),
          wide.send(`Pick ${t}`, { maxNewTokens: 16, ignoreEos: true, jsonSchema: ENUM_100, seed: t, testGrammarPassOn: on }),
        ]);
        rows[on].push(f);
        rows[on === 'step' ? 'wideStep' : 'wideThread'].push(w);
      }
    }
    free.dispose();
    wide.dispose();
    m.dispose();
    const a = perToken(rows.alone);
    beside.push(`| ${budget} of ${threads} | ${a.toFixed(2)} | ${perToken(rows.step).toFixed(2)} (${(perToken(rows.step) / a).toFixed(2)}x) | ${perToken(rows.thread).toFixed(2)} (${(perToken(rows.thread) / a).toFixed(2)}x) | ${perToken(rows.wideStep).toFixed(2)} | ${perToken(rows.wideThread).toFixed(2)} |`);
    if (threads === 1) break;
  }

  const grammar = jsonSchemaToGrammar(FORM_SCHEMA);
  const convertMs: number[] = [];
  for (let i = 0; i < 50; i++) {
    const t0 = performance.now();
    jsonSchemaToGrammar(FORM_SCHEMA);
    convertMs.push(performance.now() - t0);
  }

  // Turn 1 on (the first turns are warm-up for neither: every case decodes the same counts).
  const lines = CASES.map((c, i) => {
    const rs = turns[i]!;
    const base = perToken(turns[c.base ?? 0]!);
    return `| ${c.label} | ${median(rs.map((r) => r.stats.generatedTokens))} | ${perToken(rs).toFixed(2)} | ${(perToken(rs) - base).toFixed(2)} | ${(perToken(rs) / base).toFixed(2)}x | ${median(rs.map((r) => r.stats.firstTokenMs)).toFixed(0)} |`;
  });
  const out = [
    '## Structured output: a JSON schema per token (`npx tsx bench/structured.ts`)',
    '',
    `- machine: ${machine()}`,
    `- model: Qwen2.5-0.5B geometry (24 layers, n_embd 896, 14/2 heads x 64, FFN 4864, Q8_0, seeded random weights) with a ${info.nVocab.toLocaleString('en-US')}-token vocabulary (Qwen2.5's is 151,936; ${(info.nParams / 1e6).toFixed(0)}M parameters), ${threads} threads, ${info.backend}`,
    `- ${TURNS} turns per case, round-robin, ${TOKENS} tokens each (the grammars cannot complete sooner; the whole-pass cases 16); medians over the turns`,
    '- shortcuts where the sampler\'s choice does not fit: greedy checks its best 64 candidates first, top-k sampling its best 256, and a pass skips tokens whose first byte the grammar refuses; "whole pass": none of them (llama.cpp\'s common sampler)',
    `- a schema reply's start: ${JSON.stringify(sample.slice(0, 60))}; a digits reply's: ${JSON.stringify(digits.slice(0, 24))}; a no-e greedy reply's: ${JSON.stringify(noE.slice(0, 40))}`,
    '',
    '| case | tokens | decode ms / token | + ms / token | / free (sampled or greedy) | first token ms |',
    '|---|---|---|---|---|---|',
    ...lines,
    '',
    `A free chat beside one under the enum of 100 values (${TURNS} turns each way, round-robin; decode ms / token, medians: the free chat's ${TOKENS} tokens, the enum chat's 16). By default a chat's passes run on a thread of their own when its model's thread budget leaves a core spare (or a GPU decodes), else in the step:`,
    '',
    '| model threads of the cores | free chat alone | beside, passes in the step | beside, passes on a thread of their own | enum chat, in the step | enum chat, own thread |',
    '|---|---|---|---|---|---|',
    ...beside,
    '',
    `Converting a 30-field schema (${JSON.stringify(FORM_SCHEMA).length} bytes of JSON, ${grammar.length} bytes of GBNF) with \`jsonSchemaToGrammar\`: ${median(convertMs).toFixed(2)} ms (median of 50; \`send\` converts and compiles it once per turn, on the calling thread).`,
  ].join('\n');
  console.log(out);
  if (!values['no-write']) writeResultsSection('structured', out);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
