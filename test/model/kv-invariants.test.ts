// Hundreds of turns against the real KV cache: the budget holds, positions stay contiguous, the
// cache agrees with the ledger, pinned tokens survive, and each turn prefills only its new tokens.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type Chat, type Model, type TurnResult } from '../../src/index.ts';
import { checkCache, testModelPath, THREADS } from '../helpers.ts';

let model: Model;
beforeAll(async () => {
  model = await loadModel(testModelPath(), { threads: THREADS });
});
afterAll(() => model?.dispose());

const decodedTokens = (r: TurnResult) =>
  r.stopReason === 'eos' ? r.stats.generatedTokens : Math.max(0, r.stats.generatedTokens - 1);


describe('bounded KV memory over many turns (sliding)', () => {
  it('keeps every invariant for 300 turns', async () => {
    const maxTokens = 128;
    const chat = model.createChat({ maxTokens, windowSize: 32, sinkTokens: 4, systemPrompt: 'You are terse.' });
    let pinnedSnapshot: string | undefined;
    let evictionsSeen = 0;
    for (let t = 0; t < 300; t++) {
      const message = `message ${t}: ${'lorem ipsum '.repeat(t % 5)}ok`;
      const internals = chat._internals();
      const before = internals.cacheState();
      const seenBefore = chat.stats().tokensSeen;
      const expectedPrefill = internals.countTurnTokens(message) + before.carriedTokens + before.pendingSystemTokens;
      const r = await chat.send(message, { maxNewTokens: 6 + (t % 11), temperature: 0.9, seed: t });

      // Only the new tokens were prefilled; nothing of the history was re-evaluated.
      expect(r.stats.promptTokens).toBe(expectedPrefill);
      const decoded = decodedTokens(r);
      expect(chat.stats().tokensSeen - seenBefore).toBe(r.stats.promptTokens + decoded);
      const after = checkCache(chat, maxTokens);
      expect(after.ledgerTokens).toBe(before.ledgerTokens + r.stats.promptTokens + decoded - r.stats.evictedTokens);
      expect(r.stats.retainedTokens).toBe(after.ledgerTokens);

      // Pinned tokens (system prompt + sinks) are the same tokens at the same positions every turn.
      const pinned = JSON.stringify(chat.memory().filter((e) => e.pinned).map((e) => [e.position, e.token, e.role]));
      pinnedSnapshot ??= pinned;
      expect(pinned).toBe(pinnedSnapshot);
      evictionsSeen += r.stats.evictions;
    }
    const s = chat.stats();
    expect(s.turns).toBe(300);
    expect(evictionsSeen).toBeGreaterThan(50);
    expect(s.tokensEvicted).toBe(s.tokensSeen - s.tokensRetained);
    expect(s.compressionRatio).toBeGreaterThan(10);
    const mem = chat.memory();
    expect(mem[0]?.role).toBe('system');
    expect(mem.filter((e) => e.pinned).length).toBeGreaterThanOrEqual(4);
    // The window: the newest tokens are the last turn's.
    expect(mem.at(-1)?.turn).toBe(300);
    chat.dispose();
  });

  it('evicts during generation when the reply itself overflows the budget', async () => {
    const maxTokens = 64;
    const phases: string[] = [];
    const chat = model.createChat({ maxTokens, windowSize: 16, sinkTokens: 4, telemetry: { onEviction: (e) => void phases.push(e.phase) } });
    const r = await chat.send('go', { maxNewTokens: 300, temperature: 1, seed: 3, ignoreEos: true });
    checkCache(chat, maxTokens);
    expect(r.stats.generatedTokens).toBe(300);
    expect(r.stats.evictions).toBeGreaterThan(0);
    await new Promise((res) => setTimeout(res, 10)); // telemetry hooks run on a later tick
    expect(phases).toContain('generation');
    // Force a long reply regardless of EOS by continuing: the budget holds either way.
    for (let i = 0; i < 5; i++) {
      await chat.send('more', { maxNewTokens: 200, temperature: 1.5, seed: 100 + i });
      checkCache(chat, maxTokens);
    }
    expect(chat.stats().tokensSeen).toBeGreaterThan(maxTokens);
    chat.dispose();
  });

  it('reset forgets the conversation and the chat works again', async () => {
    const chat = model.createChat({ maxTokens: 64, windowSize: 16, systemPrompt: 'sys' });
    await chat.send('hello', { maxNewTokens: 4, temperature: 0 });
    chat.reset();
    expect(chat.memory()).toEqual([]);
    expect(chat.stats().turns).toBe(0);
    const r = await chat.send('hello', { maxNewTokens: 4, temperature: 0 });
    expect(r.stats.retainedTokens).toBeGreaterThan(0);
    checkCache(chat, 64);
    chat.dispose();
  });
});

describe('KV bytes', () => {
  it('counts K and V with the real head dimension (which may differ from nEmbd / nHead)', async () => {
    const m = await loadModel(testModelPath({ embd: 64, heads: 4, kvHeads: 2, headDim: 32 }), { threads: THREADS });
    expect(m.info.headDim).toBe(32);
    const chat = m.createChat({ maxTokens: 64, kvType: 'f16' });
    await chat.send('hello there', { maxNewTokens: 4, temperature: 0 });
    const s = chat.stats();
    expect(s.kvBytes).toBe(s.tokensRetained * m.info.nLayer * m.info.nHeadKv * (32 + 32) * 2);
    m.dispose();
  });
});
