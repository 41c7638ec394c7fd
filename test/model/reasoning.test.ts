// Reasoning models: a reply's reasoning (a think block, gpt-oss's analysis channel) comes apart from
// its answer (TurnResult.reasoning, onReasoning, the server's reasoning_content), the ledger keeps it
// under its own role, and pastReasoning decides what memory does with it at later turns ('drop': gone
// when the next turn starts, as the chat templates render past replies; 'first': the first to go;
// 'keep': the policy's). The replies are fixed by the testReply hook (random weights think nothing),
// so every token's part is known; the cache is checked against llama.cpp's view after each step.
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeModel, type ModelFamily } from '../../src/gguf/index.ts';
import { loadModel, type Chat, type ChatOptions, type EvictionEvent, type MemoryEntry, type Model } from '../../src/index.ts';
import { connectRemote } from '../../src/remote/index.ts';
import { createServer } from '../../src/server/index.ts';
import { checkCache, fakeCompletions, testDir, testModelPath, THREADS } from '../helpers.ts';

const THINK = '<think>\nI should greet them warmly.\n</think>\n\nHello there.';
const HARMONY = '<|channel|>analysis<|message|>I should greet them warmly.<|end|><|start|>assistant<|channel|>final<|message|>Hello there.';

const models = new Map<string, Model>();
async function load(family: ModelFamily): Promise<Model> {
  const path = join(testDir, `reasoning-${family}.gguf`);
  writeModel(path, { family, seed: 7 });
  const m = await loadModel(path, { threads: THREADS });
  models.set(family, m);
  return m;
}
let qwen3: Model;
let gptoss: Model;
beforeAll(async () => {
  qwen3 = await load('qwen3');
  gptoss = await load('gptoss');
  await load('glm4moe');
  await load('deepseek3');
});
afterAll(() => {
  for (const m of models.values()) m.dispose();
});

const BASE: ChatOptions = { maxTokens: 256, threads: THREADS, systemPrompt: 'be brief', policy: 'sliding' };
const ofTurn = (chat: Chat, turn: number, role?: MemoryEntry['role']) => chat.memory().filter((e) => e.turn === turn && (role === undefined || e.role === role));
const text = (entries: MemoryEntry[]) => entries.map((e) => e.text).join('');

describe('ModelInfo.reasoning', () => {
  it('is told from the vocabulary', async () => {
    expect(qwen3.info.reasoning).toBe('think');
    expect(gptoss.info.reasoning).toBe('harmony');
    const plain = await loadModel(testModelPath(), { threads: THREADS });
    expect(plain.info.reasoning).toBe('none');
    plain.dispose();
  });
});

describe('a reply with reasoning', () => {
  for (const [family, reply] of [['qwen3', THINK], ['glm4moe', THINK], ['deepseek3', THINK], ['gptoss', HARMONY]] as const) {
    it(`comes apart from the answer, streamed and in the result (${family})`, async () => {
      const chat = models.get(family)!.createChat({ ...BASE, testReply: reply });
      const answer: string[] = [];
      const thought: string[] = [];
      const r = await chat.send('hi', { onToken: (p) => answer.push(p), onReasoning: (p) => thought.push(p) });
      expect(r.response).toBe('Hello there.');
      expect(r.reasoning).toBe('I should greet them warmly.');
      expect(answer.join('')).toBe(r.response);
      expect(thought.join('').trimEnd()).toBe(r.reasoning);
      // The ledger: the markers and framing around the reasoning are reasoning too; what stays is
      // what the model's template renders for a past reply.
      const reasoning = text(ofTurn(chat, 1, 'reasoning'));
      expect(reasoning).toBe(family !== 'gptoss' ? '<think>\nI should greet them warmly.\n</think>\n\n'
        : '<|channel|>analysis<|message|>I should greet them warmly.<|end|><|start|>assistant');
      expect(text(ofTurn(chat, 1, 'assistant'))).toBe(family !== 'gptoss' ? 'Hello there.' : '<|channel|>final<|message|>Hello there.');
      // Transcripts keep the answer only (templates drop past reasoning).
      expect(chat.exportTranscript().messages).toEqual([{ role: 'user', content: 'hi' }, { role: 'assistant', content: 'Hello there.' }]);
      checkCache(chat, BASE.maxTokens!);
      chat.dispose();
    });

    it(`pastReasoning 'drop' evicts it in place when the next turn starts (${family})`, async () => {
      const evictions: EvictionEvent[] = [];
      const chat = models.get(family)!.createChat({ ...BASE, testReply: reply, telemetry: { onEviction: (ev) => void evictions.push(ev) } });
      await chat.send('hi');
      const before = ofTurn(chat, 1);
      const thoughts = before.filter((e) => e.role === 'reasoning');
      const r2 = await chat.send('and again');
      // Exactly the reasoning left, and only at the start: nothing else of turn 1 moved or went.
      expect(r2.stats.evictedTokens).toBe(thoughts.length);
      await new Promise((r) => setImmediate(r));   // telemetry hooks run after the turn resolves
      expect(evictions.map((ev) => [ev.turn, ev.phase, ev.pastReasoning, ev.evictedTokens])).toEqual([[2, 'prefill', true, thoughts.length]]);
      expect(r2.stats.promptTokens).toBeGreaterThan(0);
      const after = ofTurn(chat, 1);
      expect(after.map((e) => [e.token, e.position])).toEqual(before.filter((e) => e.role !== 'reasoning').map((e) => [e.token, e.position])
        .concat(after.slice(before.length - thoughts.length).map((e) => [e.token, e.position])));
      expect(after.some((e) => e.role === 'reasoning')).toBe(false);
      // Turn 2's own reasoning stays until turn 3.
      expect(ofTurn(chat, 2, 'reasoning').length).toBe(thoughts.length);
      checkCache(chat, BASE.maxTokens!);
      await chat.send('third');
      expect(ofTurn(chat, 2, 'reasoning')).toEqual([]);
      checkCache(chat, BASE.maxTokens!);
      chat.dispose();
    });
  }

  it("pastReasoning 'keep' leaves it in memory", async () => {
    const chat = qwen3.createChat({ ...BASE, testReply: THINK, pastReasoning: 'keep' });
    await chat.send('hi');
    const thoughts = ofTurn(chat, 1, 'reasoning');
    const r2 = await chat.send('and again');
    expect(r2.stats.evictedTokens).toBe(0);
    expect(ofTurn(chat, 1, 'reasoning')).toEqual(thoughts);
    checkCache(chat, BASE.maxTokens!);
    chat.dispose();
  });

  it("pastReasoning 'first' keeps it while there is room, then evicts it before what sliding would", async () => {
    // A budget the third turn overflows: sliding alone takes the oldest tokens (turn 1's message);
    // with 'first' the earlier replies' reasoning goes instead, and turn 1's message stays.
    const long = `<think>\n${'I think about the weather and the sea. '.repeat(4)}\n</think>\n\nYes.`;
    const opts = { ...BASE, maxTokens: 192, testReply: long };
    const run = async (pastReasoning: 'first' | 'keep') => {
      const chat = qwen3.createChat({ ...opts, pastReasoning });
      await chat.send('my name is Ada');
      const turn1 = ofTurn(chat, 1, 'user');
      const r2 = await chat.send('tell me more');
      expect(r2.stats.evictedTokens).toBe(0);   // room enough: nothing leaves yet
      const r3 = await chat.send('and more again please');
      expect(r3.stats.evictedTokens).toBeGreaterThan(0);
      checkCache(chat, opts.maxTokens);
      const kept = { user1: ofTurn(chat, 1, 'user').length === turn1.length, reasoning: chat.memory().filter((e) => e.role === 'reasoning' && e.turn < 3).length };
      chat.dispose();
      return kept;
    };
    const first = await run('first');
    const keep = await run('keep');
    expect(first.user1).toBe(true);
    expect(keep.user1).toBe(false);
    expect(first.reasoning).toBeLessThan(keep.reasoning);
  });

  it('a think block closed without being opened was reasoning all along', async () => {
    const chat = qwen3.createChat({ ...BASE, testReply: 'an unopened thought</think>\n\nFine.' });
    const r = await chat.send('hi');
    expect(r.reasoning).toBe('an unopened thought');
    expect(r.response).toBe('Fine.');
    expect(text(ofTurn(chat, 1, 'reasoning'))).toBe('an unopened thought</think>\n\n');
    expect(text(ofTurn(chat, 1, 'assistant'))).toBe('Fine.');
    chat.dispose();
  });

  it('an unopened block: what the answer stream held back (a possible stop string) goes out as reasoning', async () => {
    const chat = qwen3.createChat({ ...BASE, testReply: 'an unopened thought</think>\n\nFine.' });
    const answer: string[] = [];
    const thought: string[] = [];
    const r = await chat.send('hi', { stop: ['thought!'], onToken: (p) => answer.push(p), onReasoning: (p) => thought.push(p) });
    expect([r.reasoning, r.response]).toEqual(['an unopened thought', 'Fine.']);
    // "thought" could have begun the stop string: held back, then sent as the reasoning it was.
    expect(thought.join('')).toBe('thought');
    expect(answer.join('')).toBe('an unopened Fine.');
    chat.dispose();
  });

  it("a harmony tool call (commentary channel) is answer, not reasoning, whatever its recipient's name", async () => {
    const chat = gptoss.createChat({ ...BASE, testReply: '<|channel|>commentary to=functions.run_analysis<|message|>{"a":1}' });
    const r = await chat.send('hi');
    expect([r.reasoning, r.response]).toEqual(['', '{"a":1}']);
    expect(ofTurn(chat, 1, 'reasoning')).toEqual([]);
    chat.dispose();
  });

  it('a generation prompt that opens the think block (Bailing-think): the opener is reasoning, the reply starts in it', async () => {
    // llama.cpp's Bailing-think formatter is the one that ends its generation prompt with <think>.
    const template = '{% for message in messages %}<role>{{ "HUMAN" if message["role"] == "user" else message["role"] | upper }}</role>{{ message["content"] }}{% endfor %}{% if add_generation_prompt %}<role>ASSISTANT</role><think>{% endif %}';
    const path = join(testDir, 'reasoning-bailing.gguf');
    writeModel(path, { family: 'qwen3', seed: 7, chatTemplate: template });
    const model = await loadModel(path, { threads: THREADS });
    try {
      expect(model.info.framing).toBe('template');
      const chat = model.createChat({ ...BASE, systemPrompt: '', testReply: 'I plan a greeting.\n</think>\n\nHello there.' });
      const answer: string[] = [];
      const r = await chat.send('hi', { onToken: (p) => answer.push(p) });
      expect([r.reasoning, r.response, answer.join('')]).toEqual(['I plan a greeting.', 'Hello there.', 'Hello there.']);
      expect(text(ofTurn(chat, 1, 'reasoning'))).toBe('<think>I plan a greeting.\n</think>\n\n');
      expect(text(ofTurn(chat, 1, 'user'))).not.toContain('<think>');
      await chat.send('again');
      expect(ofTurn(chat, 1, 'reasoning')).toEqual([]);
      checkCache(chat, BASE.maxTokens!);
      chat.dispose();
      // thinking false closes the block the prompt opened (never a second <think>).
      const quiet = model.createChat({ ...BASE, systemPrompt: '', testReply: 'Hello there.' });
      const q = await quiet.send('hi', { thinking: false });
      expect([q.reasoning, q.response]).toEqual(['', 'Hello there.']);
      expect(text(ofTurn(quiet, 1, 'reasoning'))).toBe('<think>\n\n</think>\n\n');
      quiet.dispose();
    } finally {
      model.dispose();
    }
  });

  it('a reply cut mid-thought: its carried last token is reasoning, dropped with the rest', async () => {
    for (const pastReasoning of ['drop', 'keep'] as const) {
      const chat = qwen3.createChat({ ...BASE, testReply: THINK, pastReasoning });
      const r = await chat.send('hi', { maxNewTokens: 4 });
      expect(r.stopReason).toBe('maxTokens');
      expect(r.response).toBe('');
      const thought = ofTurn(chat, 1, 'reasoning').length;
      await chat.send('go on', { maxNewTokens: 2 });
      const left = ofTurn(chat, 1, 'reasoning').length;
      // 'keep': the carried token joins turn 1's reasoning; 'drop': none of it, carried token included.
      expect(left).toBe(pastReasoning === 'keep' ? thought + 1 : 0);
      expect(ofTurn(chat, 1, 'assistant').map((e) => e.text).join('')).toBe('<|im_end|>\n');
      checkCache(chat, BASE.maxTokens!);
      chat.dispose();
    }
  });

  it('checkpoints keep the roles and a carried reasoning token', async () => {
    const chat = qwen3.createChat({ ...BASE, testReply: THINK, pastReasoning: 'keep' });
    await chat.send('hi');
    await chat.send('more', { maxNewTokens: 4 });   // cut mid-thought: the carry starts with reasoning
    for (const kind of ['full', 'ledger'] as const) {
      const restored = await qwen3.loadChat(await chat.checkpoint({ kind }));
      expect(restored.options.pastReasoning).toBe('keep');
      expect(restored.memory().map((e) => [e.token, e.position, e.role])).toEqual(chat.memory().map((e) => [e.token, e.position, e.role]));
      await restored.send('next', { maxNewTokens: 2 });
      expect(ofTurn(restored, 2, 'reasoning').length).toBe(ofTurn(chat, 2, 'reasoning').length + 1);
      checkCache(restored, BASE.maxTokens!);
      restored.dispose();
    }
    chat.dispose();
  });
});

describe('other think-block markers', () => {
  it("Magistral's [THINK] ... [/THINK] (on a vocabulary that adds no space prefix, as its tekken one) and Gemma 4's thought channel (its name line framing too)", async () => {
    const cases = [
      { name: 'magistral', input: { family: 'qwen2', template: 'magistral' }, reply: '[THINK]plan a greeting[/THINK]Hello there.', skipped: '[THINK][/THINK]' },
      { name: 'gemma4', input: { family: 'gemma4' }, reply: '<|channel>thought\nplan a greeting<channel|>Hello there.', skipped: '<|channel>thought\n<channel|>' },
    ] as const;
    for (const c of cases) {
      const path = join(testDir, `reasoning-${c.name}.gguf`);
      writeModel(path, { ...c.input, seed: 7 });
      const model = await loadModel(path, { threads: THREADS });
      try {
        expect(model.info.reasoning).toBe('think');
        const chat = model.createChat({ ...BASE, testReply: c.reply });
        const r = await chat.send('hi');
        expect([r.reasoning, r.response]).toEqual(['plan a greeting', 'Hello there.']);
        await chat.send('again', { thinking: false });
        expect(ofTurn(chat, 1, 'reasoning')).toEqual([]);   // dropped at turn 2
        // thinking false: the empty block its template writes, then the whole reply again as told.
        expect(text(ofTurn(chat, 2, 'reasoning')).startsWith(c.skipped)).toBe(true);
        checkCache(chat, BASE.maxTokens!);
        chat.dispose();
        if (c.name === 'gemma4') {
          // Gemma 4 may end an answer with an unmatched <channel|>: framing, not the close of reasoning.
          const stray = model.createChat({ ...BASE, testReply: 'Hello there.<channel|>' });
          const s = await stray.send('hi');
          expect([s.reasoning, s.response]).toEqual(['', 'Hello there.']);
          expect(ofTurn(stray, 1, 'reasoning')).toEqual([]);
          stray.dispose();
        }
      } finally {
        model.dispose();
      }
    }
  });
});

describe('an imported conversation', () => {
  it("leaves past replies' think blocks out, as the template renders them", async () => {
    const chat = await qwen3.importTranscript({
      format: 'finite-memory-llm/transcript', version: 1, systemPrompt: 'be brief',
      messages: [{ role: 'user', content: 'hi' }, { role: 'assistant', content: '<think>\nplan a greeting\n</think>\n\nHello there.' }],
    }, { ...BASE });
    const reply = ofTurn(chat, 1).filter((e) => e.role !== 'user');
    expect(reply.every((e) => e.role === 'assistant')).toBe(true);
    expect(text(reply)).not.toContain('think');
    expect(text(reply)).toContain('Hello there.');
    checkCache(chat, BASE.maxTokens!);
    chat.dispose();
  });
});

describe('thinking: false', () => {
  it('starts the reply with an empty think block, which is reasoning and dropped like any (qwen3)', async () => {
    const chat = qwen3.createChat({ ...BASE, testReply: 'Hello there.' });
    await chat.send('hi');
    const off = await chat.send('hi', { thinking: false });
    expect([off.response, off.reasoning]).toEqual(['Hello there.', '']);
    const skipped = ofTurn(chat, 2, 'reasoning');
    expect(text(skipped)).toBe('<think>\n\n</think>\n\n');
    const on = await chat.send('hi');   // the same message after a reply: the same prompt, less the block
    expect(off.stats.promptTokens).toBe(on.stats.promptTokens + skipped.length);
    expect(ofTurn(chat, 2, 'reasoning')).toEqual([]);
    checkCache(chat, BASE.maxTokens!);
    chat.dispose();
  });

  it("opens gpt-oss's final channel at once; a model without reasoning is unchanged", async () => {
    const chat = gptoss.createChat({ ...BASE, testReply: 'Hello there.' });
    const r = await chat.send('hi', { thinking: false });
    expect([r.response, r.reasoning]).toEqual(['Hello there.', '']);
    expect(text(ofTurn(chat, 1, 'assistant'))).toBe('<|channel|>final<|message|>Hello there.');
    // A past reply closes as gpt-oss's template writes one: <|end|> (llama.cpp's formatter writes
    // <|return|>, which the template says is never an input), and so does applyTemplate.
    await chat.send('and again', { thinking: false });
    expect(text(ofTurn(chat, 1, 'assistant'))).toBe('<|channel|>final<|message|>Hello there.<|end|>');
    expect(gptoss.applyTemplate([{ role: 'user', content: 'hi' }, { role: 'assistant', content: 'A' }], { addAssistant: true }))
      .toBe('<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>A<|end|><|start|>assistant');
    chat.dispose();
    const plain = await loadModel(testModelPath(), { threads: THREADS });
    const a = plain.createChat({ maxTokens: 128, threads: THREADS });
    const b = plain.createChat({ maxTokens: 128, threads: THREADS });
    const ra = await a.send('hi', { temperature: 0, maxNewTokens: 6 });
    const rb = await b.send('hi', { temperature: 0, maxNewTokens: 6, thinking: false });
    expect([rb.response, rb.stats.promptTokens]).toEqual([ra.response, ra.stats.promptTokens]);
    a.dispose();
    b.dispose();
    plain.dispose();
  });
});

describe('reasoning over HTTP', () => {
  it('the server sends reasoning_content apart from content; the remote chat reads it', async () => {
    const server = await createServer(qwen3, { chat: { ...BASE, testReply: THINK } as ChatOptions });
    try {
      const url = await server.listen({ port: 0, host: '127.0.0.1' });
      const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: 'unused', maxRetries: 0 });
      const messages = [{ role: 'user' as const, content: 'hi' }];
      const r = await client.chat.completions.create({ model: server.modelId, messages, max_tokens: 64 });
      const message = r.choices[0]!.message as { content: string; reasoning_content?: string };
      expect(message.content).toBe('Hello there.');
      expect(message.reasoning_content).toBe('I should greet them warmly.');

      const stream = await client.chat.completions.create({ model: server.modelId, messages, max_tokens: 64, stream: true });
      let content = '';
      let reasoning = '';
      for await (const chunk of stream) {
        const delta = chunk.choices[0]?.delta as { content?: string; reasoning_content?: string } | undefined;
        content += delta?.content ?? '';
        reasoning += delta?.reasoning_content ?? '';
      }
      expect(content).toBe('Hello there.');
      expect(reasoning.trimEnd()).toBe('I should greet them warmly.');

      const remote = connectRemote({ baseURL: `${url}/v1`, model: server.modelId }).createChat();
      const plain = await remote.send('hi', { maxNewTokens: 64 });
      expect([plain.response, plain.reasoning]).toEqual(['Hello there.', 'I should greet them warmly.']);
      const thought: string[] = [];
      const streamed = await remote.send('again', { maxNewTokens: 64, onReasoning: (p) => thought.push(p) });
      expect([streamed.response, streamed.reasoning.trimEnd()]).toEqual(['Hello there.', 'I should greet them warmly.']);
      expect(thought.join('')).toBe(streamed.reasoning);
      // The history it sends back holds the answers only.
      expect(remote.exportTranscript().messages.filter((m) => m.role === 'assistant').map((m) => m.content)).toEqual(['Hello there.', 'Hello there.']);
      remote.dispose();

      // chat_template_kwargs.enable_thinking false (llama-server's and vLLM's field): the empty think block is prefilled.
      const asked = (enable_thinking?: unknown) => post(url, { messages, max_tokens: 64, ...(enable_thinking === undefined ? {} : { chat_template_kwargs: { enable_thinking } }) });
      const withThinking = (await (await asked()).json()) as { finite_memory: { turn: { promptTokens: number } } };
      const without = (await (await asked(false)).json()) as { finite_memory: { turn: { promptTokens: number } } };
      expect(without.finite_memory.turn.promptTokens).toBeGreaterThan(withThinking.finite_memory.turn.promptTokens);
      const bad = await asked('no');
      expect(bad.status).toBe(400);
      expect(((await bad.json()) as { error: { param: string } }).error.param).toBe('chat_template_kwargs.enable_thinking');
    } finally {
      await server.close();
    }
  });

  it('a remote chat asks for no thinking with chat_template_kwargs', async () => {
    const { baseURL, bodies, close } = await fakeCompletions({ content: 'ok', reasoning_content: 'thought' });
    try {
      const chat = connectRemote({ baseURL, model: 'm' }).createChat();
      const r = await chat.send('hi', { thinking: false });
      expect([r.response, r.reasoning]).toEqual(['ok', 'thought']);
      expect(bodies[0]!.chat_template_kwargs).toEqual({ enable_thinking: false });
      await chat.send('again');
      expect(bodies[1]!.chat_template_kwargs).toBeUndefined();
      // The history sent holds the answer, never the reasoning.
      expect(JSON.stringify(bodies[1]!.messages)).not.toContain('thought');
      chat.dispose();
    } finally {
      await close();
    }
  });
});

const post = (url: string, body: unknown) =>
  fetch(`${url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
