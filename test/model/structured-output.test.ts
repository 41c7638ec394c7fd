// Structured output: send's `jsonSchema` and `grammar` hold a reply's answer to a JSON schema or a
// GBNF grammar (llama.cpp's grammar sampler; schemas converted by llama.cpp's own converter, as
// llama-server converts a response_format), while a reasoning model's reasoning stays free; the
// server takes OpenAI's `response_format`, the remote chat sends it. Random weights write anything,
// so a reply that parses and fits its schema is the grammar's work (the same seeds without it do not
// parse); bad grammars and schemas are typed errors that leave the chat as it was.
import { join } from 'node:path';
import OpenAI from 'openai';
import { Registry } from 'prom-client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeModel } from '../../src/gguf/index.ts';
import { createPrometheusTelemetry, InvalidOptionError, jsonSchemaToGrammar, loadModel, type ChatOptions, type Model } from '../../src/index.ts';
import { connectRemote } from '../../src/remote/index.ts';
import { createServer } from '../../src/server/index.ts';
import { checkCache, fakeCompletions, testDir, testModelPath, THREADS } from '../helpers.ts';

const SCHEMA = {
  type: 'object',
  properties: { color: { enum: ['red', 'green', 'blue'] }, ok: { type: 'boolean' } },
  required: ['color', 'ok'],
  additionalProperties: false,
} as const;

/** The reply fits SCHEMA: a JSON object with exactly its two keys, each of its type. */
function expectFitsSchema(response: string) {
  const v = JSON.parse(response) as Record<string, unknown>;
  expect(Object.keys(v).sort()).toEqual(['color', 'ok']);
  expect(['red', 'green', 'blue']).toContain(v.color);
  expect(typeof v.ok).toBe('boolean');
}

const parses = (text: string) => {
  try {
    JSON.parse(text);
    return true;
  } catch {
    return false;
  }
};

let plain: Model;
let qwen3: Model;
let gptoss: Model;
beforeAll(async () => {
  plain = await loadModel(testModelPath(), { threads: THREADS });
  for (const family of ['qwen3', 'gptoss'] as const) {
    const path = join(testDir, `structured-${family}.gguf`);
    writeModel(path, { family, seed: 7 });
    const m = await loadModel(path, { threads: THREADS });
    if (family === 'qwen3') qwen3 = m;
    else gptoss = m;
  }
});
afterAll(() => {
  plain.dispose();
  qwen3.dispose();
  gptoss.dispose();
});

const BASE: ChatOptions = { maxTokens: 160, threads: THREADS, policy: 'sliding' };

describe('send({ jsonSchema })', () => {
  it('every reply parses and fits the schema, streamed as sampled; the same seeds without it do not parse', async () => {
    const chat = plain.createChat(BASE);
    const free = plain.createChat(BASE);
    let freeParsed = 0;
    for (let seed = 0; seed < 6; seed++) {
      const pieces: string[] = [];
      const r = await chat.send(`Pick a color (${seed})`, { maxNewTokens: 64, jsonSchema: SCHEMA, seed, onToken: (p) => pieces.push(p) });
      expectFitsSchema(r.response);
      // The grammar ended the reply (it allows nothing but the end once the object is closed).
      expect(r.stopReason).toBe('eos');
      // Random weights miss it at most tokens: passes over the vocabulary, counted and timed.
      expect(r.stats.grammarPasses).toBeGreaterThan(0);
      expect(r.stats.grammarPasses).toBeLessThanOrEqual(r.stats.generatedTokens + 1);
      expect(r.stats.grammarMs).toBeGreaterThan(0);
      expect(pieces.join('')).toBe(r.response);
      checkCache(chat, BASE.maxTokens!);
      const f = await free.send(`Pick a color (${seed})`, { maxNewTokens: 64, seed });
      if (parses(f.response)) freeParsed++;
      expect([f.stats.grammarPasses, f.stats.grammarMs]).toEqual([0, 0]);
    }
    // Six turns of ~30 tokens in 160: the chat evicted on the way and still holds to the schema.
    expect(chat.stats().evictions).toBeGreaterThan(0);
    expect(freeParsed).toBe(0);
    // The schema holds one turn only: the next is free again.
    const next = await chat.send('Say anything', { maxNewTokens: 12, seed: 1 });
    expect(parses(next.response)).toBe(false);
    chat.dispose();
    free.dispose();
  });

  it("counts the grammar's passes in Prometheus", async () => {
    const registry = new Registry();
    const chat = plain.createChat({ ...BASE, telemetry: createPrometheusTelemetry({ registry }) });
    let passes = 0;
    for (let seed = 0; seed < 3; seed++) passes += (await chat.send('Pick', { maxNewTokens: 64, jsonSchema: SCHEMA, seed })).stats.grammarPasses;
    await new Promise((r) => setImmediate(r));
    expect(passes).toBeGreaterThan(0);
    expect(await registry.metrics()).toContain(`finite_memory_grammar_passes_total{policy="sliding"} ${passes}`);
    chat.dispose();
  });

  it('takes the schema as JSON text too, and `{ type: "object" }` for any JSON object', async () => {
    const chat = plain.createChat(BASE);
    const r = await chat.send('Pick', { maxNewTokens: 64, jsonSchema: JSON.stringify(SCHEMA), seed: 3 });
    expectFitsSchema(r.response);
    // Any object: random weights fill strings for ever, so only its start is certain.
    const any = await chat.send('Anything', { maxNewTokens: 24, jsonSchema: { type: 'object' }, seed: 4 });
    expect(any.response.trimStart().startsWith('{')).toBe(true);
    chat.dispose();
  });

  it("ends the reply when the grammar is complete, even with ignoreEos (end-of-generation tokens banned)", async () => {
    const chat = plain.createChat(BASE);
    for (let seed = 0; seed < 4; seed++) {
      const r = await chat.send('Yes or no?', { maxNewTokens: 48, grammar: 'root ::= ("yes" | "no") "."', seed, ignoreEos: true });
      expect(['yes.', 'no.']).toContain(r.response);
      expect(r.stopReason).toBe('eos');
      expect(r.stats.generatedTokens).toBeLessThan(48);
    }
    chat.dispose();
  });
});

describe('a reasoning model under a schema', () => {
  it('thinks freely; the answer after its think block fits the schema (qwen3)', async () => {
    const chat = qwen3.createChat({ ...BASE, testReply: '<think>\nLet me see.\n</think>\n\n', testReplyThenSample: true });
    for (let seed = 0; seed < 3; seed++) {
      const r = await chat.send('Pick a color', { maxNewTokens: 64, jsonSchema: SCHEMA, seed });
      expect(r.reasoning).toBe('Let me see.');
      expectFitsSchema(r.response);
    }
    checkCache(chat, BASE.maxTokens!);
    chat.dispose();
  });

  it("its analysis channel stays free; the final channel's text fits the schema (gpt-oss)", async () => {
    const chat = gptoss.createChat({
      ...BASE,
      testReply: '<|channel|>analysis<|message|>Let me see.<|end|><|start|>assistant<|channel|>final<|message|>',
      testReplyThenSample: true,
    });
    for (let seed = 0; seed < 3; seed++) {
      const r = await chat.send('Pick a color', { maxNewTokens: 96, jsonSchema: SCHEMA, seed });
      expect(r.reasoning).toBe('Let me see.');
      expectFitsSchema(r.response);
    }
    chat.dispose();
  });

  it('with thinking false the answer starts under the schema at once', async () => {
    for (const m of [qwen3, gptoss]) {
      const chat = m.createChat(BASE);
      const r = await chat.send('Pick a color', { maxNewTokens: 96, jsonSchema: SCHEMA, seed: 5, thinking: false });
      expect(r.reasoning).toBe('');
      expectFitsSchema(r.response);
      chat.dispose();
    }
  });
});

describe('what the answer holds is its text', () => {
  // A grammar reads a control token or a think marker as its text ("<|end|>", "<think>"), but the
  // answer has none of it (and a marker would turn the reply's part): once the answer is held, such
  // tokens are refused, so the answer is exactly what the grammar took. Random weights pick them
  // readily where the grammar allows any character.
  // The characters of the markers' text and of words: a good share of what the grammar allows is then
  // control tokens and markers (before they were refused, 3-4 of 8 sampled replies here lost text).
  const FORTY = 'root ::= [<|>/a-z_]{40} "."';
  const fortyAndDot = (text: string) => [...text].length === 41 && text.endsWith('.') && !text.slice(0, -1).includes('.');
  it('gpt-oss in its final channel, qwen3 with thinking false, greedy and sampled', async () => {
    const harmony = gptoss.createChat({ ...BASE, testReply: '<|channel|>final<|message|>', testReplyThenSample: true });
    const think = qwen3.createChat(BASE);
    for (let seed = 0; seed < 8; seed++) {
      for (const [chat, extra] of [[harmony, {}], [think, { thinking: false }]] as const) {
        for (const temperature of seed === 0 ? [0, 1.5] : [1.5]) {
          const r = await chat.send(`Forty characters (${seed})`, { maxNewTokens: 80, grammar: FORTY, seed, temperature, ...extra });
          expect(fortyAndDot(r.response), JSON.stringify(r.response)).toBe(true);
          expect(r.reasoning).toBe('');
          expect(r.stopReason).toBe('eos');
        }
      }
    }
    harmony.dispose();
    think.dispose();
  });

  it('greedy decoding under a schema is deterministic and fits it', async () => {
    const replies = [];
    for (let i = 0; i < 2; i++) {
      const chat = plain.createChat(BASE);
      const r = await chat.send('Pick a color', { maxNewTokens: 64, jsonSchema: SCHEMA, temperature: 0 });
      expectFitsSchema(r.response);
      replies.push(r.response);
      // Complete with end of generation banned: the reply ends all the same.
      const e = await chat.send('Again', { maxNewTokens: 64, jsonSchema: SCHEMA, temperature: 0, ignoreEos: true });
      expectFitsSchema(e.response);
      expect(e.stopReason).toBe('eos');
      chat.dispose();
    }
    expect(replies[0]).toBe(replies[1]);
  });
});

describe("the grammar's shortcuts", () => {
  // Where the sampler's choice does not fit, the pass over the vocabulary is cut short: greedy
  // decoding checks its best 64 candidates first, top-k sampling its best 256 (when they hold k that
  // fit, those are the k it samples from), and a pass skips the tokens whose first byte the grammar
  // refuses (not for a grammar that names a token). Each must choose what the whole pass chooses
  // (the test hook testFullGrammarPass): the same replies, token for token.
  it('choose what the whole pass chooses: greedy, top-k, plain temperature, and a grammar naming a token', async () => {
    // The first-byte shortcut starts at 1,024 candidates: a vocabulary of ~2,900 tokens.
    const wide = await loadModel(testModelPath({ vocabExtra: 2000 }), { threads: THREADS });
    expect(wide.info.nVocab).toBeGreaterThan(2048);
    const grammars = [
      jsonSchemaToGrammar(SCHEMA),
      jsonSchemaToGrammar({ enum: Array.from({ length: 40 }, (_, i) => `value ${i * 7}`) }),
      'root ::= [0-9]{8} ("x" | [a-f]+) "."',
      'root ::= [^e]{30} "."',
      'root ::= [^e]{30} "." | <[3]>',
    ];
    const samplings = [{ temperature: 0 }, { temperature: 1 }, { temperature: 1.5, topK: 5 }, { temperature: 1, topK: 0 }, { temperature: 0.8, repeatPenalty: 1.3 }];
    let compared = 0;
    for (const grammar of grammars) {
      for (const [i, sampling] of samplings.entries()) {
        const replies: string[] = [];
        for (const full of [false, true]) {
          const chat = wide.createChat(BASE);
          // The passes in the step one way, on a thread of their own the other.
          const on = full ? ('step' as const) : ('thread' as const);
          replies.push((await chat.send('Go', { maxNewTokens: 40, grammar, seed: 10 + i, ...sampling, testFullGrammarPass: full, testGrammarPassOn: on })).response);
          chat.dispose();
        }
        expect(replies[0], `${grammar.slice(0, 40)} ${JSON.stringify(sampling)}`).toBe(replies[1]);
        compared++;
      }
    }
    expect(compared).toBe(25);
    wide.dispose();
  });

  it('choose what the whole pass chooses with multi-byte tokens and a negated class (a lone lead byte is no answer for them)', async () => {
    // Pieces of two-byte characters that start with 0xC3, as é does: a lone 0xC3 is checked as a
    // partial character, which [^...é] refuses, though it allows ê, à, ü.
    const path = join(testDir, 'structured-multibyte.gguf');
    writeModel(path, { family: 'llama', vocabExtra: 1500, seed: 3 }, { vocabPieces: ['ê', 'à', 'ü', 'ñ', 'Ã', 'é', 'ça', 'üe'] });
    const m = await loadModel(path, { threads: THREADS });
    expect(m.info.nVocab).toBeGreaterThan(2048);
    const grammar = 'root ::= [^\\x00-\\x7Fé]{12} "."';
    let nonAscii = 0;
    for (const [seed, temperature] of [[1, 1], [2, 1.5], [3, 0], [4, 2]] as const) {
      const replies: string[] = [];
      for (const full of [false, true]) {
        const chat = m.createChat(BASE);
        replies.push((await chat.send('Go', { maxNewTokens: 40, grammar, seed, temperature, testFullGrammarPass: full })).response);
        chat.dispose();
      }
      expect(replies[0], `seed ${seed}`).toBe(replies[1]);
      expect(replies[0]).not.toContain('é');
      nonAscii += (replies[0]!.match(/[êàüñÃ]/g) ?? []).length;
    }
    // The multi-byte pieces were chosen (what a wrong narrowing would have refused).
    expect(nonAscii).toBeGreaterThan(0);
    m.dispose();
  });
});

describe("a grammar's pass runs off the scheduler thread", () => {
  // A pass over the vocabulary (when the sampler's choice does not fit) runs on a thread of its own
  // while the steps go on without its chat: a slow one holds back its own chat, not the others. The
  // test hook testGrammarPassDelayMs makes every pass 400 ms longer; a digits-only grammar on random
  // weights needs one at nearly every token.
  const SLOW = { grammar: 'root ::= [0-9]{3,}', testGrammarPassDelayMs: 400, testGrammarPassOn: 'thread' as const, maxNewTokens: 3, seed: 1 };

  it("another chat's turn goes on meanwhile, and finishes first", async () => {
    const m = await loadModel(testModelPath(), { threads: THREADS, slots: 2 });
    const slow = m.createChat(BASE);
    const free = m.createChat(BASE);
    const order: string[] = [];
    const a = slow.send('Digits', SLOW).then((r) => { order.push('slow'); return r; });
    const b = free.send('Words', { maxNewTokens: 24, seed: 2, ignoreEos: true }).then((r) => { order.push('free'); return r; });
    const [ra, rb] = await Promise.all([a, b]);
    expect(order).toEqual(['free', 'slow']);
    expect(ra.response).toMatch(/^[0-9]{3}$/);
    expect(rb.stats.generatedTokens).toBe(24);
    checkCache(slow, BASE.maxTokens!);
    checkCache(free, BASE.maxTokens!);
    slow.dispose();
    free.dispose();
    m.dispose();
  });

  it('an abort while a pass runs ends the turn; the chat goes on; disposing the model meanwhile settles the turn', async () => {
    const m = await loadModel(testModelPath(), { threads: THREADS });
    const chat = m.createChat(BASE);
    const ac = new AbortController();
    // A pass of 20 s more: the abort stops it where it is (the test's timeout is shorter than it).
    const turn = chat.send('Digits', { ...SLOW, testGrammarPassDelayMs: 20000, maxNewTokens: 40, signal: ac.signal });
    await new Promise((r) => setTimeout(r, 150));
    ac.abort();
    const r = await turn;
    expect(r.stopReason).toBe('abort');
    expect(r.response).toMatch(/^[0-9]*$/);
    checkCache(chat, BASE.maxTokens!);
    const next = await chat.send('Again', { maxNewTokens: 3, seed: 3, grammar: 'root ::= [0-9]{3,}' });
    expect(next.response).toMatch(/^[0-9]{3}$/);
    // The model goes while a pass runs: the turn settles (aborted or failed with a typed error).
    const pending = chat.send('Once more', { ...SLOW, testGrammarPassDelayMs: 20000, maxNewTokens: 40 }).then((x) => x.stopReason, (e: unknown) => (e as Error).constructor.name);
    await new Promise((r) => setTimeout(r, 150));
    m.dispose();
    expect(['abort', 'DisposedError', 'AbortedError']).toContain(await pending);
  });
});

describe('bad grammars and schemas', () => {
  const cases: [string, Record<string, unknown>, RegExp][] = [
    ['an undefined rule', { grammar: 'root ::= answer' }, /grammar is not valid GBNF/],
    ['no root rule', { grammar: 'start ::= "a"' }, /grammar is not valid GBNF/],
    ['groups nested too deep', { grammar: `root ::= ${'('.repeat(200)}"a"${')'.repeat(200)}` }, /nests groups more than 128/],
    ['a grammar too large', { grammar: `root ::= "${'a'.repeat(140000)}"` }, /at most 131072 bytes/],
    ['schema text that is not JSON', { jsonSchema: '{"type": ' }, /jsonSchema could not be converted/],
    ['a schema the converter does not know', { jsonSchema: { type: 'nonsense' } }, /Unrecognized schema/],
    ['a schema nested too deep', { jsonSchema: JSON.parse(`${'{"items":'.repeat(80)}{}${'}'.repeat(80)}`) as object }, /nests objects and arrays more than 64/],
    ['a schema too large', { jsonSchema: { enum: Array.from({ length: 8000 }, (_, i) => `value-${i}`) } }, /at most 65536/],
    ['a schema that is not an object', { jsonSchema: '[1, 2]' }, /must be a JSON schema/],
    ['both at once', { grammar: 'root ::= "a"', jsonSchema: SCHEMA }, /both given/],
    ['a cyclic object', { jsonSchema: (() => { const o: Record<string, unknown> = {}; o.self = o; return o; })() }, /JSON-serializable/],
    ['a grammar that is not a string', { grammar: 42 }, /Expected a string for grammar/],
    ['empty schema text', { jsonSchema: '' }, /Expected a JSON schema/],
    // What llama.cpp's converter has no guard against (it would overflow the stack or spin for minutes).
    ['an allOf $ref to itself', { jsonSchema: { allOf: [{ $ref: '#/allOf/0' }] } }, /cycle of \$refs/],
    ['a cycle of $refs through $defs', { jsonSchema: { $defs: { a: { $ref: '#/$defs/b' }, b: { $ref: '#/$defs/a' } }, allOf: [{ $ref: '#/$defs/a' }] } }, /cycle of \$refs/],
    ['a key of 16,000 bytes', { jsonSchema: { type: 'object', properties: { ['a'.repeat(16000)]: {} }, additionalProperties: true } }, /key of 16000 bytes/],
    ['2,000 optional properties', { jsonSchema: { type: 'object', properties: Object.fromEntries(Array.from({ length: 2000 }, (_, i) => [`p${i}`, {}])) } }, /2000 optional properties/],
    ['3 objects of 60 optional properties', { jsonSchema: { type: 'object', properties: Object.fromEntries(Array.from({ length: 3 }, (_, j) => [`o${j}`, { type: 'object', properties: Object.fromEntries(Array.from({ length: 60 }, (_, i) => [`p${i}`, {}])) }])) } }, /more than 128 optional properties in all/],
    ['a $ref cycle through an index the converter reads as 0', { jsonSchema: { $defs: { l: [{ $ref: '#/$defs/l/0x' }] }, allOf: [{ $ref: '#/$defs/l/0x' }] } }, /cycle of \$refs/],
    ['1,000 properties given as an array', { jsonSchema: { type: 'object', properties: Array.from({ length: 1000 }, () => ({})) } }, /1000 optional properties/],
    ['an allOf gathering one $ref 100 times', { jsonSchema: { $defs: { a: { properties: Object.fromEntries(Array.from({ length: 10 }, (_, i) => [`p${i}`, {}])) } }, allOf: [{ anyOf: Array.from({ length: 100 }, () => ({ $ref: '#/$defs/a' })) }] } }, /1000 optional properties/],
    ['400 types for one value', { jsonSchema: { type: Array.from({ length: 400 }, () => 'object') } }, /lists 400 types/],
    ['a pattern of 2,000 bytes', { jsonSchema: { type: 'string', pattern: '('.repeat(1000) + ')'.repeat(1000) } }, /pattern over 1024 bytes/],
  ];
  for (const [what, options, message] of cases) {
    it(`${what}: InvalidOptionError, and the chat goes on as it was`, async () => {
      const chat = plain.createChat(BASE);
      await chat.send('Hello', { maxNewTokens: 4, seed: 1 });
      const before = { stats: chat.stats(), memory: chat.memory() };
      const err = await chat.send('Pick', { maxNewTokens: 8, ...options }).then(() => undefined, (e: unknown) => e);
      expect(err).toBeInstanceOf(InvalidOptionError);
      expect((err as Error).message).toMatch(message);
      expect(chat.stats()).toEqual(before.stats);
      expect(chat.memory()).toEqual(before.memory);
      await chat.send('Again', { maxNewTokens: 4, seed: 2 });
      expect(chat.stats().turns).toBe(before.stats.turns + 1);
      chat.dispose();
    });
  }

  it('jsonSchemaToGrammar shows the grammar a schema becomes, and refuses what send refuses', () => {
    const g = jsonSchemaToGrammar(SCHEMA);
    expect(g).toMatch(/^root ::= /m);
    expect(g).toContain('\\"red\\"');
    expect(jsonSchemaToGrammar(JSON.stringify(SCHEMA))).toBe(g);
    expect(() => jsonSchemaToGrammar({ type: 'nonsense' })).toThrow(InvalidOptionError);
    // A recursive schema through properties is fine (the converter guards that recursion itself).
    const tree = { $defs: { node: { type: 'object', properties: { name: { type: 'string' }, children: { type: 'array', items: { $ref: '#/$defs/node' } } }, required: ['name'] } }, $ref: '#/$defs/node' };
    expect(jsonSchemaToGrammar(tree)).toMatch(/root ::= /);
    // 64 optional properties are taken, and required ones by the hundred.
    const props = (n: number) => Object.fromEntries(Array.from({ length: n }, (_, i) => [`p${i}`, { type: 'integer' }]));
    expect(jsonSchemaToGrammar({ type: 'object', properties: props(64) })).toMatch(/root ::= /);
    expect(jsonSchemaToGrammar({ type: 'object', properties: props(500), required: Object.keys(props(500)) })).toMatch(/root ::= /);
  });
});

const post = (url: string, body: unknown, headers: Record<string, string> = {}) =>
  fetch(`${url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) });

describe('the server and the remote chat', () => {
  it("the server takes response_format (json_schema, json_object, text); a bad one is a 400 before any work", async () => {
    const server = await createServer(plain, { chat: BASE });
    try {
      const url = await server.listen({ port: 0, host: '127.0.0.1' });
      const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: 'unused', maxRetries: 0 });
      const messages = [{ role: 'user' as const, content: 'Pick a color' }];
      const schemaFormat = { type: 'json_schema' as const, json_schema: { name: 'pick', schema: SCHEMA, strict: true } };
      const r = await client.chat.completions.create({ model: server.modelId, messages, max_tokens: 64, seed: 1, response_format: schemaFormat });
      expectFitsSchema(r.choices[0]!.message.content!);
      expect(r.choices[0]!.finish_reason).toBe('stop');

      const stream = await client.chat.completions.create({ model: server.modelId, messages, max_tokens: 64, seed: 2, response_format: schemaFormat, stream: true });
      let content = '';
      for await (const chunk of stream) content += chunk.choices[0]?.delta?.content ?? '';
      expectFitsSchema(content);

      const object = await client.chat.completions.create({ model: server.modelId, messages, max_tokens: 24, seed: 3, response_format: { type: 'json_object' } });
      expect(object.choices[0]!.message.content!.trimStart().startsWith('{')).toBe(true);
      const text = await client.chat.completions.create({ model: server.modelId, messages, max_tokens: 8, seed: 3, response_format: { type: 'text' } });
      expect(parses(text.choices[0]!.message.content!)).toBe(false);

      // A session's bad request changes nothing: its next turn is still its first.
      const session = { 'x-session-id': 'structured' };
      for (const [format, param] of [
        [{ type: 'xml' }, 'response_format.type'],
        [{ type: 'json_schema', json_schema: { name: 'x', schema: { type: 'nonsense' } } }, 'response_format'],
        [{ type: 'json_schema' }, 'response_format.json_schema'],
        ['json', 'response_format'],
        [{ type: 'json_schema', json_schema: { name: 'x', schema: true } }, 'response_format.json_schema.schema'],
        // llama.cpp's converter would crash the process on this one: refused first.
        [{ type: 'json_schema', json_schema: { name: 'x', schema: { allOf: [{ $ref: '#/allOf/0' }] } } }, 'response_format'],
      ] as const) {
        const bad = await post(url, { messages, max_tokens: 8, response_format: format }, session);
        expect(bad.status).toBe(400);
        expect(((await bad.json()) as { error: { param: string } }).error.param).toBe(param);
      }
      const first = (await (await post(url, { messages, max_tokens: 4 }, session)).json()) as { finite_memory: { turn: { turn: number } } };
      expect(first.finite_memory.turn.turn).toBe(1);

      const remote = connectRemote({ baseURL: `${url}/v1`, model: server.modelId }).createChat();
      const viaRemote = await remote.send('Pick a color', { maxNewTokens: 64, jsonSchema: SCHEMA, seed: 4 });
      expectFitsSchema(viaRemote.response);
      remote.dispose();
    } finally {
      await server.close();
    }
  });

  it('a remote chat sends the schema as response_format json_schema (strict), and checks schema text first', async () => {
    const { baseURL, bodies, close } = await fakeCompletions({ content: '{"color":"red","ok":true}' });
    try {
      const chat = connectRemote({ baseURL, model: 'm' }).createChat();
      await chat.send('Pick', { jsonSchema: SCHEMA });
      expect(bodies[0]!.response_format).toEqual({ type: 'json_schema', json_schema: { name: 'response', schema: SCHEMA, strict: true } });
      await chat.send('Again');
      expect(bodies[1]!.response_format).toBeUndefined();
      await expect(chat.send('Bad', { jsonSchema: '{"type": ' })).rejects.toThrow(InvalidOptionError);
      expect(bodies).toHaveLength(2);
      chat.dispose();
    } finally {
      await close();
    }
  });
});
