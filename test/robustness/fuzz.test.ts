// Bad-input battery and a bounded fuzz test (fast-check, fixed seed): every case ends in a typed
// error or a correct result, never a crash, and the chat stays usable afterwards.
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FiniteMemoryError, loadModel, type Chat, type Model } from '../../src/index.ts';
import { checkCache, testModelPath, THREADS, expectTurnRan } from '../helpers.ts';

let model: Model;
beforeAll(async () => {
  model = await loadModel(testModelPath(), { threads: THREADS });
});
afterAll(() => model?.dispose());

async function stillUsable(chat: Chat) {
  const r = await chat.send('ok', { maxNewTokens: 2, temperature: 0 });
  expect(r.stats.retainedTokens).toBeLessThanOrEqual(chat.options.maxTokens);
  checkCache(chat, chat.options.maxTokens);
}

const weird = fc.oneof(
  fc.integer({ min: -5, max: 5000 }),
  fc.double(),
  fc.constantFrom(Number.NaN, Infinity, -Infinity, 2 ** 53, -0, 0.5),
  fc.string({ maxLength: 8 }),
  fc.boolean(),
  fc.constant(null),
  fc.constant(undefined),
  fc.array(fc.string({ maxLength: 3 }), { maxLength: 3 }),
);

describe('fuzz', () => {
  it('random chat options, messages and send options: typed error or a result, chat usable after', async () => {
    const chatOptions = fc.record(
      {
        policy: fc.oneof(fc.constantFrom('sliding', 'importance', 'semantic', 'rolling_summary', 'hybrid', 'lru', ''), weird),
        maxTokens: fc.oneof(fc.integer({ min: 8, max: 300 }), weird),
        windowSize: fc.oneof(fc.integer({ min: 0, max: 300 }), weird),
        sinkTokens: fc.oneof(fc.integer({ min: 0, max: 40 }), weird),
        systemPrompt: fc.oneof(fc.string({ maxLength: 200 }), weird),
        summaryTokens: fc.oneof(fc.integer({ min: 0, max: 80 }), weird),
        kvType: fc.oneof(fc.constantFrom('f16', 'f32', 'q8_0', 'q4'), weird),
      },
      { requiredKeys: [] },
    );
    const message = fc.oneof(
      fc.string({ maxLength: 200 }),
      fc.string({ unit: 'binary', maxLength: 100 }),
      fc.constantFrom('', '\u0000\u0000', '\uD800', '\uDFFF lone', '👋🏽 emoji 🧪', 'x'.repeat(5000)),
      weird,
    );
    const sendOptions = fc.record(
      {
        maxNewTokens: fc.oneof(fc.integer({ min: 0, max: 40 }), weird),
        temperature: fc.oneof(fc.double({ min: 0, max: 3, noNaN: true }), weird),
        topK: fc.oneof(fc.integer({ min: 0, max: 100 }), weird),
        topP: fc.oneof(fc.double({ min: 0, max: 1, noNaN: true }), weird),
        seed: fc.oneof(fc.integer({ min: 0, max: 2 ** 31 }), weird),
        stop: fc.oneof(fc.array(fc.string({ maxLength: 5 }), { maxLength: 4 }), fc.constant(['', 'x'.repeat(1024)]), weird),
      },
      { requiredKeys: [] },
    );
    await fc.assert(
      fc.asyncProperty(chatOptions, message, sendOptions, async (opts, msg, sendOpts) => {
        let chat: Chat;
        try {
          chat = model.createChat(opts as never);
        } catch (err) {
          expect(err).toBeInstanceOf(FiniteMemoryError);
          return;
        }
        try {
          const r = await chat.send(msg as never, sendOpts as never);
          expect(typeof r.response).toBe('string');
          expect(['eos', 'maxTokens', 'stop', 'abort']).toContain(r.stopReason);
        } catch (err) {
          expect(err).toBeInstanceOf(FiniteMemoryError);
        }
        await stillUsable(chat);
        chat.dispose();
      }),
      { seed: 20261125, numRuns: 120 },
    );
  });
});

// Grammars and schemas from pieces of their syntax: llama.cpp's parser and converter see text they
// were not written for; each ends in a typed error or a reply that follows it.
const GBNF_PIECES = ['root', ' ', '::=', ' ::= ', '"a"', '"\\"', '"', '(', ')', '|', '*', '+', '?', '[', ']', '[^', 'a-z', '{', '}', '{0,3}', '{2,}', '2', ',', '\n', 'x', 'x ::= ', '\\', '#', '<[5]>', '<', '>', '.', '\u00e9', '-'];
const schema: fc.Arbitrary<unknown> = fc.letrec<{ node: unknown }>((tie) => ({
  // Leaves first: at maxDepth fast-check takes the first arbitrary (the tree stays small).
  node: fc.oneof(
    { maxDepth: 3, depthSize: 'small', withCrossShrink: true },
    fc.constant({}),
    fc.boolean(),
    fc.record(
      {
        type: fc.oneof(fc.constantFrom('object', 'array', 'string', 'number', 'integer', 'boolean', 'null', 'nonsense'), fc.array(fc.constantFrom('string', 'null'), { maxLength: 2 })),
        properties: fc.dictionary(fc.oneof(fc.string({ maxLength: 4 }), fc.constantFrom('k'.repeat(256), 'k'.repeat(300))), tie('node'), { maxKeys: 3 }),
        required: fc.array(fc.string({ maxLength: 4 }), { maxLength: 3 }),
        items: tie('node'),
        prefixItems: fc.array(tie('node'), { maxLength: 2 }),
        anyOf: fc.array(tie('node'), { maxLength: 2 }),
        allOf: fc.array(fc.oneof(tie('node'), fc.constantFrom({ $ref: '#/allOf/0' }, { $ref: '#/$defs/a' }, { $ref: '#' })), { maxLength: 2 }),
        enum: fc.array(fc.oneof(fc.string({ maxLength: 4 }), fc.integer(), fc.constant(null)), { maxLength: 3 }),
        const: fc.oneof(fc.string({ maxLength: 4 }), fc.integer()),
        minItems: fc.oneof(fc.integer({ min: -2, max: 5000 }), fc.double()),
        maxItems: fc.integer({ min: -2, max: 5 }),
        minLength: fc.integer({ min: -2, max: 3000 }),
        maxLength: fc.integer({ min: -2, max: 5 }),
        minimum: fc.oneof(fc.integer({ min: -1e6, max: 1e6 }), fc.double()),
        maximum: fc.integer({ min: -1e6, max: 1e6 }),
        pattern: fc.oneof(fc.string({ maxLength: 8 }), fc.constantFrom('^[a-z]+$', '(a|b)*', '\\d{2,3}', '[', '(?:x)', `${'('.repeat(500)}${')'.repeat(500)}`)),
        format: fc.constantFrom('date', 'time', 'date-time', 'uuid', 'email', 'bogus'),
        additionalProperties: fc.oneof(fc.boolean(), tie('node')),
        $ref: fc.constantFrom('#', '#/$defs/a', '#/$defs/b', '#/allOf/0', '#/definitions/x', 'http://example.com/s.json', 'https://example.com/s.json#/a', '#/nowhere', '#/allOf/99999999999999999999'),
        $defs: fc.dictionary(fc.constantFrom('a', 'b'), fc.oneof(tie('node'), fc.constantFrom({ $ref: '#/$defs/a' }, { $ref: '#/$defs/b' })), { maxKeys: 2 }),
      },
      { requiredKeys: [] },
    ),
  ),
})).node;

describe('fuzz: grammars and schemas', () => {
  const check = async (chat: Chat, options: Record<string, unknown>) => {
    try {
      const r = await chat.send('go', { maxNewTokens: 12, seed: 1, ...options });
      expect(['eos', 'maxTokens', 'stop', 'abort']).toContain(r.stopReason);
    } catch (err) {
      expect(err).toBeInstanceOf(FiniteMemoryError);
    }
  };

  it('random GBNF from pieces of its syntax: typed error or a reply, chat usable after', async () => {
    const chat = model.createChat({ maxTokens: 128 });
    const gbnf = fc.oneof(
      fc.array(fc.constantFrom(...GBNF_PIECES), { maxLength: 24 }).map((p) => p.join('')),
      fc.array(fc.constantFrom(...GBNF_PIECES), { maxLength: 16 }).map((p) => `root ::= ${p.join('')}`),
      fc.string({ maxLength: 40 }),
    );
    await fc.assert(fc.asyncProperty(gbnf, async (g) => check(chat, { grammar: g })), { seed: 20261207, numRuns: 400 });
    await stillUsable(chat);
    chat.dispose();
  });

  it('random JSON schemas: typed error or a reply, chat usable after', async () => {
    const chat = model.createChat({ maxTokens: 128 });
    await fc.assert(fc.asyncProperty(schema, async (s) => check(chat, { jsonSchema: s as object })), { seed: 20261207, numRuns: 300 });
    await stillUsable(chat);
    chat.dispose();
  });
});

describe('battery', () => {
  it('stop strings: empty ones are ignored, huge ones are refused, ordinary ones work', async () => {
    const chat = model.createChat({ maxTokens: 128 });
    await expectTurnRan(chat.send('hi', { stop: [''], maxNewTokens: 4 }));
    await expect(chat.send('hi', { stop: ['x'.repeat(5000)] })).rejects.toBeInstanceOf(FiniteMemoryError);
    await expect(chat.send('hi', { stop: Array(100).fill('a') })).rejects.toBeInstanceOf(FiniteMemoryError);
    await stillUsable(chat);
    chat.dispose();
  });

  it('an aborted prefill leaves importance\'s scores as they were, after the evictions it made too', async () => {
    // 8-token chunks at 5 ms a step: the abort lands inside the ~200-token prefill.
    const chat = model.createChat({ policy: 'importance', maxTokens: 256, windowSize: 16, batchSize: 8, testTokenDelayMs: 5 });
    for (let t = 0; t < 12; t++) await chat.send(`turn ${t} about lanterns and rivers`, { maxNewTokens: 6, temperature: 0 });
    const before = chat.memory();
    const r = await chat.send('word '.repeat(100), { maxNewTokens: 4, signal: AbortSignal.timeout(60) });
    expect(r.stopReason).toBe('abort');
    expect(r.stats.promptTokens).toBe(0);
    const after = chat.memory();
    expect(after.length).toBeLessThan(before.length - 100);   // its room was made: those evictions stay
    // What is left is what was there, scores included (the chunks' attention had changed them).
    const byPosition = new Map(before.map((e) => [e.position, e]));
    for (const e of after) expect(e).toEqual(byPosition.get(e.position));
    expect(after.filter((e) => !e.pinned).some((e) => e.score > 0)).toBe(true);
    await stillUsable(chat);
    chat.dispose();
  });

  it('an import aborted in its reply, after the reply made room, leaves nothing of the exchange', async () => {
    // The reply's room is made mid-turn, by evicting older history: a rollback point kept as an
    // index pointed past the exchange's first tokens by then, and kept them.
    const chat = model.createChat({ policy: 'sliding', maxTokens: 160, windowSize: 16, batchSize: 8, testTokenDelayMs: 10 });
    for (let t = 0; t < 4; t++) await chat.send(`turn ${t} about lanterns and rivers`, { maxNewTokens: 6, temperature: 0 });
    const evictedBefore = chat.stats().tokensEvicted;
    const lastTurn = Math.max(...chat.memory().map((e) => e.turn));
    // ~20 tokens of user message (3 steps), then ~100 of reply (13 steps): the abort lands in the reply.
    await expect(chat._ingest('word '.repeat(10), 'reply '.repeat(50), AbortSignal.timeout(90))).rejects.toMatchObject({ code: 'ABORTED' });
    expect(chat.stats().tokensEvicted).toBeGreaterThan(evictedBefore);   // the reply's room was made
    expect(chat.memory().filter((e) => e.turn > lastTurn)).toEqual([]);
    await stillUsable(chat);
    chat.dispose();
  });

  it('abort during prefill rolls the turn back', async () => {
    const chat = model.createChat({ maxTokens: 2048, batchSize: 8 });
    await chat.send('warm up', { maxNewTokens: 2, temperature: 0 });
    const before = chat.memory();
    const ac = new AbortController();
    const turn = chat.send('word '.repeat(900), { signal: ac.signal, maxNewTokens: 5 });
    setImmediate(() => ac.abort());
    const r = await turn;
    if (r.stats.promptTokens === 0) {
      // Aborted inside the prefill: nothing of the turn stays in memory.
      expect(r.stopReason).toBe('abort');
      expect(chat.memory()).toEqual(before);
    } else {
      expect(['abort', 'eos', 'maxTokens']).toContain(r.stopReason);
    }
    await stillUsable(chat);
    chat.dispose();
  });

  it('send after dispose, and dispose twice', async () => {
    const chat = model.createChat({ maxTokens: 64 });
    chat.dispose();
    chat.dispose();
    await expect(chat.send('x')).rejects.toMatchObject({ code: 'DISPOSED' });
    expect(() => chat.memory()).toThrow(FiniteMemoryError);
  });
});
