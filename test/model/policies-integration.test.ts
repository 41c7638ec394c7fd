// Every policy against the real KV cache: hundreds of turns with the foundation's invariants.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, POLICIES, type Chat, type ChatOptions, type EvictionEvent, type MemoryEntry, type Model, type PolicyName } from '../../src/index.ts';
import { checkCache, SHARED_MODELS, testModelPath, THREADS } from '../helpers.ts';

let model: Model;
beforeAll(async () => {
  model = await loadModel(testModelPath(), { threads: THREADS });
});
afterAll(() => model?.dispose());


async function runTurns(m: Model, policy: PolicyName, turns: number, extra: ChatOptions = {}) {
  const maxTokens = 160;
  const chat = m.createChat({ policy, maxTokens, windowSize: 32, sinkTokens: 4, systemPrompt: 'You are terse.', maxPolicyMs: 0, ...extra });
  const pinned0: string[] = [];
  const signals = new Set<string | null>();
  let summaryTokens = 0;
  for (let t = 0; t < turns; t++) {
    const internals = chat._internals();
    const before = internals.cacheState();
    const message = `turn ${t}. ${['The cat sat.', 'Rain fell on the hill!', 'Why is the sky blue?', 'Bread and jam.'][t % 4]}`;
    const expectedPrefill = internals.countTurnTokens(message) + before.carriedTokens + before.pendingSystemTokens;
    const r = await chat.send(message, { maxNewTokens: 4 + (t % 9), temperature: 0.9, seed: t });
    expect(r.stats.promptTokens).toBe(expectedPrefill);
    expect(r.stats.policy).toBe(policy);
    checkCache(chat, maxTokens);
    const pinned = chat.memory().filter((e) => e.pinned).map((e) => `${e.position}:${e.token}`);
    if (pinned0.length === 0) pinned0.push(...pinned);
    expect(pinned).toEqual(pinned0);
    signals.add(r.stats.importanceSignal);
    summaryTokens += r.stats.summaryTokens;
  }
  return { chat, signals, summaryTokens };
}

describe.each(POLICIES)('policy %s', (policy) => {
  it('keeps the KV invariants for 200 turns', async () => {
    const { chat, signals, summaryTokens } = await runTurns(model, policy, 200);
    const s = chat.stats();
    expect(s.evictions).toBeGreaterThan(10);
    expect(s.fallbackCount).toBe(0);
    if (policy === 'importance' || policy === 'hybrid') expect([...signals]).toEqual(['attention']);
    else expect([...signals]).toEqual([null]);
    const summaryEntries = chat.memory().filter((e) => e.role === 'summary');
    if (policy === 'rolling_summary' || policy === 'hybrid') {
      // Summaries were written over 200 turns, and what the last one wrote is in the cache as role 'summary'.
      expect(summaryTokens).toBeGreaterThan(0);
      expect(summaryEntries.length).toBeGreaterThan(0);
      expect(summaryEntries.length).toBeLessThanOrEqual(48);
      expect(s.summary.length).toBeGreaterThan(0);
      expect(summaryTokens).toBeGreaterThanOrEqual(summaryEntries.length);
    } else {
      expect(summaryEntries).toHaveLength(0);
    }
    chat.dispose();
  });

  it('is deterministic for a seed', async () => {
    const run = async () => {
      const chat = model.createChat({ policy, maxTokens: 96, windowSize: 16, maxPolicyMs: 0 });
      const out: string[] = [];
      for (let t = 0; t < 25; t++) out.push((await chat.send(`m${t}`, { maxNewTokens: 8, temperature: 0.8, seed: t })).response);
      chat.dispose();
      return out.join('|');
    };
    expect(await run()).toBe(await run());
  });
});

describe('importance signals', () => {
  // A flash-attention node never materializes its weights: they are recomputed from its inputs
  // (engine/flash-weights.h). The same imported conversation with flash attention off (the graph's own
  // weights) and on: every token's mean attention received within 1e-3. (One sampled token, carried
  // and not decoded: the two kernels' rounding could make greedy replies differ.)
  it('reads the same attention weights with flash attention forced on as with it off', async () => {
    const messages = Array.from({ length: 6 }, (_, t) => [
      { role: 'user' as const, content: `message ${t}: the river runs past the old mill` },
      { role: 'assistant' as const, content: `reply ${t}: and the bridge by the water` },
    ]).flat();
    // An f32 cache: the flash kernel reads an f16 copy of its keys (the node's keys are a copy, not the cache).
    const settings: ChatOptions[] = [{ flashAttention: false }, { flashAttention: true }, { flashAttention: true, kvType: 'f32' }];
    const memories = settings.map(async (setting) => {
      const chat = await model.importTranscript({ format: 'finite-memory-llm/transcript', version: 1, systemPrompt: 'Be brief.', messages },
        { policy: 'importance', importanceScore: 'mean', maxTokens: 1024, threads: THREADS, ...setting });
      const r = await chat.send('and then?', { maxNewTokens: 1, temperature: 0 });
      expect(r.stats.importanceSignal).toBe('attention');
      const cache = checkCache(chat, 1024);
      expect(cache.attentionRowsChecked).toBeGreaterThan(1000);
      const memory = chat.memory();
      chat.dispose();
      return memory;
    });
    const [off, ...on] = await Promise.all(memories);
    expect(Math.max(...off!.map((e) => e.score))).toBeGreaterThan(0.05);
    for (const memory of on) {
      expect(memory.map((e) => e.token)).toEqual(off!.map((e) => e.token));
      expect(Math.max(...off!.map((e, i) => Math.abs(e.score - memory[i]!.score)))).toBeLessThan(1e-3);
    }
  });

  // Chats decoded together: the flash node holds a KV stream per chat (queries [d, T, H, chats], keys
  // [d, n_kv, Hkv, chats]). Four different conversations imported at once, flash off and on: each
  // chat's scores from its own stream, as the graph's weights give them.
  it('with flash attention forced on, chats decoded together each read their own stream', async () => {
    const transcript = (i: number) => ({
      format: 'finite-memory-llm/transcript' as const, version: 1 as const, systemPrompt: 'Be brief.',
      messages: Array.from({ length: 3 + i }, (_, t) => [
        { role: 'user' as const, content: `chat ${i} message ${t}: ${'the river runs past the mill '.repeat(1 + ((i + t) % 3))}` },
        { role: 'assistant' as const, content: `reply ${t} of chat ${i}` },
      ]).flat(),
    });
    const run = async (flashAttention: boolean) => {
      const chats = await Promise.all([0, 1, 2, 3].map((i) => model.importTranscript(transcript(i), { policy: 'importance', importanceScore: 'mean', maxTokens: 1024, flashAttention })));
      await Promise.all(chats.map((c) => c.send('and then?', { maxNewTokens: 1, temperature: 0 })));
      const shared = chats[0]!._internals().engineStats().sharedDecodes;
      const memories = chats.map((c) => {
        checkCache(c, 1024);
        const memory = c.memory();
        c.dispose();
        return memory;
      });
      return { memories, shared };
    };
    const off = await run(false);
    const on = await run(true);
    expect(on.shared).toBeGreaterThan(0);
    for (let i = 0; i < 4; i++) {
      const [a, b] = [off.memories[i]!, on.memories[i]!];
      expect(b.map((e) => e.token)).toEqual(a.map((e) => e.token));
      expect(Math.max(...a.map((e, k) => Math.abs(e.score - b[k]!.score)))).toBeLessThan(1e-3);
    }
  });

  it('with flash attention forced on, evicts by those weights through hundreds of cell reuses', async () => {
    const chat = model.createChat({ policy: 'importance', maxTokens: 96, windowSize: 16, flashAttention: true, maxPolicyMs: 0 });
    for (let t = 0; t < 30; t++) {
      const r = await chat.send(`m${t} with some words`, { maxNewTokens: 8, temperature: 1, seed: t });
      expect(r.stats.importanceSignal).toBe('attention');
      checkCache(chat, 96);
    }
    expect(chat.stats().evictions).toBeGreaterThan(5);
    // checkCache: no weight on a position after its query (the cell map of the flash node's keys).
    expect(chat._internals().cacheState().attentionRowsChecked).toBeGreaterThan(1000);
    expect(chat.memory().some((e) => !e.pinned && e.score > 0)).toBe(true);
    chat.dispose();
  });
});

describe('summaries with positions kept', () => {
  it.each(['hybrid', 'rolling_summary'] as const)('%s: a summary goes into an evicted range, never after the history (the next tokens would read it as the newest text): no compaction below the position limit', async (policy) => {
    const events: EvictionEvent[] = [];
    const chat = model.createChat({ policy, maxTokens: 256, maxPolicyMs: 0, systemPrompt: 'You are terse.', telemetry: { onEviction: (e) => void events.push(e) } });
    const words = 'the cat sat on a mat. rain fell! why is the sky blue? bread and jam\nok'.split(' ');
    let compactions = 0;
    let summaries = 0;
    for (let t = 0; t < 30; t++) {
      const msg = Array.from({ length: 5 + (t * 7) % 30 }, (_, i) => words[(t * 3 + i) % words.length]).join(' ');
      const r = await chat.send(msg, { maxNewTokens: 20, temperature: 0.8, seed: t });
      compactions += r.stats.compactions;
      checkCache(chat, 256);
      if (r.stats.summaryTokens === 0) continue;
      summaries++;
      await new Promise((res) => setTimeout(res, 0));   // telemetry hooks run on a later tick
      // The summary starts where one of the ranges its eviction freed started (the first that holds
      // it, or the first with what follows pushed), not after the retained history.
      const last = events.filter((e) => e.summaryTokens > 0).at(-1)!;
      const first = chat.memory().find((e) => e.role === 'summary')!;
      expect(last.positions.map(([begin]) => begin)).toContain(first.position);
    }
    expect(summaries).toBeGreaterThan(5);
    expect(chat._internals().cacheState().ledgerPosLast).toBeLessThan(chat._internals().cacheState().positionLimit);
    expect(compactions).toBe(0);
    chat.dispose();
  });

  it.each(['rolling_summary', 'hybrid'] as const)('%s: a summary whose decode fails: the eviction goes ahead without it and the turn goes on', async (policy) => {
    const run = async (testFailSummaryDecode: boolean) => {
      const chat = model.createChat({ policy, maxTokens: 128, maxPolicyMs: 0, systemPrompt: 'You are terse.', summaryTokens: 12, testFailSummaryDecode });
      for (let t = 0; t < 14; t++) {
        const r = await chat.send(`message ${t} about the cat, the mat and the rain on the hill`, { maxNewTokens: 8, temperature: 0 });
        expect(r.stats.promptTokens).toBeGreaterThan(0);
        checkCache(chat, 128);
      }
      const seen = { fallbacks: chat.stats().fallbackCount, evictions: chat.stats().evictions, summaries: chat.memory().filter((e) => e.role === 'summary').length };
      chat.dispose();
      return seen;
    };
    const failing = await run(true);
    const writing = await run(false);
    expect(writing.summaries).toBeGreaterThan(0);   // the same chat without the hook writes summaries
    expect(failing.summaries).toBe(0);
    expect(failing.fallbacks).toBeGreaterThan(0);
    expect(failing.fallbacks).toBe(failing.evictions);   // every eviction wanted a summary and went without it
  });

  it('hybrid: a turn rolled back after its summary pushed the tokens after it leaves their scores as they were', async () => {
    // testFailAfterTokens: a reply's 21st decode fails and the whole turn goes (its prompt's and reply's
    // attention with it); every other turn is one, stopping at 20. Long summaries over short spans:
    // no freed range holds one at times, and it is pushed in (turn 5 here).
    const chat = model.createChat({ policy: 'hybrid', maxTokens: 256, maxPolicyMs: 0, systemPrompt: 'You are terse.', testFailAfterTokens: 21, summaryTokens: 60, spanMaxTokens: 16 });
    const words = 'the cat sat on a mat. rain fell! why is the sky blue? bread and jam\nok'.split(' ');
    const say = (t: number) => Array.from({ length: 5 + (t * 7) % 30 }, (_, i) => words[(t * 3 + i) % words.length]).join(' ');
    const key = (e: MemoryEntry) => `${e.turn}:${e.role}:${e.token}`;
    let pushed = 0;
    for (let t = 0; t < 12; t++) {
      const before = chat.memory();
      if (t % 2 === 0) {
        await chat.send(say(t), { maxNewTokens: 20, temperature: 0.8, seed: t });
        continue;
      }
      await expect(chat.send(say(t), { maxNewTokens: 30, ignoreEos: true, temperature: 0.8, seed: t })).rejects.toThrow(/testFailAfterTokens/);
      // The entries still there, in order, with the scores they had (evictions done stay done): each
      // where it was, or pushed forward by less than a summary's length.
      const after = chat.memory();
      let j = 0;
      for (const e of after.filter((x) => x.role !== 'summary')) {
        const at = (b: MemoryEntry) => key(b) === key(e) && (b.position === e.position ||
          (b.position < e.position && e.position - b.position <= 64 && !before.some((o) => o.position === e.position && key(o) === key(e))));
        while (j < before.length && !at(before[j]!)) j++;
        expect(j).toBeLessThan(before.length);
        expect(e.score).toBe(before[j]!.score);
        if (e.position !== before[j]!.position) pushed++;
        j++;
      }
      checkCache(chat, 256);
    }
    expect(pushed).toBeGreaterThan(0);   // the case this is about happened
    chat.dispose();
  });

  it.each(['rolling_summary', 'hybrid'] as const)('%s: an eviction that summarizes frees summaryEvictTokens more, so summaries come every few turns', async (policy) => {
    const run = async (summaryEvictTokens?: number) => {
      const chat = model.createChat({ policy, maxTokens: 512, maxPolicyMs: 0, systemPrompt: 'You are terse.', ...(summaryEvictTokens === undefined ? {} : { summaryEvictTokens }) });
      expect(chat.options.summaryEvictTokens).toBe(summaryEvictTokens ?? 0);
      let summaries = 0;
      let minRetained = Infinity;
      for (let t = 0; t < 40; t++) {
        const r = await chat.send(`turn ${t}. the cat sat on a mat. rain fell! why is the sky blue?`, { maxNewTokens: 16, temperature: 0.8, seed: t });
        summaries += r.stats.summaryTokens > 0 ? 1 : 0;
        if (t >= 20) minRetained = Math.min(minRetained, r.stats.retainedTokens);
        checkCache(chat, 512);
      }
      chat.dispose();
      return { summaries, minRetained };
    };
    const every = await run();
    const amortised = await run(128);   // two turns of ~65 tokens here
    expect(every.summaries).toBeGreaterThanOrEqual(25);
    expect(amortised.summaries).toBeGreaterThan(0);
    expect(amortised.summaries * 2).toBeLessThanOrEqual(every.summaries);
    // The price: after a summary the chat holds less than the budget, for a few turns.
    expect(amortised.minRetained).toBeLessThan(every.minRetained);
  });

  it('a summary at a turn\'s start reads the previous reply closed (its last token and end of turn), then the instruction', async () => {
    const chat = model.createChat({ policy: 'rolling_summary', maxTokens: 256, maxPolicyMs: 0 });
    const instruction = chat._internals().summaryPrompt();
    expect(model.detokenize(instruction, { special: true })).toContain('Summarize the conversation so far');
    await chat.send('the cat sat on a mat', { maxNewTokens: 6, temperature: 0 });
    const prompt = chat._internals().summaryPrompt();
    const closing = prompt.slice(0, prompt.length - instruction.length);
    expect(prompt.slice(closing.length)).toEqual(instruction);
    expect(closing.length).toBe(chat._internals().cacheState().carriedTokens);
    expect(model.detokenize(closing, { special: true })).toContain('<|im_end|>');
    const sliding = model.createChat({ policy: 'sliding', maxTokens: 256 });
    expect(sliding._internals().summaryPrompt()).toEqual([]);
    sliding.dispose();
    chat.dispose();
  });

  it('a summary written mid-reply reads the reply closed too: its pending token and end of turn, then the instruction', async () => {
    const events: EvictionEvent[] = [];
    const chat = model.createChat({ policy: 'rolling_summary', maxTokens: 128, windowSize: 24, summaryTokens: 12, maxPolicyMs: 0, telemetry: { onEviction: (e) => void events.push(e) } });
    // A reply that ended on maxTokens leaves its last token pending: between turns the prompt is that
    // token, the end of turn and the instruction; mid-reply it is the same three parts.
    await chat.send('the cat sat on a mat', { maxNewTokens: 6, ignoreEos: true, temperature: 0 });
    const between = chat._internals().summaryPrompt().length;
    // Replies longer than the budget: room is made while they are written.
    for (let t = 0; t < 3; t++) await chat.send(`turn ${t}: the dog ran`, { maxNewTokens: 150, ignoreEos: true, temperature: 0.8, seed: t });
    await chat.send('and then? '.repeat(12), { maxNewTokens: 4, ignoreEos: true, temperature: 0 }); // room made before its prompt
    await new Promise((r) => setTimeout(r, 20)); // hooks run on a later tick
    const midReply = events.filter((e) => e.phase === 'generation' && e.summaryTokens > 0);
    const atStart = events.filter((e) => e.phase === 'prefill' && e.summaryTokens > 0);
    expect(midReply.length).toBeGreaterThan(0);
    expect(atStart.length).toBeGreaterThan(0);
    for (const e of [...midReply, ...atStart]) expect(e.summaryPromptTokens).toBe(between);
    chat.dispose();
  });
});

describe('latency guard', () => {
  it('falls back to sliding when the policy is too slow, and counts it', async () => {
    const chat = model.createChat({ policy: 'hybrid', maxTokens: 96, windowSize: 16, maxPolicyMs: 5, testPolicyDelayMs: 20 });
    let fallbacks = 0;
    for (let t = 0; t < 20; t++) {
      const r = await chat.send(`m${t}`, { maxNewTokens: 8, temperature: 0 });
      if (r.stats.evictions > 0) expect(r.stats.fallback).toBe(true);
      fallbacks += r.stats.fallback ? 1 : 0;
      checkCache(chat, 96);
    }
    expect(fallbacks).toBeGreaterThan(0);
    expect(chat.stats().fallbackCount).toBeGreaterThanOrEqual(fallbacks);
    // Without the delay the same policy does not fall back.
    const fast = model.createChat({ policy: 'hybrid', maxTokens: 96, windowSize: 16, maxPolicyMs: 1000 });
    for (let t = 0; t < 20; t++) await fast.send(`m${t}`, { maxNewTokens: 8, temperature: 0 });
    expect(fast.stats().fallbackCount).toBe(0);
    chat.dispose();
    fast.dispose();
  });

  it('after 3 slow plans in a row, the policy is not run for the next 16 evictions (sliding at once), then tried again', async () => {
    const policyMs: number[] = [];
    const chat = model.createChat({ policy: 'importance', maxTokens: 64, windowSize: 8, maxPolicyMs: 5, testPolicyDelayMs: 20,
      telemetry: { onEviction: (e) => { policyMs.push(e.policyMs); } } });
    for (let t = 0; policyMs.length < 21 && t < 200; t++) await chat.send(`message ${t}`, { maxNewTokens: 4, ignoreEos: true, temperature: 0 });
    await new Promise((r) => setImmediate(r));   // hooks run after the turn settles
    const ran = policyMs.map((ms) => ms >= 20);
    expect(ran.slice(0, 3)).toEqual([true, true, true]);
    expect(ran.slice(3, 19)).toEqual(Array(16).fill(false));
    expect(ran[19]).toBe(true);
    expect(chat.stats().fallbackCount).toBeGreaterThanOrEqual(20);
    checkCache(chat, 64);
    chat.dispose();
  });

  // A long pinned system prompt leaves the window all there is to evict: a summary as long as what
  // the eviction freed left one free token, so every generated token summarized again.
  it.each(['rolling_summary', 'hybrid'] as const)('%s under a system prompt of most of the budget: a summary leaves the reply room to go on', async (policy) => {
    const systemPrompt = 'You are a careful assistant. '.repeat(22);
    expect(model.tokenize(systemPrompt).length).toBeGreaterThan(150);
    const chat = model.createChat({ policy, maxTokens: 256, summaryTokens: 24, systemPrompt, maxPolicyMs: 0 });
    let summaries = 0;
    for (let t = 0; t < 3; t++) {
      const r = await chat.send(`question ${t} about the river`, { maxNewTokens: 60, ignoreEos: true, temperature: 0.8, seed: t });
      expect(r.stats.evictions).toBeLessThanOrEqual(8);   // 35-50 a turn before
      summaries += r.stats.summaryTokens;
      checkCache(chat, 256);
    }
    expect(summaries).toBeGreaterThan(0);
    chat.dispose();
  });

  // The fallback is sliding for that eviction: a summarizing policy frees room for a summary, which
  // the fallback does not write, so that room is not taken from the history.
  it.each(['rolling_summary', 'hybrid'] as const)('a %s eviction that falls back evicts what sliding would', async (policy) => {
    const opts = { maxTokens: 96, windowSize: 16, summaryTokens: 24 } as const;
    const slow = model.createChat({ ...opts, policy, maxPolicyMs: 5, testPolicyDelayMs: 20 });
    const sliding = model.createChat({ ...opts, policy: 'sliding' });
    let evictions = 0;
    for (let t = 0; t < 12; t++) {
      const [a, b] = await Promise.all([slow, sliding].map((c) => c.send(`m${t} ${'word '.repeat(t % 5)}`, { maxNewTokens: 8, temperature: 0 })));
      expect(a!.stats.evictedTokens).toBe(b!.stats.evictedTokens);
      evictions += a!.stats.evictions;
      if (a!.stats.evictions > 0) expect(a!.stats.fallback).toBe(true);
    }
    expect(evictions).toBeGreaterThan(2);
    expect(slow.memory().map((e) => [e.position, e.token])).toEqual(sliding.memory().map((e) => [e.position, e.token]));
    slow.dispose();
    sliding.dispose();
  });
});

const stories = join(SHARED_MODELS, 'stories260K.gguf');
describe.skipIf(!existsSync(stories))('policies on stories260K', () => {
  it.each(POLICIES)('%s keeps its invariants for 100 turns', async (policy) => {
    const m = await loadModel(stories, { threads: THREADS });
    const { chat } = await runTurns(m, policy, 100);
    expect(chat.stats().evictions).toBeGreaterThan(5);
    m.dispose();
  });
});

describe('signals read from the model', () => {
  it('the KV cell -> position map is right: no attention ever lands on a position after the query', async () => {
    // Evictions free cells in the middle; later tokens refill those holes, so cells and positions
    // diverge. A wrong map would put (causally impossible) weight on later positions.
    const chat = model.createChat({ policy: 'importance', maxTokens: 96, windowSize: 16, maxPolicyMs: 0 });
    for (let t = 0; t < 40; t++) await chat.send(`message ${t} with some words`, { maxNewTokens: 10, temperature: 1, seed: t });
    const cache = chat._internals().cacheState();
    expect(chat.stats().evictions).toBeGreaterThan(10);
    expect(cache.attentionRowsChecked).toBeGreaterThan(1000);
    expect(cache.causalViolations).toBe(0);
    const scores = chat.memory().map((e) => e.score);
    expect(scores.some((s) => s > 0)).toBe(true);
    chat.dispose();
  });

  it('summaries leave no scratch-sequence cells behind', async () => {
    const chat = model.createChat({ policy: 'rolling_summary', maxTokens: 128, windowSize: 16, maxPolicyMs: 0 });
    for (let t = 0; t < 30; t++) await chat.send(`message ${t}`, { maxNewTokens: 10, temperature: 1, seed: t });
    expect(chat.stats().evictions).toBeGreaterThan(3);
    expect(chat._internals().cacheState().scratchPosMax).toBe(-1);
    chat.dispose();
  });
});
