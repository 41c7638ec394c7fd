import { mkdtempSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect } from 'vitest';
import { writeLlamaModel, type LlamaModelOptions } from '../src/gguf/index.ts';
import type { Chat, TurnResult } from '../src/index.ts';

const dir = mkdtempSync(join(tmpdir(), 'fml-test-'));
const made = new Map<string, string>();

/** Generates (once per test file and shape) a tiny seeded llama GGUF in a temp dir. */
export function testModelPath(options: Partial<LlamaModelOptions> = {}): string {
  const key = JSON.stringify(options);
  let path = made.get(key);
  if (!path) {
    path = join(dir, `model-${made.size}.gguf`);
    writeLlamaModel(path, options);
    made.set(key, path);
  }
  return path;
}

export const testDir = dir;

/** Tests run llama.cpp on one thread: its spin barrier is fragile on a shared 2-core VM. */
export const THREADS = 1;

export const SHARED_MODELS = join(import.meta.dirname, '..', '..', 'shared', 'models');

/** The KV invariants: within budget, positions increasing below the limit, and llama.cpp's own view agrees. */
export function checkCache(chat: Chat, maxTokens: number) {
  const cache = chat._internals().cacheState();
  expect(cache.ledgerTokens).toBeLessThanOrEqual(maxTokens);
  // Positions may have gaps (kept positions) but always increase, below the chat's limit, and
  // llama.cpp's view of the sequence spans exactly the ledger's.
  expect(cache.positionsIncreasing).toBe(true);
  expect(cache.cachePosMin).toBe(cache.ledgerPosFirst);
  expect(cache.cachePosMax).toBe(cache.ledgerPosLast);
  expect(cache.ledgerPosLast).toBeLessThan(cache.positionLimit);
  expect(cache.windowIntact).toBe(true);
  // Attention signals: every decode's tensors had the planned layout, and no weight fell on a
  // position after its query (a wrong cell -> position map would put some there).
  expect(cache.signalLayoutMismatches).toBe(0);
  expect(cache.causalViolations).toBe(0);
  if (chat.options.positions === 'compact') {
    expect(cache.positionsContiguous).toBe(true);
    expect(cache.cachePosMax).toBe(cache.ledgerTokens - 1);
  }
  return cache;
}

/** Largest elementwise difference of two logit vectors (NaN-safe: a missing element counts as NaN). */
export const maxAbsDiff = (a: Float32Array, b: Float32Array): number => a.reduce((m, v, i) => Math.max(m, Math.abs(v - (b[i] ?? NaN))), 0);

/** The turn ran: it resolved with a result whose prompt was prefilled (not merely "something came back"). */
export async function expectTurnRan(turn: Promise<TurnResult>): Promise<TurnResult> {
  const r = await turn;
  expect(r.stats.promptTokens).toBeGreaterThan(0);
  expect(typeof r.response).toBe('string');
  expect(['eos', 'maxTokens', 'stop', 'abort']).toContain(r.stopReason);
  return r;
}

/**
 * A fake OpenAI-compatible endpoint for remote chats: answers every request with `message` and keeps
 * each request's JSON body. `close()` when done.
 */
export async function fakeCompletions(message: Record<string, unknown>): Promise<{ baseURL: string; bodies: Record<string, unknown>[]; close: () => Promise<void> }> {
  const bodies: Record<string, unknown>[] = [];
  const fake = createHttpServer((req, res) => {
    let data = '';
    req.on('data', (c) => (data += c));
    req.on('end', () => {
      bodies.push(JSON.parse(data) as Record<string, unknown>);
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ choices: [{ message: { role: 'assistant', ...message }, finish_reason: 'stop' }] }));
    });
  });
  await new Promise<void>((r) => fake.listen(0, '127.0.0.1', r));
  return {
    baseURL: `http://127.0.0.1:${(fake.address() as AddressInfo).port}/v1`,
    bodies,
    close: () => new Promise<void>((r) => fake.close(() => r())),
  };
}
