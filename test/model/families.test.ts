// Every model family the generator writes, against the real KV cache: the invariants over hundreds
// of turns, shift invariance, checkpoints, all five policies, and framing equal to the template's
// rendering of the whole conversation. Families that cannot evict in place get a typed error.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MODEL_FAMILIES, writeModel, type ModelFamily } from '../../src/gguf/index.ts';
import { loadModel, POLICIES, UnsupportedModelError, type Chat, type Model } from '../../src/index.ts';
import { checkCache, maxAbsDiff, THREADS } from '../helpers.ts';

const dir = mkdtempSync(join(tmpdir(), 'fml-families-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const SUPPORTED: ModelFamily[] = ['llama', 'mistral', 'smollm3', 'qwen2', 'qwen3', 'gemma3', 'gemma4', 'phi3', 'qwen3moe', 'gptoss', 'deepseek2', 'deepseek3', 'glm4moe', 'qwen2vl', 'qwen3vl', 'qwen35', 'qwen35moe', 'qwen3next', 'lfm2', 'granite4', 'nemotron3'];
const SLIDING: ModelFamily[] = ['gemma3', 'gemma4', 'gptoss'];
const HYBRID: ModelFamily[] = ['qwen35', 'qwen35moe', 'qwen3next', 'lfm2', 'granite4', 'nemotron3'];
const MROPE: ModelFamily[] = ['qwen2vl', 'qwen3vl', 'qwen35', 'qwen35moe'];
const UNSUPPORTED: ModelFamily[] = ['mamba'];
/** Families whose files declare a multi-token-prediction block after the trunk. */
const MTP: ModelFamily[] = ['glm4moe', 'deepseek3'];

async function load(family: ModelFamily): Promise<Model> {
  const path = join(dir, `${family}.gguf`);
  writeModel(path, { family, seed: 7 });
  return loadModel(path, { threads: THREADS });
}

const MESSAGES = ['The cat sat.', 'Rain fell on the hill!', 'Why is the sky blue?', 'Bread and jam, please.'];

/** Loads a model of an unusual KV layout for `check`, and disposes of it after. */
async function withLayoutModel(path: string, check: (m: Model) => Promise<void>): Promise<void> {
  const m = await loadModel(path, { threads: THREADS });
  try {
    await check(m);
  } finally {
    m.dispose();
  }
}

/** 20 evicting turns that compact at a position limit of 128 (the KV invariants after each), then a whole-sequence shift and a checkpoint round trip that leave the logits as they were; the chat's stats. */
async function evictsShiftsRoundTrips(m: Model) {
  const chat = m.createChat({ maxTokens: 64, windowSize: 16, kvType: 'f32', systemPrompt: 'You are terse.', positionLimit: 128 });
  for (let t = 0; t < 20; t++) {
    await chat.send(`turn ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 5, temperature: 0 });
    checkCache(chat, 64);
  }
  const s = chat.stats();
  expect(s.compactions).toBeGreaterThan(0);
  const internals = chat._internals();
  const probe = m.tokenize('the')[0]!;
  const before = internals.probeLogits(probe);
  internals.shiftPositions(40);
  expect(maxAbsDiff(before, internals.probeLogits(probe))).toBeLessThan(1e-3);
  const back = await m.loadChat(await chat.checkpoint());
  expect(maxAbsDiff(internals.probeLogits(probe), back._internals().probeLogits(probe))).toBe(0);
  back.dispose();
  chat.dispose();
  return s;
}

describe.each(SUPPORTED)('family %s', (family) => {
  let model: Model;
  beforeAll(async () => {
    model = await load(family);
  });
  afterAll(() => model?.dispose());

  it('loads as its architecture with its template, and evicts in place', () => {
    expect(model.info.architecture).toBe(MODEL_FAMILIES[family].arch);
    // llama.cpp has no formatter for Gemma 4's template: ChatML, as for any template it does not know.
    expect(model.info.framing).toBe(family === 'gemma4' ? 'chatml' : 'template');
    expect(model.info.inPlaceEviction).toBe(true);
    expect(model.info.unsupportedReason).toBeNull();
    expect(model.info.memory).toBe(SLIDING.includes(family) ? 'kv-swa' : HYBRID.includes(family) ? 'hybrid' : 'kv');
    expect(model.info.slidingWindow).toBe(SLIDING.includes(family) ? 16 : 0);
    // Hybrids: half the layers attend (attentionInterval 2) and each chat has a recurrent state besides.
    // (Nemotron 3: one of its four layers; its expert layers keep neither.)
    // (GLM-4.5, DeepSeek-V3: one more, their multi-token-prediction block's, which llama.cpp allocates and the trunk never attends with.)
    expect(model.info.kvLayers).toBe(family === 'nemotron3' ? 1 : HYBRID.includes(family) ? model.info.nLayer / 2 : model.info.nLayer + (MTP.includes(family) ? 1 : 0));

    expect(model.info.recurrentBytes > 0).toBe(HYBRID.includes(family));
    // M-RoPE: llama.cpp will not shift these keys; this library rotates a text token's keys itself.
    expect(model.info.canShift).toBe(true);
    expect(model.info.rope).toBe(MROPE.includes(family) ? (['qwen2vl'].includes(family) ? 'mrope' : 'imrope') : model.info.rope);
  });

  it('keeps the KV invariants for 200 turns, each prefilling only its new tokens', async () => {
    const maxTokens = 96; // larger than gemma3's window of 16: its sliding layers hold the whole budget
    const chat = model.createChat({ maxTokens, windowSize: 16, sinkTokens: 4, systemPrompt: 'You are terse.' });
    let pinned0: string | undefined;
    for (let t = 0; t < 200; t++) {
      const internals = chat._internals();
      const before = internals.cacheState();
      const message = `turn ${t}. ${MESSAGES[t % 4]}`;
      const expectedPrefill = internals.countTurnTokens(message) + before.carriedTokens + before.pendingSystemTokens;
      const r = await chat.send(message, { maxNewTokens: 3 + (t % 7), temperature: 0.9, seed: t });
      expect(r.stats.promptTokens).toBe(expectedPrefill);
      checkCache(chat, maxTokens);
      const pinned = JSON.stringify(chat.memory().filter((e) => e.pinned).map((e) => [e.position, e.token]));
      pinned0 ??= pinned;
      expect(pinned).toBe(pinned0);
    }
    expect(chat.stats().evictions).toBeGreaterThan(20);
    chat.dispose();
  });

  it.runIf(family === 'deepseek2' || family === 'deepseek3')('latent attention: kvBytes counts one F16 row a token and layer (the latent and the shared rotary key), no values', async () => {
    const chat = model.createChat({ maxTokens: 64, kvType: 'f16' });
    await chat.send('The cat sat.', { maxNewTokens: 4, temperature: 0 });
    const s = chat.stats();
    expect(s.kvBytes).toBe(s.tokensRetained * model.info.kvLayers * (4 * 16 + 8) * 2);
    chat.dispose();
  });

  it.runIf(family === 'deepseek2')('a multi-token-prediction block the file declares: its KV layer is counted, and chats run, move and round-trip as without it', async () => {
    // DeepSeek-V3, Kimi K2 and GLM-4.7-Flash GGUFs carry a NextN block after the trunk: llama.cpp's
    // main context keeps a KV layer for it that the trunk never attends with.
    const path = join(dir, 'deepseek2-nextn.gguf');
    writeModel(path, { family, seed: 7, nextnLayers: 1 });
    await withLayoutModel(path, async (mtp) => {
      expect(mtp.info.nLayer).toBe(model.info.nLayer);
      expect(mtp.info.kvLayers).toBe(model.info.kvLayers + 1);
      const s = await evictsShiftsRoundTrips(mtp);
      expect(s.kvBytes).toBe(s.tokensRetained * (model.info.nLayer + 1) * (4 * 16 + 8) * 4);
    });
  });

  it.runIf(family === 'gemma4')('layers that read earlier layers\' KV (Gemma 4 E2B/E4B, Gemma 3n): kvLayers and kvBytes count only the layers that keep cells; chats evict, shift and round-trip', async () => {
    const path = join(dir, 'gemma4-shared.gguf');
    writeModel(path, { family, seed: 7, layers: 4, sharedKvLayers: 2 });
    await withLayoutModel(path, async (shared) => {
      expect(shared.info.nLayer).toBe(4);
      expect(shared.info.kvLayers).toBe(2);
      const s = await evictsShiftsRoundTrips(shared);
      // One sliding layer of headDim and one full layer of 2 x headDim keep K and V, F32.
      expect(s.kvBytes).toBe(s.tokensRetained * model.info.nHeadKv * (16 + 32) * 2 * 4);
    });
  });

  it('a whole-sequence position shift leaves the next-token logits unchanged', async () => {
    const chat = model.createChat({ maxTokens: 256, kvType: 'f32', flashAttention: false, systemPrompt: 'You are terse.' });
    await chat.send('Tell me about the sea and the sky.', { maxNewTokens: 12, temperature: 0 });
    const internals = chat._internals();
    const probe = model.tokenize('the')[0]!;
    const before = internals.probeLogits(probe);
    internals.shiftPositions(40);
    const shifted = internals.probeLogits(probe);
    internals.shiftPositions(-40);
    expect(maxAbsDiff(before, shifted)).toBeLessThan(1e-3);
    // Below position 0 the M-RoPE rotation refuses (a cell at -1 would read as empty); llama.cpp's seq_add drops such cells.
    if (MROPE.includes(family)) expect(() => internals.shiftPositions(-1)).toThrow(/below 0/);
    expect(maxAbsDiff(before, internals.probeLogits(model.tokenize('sea')[0]!))).toBeGreaterThan(1e-3);
    chat.dispose();
  });

  it('round-trips a checkpoint after evictions: same memory, logits and seeded continuation', async () => {
    const chat = model.createChat({ maxTokens: 80, windowSize: 16, kvType: 'f32', flashAttention: false, systemPrompt: 'Be brief.' });
    for (let t = 0; t < 10; t++) await chat.send(`message ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 8, temperature: 0.8, seed: t });
    expect(chat.stats().evictions).toBeGreaterThan(0);
    const path = join(dir, `${family}.ckpt`);
    await chat.saveCheckpoint(path);
    const restored = await model.loadChat(path);
    expect(restored.memory()).toEqual(chat.memory());
    const probe = model.tokenize('the')[0]!;
    expect(maxAbsDiff(chat._internals().probeLogits(probe), restored._internals().probeLogits(probe))).toBeLessThan(1e-4);
    // Several turns on, through more evictions (for gemma3: tokens leaving and re-entering the
    // sliding window by compaction), the restored chat still answers exactly like the original.
    const evictionsBefore = chat.stats().evictions;
    for (let t = 0; t < 6; t++) {
      const a = await chat.send(`next ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 10, temperature: 0.9, seed: 99 + t });
      const b = await restored.send(`next ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 10, temperature: 0.9, seed: 99 + t });
      expect(b.response).toBe(a.response);
      expect(a.stats.generatedTokens).toBeGreaterThan(0);
    }
    expect(chat.stats().evictions).toBeGreaterThan(evictionsBefore);
    expect(maxAbsDiff(chat._internals().probeLogits(probe), restored._internals().probeLogits(probe))).toBeLessThan(1e-4);
    chat.dispose();
    restored.dispose();
  });

  it.each(POLICIES)('policy %s keeps the invariants for 40 turns', async (policy) => {
    const maxTokens = 128;
    const chat = model.createChat({ policy, maxTokens, windowSize: 24, sinkTokens: 4, systemPrompt: 'You are terse.', maxPolicyMs: 0 });
    const scored = policy === 'importance' || policy === 'hybrid';
    for (let t = 0; t < 40; t++) {
      const r = await chat.send(`turn ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 4 + (t % 5), temperature: 0.9, seed: t });
      expect(r.stats.policy).toBe(policy);
      // Attention weights in every family (sliding-window models: their full layers' weights).
      expect(r.stats.importanceSignal).toBe(scored ? 'attention' : null);
      checkCache(chat, maxTokens);
    }
    const s = chat.stats();
    expect(s.evictions).toBeGreaterThan(3);
    expect(s.fallbackCount).toBe(0);
    if (scored) {
      // The cell -> position map of the cache the weights index: no weight on a later position.
      const cache = chat._internals().cacheState();
      expect(cache.attentionRowsChecked).toBeGreaterThan(1000);
      expect(cache.causalViolations).toBe(0);
      expect(chat.memory().some((e) => !e.pinned && e.score > 0)).toBe(true);
    }
    chat.dispose();
  });

  // windowSize 0: the scored policies may pick the newest tokens, but never the newest one (a
  // sliding-window cache left without it refused the next decode: Gemma 4 with hybrid, turn 8).
  it.each(['importance', 'hybrid'] as const)('policy %s with windowSize 0 keeps the invariants for 40 turns', async (policy) => {
    const maxTokens = 128;
    const chat = model.createChat({ policy, maxTokens, windowSize: 0, sinkTokens: 4, systemPrompt: 'You are terse.', maxPolicyMs: 0 });
    for (let t = 0; t < 40; t++) {
      await chat.send(`turn ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 4 + (t % 5), temperature: 0.9, seed: t });
      checkCache(chat, maxTokens);
    }
    expect(chat.stats().fallbackCount).toBe(0);
    chat.dispose();
  });

  // With flash attention on, the weights are recomputed from the flash node's inputs (the full
  // layers' only, for sliding-window models; the attention layers of a hybrid): the same scores as the
  // graph's own weights, then 30 evicting turns with the cell map checked (checkCache).
  it('importance reads the same attention weights with flash attention on', async () => {
    // An imported conversation and one sampled token (carried, not decoded): the same tokens in both,
    // whatever greedy decoding would pick with either kernel's rounding.
    const messages = MESSAGES.flatMap((m, i) => [{ role: 'user' as const, content: `turn ${i}. ${m}` }, { role: 'assistant' as const, content: MESSAGES[(i + 1) % 4]! }]);
    const memories = await Promise.all([false, true].map(async (flashAttention) => {
      const chat = await model.importTranscript({ format: 'finite-memory-llm/transcript', version: 1, systemPrompt: 'You are terse.', messages },
        { policy: 'importance', importanceScore: 'mean', maxTokens: 512, flashAttention });
      await chat.send('One more question', { maxNewTokens: 1, temperature: 0 });
      const memory = chat.memory();
      chat.dispose();
      return memory;
    }));
    const [off, on] = memories as [ReturnType<Chat['memory']>, ReturnType<Chat['memory']>];
    expect(on.map((e) => e.token)).toEqual(off.map((e) => e.token));
    expect(Math.max(...off.map((e) => e.score))).toBeGreaterThan(0.01);
    expect(Math.max(...off.map((e, i) => Math.abs(e.score - on[i]!.score)))).toBeLessThan(1e-3);

    const chat = model.createChat({ policy: 'importance', maxTokens: 96, windowSize: 16, sinkTokens: 4, flashAttention: true, maxPolicyMs: 0 });
    for (let t = 0; t < 30; t++) {
      const r = await chat.send(`turn ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 4 + (t % 5), temperature: 0.9, seed: t });
      expect(r.stats.importanceSignal).toBe('attention');
      checkCache(chat, 96);
    }
    expect(chat.stats().evictions).toBeGreaterThan(3);
    expect(chat._internals().cacheState().attentionRowsChecked).toBeGreaterThan(1000);
    chat.dispose();
  });

  it('prefills exactly the template rendering of the whole conversation, message by message', async () => {
    await expectPrefillIsTemplateRendering(model);
  });
});

/** An imported conversation and a sent message are, token for token, the template's rendering of the whole conversation. */
async function expectPrefillIsTemplateRendering(model: Model): Promise<void> {
  const system = 'You are terse.';
  // Whitespace around content: templates that trim it (Llama 2 and 3, Gemma) must be followed.
  const turns = [
    { user: 'Hello there', assistant: 'Hi. The sky is blue' },
    { user: '  Why is that?\n', assistant: 'Because of the sea' },
    { user: 'Thank you', assistant: 'Yes' },
  ];
  const last = 'One more question';
  const chat = await model.importTranscript({
    format: 'finite-memory-llm/transcript',
    version: 1,
    systemPrompt: system,
    messages: turns.flatMap((t) => [{ role: 'user' as const, content: t.user }, { role: 'assistant' as const, content: t.assistant }]),
  }, { maxTokens: 1024 });
  await chat.send(last, { maxNewTokens: 1, temperature: 0 });
  const cached = chat.memory().map((e) => e.token);
  const rendered = model.applyTemplate([
    { role: 'system', content: system },
    ...turns.flatMap((t) => [{ role: 'user' as const, content: t.user }, { role: 'assistant' as const, content: t.assistant }]),
    { role: 'user', content: last },
  ], { addAssistant: true });
  const expected = model.tokenize(rendered, { addBos: true, special: true });
  // The cache holds the rendered conversation (the one sampled reply token is not decoded yet).
  expect(chat.stats().tokensEvicted).toBe(0);
  const show = (t: number[]) => t.map((x) => model.detokenize([x], { special: true })).join('|');
  expect(show(cached)).toBe(show(expected));
  expect(cached).toEqual(expected);
  chat.dispose();
}

describe('templates of real models outside the generated families', () => {
  // Meta's Llama-2-chat template (llama.cpp: llama2-sys-strip): content stripped inside '[INST] ' and ' [/INST]'.
  const LLAMA2 = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";
  it('Llama 2 chat: prefills exactly its rendering (whitespace stripped)', async () => {
    const path = join(dir, 'llama2-chat.gguf');
    writeModel(path, { family: 'llama', seed: 7, template: 'mistral', chatTemplate: LLAMA2 });
    const model = await loadModel(path, { threads: THREADS });
    try {
      await expectPrefillIsTemplateRendering(model);
    } finally {
      model.dispose();
    }
  });
});

describe('sliding-window models: compaction brings old tokens back within the window', () => {
  it('a restored checkpoint answers like the original when the retained tokens fit in the window again', async () => {
    // Window 40, budget 64: after an eviction fewer than 40 tokens can remain, so the system prompt is
    // within the window again by position. Out-of-window cells the live chat still had but its
    // checkpoint does not store must not come back (they are pruned when an eviction compacts).
    const path = join(dir, 'gemma3-w32.gguf');
    writeModel(path, { family: 'gemma3', seed: 11, slidingWindow: 40 });
    const model = await loadModel(path, { threads: THREADS });
    const chat = model.createChat({ maxTokens: 64, windowSize: 8, sinkTokens: 2, kvType: 'f32', systemPrompt: 'Be kind.' });
    for (let t = 0; t < 4; t++) await chat.send(`hi ${t}`, { maxNewTokens: 8, temperature: 0.8, seed: t });
    // Past the window without evicting yet: fill close to the budget.
    const ckpt = join(dir, 'gemma3-w32.ckpt');
    await chat.saveCheckpoint(ckpt);
    const restored = await model.loadChat(ckpt);
    let evictions = 0;
    for (let t = 0; t < 8; t++) {
      const a = await chat.send(`more ${t}`, { maxNewTokens: 8, temperature: 0.9, seed: 50 + t });
      const b = await restored.send(`more ${t}`, { maxNewTokens: 8, temperature: 0.9, seed: 50 + t });
      expect(b.response).toBe(a.response);
      evictions += a.stats.evictions;
    }
    expect(evictions).toBeGreaterThan(2);
    const probe = model.tokenize('the')[0]!;
    expect(maxAbsDiff(chat._internals().probeLogits(probe), restored._internals().probeLogits(probe))).toBeLessThan(1e-4);
    chat.dispose();
    restored.dispose();
    model.dispose();
  });
});

// Tokens decoded and then removed (an aborted prefill, a summary's scratch) can take the cells of the
// window's own tokens: llama.cpp reuses a cell once it is outside the window of the sequence's newest
// token. Longer than the window (16 here), they took them all, and the next decode was refused.
describe.each(SLIDING)('%s: tokens longer than the window, removed again, leave the window as it was', (family) => {
  let model: Model;
  let wide: Model;   // window 256
  beforeAll(async () => {
    model = await load(family);
    const path = join(dir, `${family}-w256.gguf`);
    writeModel(path, { family, seed: 7, slidingWindow: 256 });
    wide = await loadModel(path, { threads: THREADS });
  });
  afterAll(() => {
    model?.dispose();
    wide?.dispose();
  });
  const EXACT = { kvType: 'f32', flashAttention: false } as const;
  const talk = async (chat: Chat, from: number, turns: number) => {
    const out: string[] = [];
    for (let t = from; t < from + turns; t++) out.push((await chat.send(`turn ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 6, temperature: 0.9, seed: t })).response);
    return out;
  };

  it('an aborted prefill: same memory, next logits and replies as a chat that never saw it', async () => {
    const opts = { ...EXACT, policy: 'sliding', maxTokens: 1024, batchSize: 8, systemPrompt: 'Be brief.' } as const;
    const twin = model.createChat(opts);
    await talk(twin, 0, 3);
    const chat = model.createChat({ ...opts, testTokenDelayMs: 10 });
    await talk(chat, 0, 3);
    const memory = chat.memory();
    const r = await chat.send('word '.repeat(300), { maxNewTokens: 4, signal: AbortSignal.timeout(150) });
    expect(r.stopReason).toBe('abort');
    expect(r.stats.promptTokens).toBe(0);
    expect(chat.memory()).toEqual(memory);
    checkCache(chat, 1024);
    const probe = model.tokenize('the')[0]!;
    expect(maxAbsDiff(chat._internals().probeLogits(probe), twin._internals().probeLogits(probe))).toBeLessThan(1e-4);
    expect(await talk(chat, 3, 2)).toEqual(await talk(twin, 3, 2));
    chat.dispose();
    twin.dispose();
  });

  it('an aborted prefill once llama.cpp reuses cells: the window holds the history\'s newest tokens again', async () => {
    // Enough turns that the stream's 256 cells have all been used: cells are now taken wherever the
    // search finds a free or out-of-window one, the history's own among them.
    const chat = model.createChat({ ...EXACT, policy: 'sliding', maxTokens: 128, batchSize: 8, systemPrompt: 'Be brief.', testTokenDelayMs: 10 });
    await talk(chat, 0, 30);
    const r = await chat.send('word '.repeat(45), { maxNewTokens: 4, signal: AbortSignal.timeout(60) });
    expect(r.stopReason).toBe('abort');
    expect(r.stats.promptTokens).toBe(0);
    checkCache(chat, 128);   // windowIntact
    await talk(chat, 30, 3);
    checkCache(chat, 128);
    chat.dispose();
  });

  it('a window saved while a K-shift is pending keeps its keys rotated', async () => {
    const chat = model.createChat({ ...EXACT, maxTokens: 256, systemPrompt: 'Be brief.' });
    await talk(chat, 0, 3);
    const probe = model.tokenize('the')[0]!;
    const before = chat._internals().probeLogits(probe);
    chat._internals().shiftPositions(40);   // the shift is pending until the next decode
    chat._internals().windowRoundTrip();
    expect(maxAbsDiff(chat._internals().probeLogits(probe), before)).toBeLessThan(1e-3);
    checkCache(chat, 256);
    chat.dispose();
  });

  it('a summary placed within the window is in the sliding layers too', async () => {
    // Window 256 over a budget of 128: wherever the summary lands, the next token's window covers it.
    for (const positions of ['keep', 'compact'] as const) {
      const chat = wide.createChat({ ...EXACT, policy: 'rolling_summary', positions, maxTokens: 128, windowSize: 24, summaryTokens: 16, systemPrompt: 'Be brief.', maxPolicyMs: 0 });
      let summaries = 0;
      for (let t = 0; t < 20; t++) {
        summaries += (await chat.send(`turn ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 8, temperature: 0.9, seed: t })).stats.summaryTokens > 0 ? 1 : 0;
        checkCache(chat, 128);   // windowIntact: the summary's tokens included
      }
      expect(summaries).toBeGreaterThan(1);
      chat.dispose();
    }
  });

  // An import's reply makes room mid-turn; the summary of what it evicts lands where the first
  // evicted range was. Aborted in the reply, the rollback takes the exchange and keeps the rest.
  // Where the reply's prefill runs depends on the summary's length: a twin chat, identical so far,
  // times the whole import first, and the abort lands half-way through the reply's last steps.
  const abortInReply = async (m: Model, chat: Chat, twin: Chat, user: string, reply: string) => {
    const t0 = performance.now();
    await twin._ingest(user, reply);
    const total = performance.now() - t0;
    const replyMs = Math.ceil(m.tokenize(reply).length / 8) * 10;
    await expect(chat._ingest(user, reply, AbortSignal.timeout(Math.round(total - replyMs / 2)))).rejects.toMatchObject({ code: 'ABORTED' });
  };

  it('an import aborted in its reply after a summary of its own message: nothing of the exchange stays', async () => {
    const opts = { ...EXACT, policy: 'rolling_summary', maxTokens: 160, batchSize: 8, systemPrompt: 'Be brief.', maxPolicyMs: 0, testTokenDelayMs: 10 } as const;
    const chat = model.createChat(opts);
    const twin = model.createChat(opts);
    // ~100 tokens of message, then the reply's room (a summary of the message), then ~130 of reply.
    await abortInReply(model, chat, twin, 'a '.repeat(90), 'a '.repeat(120));
    expect(chat.stats().summary.length).toBeGreaterThan(0);   // the summary was written
    expect(chat.memory().filter((e) => e.turn > 0)).toEqual([]);
    checkCache(chat, 160);
    await talk(chat, 0, 2);
    checkCache(chat, 160);
    chat.dispose();
    twin.dispose();
  });

  it('an import aborted in its reply after a summary of older history: the summary stays, in the window too', async () => {
    // Window 256: the summary of the history the reply evicts lands within the next token's window.
    const opts = { ...EXACT, policy: 'rolling_summary', maxTokens: 256, batchSize: 8, summaryTokens: 16, systemPrompt: 'Be brief.', maxPolicyMs: 0, testTokenDelayMs: 10 } as const;
    const chat = wide.createChat(opts);
    const twin = wide.createChat(opts);
    await talk(chat, 0, 10);
    await talk(twin, 0, 10);
    const evictions = chat.stats().evictions;
    // ~40 tokens of message, the reply's room (a summary of older history), ~220 tokens of reply.
    await abortInReply(wide, chat, twin, 'a '.repeat(36), 'a '.repeat(200));
    expect(chat.stats().evictions).toBeGreaterThan(evictions);
    const memory = chat.memory();
    expect(memory.filter((e) => e.turn > 10 && e.role !== 'summary')).toEqual([]);
    expect(memory.some((e) => e.role === 'summary')).toBe(true);
    checkCache(chat, 256);   // windowIntact: the summary's cells are in the sliding layers
    await talk(chat, 10, 2);
    checkCache(chat, 256);
    chat.dispose();
    twin.dispose();
  });

  it('forgetting the newest turn, longer than the window: the window holds the tokens before it again', async () => {
    const chat = model.createChat({ ...EXACT, policy: 'sliding', maxTokens: 128, batchSize: 8, systemPrompt: 'Be brief.' });
    await talk(chat, 0, 30);   // every cell of the stream used: cells are reused where the search finds them
    const r = await chat.send('a '.repeat(90), { maxNewTokens: 4, temperature: 0 });
    const last = Math.max(...chat.memory().map((e) => e.turn));
    expect(await chat.forget(last)).toBeGreaterThan(16);
    checkCache(chat, 128);   // windowIntact
    expect(r.stats.promptTokens).toBeGreaterThan(40);
    await talk(chat, 30, 2);
    checkCache(chat, 128);
    chat.dispose();
  });

  it('a summary of nearly all the history once llama.cpp reuses cells: the window is decoded again', async () => {
    // A summarizing policy frees room for its summary too: a message that needs nearly all of the
    // room takes nearly every unpinned token, and the summary is decoded after the history and moved
    // to where the first was. The window then holds cells the sliding layers must not see: the chat
    // decodes the window's tokens again at its next contribution (repair_window).
    const opts = { ...EXACT, policy: 'rolling_summary', maxTokens: 128, batchSize: 8, summaryTokens: 16, sinkTokens: 0, maxPolicyMs: 0 } as const;
    const setUp = async () => {
      const c = model.createChat(opts);
      await c.send('Remember this: the code is 4817 and the door is blue.', { maxNewTokens: 2, temperature: 0, pin: true });
      await talk(c, 0, 12);   // every cell of the stream used: cells are reused where the search finds them
      return c;
    };
    // The longest message that fits beside the pinned tokens, found on a twin (a send that fits runs).
    const twin = await setUp();
    let longest = 0;
    for (let words = 120; words > 0 && longest === 0; words--) {
      try {
        await twin.send('word '.repeat(words), { maxNewTokens: 1, temperature: 0 });
        longest = words;
      } catch (e) {
        expect(e).toMatchObject({ code: 'PROMPT_TOO_LARGE' });
      }
    }
    twin.dispose();
    const chat = await setUp();
    const repairs = chat._internals().cacheState().windowRepairs;
    // A few words less: room for a short summary beyond what the message and its reply need, while
    // every unpinned token still goes (the newest among them: the end of the conversation moves back).
    const last = await chat.send('word '.repeat(longest - 3), { maxNewTokens: 1, temperature: 0 });
    expect(last.stats.summaryTokens).toBeGreaterThan(0);
    expect(last.stats.evictedTokens).toBeGreaterThan(40);
    expect(chat._internals().cacheState().windowRepairs).toBeGreaterThan(repairs);
    checkCache(chat, 128);   // windowIntact
    await talk(chat, 12, 2);
    checkCache(chat, 128);
    chat.dispose();
  });

  it('model.dispose() during long prefills: every turn ends with abort, nothing crashes', async () => {
    // The rollbacks run while the engine stops: a decode they need (a K-shift, a repair) is refused.
    const m = await load(family);
    const chats = Array.from({ length: 3 }, () => m.createChat({ ...EXACT, policy: 'rolling_summary', maxTokens: 128, batchSize: 8, maxPolicyMs: 0, testTokenDelayMs: 5 }));
    for (const c of chats) await talk(c, 0, 8);
    const turns = chats.map((c) => c.send('a '.repeat(90), { maxNewTokens: 8 }));
    await new Promise((r) => setTimeout(r, 60));
    m.dispose();
    for (const r of await Promise.allSettled(turns)) {
      expect(r.status).toBe('fulfilled');
      if (r.status === 'fulfilled') expect(r.value.stopReason).toBe('abort');
    }
  });

  it('a turn rolled back after the context grew for another chat: its window is repaired, nothing crashes', async () => {
    // The window saved as the turn began has the old context's stream count, which llama.cpp refuses.
    const m = await load(family);
    const opts = { ...EXACT, policy: 'sliding', maxTokens: 256, batchSize: 8, systemPrompt: 'Be brief.', testTokenDelayMs: 10 } as const;
    const a = m.createChat(opts);
    await talk(a, 0, 3);
    const streams = a._internals().engineStats().slots;
    const ac = new AbortController();
    const turn = a.send('a '.repeat(100), { maxNewTokens: 4, signal: ac.signal });
    await new Promise((r) => setTimeout(r, 40));
    const b = m.createChat(opts);
    await b.send('hello', { maxNewTokens: 2, temperature: 0 });   // a second chat: the context grows
    expect(a._internals().engineStats().slots).toBeGreaterThan(streams);
    ac.abort();
    const r = await turn;
    expect(r.stopReason).toBe('abort');
    checkCache(a, 256);
    await talk(a, 3, 2);
    checkCache(a, 256);
    m.dispose();
  });

  it('summaries longer than the window: every turn goes on, the window ending at the newest token', async () => {
    const chat = model.createChat({ ...EXACT, policy: 'rolling_summary', maxTokens: 160, windowSize: 24, summaryTokens: 40, systemPrompt: 'Be brief.', maxPolicyMs: 0 });
    let summaryTokens = 0;
    for (let t = 0; t < 30; t++) {
      const r = await chat.send(`turn ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 8, temperature: 0.9, seed: t });
      summaryTokens = Math.max(summaryTokens, r.stats.summaryTokens);
      checkCache(chat, 160);
    }
    expect(summaryTokens).toBeGreaterThan(16);   // a summary at least as long as the window was written
    chat.dispose();
  });
});

describe('sliding-window models and one KV buffer for all chats', () => {
  it('loadModel refuses kvUnified for gemma3 with a clear error (chats would share window cells)', async () => {
    const path = join(dir, 'gemma3-unified.gguf');
    writeModel(path, { family: 'gemma3', seed: 7 });
    await expect(loadModel(path, { threads: THREADS, kvUnified: true })).rejects.toMatchObject({ code: 'INVALID_OPTION', message: expect.stringMatching(/kvUnified.*sliding-window/) });
  });
});

describe('one KV buffer for all chats (kvUnified)', () => {
  // llama_memory_hybrid splits every batch equally per sequence: a step that mixed one chat's prefill
  // with another's generated token became several ubatches, and its attention signals were dropped.
  // With flash attention on, one node holds every chat's rows over the shared cells, told apart by the mask.
  it.each([['qwen35', false], ['qwen35', true], ['llama', false], ['llama', true]] as const)('%s: chats in different phases keep their attention signals (flash attention %s)', async (family, flashAttention) => {
    const path = join(dir, `${family}-unified.gguf`);
    writeModel(path, { family, seed: 7 });
    const m = await loadModel(path, { threads: THREADS, kvUnified: true });
    try {
      const chats = [0, 1, 2].map(() => m.createChat({ policy: 'importance', maxTokens: 128, windowSize: 16, maxPolicyMs: 0, flashAttention }));
      for (let t = 0; t < 8; t++) {
        // Different message and reply lengths: some chats prefill while others generate.
        await Promise.all(chats.map((c, i) => c.send(`${MESSAGES[(t + i) % 4]} `.repeat(1 + ((t + i) % 3)), { maxNewTokens: 3 + 4 * i, temperature: 0.9, seed: t })));
        for (const c of chats) checkCache(c, 128);
      }
      expect(chats[0]!._internals().cacheState().attentionRowsChecked).toBeGreaterThan(1000);
      for (const c of chats) c.dispose();
    } finally {
      m.dispose();
    }
  });

  // q8_0: the moved cells alone go through F32 and back (gathered by index); 64-dim heads, 16 rotary.
  it.each([['qwen3vl', 'f32'], ['qwen35', 'q8_0']] as const)('%s (%s keys): rotating one chat\'s M-RoPE keys (every position moved) leaves the other chats of the one buffer as they were', async (family, kvType) => {
    const path = join(dir, `${family}-${kvType}-unified.gguf`);
    writeModel(path, { family, seed: 7, ...(kvType === 'q8_0' ? { headDim: 64, ropeDims: 16 } : {}) });
    const m = await loadModel(path, { threads: THREADS, kvUnified: true });
    try {
      const [a, b] = [0, 1].map(() => m.createChat({ maxTokens: 128, kvType, ...(kvType === 'f32' ? { flashAttention: false } : {}) }));
      await Promise.all([a!.send('The cat sat on the mat.', { maxNewTokens: 6, temperature: 0 }), b!.send('Rain fell on the hill!', { maxNewTokens: 6, temperature: 0 })]);
      const probe = m.tokenize('the')[0]!;
      const [a0, b0] = [a!._internals().probeLogits(probe), b!._internals().probeLogits(probe)];
      b!._internals().shiftPositions(40);
      // a's cells sit in the same buffer, rotated by 0: bit for bit the same answer.
      expect(maxAbsDiff(a!._internals().probeLogits(probe), a0)).toBe(0);
      expect(maxAbsDiff(b!._internals().probeLogits(probe), b0)).toBeLessThan(kvType === 'f32' ? 1e-3 : 0.2);
      a!.dispose();
      b!.dispose();
    } finally {
      m.dispose();
    }
  });
});

describe.each(UNSUPPORTED)('family %s (no in-place eviction)', (family) => {
  it('loads, says why, and createChat throws UnsupportedModelError naming the architecture', async () => {
    const model = await load(family);
    const arch = MODEL_FAMILIES[family].arch;
    expect(model.info.inPlaceEviction).toBe(false);
    expect(model.info.memory).toBe('recurrent');
    expect(model.info.unsupportedReason).toContain(arch);
    let err: unknown;
    try {
      model.createChat({ maxTokens: 128 });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(UnsupportedModelError);
    expect((err as UnsupportedModelError).code).toBe('UNSUPPORTED_MODEL');
    expect((err as Error).message).toContain(arch);
    expect((err as Error).message).toMatch(/recurrent state/);
    // The model itself stays usable (tokenizer, template).
    expect(model.tokenize('hello').length).toBeGreaterThan(0);
    expect(model.applyTemplate([{ role: 'user', content: 'hi' }], { addAssistant: true })).toContain('hi');
    model.dispose();
  });
});

describe('docs/models.md families table', () => {
  it('is what scripts/families-table.ts finds now (npm run docs:families rewrites it)', async () => {
    const { familiesTable, readmeWithTable } = await import('../../scripts/families-table.ts');
    const readme = readFileSync(join(import.meta.dirname, '..', '..', 'docs', 'models.md'), 'utf8');
    expect(readmeWithTable(readme, await familiesTable())).toBe(readme);
  }, 180_000);
});
