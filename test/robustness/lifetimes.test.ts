// Lifetimes (all of them here): dispose and DisposedError, dispose mid-turn, many chats at once,
// dispose while busy, async disposal, GC without dispose, RSS over cycles.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DisposedError, loadModel, type Model } from '../../src/index.ts';
import { getProbes } from '../../src/local/binding.ts';
import { checkCache, testModelPath, THREADS } from '../helpers.ts';

let model: Model;
beforeAll(async () => {
  model = await loadModel(testModelPath(), { threads: THREADS });
});
afterAll(() => model?.dispose());

const gc = (globalThis as { gc?: () => void }).gc;

describe('concurrency', () => {
  it('chats on one model run concurrently: their tokens share decodes', async () => {
    const chats = Array.from({ length: 4 }, () => model.createChat({ maxTokens: 96 }));
    const before = chats[0]!._internals().engineStats().sharedDecodes;
    const results = await Promise.all(chats.map((c, i) => c.send(`hi ${i}`, { maxNewTokens: 8, temperature: 0, ignoreEos: true })));
    for (const r of results) expect(r.stats.generatedTokens).toBe(8);
    // Decodes that held tokens of two chats or more: the four turns ran together, not one after another.
    expect(chats[0]!._internals().engineStats().sharedDecodes - before).toBeGreaterThanOrEqual(4);
    chats.forEach((c) => c.dispose());
  });

  it('16 chats on one model under Promise.all, several turns each, all within budget', async () => {
    const chats = Array.from({ length: 16 }, (_, i) => model.createChat({ maxTokens: 64, windowSize: 16, policy: i % 2 ? 'importance' : 'sliding' }));
    for (let round = 0; round < 6; round++) {
      const results = await Promise.all(chats.map((c, i) => c.send(`chat ${i} round ${round}`, { maxNewTokens: 8, temperature: 1, seed: i * 100 + round })));
      for (const r of results) expect(r.stats.retainedTokens).toBeLessThanOrEqual(64);
    }
    for (const c of chats) {
      checkCache(c, 64);
      c.dispose();
    }
  });

  it('model.dispose() while chats are busy: their turns end with abort, nothing crashes, later use throws', async () => {
    const m = await loadModel(testModelPath(), { threads: THREADS });
    const chats = Array.from({ length: 4 }, () => m.createChat({ maxTokens: 256 }));
    const turns = chats.map((c, i) => c.send('go on and on', { maxNewTokens: 400, temperature: 1.5, seed: i }));
    m.dispose();
    const results = await Promise.allSettled(turns);
    for (const r of results) {
      expect(r.status).toBe('fulfilled');
      if (r.status === 'fulfilled') expect(['abort', 'eos']).toContain(r.value.stopReason);
    }
    for (const c of chats) await expect(c.send('x')).rejects.toBeInstanceOf(DisposedError);
  });
});

describe('async disposal', () => {
  it('await using: a chat disposed mid-turn settles its turn (abort) before the block ends', async () => {
    let state = 'pending';
    {
      await using chat = model.createChat({ threads: THREADS });
      void chat.send('tell me a long story', { maxNewTokens: 200, temperature: 1, seed: 1 }).then((r) => (state = r.stopReason));
      await new Promise((r) => setTimeout(r, 5));
    }
    expect(state).toBe('abort');
  });

  it('model asyncDispose waits for its chats; a native DISPOSED is a DisposedError', async () => {
    const m = await loadModel(testModelPath(), { threads: THREADS });
    const chat = m.createChat({ threads: THREADS });
    let state = 'pending';
    void chat.send('hello there', { maxNewTokens: 100, temperature: 1, seed: 2 }).then((r) => (state = r.stopReason));
    await m[Symbol.asyncDispose]();
    expect(state).toBe('abort');
    expect(() => chat.memory()).toThrow(DisposedError);
    expect(() => m.createChat()).toThrow(DisposedError);
    // The native layer's own DISPOSED code maps to the same class, with the caller's stack.
    const { fromNativeError } = await import('../../src/shared/errors.ts');
    const mapped = fromNativeError(Object.assign(new Error('chat is disposed'), { code: 'DISPOSED' }), new Error().stack);
    expect(mapped).toBeInstanceOf(DisposedError);
    expect(mapped.message).toBe('chat is disposed');
    expect(mapped.stack).toContain('lifetimes.test.ts');
  });
});

describe('native memory', () => {
  it('1,000 create/dispose cycles do not grow RSS', async () => {
    const cycle = async (n: number) => {
      for (let i = 0; i < n; i++) {
        const c = model.createChat({ maxTokens: 64 });
        if (i % 50 === 0) await c.send('hi', { maxNewTokens: 2, temperature: 0 });
        c.dispose();
      }
    };
    await cycle(100); // warm-up: allocator pools, JIT
    gc?.();
    const before = process.memoryUsage().rss;
    await cycle(1000);
    gc?.();
    const grown = process.memoryUsage().rss - before;
    // A leaked context (KV cache + compute buffers) is well over 100 KiB; 1,000 of them would be >100 MiB.
    expect(grown).toBeLessThan(40 * 2 ** 20);
  });

  it.skipIf(!gc)('chats and models dropped without dispose() are freed by their finalizers', async () => {
    const live = () => getProbes().liveObjects();
    const settle = async () => {
      for (let i = 0; i < 5; i++) {
        gc!();
        await new Promise((r) => setTimeout(r, 10));
      }
    };
    await settle();
    const before = live();
    for (let i = 0; i < 200; i++) model.createChat({ maxTokens: 128 }); // never disposed
    let dropped: Model | undefined = await loadModel(testModelPath(), { threads: THREADS });
    dropped.createChat({ maxTokens: 64 });
    expect(live().chats).toBeGreaterThanOrEqual(before.chats + 201);
    dropped = undefined;
    await settle();
    expect(live()).toEqual(before);
  });
});

describe('dispose during a load', () => {
  it('model.dispose() while loadChat runs: DisposedError, and the chat it made is freed at once (no GC needed)', async () => {
    const m = await loadModel(testModelPath(), { threads: THREADS });
    const c = m.createChat({ maxTokens: 128 });
    await c.send('hello', { maxNewTokens: 2 });
    const bytes = await c.checkpoint();
    c.dispose();
    // Chats other tests dropped are finalized first (with --expose-gc), so that the count below
    // moves only for this one (which a collection would free too: no gc() after the load).
    for (let i = 0; i < 5 && gc; i++) {
      gc();
      await new Promise((r) => setTimeout(r, 10));
    }
    const before = getProbes().liveObjects().chats;
    const loading = m.loadChat(bytes);
    m.dispose();
    await expect(loading).rejects.toBeInstanceOf(DisposedError);
    expect(getProbes().liveObjects().chats).toBe(before);
  });
});

describe('dispose', () => {
  it('using a disposed chat or model throws DisposedError', async () => {
    const m = await loadModel(testModelPath(), { threads: THREADS });
    const chat = m.createChat({ maxTokens: 64 });
    chat.dispose();
    chat.dispose(); // idempotent
    await expect(chat.send('x')).rejects.toBeInstanceOf(DisposedError);
    expect(() => chat.stats()).toThrow(DisposedError);
    const chat2 = m.createChat({ maxTokens: 64 });
    m.dispose();
    expect(chat2.disposed).toBe(true);
    expect(() => m.createChat()).toThrow(DisposedError);
    expect(() => m.tokenize('x')).toThrow(DisposedError);
  });

  it('disposing a chat mid-turn aborts it cleanly', async () => {
    const chat = model.createChat({ maxTokens: 256, testTokenDelayMs: 5 });
    // Disposed while the turn is queued or running (not from onToken: pieces reach JS asynchronously,
    // so a short reply can finish before the callback runs). The abort is never lost.
    const p = chat.send('long', { maxNewTokens: 500, temperature: 1.5, seed: 4 });
    chat.dispose();
    const r = await p;
    expect(r.stopReason).toBe('abort');
    expect(chat.disposed).toBe(true);
  });
});

describe('a turn is prepared off the event loop', () => {
  // holdPrepare(ms): the chat's next turn preparations (framing, tool set-up, grammar, the fit check)
  // wait until release(). One run on the JS thread could never be released (JS waits for it) and
  // would fail its turn after the timeout: each test fails if a preparation blocks the event loop.
  const HOLD_MS = 5000;
  const loopTurns = () => new Promise((r) => setTimeout(r, 20));

  it('send and an imported exchange: the event loop runs while they are prepared, then they run', async () => {
    const chat = model.createChat({ maxTokens: 128 });
    const release = chat._internals().holdPrepare(HOLD_MS);
    const turn = chat.send('hello there', { maxNewTokens: 4, temperature: 0, ignoreEos: true });
    expect(chat.busy).toBe(true);
    await loopTurns();
    release();
    const { stats } = await turn;
    expect(stats.generatedTokens).toBe(4);
    // The preparation's time is the turn's (it waited at the gate while the event loop ran for 20 ms);
    // latency and the first token count from the call, the preparation included.
    expect(stats.prepareMs).toBeGreaterThanOrEqual(10);
    expect(stats.firstTokenMs).toBeGreaterThanOrEqual(stats.prepareMs);
    expect(stats.latencyMs).toBeGreaterThanOrEqual(stats.firstTokenMs);
    await chat._ingest('and then?', 'then this');
    expect(chat.stats().turns).toBe(2);
    chat.dispose();
  });

  it('a message refused while prepared (too large) rejects typed; the chat stays as it was and usable', async () => {
    const chat = model.createChat({ maxTokens: 64 });
    await chat.send('first', { maxNewTokens: 2, temperature: 0 });
    const before = chat.memory();
    const release = chat._internals().holdPrepare(HOLD_MS);
    const turn = chat.send('word '.repeat(400), { maxNewTokens: 2 });
    await loopTurns();
    release();
    await expect(turn).rejects.toMatchObject({ code: 'PROMPT_TOO_LARGE' });
    expect(chat.busy).toBe(false);
    expect(chat.memory()).toEqual(before);
    expect((await chat.send('short', { maxNewTokens: 2, temperature: 0 })).stats.turn).toBe(2);
    chat.dispose();
  });

  it('aborted, disposed, or its model disposed while prepared: the turn ends as aborted, nothing ran', async () => {
    const m = await loadModel(testModelPath(), { threads: THREADS });
    const chats = Array.from({ length: 3 }, () => m.createChat({ maxTokens: 96 }));
    const releases = chats.map((c) => c._internals().holdPrepare(HOLD_MS));
    const controller = new AbortController();
    const turns = chats.map((c, i) => c.send(`go ${i}`, { maxNewTokens: 8, signal: i === 0 ? controller.signal : undefined }));
    controller.abort();
    chats[1]!.dispose();
    await loopTurns();
    const aborted = await (releases[0]!(), turns[0]!);
    expect(aborted.stopReason).toBe('abort');
    expect(aborted.stats.generatedTokens).toBe(0);
    expect(chats[0]!.stats().turns).toBe(0);
    m.dispose();   // chats[2]'s preparation still waits: its turn ends aborted too
    releases[1]!();
    releases[2]!();
    for (const r of await Promise.all(turns.slice(1))) {
      expect(r.stopReason).toBe('abort');
      expect(r.stats.generatedTokens).toBe(0);
    }
    await expect(chats[2]!.send('x')).rejects.toBeInstanceOf(DisposedError);
  });
});
