/**
 * Builds the recall model: a tiny llama-architecture chat model trained (Debian's python3-torch,
 * fixed seed, CPU) on the recall dialogues of scripts/recall/dialogues.ts, exported to GGUF with the
 * ChatML template, then checked: with the full cache it must answer >= 95% of the questions of
 * conversations at its training length, or the script fails.
 *
 *   npm run make-recall-model [-- --out FILE] [--steps N] [--threads N] [--check N] [--force] [--keep-work DIR] [--trained DIR] [--seed N]
 *
 * Default output: .cache/models/recall-<recipe hash>.gguf (git-ignored); an existing file is reused.
 * The data are tokenized by llama.cpp itself (a vocabulary-only model with the same vocabulary),
 * so training sees exactly the tokens a chat feeds.
 */
import { execFileSync, spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { writeLlamaModel, type LlamaModelInput } from '../src/gguf/index.ts';
import { progress } from '../src/progress.ts';
import { loadModel, type Model } from '../src/index.ts';
import {
  RECALL_SYSTEM_PROMPT,
  RECALL_PIECES,
  benchConversation,
  isCorrectAnswer,
  recallMessages,
  summaryText,
  trainingConversation,
  type BenchShape,
  type RecallConversation,
} from './recall/dialogues.ts';

const ROOT = join(import.meta.dirname, '..');

/** Geometry: small enough to train in minutes on 2 cores, deep enough for induction-style recall. */
export const RECALL_GEOMETRY = { layers: 3, embd: 64, heads: 4, kvHeads: 2, headDim: 32, ffn: 192 } as const;
/** Training length in tokens (conversations are cut at a turn boundary to fit); the check's conversations fit in it (checked). */
export const RECALL_TRAINING_TOKENS = 320;
/** The benchmark's and the check's conversation shape at the training length. */
export const RECALL_BENCH_SHAPE: BenchShape = { facts: 4, asked: 2, askedTimes: 2, fillers: 1, tailFillers: 1 };

/**
 * Loss weights of predicting each kind of token: what recall is about, the rest of the replies,
 * everything else. The user's text weighs a little: the model never writes it, but with weight 0 (no
 * logits there, 10% faster steps) the same schedule answered 8.8% of the check's questions, not 29.1%
 * (one machine; the same recipe and seed answered 5.0% on another, so that gap may be noise too).
 */
const WEIGHT = { recall: 1, reply: 0.5, other: 0.02 } as const;

const RECIPE = {
  version: 11,
  weights: WEIGHT,
  geometry: RECALL_GEOMETRY,
  tokens: RECALL_TRAINING_TOKENS,
  conversations: 16000,
  train: {
    seed: 1234,
    lr: 3e-3,
    warmup: 50,
    evalEvery: 250,
    // Token embeddings of unit scale: at 0.04 the first layer's output swamped them (see train.py).
    embeddingStd: 1,
    // An auxiliary loss on where two heads of layer 1 look: at a code token to predict, at least half
    // their attention on where that token followed the same token before (the fact). Without it
    // every recipe tried here learned to copy *some* fact's code: on the check's shape the first code
    // token was right 31% of the time with 4 facts (chance 25%), and every wrong one was another
    // fact's, evenly. The exported model is a plain llama; the hint only shapes training.
    attentionHint: { layer: 1, heads: [0, 2], weight: 1, mass: 0.5 },
    phases: [
      // First the lookup alone, in the dialogues' tokens (train.py's PairDrill): with the hint it
      // forms here (0.97 of code tokens by step 650; 0.21 at step 500 without the hint), which it
      // never did inside the dialogues (0.6 there, hint or not, in 3000 steps).
      { kind: 'pairs', steps: 800, batch: 16, crop: 128, maxPairs: 8, decay: false },
      // Then the dialogues: several facts per 192-token crop at a constant rate, then the full
      // training length, decaying.
      { steps: 1500, batch: 16, crop: 192, decay: false },
      { steps: 500, batch: 12, crop: RECALL_TRAINING_TOKENS },
    ],
  },
};

/** Held-out conversations train.py scores teacher-forced as it goes (a cheap estimate of the check). */
const EVAL_CONVERSATIONS = 96;

/** A source file without its comment lines: a comment edit does not change the recipe (nor retrain the model). */
function withoutComments(path: string, prefixes: string[]): string {
  return readFileSync(path, 'utf8').split('\n').filter((l) => !prefixes.some((p) => l.trimStart().startsWith(p))).join('\n');
}

export function defaultRecallModelPath(): string {
  const hash = createHash('sha256').update(JSON.stringify(RECIPE))
    .update(withoutComments(join(ROOT, 'scripts', 'recall', 'train.py'), ['#']))
    .update(withoutComments(join(ROOT, 'scripts', 'recall', 'dialogues.ts'), ['//', '/*', '*']))
    .digest('hex').slice(0, 10);
  return join(ROOT, '.cache', 'models', `recall-${hash}.gguf`);
}

const codeTokens = new WeakMap<Model, Map<number, boolean>>();
/** A two-digit piece (`48` or `▁48`): the tokens a code is made of. */
function isCodeToken(model: Model, token: number): boolean {
  let known = codeTokens.get(model);
  if (!known) codeTokens.set(model, (known = new Map()));
  let v = known.get(token);
  if (v === undefined) known.set(token, (v = /^ ?\d\d$/.test(model.detokenize([token]))));
  return v;
}

/**
 * A conversation's tokens as a chat holds them (llama.cpp tokenizes each frame, as the chat does),
 * cut at the last whole exchange that fits `limit`, and the loss weight of predicting each next token.
 */
export function tokenizeConversation(model: Model, c: RecallConversation, limit: number): { tokens: number[]; weights: number[] } {
  const frame = (m: { role: 'system' | 'user' | 'assistant'; content: string }) => model.tokenize(model.applyTemplate([m]), { special: true });
  const assistantPrefix = model.tokenize(model.applyTemplate([], { addAssistant: true }), { special: true }).length;
  const closing = model.tokenize('<|im_end|>\n', { special: true }).length;
  const tokens = model.tokenize('', { addBos: true });
  const targets: number[] = tokens.map(() => WEIGHT.other);
  const push = (toks: number[], weight: (j: number) => number) => {
    toks.forEach((t, j) => {
      tokens.push(t);
      targets.push(weight(j));
    });
  };
  push(frame({ role: 'system', content: RECALL_SYSTEM_PROMPT }), () => WEIGHT.other);
  if (c.summaryOf) {
    // A summary where evicted turns were: the reply tokens the model writes for it, bare, as the chat inserts them.
    const reply = frame({ role: 'assistant', content: summaryText(c.summaryOf.map((f) => c.facts[f]!)) });
    push(reply.slice(assistantPrefix, reply.length - closing), () => WEIGHT.other);
  }
  for (const turn of c.turns) {
    const user = frame({ role: 'user', content: turn.user });
    const reply = frame({ role: 'assistant', content: turn.assistant });
    if (tokens.length + user.length + reply.length > limit) break;
    push(user, () => WEIGHT.other);
    const recall = turn.kind === 'question' || turn.kind === 'summary';
    const endOfTurn = reply.length - closing;
    // Of a recalled reply, the code's tokens are what recall is about (the name before them is a copy
    // from the question, which the model learns at once); the rest weighs as any reply.
    const isCode = (j: number) => recall && isCodeToken(model, reply[j]!);
    push(reply, (j) => (j < assistantPrefix || j > endOfTurn ? WEIGHT.other : isCode(j) ? WEIGHT.recall : WEIGHT.reply));
  }
  // weights[t] is the weight of predicting tokens[t + 1].
  return { tokens, weights: targets.slice(1).concat([0]) };
}

/** With the full cache, the share of questions the model answers exactly (greedy). */
/** A question answered wrongly: what was asked, the reply it wanted, the one it got. */
interface RecallMiss { question: string; wanted: string; got: string }

export async function recallAccuracy(model: Model, conversations: RecallConversation[], maxTokens: number): Promise<{ correct: number; total: number; misses: RecallMiss[] }> {
  let correct = 0;
  let total = 0;
  const misses: RecallMiss[] = [];
  for (const c of conversations) {
    const chat = model.createChat({ maxTokens, systemPrompt: RECALL_SYSTEM_PROMPT, policy: 'sliding', threads: 2 });
    for (const turn of c.turns) {
      const r = await chat.send(turn.user, { temperature: 0, maxNewTokens: 8 });
      if (turn.kind === 'question') {
        total++;
        if (isCorrectAnswer(r.response, c.facts[turn.fact!]!)) correct++;
        else misses.push({ question: turn.user, wanted: turn.assistant, got: r.response });
      }
    }
    chat.dispose();
  }
  return { correct, total, misses };
}

/** llama.cpp's logits for `tokens` (after the system prompt, which the chat feeds itself) against PyTorch's. */
function logitParity(model: Model, tokens: Int32Array, systemTokens: number, reference: Float32Array, nVocab: number) {
  const chat = model.createChat({ maxTokens: 4 * tokens.length, systemPrompt: RECALL_SYSTEM_PROMPT, threads: 2 });
  const got = chat._internals().evaluateTokens([...tokens.subarray(systemTokens)], 64);
  chat.dispose();
  let maxDiff = 0;
  let maxAbs = 0;
  let agree = 0;
  const rows = tokens.length - systemTokens;
  for (let r = 0; r < rows; r++) {
    const ref = reference.subarray((systemTokens + r) * nVocab, (systemTokens + r + 1) * nVocab);
    const row = got.subarray(r * nVocab, (r + 1) * nVocab);
    let refBest = 0;
    let rowBest = 0;
    for (let i = 0; i < nVocab; i++) {
      maxDiff = Math.max(maxDiff, Math.abs(ref[i]! - row[i]!));
      maxAbs = Math.max(maxAbs, Math.abs(ref[i]!));
      if (ref[i]! > ref[refBest]!) refBest = i;
      if (row[i]! > row[rowBest]!) rowBest = i;
    }
    if (refBest === rowBest) agree++;
  }
  return { maxDiff, maxAbs, argmaxAgree: agree / rows };
}

/** The check's conversations and the held-out ones train.py scores: the benchmark's shape, seeds apart. */
const CHECK_SEED = 900_000;
const HELD_OUT_SEED = 800_000;
const benchConversations = (firstSeed: number, count: number): RecallConversation[] => Array.from({ length: count }, (_, i) => benchConversation(firstSeed + i, RECALL_BENCH_SHAPE));

export function checkConversations(count: number): RecallConversation[] {
  return benchConversations(CHECK_SEED, count);
}

/** Conversations as train.py reads them: `limit` tokens a row (zero-padded, weight 0), and the tokens held in all. */
function packConversations(model: Model, conversations: RecallConversation[], limit: number): { tokens: Int32Array; weights: Float32Array; total: number } {
  const tokens = new Int32Array(conversations.length * limit);
  const weights = new Float32Array(conversations.length * limit);
  let total = 0;
  conversations.forEach((c, i) => {
    const conv = tokenizeConversation(model, c, limit);
    tokens.set(conv.tokens, i * limit);
    weights.set(conv.weights, i * limit);
    total += conv.tokens.length;
  });
  return { tokens, weights, total };
}

const systemPython = (): string => (existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3');

/**
 * Runs train.py: its lines pass through, and its "step N" lines drive a progress bar with the time
 * left on a terminal (on stderr; a line per quarter elsewhere). Rejects when it fails.
 */
function train(work: string, env: NodeJS.ProcessEnv, totalSteps: number): Promise<void> {
  const bar = progress('training', { eta: true });
  const tty = process.stderr.isTTY === true;
  return new Promise((resolveTrain, reject) => {
    const child = spawn(systemPython(), [join(ROOT, 'scripts', 'recall', 'train.py'), work, work], { stdio: ['ignore', 'pipe', 'inherit'], env });
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const m = /^step\s+(\d+)/.exec(line);
      if (m) bar.update(Number(m[1]) / totalSteps);
      // On a terminal the bar stands in for the step lines; everything else (and all of it in logs) passes through.
      if (!m || !tty) console.log(tty ? `\r\x1b[K${line}` : line);
    });
    child.once('error', reject);
    child.once('exit', (code) => {
      bar.done();
      if (code === 0) resolveTrain();
      else reject(new Error(`train.py exited with ${code}`));
    });
  });
}

async function main(): Promise<void> {
  // The parity check reads logits through the probes of the test build, as the benchmarks do.
  process.env.FML_ADDON_PATH ??= join(ROOT, 'build', 'Probes', 'finite_memory_llm_probes.node');
  const { values } = parseArgs({
    options: {
      out: { type: 'string', short: 'o' },
      steps: { type: 'string' },
      threads: { type: 'string', default: '2' },
      check: { type: 'string', default: '40' },
      force: { type: 'boolean', default: false },
      'keep-work': { type: 'string' },
      trained: { type: 'string' },
      seed: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log('Usage: make-recall-model [--out FILE] [--steps N] [--threads N] [--check N (0: none, needs --out)] [--force] [--keep-work DIR] [--trained DIR] [--seed N (needs --out)]');
    return;
  }
  const out = resolve(values.out ?? defaultRecallModelPath());
  const checks = Number(values.check);
  if (!Number.isInteger(checks) || checks < 0) throw new Error(`--check ${values.check}: a number of conversations (0 skips the check)`);
  // Another seed is another model than the recipe's: it does not go to the recipe's path.
  if (values.seed !== undefined && (!values.out || !Number.isInteger(Number(values.seed)))) throw new Error('--seed N (an integer) needs --out');
  if (checks === 0 && !values.out) throw new Error('--check 0 (no recall check) needs --out: an unchecked model does not go to the default path');
  const checkConvs = checkConversations(checks);
  // Checked first: a rename onto an existing folder fails only after the whole training.
  if (values['keep-work'] && existsSync(values['keep-work'])) throw new Error(`--keep-work ${values['keep-work']} exists: name a new folder`);
  if (existsSync(out) && !values.force) {
    console.log(`${out} exists (use --force to rebuild)`);
    return;
  }
  // Which BLAS torch runs on: Debian's python3-torch links the generic libblas.so.3, which is the
  // reference BLAS unless OpenBLAS is installed; on it training was 11x slower (1.5 s a step instead
  // of 0.13 s), far past this script's 15 minutes.
  let blas: string;
  try {
    const probe = "import torch, numpy; torch.ones(8, 8) @ torch.ones(8, 8); print(' '.join(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'blas' in l})))";
    blas = execFileSync(systemPython(), ['-c', probe], { stdio: 'pipe', encoding: 'utf8' });
  } catch {
    throw new Error("PyTorch is missing: install Debian's python3-torch and OpenBLAS (apt-get install -y python3-torch libopenblas0-pthread)");
  }
  if (!/openblas/.test(blas)) {
    throw new Error(`PyTorch runs on the reference BLAS (${blas.trim() || 'none found'}), about 11x slower: install OpenBLAS (apt-get install -y libopenblas0-pthread)`);
  }
  // --steps N scales every phase to N steps in all (quick trials of the pipeline).
  const scale = values.steps ? Number(values.steps) / RECIPE.train.phases.reduce((s, p) => s + p.steps, 0) : 1;
  const phases = RECIPE.train.phases.map((p) => ({ ...p, steps: Math.max(1, Math.round(p.steps * scale)) }));
  const recipe = { ...RECIPE, train: { ...RECIPE.train, seed: values.seed === undefined ? RECIPE.train.seed : Number(values.seed), threads: Number(values.threads), phases } };
  const work = mkdtempSync(join(tmpdir(), 'fml-recall-'));
  const t0 = performance.now();
  try {
    // 1. The vocabulary, in a model whose weights do not matter: llama.cpp tokenizes the data with it.
    const geometry: LlamaModelInput = { ...RECALL_GEOMETRY, ctx: 2 * RECALL_TRAINING_TOKENS, type: 'f32', seed: 1, name: 'finite-memory-llm recall model' };
    const vocabModelPath = join(work, 'vocab.gguf');
    writeLlamaModel(vocabModelPath, geometry, { vocabPieces: RECALL_PIECES, vocabCommon: false });
    const vocabModel = await loadModel(vocabModelPath, { threads: 1 });
    const T = RECALL_TRAINING_TOKENS;
    const training = packConversations(vocabModel, Array.from({ length: recipe.conversations }, (_, i) => trainingConversation(i + 1)), T);
    // The tokens a chat really holds must be the ones trained on: one conversation through the engine.
    const sample = benchConversation(7, RECALL_BENCH_SHAPE);
    const messages = recallMessages(sample);
    const expected = tokenizeConversation(vocabModel, sample, 1 << 20).tokens;
    const chat = await vocabModel.importTranscript(
      { format: 'finite-memory-llm/transcript', version: 1, messages: messages.slice(1), systemPrompt: RECALL_SYSTEM_PROMPT } as never,
      { maxTokens: 4 * T, systemPrompt: RECALL_SYSTEM_PROMPT },
    );
    const held = chat.memory().map((e) => e.token);
    const systemTokens = chat.memory().filter((e) => e.role === 'system').length;
    chat.dispose();
    // The chat holds the last reply's closing tokens back until the next turn (its carry).
    const carry = vocabModel.tokenize('<|im_end|>\n', { special: true }).length;
    if (held.join(',') !== expected.slice(0, expected.length - carry).join(',')) {
      let at = 0;
      while (held[at] === expected[at]) at++;
      throw new Error(`tokenization differs from the chat's at token ${at} of ${expected.length}: chat ${held.slice(at - 5, at + 10).join(" ")} vs data ${expected.slice(at - 5, at + 10).join(" ")}`);
    }
    // The check runs at the training length: every check conversation must fit in it.
    const longest = Math.max(...checkConvs.map((c) => tokenizeConversation(vocabModel, c, 1 << 20).tokens.length));
    if (longest > T) throw new Error(`the check's conversations reach ${longest} tokens, past the training length ${T}`);
    const nVocab = vocabModel.info.nVocab;
    // The parity sequence: PyTorch writes its logits for it, llama.cpp must compute the same ones.
    const parity = Int32Array.from(expected.slice(0, T));
    writeFileSync(join(work, 'parity.i32'), Buffer.from(parity.buffer));
    // Held-out conversations of the check's shape (other seeds than the check's), scored during training.
    const heldOut = packConversations(vocabModel, benchConversations(HELD_OUT_SEED, EVAL_CONVERSATIONS), T);
    writeFileSync(join(work, 'eval.i32'), Buffer.from(heldOut.tokens.buffer));
    writeFileSync(join(work, 'eval-weights.f32'), Buffer.from(heldOut.weights.buffer));
    vocabModel.dispose();
    writeFileSync(join(work, 'tokens.i32'), Buffer.from(training.tokens.buffer));
    writeFileSync(join(work, 'weights.f32'), Buffer.from(training.weights.buffer));
    const model = { ...RECALL_GEOMETRY, eps: 1e-5, ropeBase: 10000 };
    writeFileSync(join(work, 'meta.json'), JSON.stringify({ n: recipe.conversations, t: T, vocab: nVocab, model, train: recipe.train, evalN: EVAL_CONVERSATIONS }));
    console.log(`data: ${recipe.conversations} conversations, ${training.total} tokens (mean ${(training.total / recipe.conversations).toFixed(0)}), vocabulary ${nVocab}, ${((performance.now() - t0) / 1000).toFixed(0)} s`);

    // 2. Training.
    // torch's own threads do the work; OpenBLAS threads on top of them only oversubscribe the cores.
    const env = { ...process.env, OPENBLAS_NUM_THREADS: '1', OMP_NUM_THREADS: values.threads };
    // --trained DIR takes what an earlier train.py wrote there (an experiment's weights) instead.
    const trainedDir = values.trained ?? work;
    if (!values.trained) await train(work, env, phases.reduce((n, p) => n + p.steps, 0));

    // 3. Export with the same vocabulary and the trained weights.
    const index = JSON.parse(readFileSync(join(trainedDir, 'weights.json'), 'utf8')) as { tensors: Record<string, { dims: number[]; offset: number }> };
    const blob = readFileSync(join(trainedDir, 'weights.bin'));
    const trained = (name: string, dims: readonly number[]): Float32Array => {
      const t = index.tensors[name];
      if (!t || t.dims.join('x') !== dims.join('x')) throw new Error(`trained tensor ${name}: ${t ? t.dims.join('x') : 'missing'}, GGUF wants ${dims.join('x')}`);
      const n = dims.reduce((a, b) => a * b, 1);
      return new Float32Array(blob.buffer.slice(blob.byteOffset + t.offset, blob.byteOffset + t.offset + 4 * n));
    };
    mkdirSync(dirname(out), { recursive: true });
    const tmp = `${out}.tmp-${process.pid}`;
    writeLlamaModel(tmp, geometry, { vocabPieces: RECALL_PIECES, vocabCommon: false, weights: trained });

    // 4. The checks. First parity: an export error (RoPE pairing, head order, layout) shows here
    // as a logit difference, long before it shows as a failed recall check.
    const m = await loadModel(tmp, { threads: Number(values.threads) });
    const gap = logitParity(m, parity, systemTokens, new Float32Array(readFileSync(join(trainedDir, 'parity.f32')).buffer.slice(0)), nVocab);
    console.log(`parity: llama.cpp vs PyTorch logits over ${parity.length - systemTokens} tokens: max |diff| ${gap.maxDiff.toFixed(4)} (logits up to ${gap.maxAbs.toFixed(1)}), argmax agrees at ${(100 * gap.argmaxAgree).toFixed(1)}%`);
    if (gap.maxDiff > 0.02 * Math.max(1, gap.maxAbs)) {
      m.dispose();
      rmSync(tmp, { force: true });
      throw new Error('the exported model does not compute what PyTorch trained (see parity above)');
    }
    // Then recall: full cache, conversations at the training length. --check 0 skips it (for
    // experiments: only with --out, so an unchecked model never lands where the benchmark looks).
    if (checks === 0) {
      m.dispose();
      renameSync(tmp, out);
      console.log(`wrote ${out} UNCHECKED (--check 0) in ${((performance.now() - t0) / 1000).toFixed(0)} s`);
      return;
    }
    const { correct, total: asked, misses } = await recallAccuracy(m, checkConvs, 4 * T);
    m.dispose();
    const share = correct / asked;
    console.log(`check: ${correct}/${asked} questions answered with the full cache (${(100 * share).toFixed(1)}%), ${checkConvs.length} conversations`);
    if (share < 0.95) {
      for (const miss of misses.slice(0, 5)) console.log(`  asked ${JSON.stringify(miss.question)}: wanted ${JSON.stringify(miss.wanted)}, got ${JSON.stringify(miss.got)}`);
      rmSync(tmp, { force: true });
      throw new Error(`the recall model answers ${(100 * share).toFixed(1)}% of questions with the full cache (needs >= 95%)`);
    }
    renameSync(tmp, out);
    console.log(`wrote ${out} in ${((performance.now() - t0) / 1000).toFixed(0)} s`);
  } finally {
    // --keep-work DIR keeps the tokenized data and the trained weights (to rerun train.py by hand).
    if (values['keep-work']) renameSync(work, values['keep-work']);
    else rmSync(work, { recursive: true, force: true });
  }
}

if (process.argv[1] && resolve(process.argv[1]) === resolve(import.meta.filename)) {
  main().catch((e: unknown) => {
    console.error(e instanceof Error ? e.message : e);
    process.exit(1);
  });
}
