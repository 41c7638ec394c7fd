/**
 * Writes docs/models.md's table of model families x what works, by trying each on a generated model:
 * what its memory is and which part finite memory bounds, whether chats evict in place (each turn
 * prefilling only its new tokens), how positions are compacted when a chat reaches its position
 * limit, which policies keep the budget through evicting turns, whether a checkpoint round-trips,
 * and whether a turn's tokens equal the template's rendering of the whole conversation. Nothing in
 * the table is declared: every cell is what this run saw.
 * `npm run docs:families` rewrites docs/models.md between the markers; `--check` exits 1 when it is out
 * of date (test/model/families.test.ts runs that check).
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MODEL_FAMILIES, MODEL_FAMILY_NAMES, writeModel, type ModelFamily } from '../src/gguf/index.ts';
import { loadModel, POLICIES, type Chat, type Model, type ModelInfo } from '../src/index.ts';
import { replaceBetweenMarkers } from './options-doc.ts';

// The compaction column counts re-prefilled tokens (a probe): the test build of the addon.
process.env.FML_ADDON_PATH ??= join(import.meta.dirname, '..', 'build', 'Probes', 'finite_memory_llm_probes.node');

export const BEGIN = '<!-- families:begin (npm run docs:families) -->';
export const END = '<!-- families:end -->';

const MESSAGES = ['The cat sat.', 'Rain fell on the hill!', 'Why is the sky blue?'];

/** The invariants after a turn: within the budget, positions increasing below the limit, llama.cpp's view = the ledger's, only new tokens prefilled. */
async function turnHolds(chat: Chat, maxTokens: number, message: string, seed: number): Promise<boolean> {
  const internals = chat._internals();
  const before = internals.cacheState();
  const expected = internals.countTurnTokens(message) + before.carriedTokens + before.pendingSystemTokens;
  const r = await chat.send(message, { maxNewTokens: 6, temperature: 0.9, seed });
  const c = internals.cacheState();
  return r.stats.promptTokens === expected && c.ledgerTokens <= maxTokens && c.positionsIncreasing && c.cachePosMin === c.ledgerPosFirst &&
    c.cachePosMax === c.ledgerPosLast && c.ledgerPosLast < c.positionLimit;
}

async function policiesThatHold(model: Model): Promise<string[]> {
  const ok: string[] = [];
  for (const policy of POLICIES) {
    const maxTokens = 96;
    const chat = model.createChat({ policy, maxTokens, windowSize: 16, sinkTokens: 4, systemPrompt: 'Be brief.', maxPolicyMs: 0, threads: 1 });
    let holds = true;
    for (let t = 0; t < 20 && holds; t++) holds = await turnHolds(chat, maxTokens, `turn ${t}. ${MESSAGES[t % 3]}`, t);
    if (holds && chat.stats().evictions > 0) ok.push(policy);
    chat.dispose();
  }
  return ok;
}

/**
 * How a chat that reaches its position limit compacts, when it held the invariants doing so: a
 * K-shift (llama.cpp's, or for M-RoPE keys this library's rotation), or a re-prefill of the retained
 * tokens (seen as tokens decoded outside the scheduler's steps, beyond the sliding window's repair
 * of its last slidingWindow tokens).
 */
async function compactionAtLimit(model: Model): Promise<string> {
  const maxTokens = 96;
  const chat = model.createChat({ maxTokens, windowSize: 16, systemPrompt: 'Be brief.', positionLimit: 240, threads: 1 });
  const before = chat._internals().engineStats(true);
  let holds = true;
  for (let t = 0; t < 24 && holds; t++) holds = await turnHolds(chat, maxTokens, `turn ${t}. ${MESSAGES[t % 3]}`, t);
  const compactions = chat.stats().compactions;
  const after = chat._internals().engineStats(true);
  const reprefilled = after.sideTokens - before.sideTokens > compactions * model.info.slidingWindow;
  const llamaShifted = after.deferredMoves > before.deferredMoves && after.rotatedMoves === before.rotatedMoves;
  chat.dispose();
  if (!holds || compactions === 0) return 'failed';
  if (reprefilled) return 're-prefill of the retained tokens';
  if (model.info.rope === 'none') return `cells moved by ${llamaShifted ? 'llama.cpp' : 'this library'} (no positions in the keys)`;
  if (llamaShifted) return 'K-shift';
  // Why is docs/memory.md's (YaRN's magnitude, NoPE layers the shift would turn, Hadamard matrices that do not fit).
  const why = ['mrope', 'imrope'].includes(model.info.rope) ? 'llama.cpp has none for M-RoPE' : "llama.cpp's would get these keys wrong";
  return `K-shift (by this library: ${why})`;
}

/** What the model keeps, and which part of it finite memory bounds. */
function memoryCell(i: ModelInfo): string {
  switch (i.memory) {
    case 'kv': return 'KV cache (finite)';
    case 'kv-swa': return `KV cache (finite), sliding window ${i.slidingWindow} (kept at the full budget)`;
    case 'hybrid': return `attention KV of ${i.kvLayers} of ${i.nLayer} layers (finite) + a recurrent state of ${formatBytes(i.recurrentBytes)} per chat (fixed, kept)`;
    case 'recurrent': return 'recurrent state only';
  }
}

function formatBytes(n: number): string {
  return n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / (1 << 20)).toFixed(1)} MiB`;
}

async function checkpointRoundTrips(model: Model, dir: string): Promise<boolean> {
  const chat = model.createChat({ maxTokens: 64, windowSize: 16, threads: 1 });
  for (let t = 0; t < 8; t++) await chat.send(`message ${t}. ${MESSAGES[t % 3]}`, { maxNewTokens: 6, temperature: 0 });
  const path = join(dir, 'c.ckpt');
  await chat.saveCheckpoint(path);
  const restored = await model.loadChat(path);
  // Seeded sampling over a few turns: a random-weight model may answer EOS at once, which compares nothing.
  let same = chat.stats().evictions > 0 && JSON.stringify(chat.memory()) === JSON.stringify(restored.memory());
  let generated = 0;
  for (let seed = 0; seed < 3 && same; seed++) {
    const a = await chat.send(`next ${seed}`, { maxNewTokens: 6, temperature: 0.9, seed });
    const b = await restored.send(`next ${seed}`, { maxNewTokens: 6, temperature: 0.9, seed });
    generated += a.stats.generatedTokens;
    same = a.response === b.response;
  }
  same = same && generated > 0;
  chat.dispose();
  restored.dispose();
  return same;
}

async function framingMatches(model: Model): Promise<boolean> {
  const messages = [
    { role: 'user' as const, content: 'Hello there' },
    { role: 'assistant' as const, content: 'Hi. The sky is blue' },
  ];
  const chat = await model.importTranscript({ format: 'finite-memory-llm/transcript', version: 1, systemPrompt: 'Be brief.', messages }, { maxTokens: 512, threads: 1 });
  await chat.send('Why?', { maxNewTokens: 1, temperature: 0 });
  const rendered = model.applyTemplate([{ role: 'system', content: 'Be brief.' }, ...messages, { role: 'user', content: 'Why?' }], { addAssistant: true });
  const same = JSON.stringify(chat.memory().map((e) => e.token)) === JSON.stringify(model.tokenize(rendered, { addBos: true, special: true }));
  chat.dispose();
  return same;
}

export async function familiesTable(): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), 'fml-families-table-'));
  const rows = [
    '| family (`make-model --arch`) | llama.cpp architecture | memory | in-place eviction (positions kept) | compaction at the position limit | policies that keep the budget | checkpoint round trip | turn tokens = template rendering |',
    '|---|---|---|---|---|---|---|---|',
  ];
  try {
    for (const family of MODEL_FAMILY_NAMES as ModelFamily[]) {
      const path = join(dir, `${family}.gguf`);
      writeModel(path, { family, seed: 3 });
      const model = await loadModel(path, { threads: 1 });
      const i = model.info;
      const memory = memoryCell(i);
      if (!i.inPlaceEviction) {
        const why = i.unsupportedReason!.replace(/^architecture \S+ /, '').split(':')[0];
        rows.push(`| ${family} | ${i.architecture} | ${memory} | no: UnsupportedModelError (${why}) | - | - | - | - |`);
      } else {
        const policies = await policiesThatHold(model);
        const evicts = i.memory === 'hybrid' ? 'yes, from the attention KV' : 'yes';
        const rope = i.rope === 'none' ? 'NoPE' : `${i.rope} RoPE`;
        rows.push(`| ${family} | ${i.architecture} | ${memory} | ${evicts} | ${await compactionAtLimit(model)} (${rope}) | ${policies.length === POLICIES.length ? 'all five' : policies.join(', ') || 'none'} | ${(await checkpointRoundTrips(model, dir)) ? 'yes' : 'no'} | ${(await framingMatches(model)) ? 'yes' : 'no'} |`);
      }
      model.dispose();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const about = MODEL_FAMILY_NAMES.map((f) => `\`${f}\`: ${MODEL_FAMILIES[f].about}`).join('; ');
  return `${rows.join('\n')}\n\nGenerated models (seeded random weights, tiny shapes): ${about}.`;
}

export function readmeWithTable(readme: string, table: string): string {
  return replaceBetweenMarkers(readme, BEGIN, END, table);
}

if (process.argv[1] && import.meta.url.endsWith(process.argv[1].split('/').pop()!)) {
  const path = join(import.meta.dirname, '..', 'docs', 'models.md');
  const readme = readFileSync(path, 'utf8');
  const next = readmeWithTable(readme, await familiesTable());
  if (process.argv.includes('--check')) {
    if (next !== readme) {
      console.error('docs/models.md families table is out of date: run npm run docs:families');
      process.exit(1);
    }
  } else {
    writeFileSync(path, next);
  }
}
