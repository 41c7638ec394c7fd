// Telemetry hooks and the Prometheus adapter.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Registry } from 'prom-client';
import { createPrometheusTelemetry, loadModel, type EvictionEvent, type Model, type TurnEvent } from '../../src/index.ts';
import { testModelPath, THREADS } from '../helpers.ts';

let model: Model;
beforeAll(async () => {
  model = await loadModel(testModelPath(), { threads: THREADS });
});
afterAll(() => model?.dispose());

const tick = () => new Promise((r) => setImmediate(r));

describe('telemetry hooks', () => {
  it('reports every turn and every eviction with figures that add up', async () => {
    const turns: TurnEvent[] = [];
    const evictions: EvictionEvent[] = [];
    const chat = model.createChat({ policy: 'sliding', maxTokens: 64, windowSize: 16, telemetry: { onTurn: (e) => void turns.push(e), onEviction: (e) => void evictions.push(e) } });
    let evictedTotal = 0;
    for (let t = 0; t < 20; t++) evictedTotal += (await chat.send(`m${t} some words`, { maxNewTokens: 8, temperature: 0 })).stats.evictedTokens;
    await tick();
    expect(turns).toHaveLength(20);
    expect(turns.map((e) => e.turn)).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    expect(turns.at(-1)!.chat.tokensRetained).toBe(chat.stats().tokensRetained);
    expect(turns.every((e) => e.chatId === chat.id && e.policy === 'sliding')).toBe(true);
    expect(evictions.length).toBe(chat.stats().evictions);
    expect(evictions.reduce((s, e) => s + e.evictedTokens, 0)).toBe(evictedTotal);
    for (const e of evictions) expect(e.positions.reduce((s, [b, end]) => s + end - b, 0)).toBe(e.evictedTokens);
    chat.dispose();
  });

  it('a throwing or never-settling hook neither breaks nor stalls the chat; errors reach onError', async () => {
    const errors: { err: unknown; source: string }[] = [];
    const chat = model.createChat({
      maxTokens: 64, windowSize: 16,
      telemetry: {
        onTurn: () => { throw new Error('hook boom'); },
        onEviction: () => new Promise<void>(() => {}), // never settles
        onError: (err, ctx) => {
          errors.push({ err, source: ctx.source });
          throw new Error('the error hook throws too');
        },
      },
    });
    for (let t = 0; t < 10; t++) await chat.send(`m${t} words words`, { maxNewTokens: 8, temperature: 0 });
    await tick();
    expect(errors.filter((e) => e.source === 'onTurn')).toHaveLength(10);
    expect((errors[0]!.err as Error).message).toBe('hook boom');
    await expect(chat.send('too big '.repeat(200))).rejects.toMatchObject({ code: 'PROMPT_TOO_LARGE' });
    await tick();
    expect(errors.filter((e) => e.source === 'turn')).toHaveLength(1);
    chat.dispose();
  });

  it('rejects telemetry that is not an object of functions', () => {
    expect(() => model.createChat({ telemetry: { onTurn: 5 } as never })).toThrow(/telemetry.onTurn/);
  });
});

describe('Prometheus adapter', () => {
  it('counts compactions and their time, and eviction positions that skip the gaps of earlier ones', async () => {
    const registry = new Registry();
    const telemetry = createPrometheusTelemetry({ registry });
    const evictions: EvictionEvent[] = [];
    const chat = model.createChat({ maxTokens: 64, windowSize: 16, policy: 'importance', importanceGranularity: 'token', positionLimit: 200, telemetry: { onEviction: (e) => void evictions.push(e) } });
    const prom = model.createChat({ policy: 'sliding', maxTokens: 64, windowSize: 16, positionLimit: 200, telemetry });
    let compactions = 0;
    let compactingTurns = 0;
    for (let t = 0; t < 16; t++) {
      await chat.send(`m${t} some words`, { maxNewTokens: 8, temperature: 0 });
      const n = (await prom.send(`m${t} some words`, { maxNewTokens: 8, temperature: 0 })).stats.compactions;
      compactions += n;
      compactingTurns += n > 0 ? 1 : 0;
    }
    await tick();
    expect(compactions).toBeGreaterThan(0);
    expect(compactions).toBe(prom.stats().compactions);
    const text = await registry.metrics();
    expect(text).toContain(`finite_memory_compactions_total{policy="sliding"} ${compactions}`);
    expect(text).toMatch(new RegExp(`finite_memory_compaction_seconds_count\\{policy="sliding"\\} ${compactingTurns}`));
    // Scattered evictions over kept positions: every range holds evicted positions only.
    for (const e of evictions) expect(e.positions.reduce((s, [b, end]) => s + end - b, 0)).toBe(e.evictedTokens);
    expect(evictions.some((e) => e.positions.length > 1)).toBe(true);
    chat.dispose();
    prom.dispose();
  });

  it('exposes histograms, counters and gauges labelled by policy', async () => {
    const registry = new Registry();
    const telemetry = createPrometheusTelemetry({ registry });
    const a = model.createChat({ policy: 'sliding', maxTokens: 64, windowSize: 16, telemetry });
    const b = model.createChat({ policy: 'importance', maxTokens: 64, windowSize: 16, telemetry });
    for (let t = 0; t < 15; t++) {
      await a.send(`m${t} words`, { maxNewTokens: 8, temperature: 0 });
      await b.send(`m${t} words`, { maxNewTokens: 8, temperature: 0 });
    }
    await tick();
    const text = await registry.metrics();
    const value = (line: string) => Number(text.split('\n').find((l) => l.startsWith(line + ' '))?.split(' ').at(-1));
    expect(value('finite_memory_turns_total{policy="sliding"}')).toBe(15);
    expect(value('finite_memory_turns_total{policy="importance"}')).toBe(15);
    expect(value('finite_memory_evicted_tokens_total{policy="sliding"}')).toBe(a.stats().tokensEvicted);
    expect(value('finite_memory_evictions_total{policy="importance"}')).toBe(b.stats().evictions);
    expect(value('finite_memory_retained_tokens{policy="sliding"}')).toBe(a.stats().tokensRetained);
    expect(value('finite_memory_kv_bytes{policy="importance"}')).toBe(b.stats().kvBytes);
    expect(value('finite_memory_turn_latency_seconds_count{policy="sliding"}')).toBe(15);
    expect(text).toContain('finite_memory_policy_seconds_bucket');
    expect(text).toContain('finite_memory_prefill_seconds_sum{policy="importance"}');
    a.dispose();
    await tick();
    const after = await registry.metrics();
    expect(after).toContain('finite_memory_retained_tokens{policy="sliding"} 0');
    b.dispose();
  });

  it('a chat disposed right after its turn leaves no gauge behind (onClose after onTurn)', async () => {
    // A server's one-off request: send, then dispose in the same tick. onClose ran before the
    // deferred onTurn, which then put the chat's gauges back for good.
    const registry = new Registry();
    const telemetry = createPrometheusTelemetry({ registry });
    const order: string[] = [];
    const hooks = { ...telemetry, onTurn: (e: TurnEvent) => { order.push('turn'); return telemetry.onTurn?.(e); }, onClose: (id: string) => { order.push('close'); telemetry.onClose?.(id); } };
    for (let i = 0; i < 3; i++) {
      const chat = model.createChat({ policy: 'sliding', maxTokens: 64, telemetry: hooks });
      await chat.send('hello there', { maxNewTokens: 4, temperature: 0 });
      chat.dispose();
    }
    await tick();
    await tick();
    expect(order).toEqual(['turn', 'close', 'turn', 'close', 'turn', 'close']);
    expect(await registry.metrics()).toContain('finite_memory_retained_tokens{policy="sliding"} 0');
  });
});
