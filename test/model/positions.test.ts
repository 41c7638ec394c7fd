// Positions after an eviction, and the model families that depend on them. With positions 'keep' an
// eviction is a seq_rm alone: the retained tokens keep their positions, no K-shift is paid, and the
// positions are compacted only when a turn would pass the chat's position limit (by a K-shift; M-RoPE
// keys, which llama.cpp will not shift, rotated by this library; a re-prefill of the retained tokens
// where even that cannot be done: a quantized M-RoPE key cache). Hybrid models evict from their
// attention KV only; their recurrent state is never touched by eviction and is put back from a
// snapshot when a turn must leave no trace.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeModel, type ModelFamily } from '../../src/gguf/index.ts';
import { InvalidOptionError, loadModel, type Chat, type ChatOptions, type Model } from '../../src/index.ts';
import { checkCache, maxAbsDiff, THREADS } from '../helpers.ts';

const dir = mkdtempSync(join(tmpdir(), 'fml-positions-'));
const models = new Map<ModelFamily, Model>();
const FAMILIES: ModelFamily[] = ['llama', 'qwen3vl', 'qwen35', 'lfm2', 'granite4', 'nemotron3'];
// M-RoPE keys not rotated (a build without llama.cpp's internals; here the test hook): the re-prefill path.
let unrotated: Model;
// Keys in a q8_0 cache (heads of 64 values: llama.cpp stores them Hadamard-rotated; 16 of them rotary).
let quantized: Model;
const Q8: ChatOptions = { kvType: 'q8_0' };

beforeAll(async () => {
  for (const family of FAMILIES) {
    const path = join(dir, `${family}.gguf`);
    writeModel(path, { family, seed: 5, layers: family === 'llama' || family === 'qwen3vl' ? 2 : 4 });
    // (nemotron3: Mamba-2, experts, attention, experts.)
    models.set(family, await loadModel(path, { threads: THREADS, slots: 4 }));
  }
  unrotated = await loadModel(join(dir, 'qwen35.gguf'), { threads: THREADS, slots: 4, testNoKeyRotation: true });
  const path = join(dir, 'qwen35-head64.gguf');
  writeModel(path, { family: 'qwen35', seed: 5, layers: 4, headDim: 64, ropeDims: 16 });
  quantized = await loadModel(path, { threads: THREADS, slots: 4 });
});
afterAll(() => {
  unrotated.dispose();
  quantized.dispose();
  for (const m of models.values()) m.dispose();
  rmSync(dir, { recursive: true, force: true });
});

const model = (family: ModelFamily) => models.get(family)!;
const MESSAGES = ['The cat sat.', 'Rain fell on the hill!', 'Why is the sky blue?', 'Bread and jam, please.'];
// F32 KV and no flash attention: two chats that should match differ only by float summation order.
const EXACT: ChatOptions = { kvType: 'f32', flashAttention: false };

async function talk(chat: Chat, turns: number, from = 0): Promise<string[]> {
  const replies: string[] = [];
  for (let t = from; t < from + turns; t++) {
    replies.push((await chat.send(`turn ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 6, temperature: 0.9, seed: t })).response);
  }
  return replies;
}

describe("positions 'keep' (the default)", () => {
  it('an eviction leaves every retained token at its position and pays no K-shift', async () => {
    const chat = model('llama').createChat({ maxTokens: 96, windowSize: 16, systemPrompt: 'Be brief.' });
    expect(chat.options.positions).toBe('keep');
    let gaps = 0;
    for (let t = 0; t < 30; t++) {
      const before = new Map(chat.memory().map((e) => [e.position, e]));
      const last = Math.max(...before.keys());
      const r = await chat.send(`turn ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 6, temperature: 0.9, seed: t });
      // Every token from before the turn that is still here is the same token at the same position
      // (a compaction would have moved some of them down onto other tokens' positions).
      for (const e of chat.memory().filter((x) => x.position <= last)) {
        expect(before.get(e.position)).toMatchObject({ token: e.token, turn: e.turn, role: e.role });
      }
      const cache = checkCache(chat, 96);
      if (!cache.positionsContiguous) gaps++;
      expect(r.stats.compactions).toBe(0);
    }
    expect(chat.stats().evictions).toBeGreaterThan(10);
    expect(gaps).toBeGreaterThan(10);
    expect(chat._internals().engineStats().shiftSteps).toBe(0);
    chat.dispose();
  });

  it("positions 'compact' renumbers 0..n-1 at every eviction and pays a K-shift for it (M-RoPE: keys rotated at once)", async () => {
    for (const family of ['llama', 'qwen3vl'] as const) {
      const chat = model(family).createChat({ maxTokens: 96, windowSize: 16, systemPrompt: 'Be brief.', positions: 'compact' });
      const before = chat._internals().engineStats(true);
      for (let t = 0; t < 30; t++) {
        await chat.send(`turn ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 6, temperature: 0.9, seed: t });
        expect(checkCache(chat, 96).positionsContiguous).toBe(true);
      }
      const s = chat.stats();
      expect(s.evictions).toBeGreaterThan(10);
      expect(s.compactions).toBe(s.evictions);
      const after = chat._internals().engineStats(true);
      // llama.cpp's K-shift runs inside the next decode; the M-RoPE rotation runs when positions move.
      if (family === 'llama') expect(after.shiftSteps - before.shiftSteps).toBeGreaterThan(10);
      else expect(after.shiftSteps - before.shiftSteps).toBe(0);
      expect(after.sideTokens - before.sideTokens).toBe(0); // nothing re-prefilled
      chat.dispose();
    }
  });

  it('a rolling summary takes the first evicted gap (M-RoPE too), and stays after the history only where keys cannot move', async () => {
    for (const [family, m, options] of [['llama', model('llama'), {}], ['qwen3vl', model('qwen3vl'), {}], ['qwen35 q8_0', quantized, Q8], ['qwen35 unrotated', unrotated, {}]] as const) {
      const chat = m.createChat({ ...options, policy: 'rolling_summary', maxTokens: 128, windowSize: 24, summaryTokens: 12, systemPrompt: 'Be brief.', maxPolicyMs: 0 });
      let summaries = 0;
      for (let t = 0; t < 24; t++) {
        await chat.send(`turn ${t}. ${MESSAGES[t % 4]}`, { maxNewTokens: 5, temperature: 0.9, seed: t });
        checkCache(chat, 128);
        const mem = chat.memory();
        const first = mem.findIndex((e) => e.role === 'summary');
        if (first < 0) continue;
        summaries++;
        const last = mem.map((e) => e.role).lastIndexOf('summary');
        if (family !== 'qwen35 unrotated') {
          // In the gap: older than the recent window, right after the pinned prefix.
          expect(mem.slice(0, first).every((e) => e.pinned)).toBe(true);
        } else {
          // Where the model wrote it: after everything retained from before it.
          expect(mem.slice(last + 1).every((e) => e.turn > mem[first]!.turn)).toBe(true);
        }
      }
      expect(summaries).toBeGreaterThan(3);
      chat.dispose();
    }
  });
});

describe('compaction at the position limit', () => {
  const maxTokens = 96;
  const maxNewTokens = 6; // below maxTokens / 8: a turn's reply fits the room its prompt makes
  it.each(['llama', 'qwen3vl', 'qwen35', 'lfm2', 'granite4', 'nemotron3', 'qwen35 q8_0', 'qwen35 unrotated'] as const)('%s compacts exactly when a turn would pass the limit, and only then', async (family) => {
    const m = family === 'qwen35 q8_0' ? quantized : family === 'qwen35 unrotated' ? unrotated : model(family);
    const limit = 300;
    const chat = m.createChat({ ...(family === 'qwen35 q8_0' ? Q8 : EXACT), maxTokens, windowSize: 16, systemPrompt: 'Be brief.', positionLimit: limit });
    // M-RoPE keys are rotated where they are (nothing decoded again), quantized ones too; unrotated:
    // re-prefilled. Granite 4.0-H's and Nemotron's attention has no positions (NoPE): their cells move,
    // no key changes (llama.cpp's own shift aborted the process for Granite: GGML_ASSERT(buffer)).
    const rotated = family === 'qwen3vl' || family === 'qwen35' || family === 'qwen35 q8_0' || family === 'granite4' || family === 'nemotron3';
    const reprefilled = family === 'qwen35 unrotated';
    let compacted = 0;
    for (let t = 0; t < 60; t++) {
      const internals = chat._internals();
      const before = internals.cacheState();
      const sideBefore = internals.engineStats(true).sideTokens;
      const message = `turn ${t}. ${MESSAGES[t % 4]}`;
      const prompt = internals.countTurnTokens(message) + before.carriedTokens + before.pendingSystemTokens;
      const r = await chat.send(message, { maxNewTokens, temperature: 0.9, seed: t });
      expect(r.stats.promptTokens).toBe(prompt);
      // The turn's positions run from the last one + 1 through its prompt and its reply's allowance.
      const passes = before.ledgerPosLast + 1 + prompt + maxNewTokens > limit;
      expect(r.stats.compactions).toBe(passes ? 1 : 0);
      const after = checkCache(chat, maxTokens);
      if (passes) {
        compacted++;
        expect(after.ledgerPosFirst).toBe(0);
        const side = chat._internals().engineStats(true).sideTokens - sideBefore;
        if (rotated) expect(side).toBe(0);
        if (reprefilled) expect(side).toBeGreaterThanOrEqual(after.ledgerTokens - prompt - maxNewTokens);
      }
    }
    expect(compacted).toBeGreaterThan(3);
    expect(chat.stats().compactions).toBe(compacted);
    chat.dispose();
  });

  it('a compacted chat answers like its checkpoint restored, through more compactions (M-RoPE keys rotated, hybrid)', async () => {
    const m = model('qwen35');
    const chat = m.createChat({ ...EXACT, maxTokens, windowSize: 16, positionLimit: 200 });
    await talk(chat, 12);
    expect(chat.stats().compactions).toBeGreaterThan(0);
    const path = join(dir, 'qwen35.ckpt');
    await chat.saveCheckpoint(path);
    const restored = await m.loadChat(path);
    expect(restored.memory()).toEqual(chat.memory());
    expect(await talk(restored, 12, 12)).toEqual(await talk(chat, 12, 12));
    expect(chat.stats().compactions).toBeGreaterThan(2);
    const probe = m.tokenize('the')[0]!;
    expect(maxAbsDiff(chat._internals().probeLogits(probe), restored._internals().probeLogits(probe))).toBeLessThan(1e-4);
    chat.dispose();
    restored.dispose();
  });
});

describe('hybrid models: the recurrent state is the model own memory', () => {
  it.each(['qwen35', 'lfm2'] as const)('%s: an eviction never touches the recurrent state', async (family) => {
    const chat = model(family).createChat({ maxTokens: 256, systemPrompt: 'Be brief.' });
    await talk(chat, 5);
    const state = chat._internals().recurrentState();
    expect(state.length).toBeGreaterThan(0);
    const evicted = await chat.forget(2);
    expect(evicted).toBeGreaterThan(0);
    expect(Buffer.from(chat._internals().recurrentState()).equals(Buffer.from(state))).toBe(true);
    // Without it the chat is another one: re-prefilling the retained tokens alone rebuilds a different state.
    chat._internals().replayHistory();
    expect(Buffer.from(chat._internals().recurrentState()).equals(Buffer.from(state))).toBe(false);
    chat.dispose();
  });

  it.each(['qwen35', 'lfm2'] as const)('%s: an aborted prefill leaves no trace (memory, recurrent state, next logits)', async (family) => {
    const m = model(family);
    const opts: ChatOptions = { ...EXACT, maxTokens: 1024, batchSize: 8, systemPrompt: 'Be brief.' };
    const twin = m.createChat(opts);
    await talk(twin, 3);
    const chat = m.createChat({ ...opts, testTokenDelayMs: 10 });
    await talk(chat, 3);
    const memory = chat.memory();
    const state = chat._internals().recurrentState();
    const r = await chat.send('word '.repeat(300), { maxNewTokens: 4, signal: AbortSignal.timeout(150) });
    expect(r.stopReason).toBe('abort');
    expect(r.stats.promptTokens).toBe(0);
    expect(chat.memory()).toEqual(memory);
    expect(Buffer.from(chat._internals().recurrentState()).equals(Buffer.from(state))).toBe(true);
    const probe = m.tokenize('the')[0]!;
    expect(maxAbsDiff(chat._internals().probeLogits(probe), twin._internals().probeLogits(probe))).toBeLessThan(1e-4);
    // And the conversation goes on as if the aborted turn had never been sent.
    expect(await talk(chat, 2, 3)).toEqual(await talk(twin, 2, 3));
    chat.dispose();
    twin.dispose();
  });

  // Layer 0 recurrent, layer 1 attention: the recurrent state then depends on the tokens alone, not
  // on what the attention keeps. Chats fed the same exchanges in the same chunks must hold the same
  // state whatever else they did with their cache.
  describe('the recurrent state depends on the conversation alone', () => {
    let m: Model;
    beforeAll(async () => {
      const path = join(dir, 'qwen35-first-recurrent.gguf');
      writeModel(path, { family: 'qwen35', seed: 9, layers: 2 });
      m = await loadModel(path, { threads: THREADS });
    });
    afterAll(() => m?.dispose());
    const transcript = {
      format: 'finite-memory-llm/transcript' as const,
      version: 1 as const,
      systemPrompt: 'Be brief.',
      messages: Array.from({ length: 12 }, (_, t) => [
        { role: 'user' as const, content: `turn ${t}. ${MESSAGES[t % 4]}` },
        { role: 'assistant' as const, content: `reply ${t}: ${MESSAGES[(t + 1) % 4]}` },
      ]).flat(),
    };
    // The state after its header (magic, sequence id, cell count) and the cell's position, which differ by design.
    const content = (c: Chat) => Buffer.from(c._internals().recurrentState().subarray(16));
    const same = async (options: ChatOptions, check: (c: Chat) => void) => {
      const chat = await m.importTranscript(transcript, { ...EXACT, batchSize: 16, ...options });
      const whole = await m.importTranscript(transcript, { ...EXACT, maxTokens: 2048, batchSize: 16 });
      check(chat);
      expect(whole.stats().evictions).toBe(0);
      expect(content(chat).length).toBeGreaterThan(1000);
      expect(content(chat).equals(content(whole))).toBe(true);
      chat.dispose();
      whole.dispose();
    };

    it("summaries' instruction and text go through the recurrent layers and are taken back out", async () => {
      await same({ policy: 'rolling_summary', maxTokens: 128, windowSize: 24, summaryTokens: 12, maxPolicyMs: 0 }, (c) => {
        expect(c.memory().some((e) => e.role === 'summary')).toBe(true);
      });
    });

    it('a compaction (keys rotated) does not feed the retained tokens to the recurrent layers', async () => {
      await same({ maxTokens: 96, windowSize: 16, positionLimit: 160 }, (c) => expect(c.stats().compactions).toBeGreaterThan(0));
    });

    it('a compaction by re-prefill (M-RoPE keys not rotated) does not feed them to the recurrent layers twice', async () => {
      const q = await loadModel(join(dir, 'qwen35-first-recurrent.gguf'), { threads: THREADS, testNoKeyRotation: true });
      const chat = await q.importTranscript(transcript, { ...EXACT, batchSize: 16, maxTokens: 96, windowSize: 16, positionLimit: 160 });
      const whole = await q.importTranscript(transcript, { ...EXACT, maxTokens: 2048, batchSize: 16 });
      expect(chat.stats().compactions).toBeGreaterThan(0);
      expect(chat._internals().engineStats(true).sideTokens).toBeGreaterThan(0);
      expect(content(chat).equals(content(whole))).toBe(true);
      chat.dispose();
      whole.dispose();
      q.dispose();
    });
  });
});

describe('hybrid checkpoints as bytes', () => {
  it('a ledger-only checkpoint of a hybrid restores its memory by one prefill (the recurrent state rebuilt from the retained tokens)', async () => {
    const m = model('qwen35');
    const chat = m.createChat({ ...EXACT, maxTokens: 96, windowSize: 16, systemPrompt: 'Be brief.' });
    await talk(chat, 12);
    const restored = await m.loadChat(await chat.checkpoint({ kind: 'ledger' }));
    const strip = (c: Chat) => c.memory().map(({ position: _p, ...e }) => e);
    expect(strip(restored)).toEqual(strip(chat));
    expect(restored.exportTranscript()).toEqual(chat.exportTranscript());
    // As re-prefilling the retained tokens from nothing does (recurrent state included).
    chat._internals().replayHistory();
    expect(Buffer.from(restored._internals().recurrentState().subarray(16)).equals(Buffer.from(chat._internals().recurrentState().subarray(16)))).toBe(true);
    await talk(restored, 3, 12);
    checkCache(restored, 96);
    chat.dispose();
    restored.dispose();
  });
});

describe('a hybrid chat batched with others behaves as it does alone', () => {
  it('same replies and logits next to chats of its own engine and of other families', async () => {
    const m = model('qwen35');
    const opts: ChatOptions = { ...EXACT, maxTokens: 96, windowSize: 16 };
    const alone = m.createChat(opts);
    const aloneReplies = await talk(alone, 10);
    const probe = m.tokenize('the')[0]!;
    const aloneLogits = alone._internals().probeLogits(probe);
    alone.dispose();

    const chat = m.createChat(opts);
    const crowd = [
      m.createChat({ ...EXACT, maxTokens: 80, windowSize: 8 }),
      m.createChat({ ...EXACT, maxTokens: 128, policy: 'importance' }),
      model('lfm2').createChat({ ...EXACT, maxTokens: 96 }),
      model('qwen3vl').createChat({ ...EXACT, maxTokens: 96 }),
      model('llama').createChat({ ...EXACT, maxTokens: 64 }),
    ];
    const [replies] = await Promise.all([talk(chat, 10), ...crowd.map((c, i) => talk(c, 6 + i, 100 * (i + 1)))]);
    expect(replies).toEqual(aloneReplies);
    expect(maxAbsDiff(chat._internals().probeLogits(probe), aloneLogits)).toBeLessThan(1e-3);
    for (const c of [chat, ...crowd]) c.dispose();
  });

  it('more chats than slots: parked hybrid chats come back with both halves', async () => {
    const path = join(dir, 'qwen35-slots.gguf');
    writeModel(path, { family: 'qwen35', seed: 5, layers: 4 });
    const small = await loadModel(path, { threads: THREADS, slots: 2 });
    const opts: ChatOptions = { ...EXACT, maxTokens: 96, windowSize: 16 };
    const ref = small.createChat(opts);
    const refReplies = await talk(ref, 8);
    ref.dispose();
    const chats = Array.from({ length: 4 }, () => small.createChat(opts));
    const replies: string[][] = chats.map(() => []);
    for (let t = 0; t < 8; t++) {
      // One turn each in turn: with 2 slots, every chat is parked and restored again and again.
      for (let i = 0; i < chats.length; i++) replies[i]!.push(...(await talk(chats[i]!, 1, t)));
    }
    for (const r of replies) expect(r).toEqual(refReplies);
    for (const c of chats) c.dispose();
    small.dispose();
  });
});

describe('M-RoPE keys in a q8_0 cache (stored Hadamard-rotated by llama.cpp; 16 of 64 dims rotary)', () => {
  it('move: every position shifted by 40 leaves the logits within the re-quantization noise', async () => {
    const chat = quantized.createChat({ ...Q8, maxTokens: 256 });
    await chat.send('Tell me about the sea and the sky.', { maxNewTokens: 12, temperature: 0 });
    const internals = chat._internals();
    const probe = quantized.tokenize('the')[0]!;
    const before = internals.probeLogits(probe);
    internals.shiftPositions(40);
    // Re-quantizing the turned keys moves these logits by ~1e-2; turning them without taking the
    // Hadamard rotation off first, or with the wrong pairing, moved them by ~2 (checked by mutation).
    expect(maxAbsDiff(internals.probeLogits(probe), before)).toBeLessThan(0.2);
    expect(maxAbsDiff(internals.probeLogits(quantized.tokenize('sea')[0]!), before)).toBeGreaterThan(2);
    expect(internals.engineStats(true).shiftSteps).toBe(0);
    chat.dispose();
  });
});

describe("keys llama.cpp's K-shift gets wrong, moved by this library's rotation", () => {
  // YaRN (gpt-oss; any model extended with YaRN): llama.cpp's K-shift graph passes the context's
  // YaRN factors to ggml's rope, which scales the rotated pairs by YaRN's magnitude (1 + 0.1
  // ln(factor): 1.35 for gpt-oss) at every shift: keys already scaled once by the model's own rope
  // grew at each move (logits moved by ~1.7 here). Quantized keys of heads that are not a multiple
  // of 64 values (Phi-3's 96; a latent attention row of 288): its shift applied a Hadamard matrix
  // the cache never made, a null pointer, and the process died (SIGSEGV).
  it.each([
    ['llama yarn', 'f32', { family: 'llama', yarnFactor: 4 }],
    ['qwen3 yarn', 'f32', { family: 'qwen3', yarnFactor: 8 }],
    ['gptoss', 'f32', { family: 'gptoss' }],
    ['gptoss', 'q8_0', { family: 'gptoss', headDim: 64, embd: 128 }],
    ['deepseek2 yarn', 'f32', { family: 'deepseek2', yarnFactor: 4 }],
    ['deepseek2 (rows of 288)', 'q8_0', { family: 'deepseek2', headDim: 64 }],
    ['phi3 (heads of 96)', 'q8_0', { family: 'phi3', headDim: 96, heads: 4, kvHeads: 4, embd: 384 }],
    // A Hadamard matrix llama.cpp applied where it does not fit: latent rows of 320 (the graph stores
    // them without it), and 16 rotary dims of 64 turned through a 64-wide matrix (mixing heads).
    ['deepseek2 (rows of 320)', 'q8_0', { family: 'deepseek2', headDim: 64, ropeDims: 64 }],
    ['qwen3next (16 of 64 dims rotary)', 'q8_0', { family: 'qwen3next', headDim: 64, ropeDims: 16 }],
  ] as const)('%s (%s keys): every position shifted by 40 leaves the logits as they were, with no K-shift of llama.cpp', async (name, kvType, options) => {
    const path = join(dir, `${name.split(' ')[0]}-unsound-${kvType}.gguf`);
    writeModel(path, { seed: 9, ...options });
    const m = await loadModel(path, { threads: THREADS, slots: 2 });
    try {
      expect(m.info.canShift).toBe(true);
      const chat = m.createChat({ kvType, flashAttention: kvType !== 'f32', maxTokens: 256 });
      await chat.send('Tell me about the sea and the sky, and why the rain falls.', { maxNewTokens: 12, temperature: 0 });
      const internals = chat._internals();
      const probe = m.tokenize('the')[0]!;
      const before = internals.probeLogits(probe);
      internals.shiftPositions(40);
      internals.shiftPositions(-25);
      // q8_0: re-quantizing the turned keys moves these logits by 0.2-0.7 (gpt-oss, three seeds;
      // 0.16-0.19 the others); llama.cpp's shift, which rescaled gpt-oss's, by 6-12 (f32 ones by ~1.7).
      expect(maxAbsDiff(internals.probeLogits(probe), before)).toBeLessThan(kvType === 'f32' ? 1e-3 : 1);
      const stats = internals.engineStats(true);
      expect([stats.shiftSteps, stats.deferredMoves, stats.rotatedMoves]).toEqual([0, 0, 2]);
      checkCache(chat, 256);
      chat.dispose();
    } finally {
      m.dispose();
    }
  });

  it('a model whose every layer slides (its full cache holds no layer) compacts at its limit', async () => {
    // llama.cpp's shift of the layerless full cache built no node reading its shift input: an abort.
    const path = join(dir, 'gemma3-all-sliding.gguf');
    writeModel(path, { family: 'gemma3', swaPattern: 64, seed: 3 });
    const m = await loadModel(path, { threads: THREADS, slots: 2 });
    try {
      const chat = m.createChat({ maxTokens: 96, windowSize: 16, positionLimit: 300 });
      await talk(chat, 40);
      expect(chat.stats().compactions).toBeGreaterThan(2);
      checkCache(chat, 96);
      chat.dispose();
    } finally {
      m.dispose();
    }
  });

  it('without YaRN llama.cpp still shifts (in the next step), as before', async () => {
    const chat = model('llama').createChat({ ...EXACT, maxTokens: 256 });
    await chat.send('Tell me about the sea.', { maxNewTokens: 4, temperature: 0 });
    const internals = chat._internals();
    const before = internals.engineStats(true);
    internals.shiftPositions(10);
    await chat.send('And the sky?', { maxNewTokens: 2, temperature: 0 });
    const after = internals.engineStats(true);
    expect([after.shiftSteps - before.shiftSteps, after.deferredMoves - before.deferredMoves, after.rotatedMoves - before.rotatedMoves]).toEqual([1, 1, 0]);
    chat.dispose();
  });
});

describe('options', () => {
  it("positions 'compact' is refused where keys cannot shift (M-RoPE keys not rotated), saying why", () => {
    for (const m of [unrotated]) {
      let err: unknown;
      try {
        m.createChat({ maxTokens: 96, positions: 'compact' });
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(InvalidOptionError);
      expect((err as Error).message).toMatch(/M-RoPE/);
    }
  });

  it('positionLimit must hold the budget and its scratch, and not pass the trained context', () => {
    const m = model('llama');
    expect(() => m.createChat({ maxTokens: 96, positionLimit: m.info.nCtxTrain + 1 })).toThrow(/trained context/);
    expect(() => m.createChat({ maxTokens: 96, positionLimit: 95 })).toThrow(InvalidOptionError);
    // A summary's scratch (instruction and summary) goes after the history: it needs positions too.
    expect(() => m.createChat({ maxTokens: 96, policy: 'rolling_summary', positionLimit: 100 })).toThrow(/summary scratch/);
    expect(m.createChat({ maxTokens: 96, positionLimit: 96 }).options.positionLimit).toBe(96);
  });
});
