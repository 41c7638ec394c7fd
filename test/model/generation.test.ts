// Logits under a whole-sequence K-shift, seeded determinism, streaming, abort (lifetimes: test/robustness/lifetimes.test.ts).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { SPECIAL_TOKEN_IDS, writeLlamaModel } from '../../src/gguf/index.ts';
import { loadModel, type Model } from '../../src/index.ts';
import { checkCache, THREADS, maxAbsDiff, testDir, testModelPath } from '../helpers.ts';

let model: Model;
beforeAll(async () => {
  model = await loadModel(testModelPath(), { threads: THREADS });
});
afterAll(() => model?.dispose());

describe('K-shift', () => {
  it('a whole-sequence position shift leaves the next-token logits unchanged (F32 cache)', async () => {
    const chat = model.createChat({ maxTokens: 256, kvType: 'f32', flashAttention: false, systemPrompt: 'You are terse.' });
    await chat.send('Tell me about the sea and the sky.', { maxNewTokens: 16, temperature: 0 });
    const internals = chat._internals();
    const probeToken = model.tokenize('the')[0]!;
    const before = internals.probeLogits(probeToken);
    internals.shiftPositions(40);
    const shifted = internals.probeLogits(probeToken);
    internals.shiftPositions(-40);
    const back = internals.probeLogits(probeToken);
    const other = internals.probeLogits(model.tokenize('sea')[0]!);
    expect(maxAbsDiff(before, shifted)).toBeLessThan(1e-4);
    expect(maxAbsDiff(before, back)).toBeLessThan(1e-4);
    // The probe is sensitive: a different token gives clearly different logits.
    expect(maxAbsDiff(before, other)).toBeGreaterThan(1e-2);
    expect(internals.cacheState().positionsContiguous).toBe(true);
    chat.dispose();
  });

  it('after eviction and compaction the chat keeps generating from the compacted cache', async () => {
    const chat = model.createChat({ maxTokens: 48, windowSize: 8, kvType: 'f32', flashAttention: false });
    for (let i = 0; i < 10; i++) await chat.send(`line ${i} of a long talk`, { maxNewTokens: 8, temperature: 0 });
    expect(chat.stats().tokensEvicted).toBeGreaterThan(0);
    const logits = chat._internals().probeLogits(5);
    expect(logits.every(Number.isFinite)).toBe(true);
    chat.dispose();
  });
});

describe('sampling', () => {
  it('is deterministic for a seed and varies across seeds', async () => {
    const run = async (seed: number) => {
      const chat = model.createChat({ maxTokens: 128 });
      const out = [];
      for (const m of ['hi', 'and then?', 'why?']) out.push((await chat.send(m, { maxNewTokens: 12, temperature: 1, seed })).response);
      chat.dispose();
      return out.join('|');
    };
    const a = await run(1);
    expect(await run(1)).toBe(a);
    const others = await Promise.all([run(2), run(3), run(4)]);
    expect(others.some((o) => o !== a)).toBe(true);
  });

  it('greedy (temperature 0) ignores the seed', async () => {
    const run = async (seed: number) => {
      const chat = model.createChat({ maxTokens: 128 });
      const r = await chat.send('hello there', { maxNewTokens: 12, temperature: 0, seed });
      chat.dispose();
      return r.response;
    };
    expect(await run(1)).toBe(await run(99));
  });

  it('stops at a stop string and does not include it', async () => {
    const chat = model.createChat({ maxTokens: 256 });
    const free = await chat.send('write', { maxNewTokens: 40, temperature: 0 });
    chat.reset();
    if (free.response.length < 4) return; // nothing to cut on
    const stop = free.response.slice(2, 4);
    const pieces: string[] = [];
    const r = await chat.send('write', { maxNewTokens: 40, temperature: 0, stop: [stop], onToken: (p) => pieces.push(p) });
    expect(r.stopReason).toBe('stop');
    expect(r.response).toBe(free.response.slice(0, free.response.indexOf(stop)));
    expect(pieces.join('')).toBe(r.response);
    chat.dispose();
  });
});

describe('streaming', () => {
  it('streamed pieces concatenate to the response, emoji and all', async () => {
    const chat = model.createChat({ maxTokens: 256 });
    for (const m of ['héllo 👋 world', '日本語のテキスト', 'plain']) {
      const pieces: string[] = [];
      const r = await chat.send(m, { maxNewTokens: 24, temperature: 1, seed: 5, onToken: (p) => pieces.push(p) });
      expect(pieces.join('')).toBe(r.response);
      for (const p of pieces) expect(p).not.toMatch(/^[\uDC00-\uDFFF]|[\uD800-\uDBFF]$/);
    }
    chat.dispose();
  });

  it('chat.stream() yields the pieces and returns the TurnResult', async () => {
    const chat = model.createChat({ maxTokens: 256 });
    const it = chat.stream('tell me', { maxNewTokens: 16, temperature: 1, seed: 9 });
    let text = '';
    let next = await it.next();
    while (!next.done) {
      text += next.value;
      next = await it.next();
    }
    expect(next.value.response).toBe(text);
    expect(chat.lastTurn).toEqual(next.value);
    chat.dispose();
  });

  it('breaking out of chat.stream() aborts the turn and the chat stays usable', async () => {
    const chat = model.createChat({ maxTokens: 256, testTokenDelayMs: 5 });
    let n = 0;
    for await (const _piece of chat.stream('go on', { maxNewTokens: 200, temperature: 1.5, seed: 1 })) {
      if (++n === 2) break;
    }
    expect(chat.busy).toBe(false);
    expect(chat.lastTurn?.stopReason).toBe('abort');
    const r = await chat.send('again', { maxNewTokens: 4, temperature: 0 });
    expect(r.stats.promptTokens).toBeGreaterThan(0);
    chat.dispose();
  });
});

describe('abort', () => {
  it('abort mid-stream returns the partial reply and leaves the chat usable', async () => {
    // testTokenDelayMs keeps the turn running long enough for the abort to land mid-reply.
    const chat = model.createChat({ maxTokens: 256, testTokenDelayMs: 5 });
    const ac = new AbortController();
    let pieces = 0;
    const r = await chat.send('talk', {
      maxNewTokens: 200, temperature: 1.5, seed: 2, signal: ac.signal,
      onToken: () => { if (++pieces === 3) ac.abort(); },
    });
    expect(r.stopReason).toBe('abort');
    expect(r.stats.generatedTokens).toBeLessThan(200);
    checkCache(chat, 256);
    const next = await chat.send('next', { maxNewTokens: 5, temperature: 0 });
    expect(['eos', 'maxTokens']).toContain(next.stopReason);
    chat.dispose();
  });

  it('an abort during prefill rolls back and uncounts the prefilled tokens (stats describe the cache)', async () => {
    // batchSize 8 and a per-decode delay: a 400-token message takes ~50 decodes, so the abort lands
    // mid-prefill.
    const chat = model.createChat({ maxTokens: 1024, batchSize: 8, testTokenDelayMs: 10 });
    await chat.send('hello', { maxNewTokens: 2, temperature: 0 });
    const before = chat.stats();
    const r = await chat.send('word '.repeat(400), { maxNewTokens: 4, signal: AbortSignal.timeout(100) });
    expect(r.stopReason).toBe('abort');
    expect(r.stats.promptTokens).toBe(0);
    const after = chat.stats();
    expect(after.tokensSeen).toBe(before.tokensSeen);
    expect(after.tokensRetained).toBe(before.tokensRetained);
    expect(after.tokensSeen).toBe(after.tokensRetained + after.tokensEvicted);
    expect(after.compressionRatio).toBe(before.compressionRatio);
    chat.dispose();
  });

  it('an already-aborted signal does nothing and says abort', async () => {
    const chat = model.createChat({ maxTokens: 64 });
    const r = await chat.send('x', { signal: AbortSignal.abort() });
    expect(r.stopReason).toBe('abort');
    expect(chat.memory()).toEqual([]);
    // Nothing was decoded, so the (default) importance policy read no attention this turn.
    expect(chat.options.policy).toBe(model.info.backend === 'cpu' ? 'importance' : 'sliding');
    expect(r.stats.importanceSignal).toBeNull();
    chat.dispose();
  });
});

describe('ignoreEos', () => {
  it('a model whose every first choice is end-of-generation: without ignoreEos the reply ends at once, with it it runs to maxNewTokens', async () => {
    // Constant embeddings and no layer output: every position's hidden state is the same positive
    // vector, and only the EOS row of the output layer answers it.
    const path = join(testDir, 'always-eos.gguf');
    writeLlamaModel(path, { seed: 5 }, {
      weights: (name, dims) => {
        const n = dims.reduce((a, b) => a * b, 1);
        if (name === 'token_embd.weight') return new Float32Array(n).fill(1);
        if (name.endsWith('attn_output.weight') || name.endsWith('ffn_down.weight')) return new Float32Array(n);
        if (name === 'output.weight') {
          const out = new Float32Array(n);
          out.fill(1, SPECIAL_TOKEN_IDS.eos * dims[0]!, (SPECIAL_TOKEN_IDS.eos + 1) * dims[0]!);
          return out;
        }
        return undefined;
      },
    });
    const m = await loadModel(path, { threads: THREADS });
    const chat = m.createChat({ maxTokens: 256 });
    const plain = await chat.send('hello', { maxNewTokens: 12, temperature: 0 });
    expect(plain.stopReason).toBe('eos');
    expect(plain.stats.generatedTokens).toBe(0);
    for (const temperature of [0, 1.5]) {
      const r = await chat.send('hello again', { maxNewTokens: 12, temperature, seed: 3, ignoreEos: true });
      expect(r.stopReason).toBe('maxTokens');
      expect(r.stats.generatedTokens).toBe(12);
      expect(chat.memory().some((e) => e.token === SPECIAL_TOKEN_IDS.eos && e.role === 'assistant')).toBe(false);
    }
    await expect(chat.send('x', { ignoreEos: 'yes' as never })).rejects.toMatchObject({ code: 'INVALID_OPTION' });
    chat.dispose();
    m.dispose();
  });
});
