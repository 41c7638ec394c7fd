// The OpenAI-compatible server: the official openai client against it (non-streaming, streaming),
// sessions that stay within their budget over 50 turns, LRU checkpointing and exact restore, restart
// from a checkpoint dir, TTL, auth, body limit, overload, malformed JSON, abort on disconnect, metrics.
import { mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type ChatOptions, type Model } from '../../src/index.ts';
import { createServer, type FiniteMemoryServer, type ServerOptions } from '../../src/server/index.ts';
import { testDir, testModelPath, THREADS } from '../helpers.ts';

const MAX_TOKENS = 128;
const CHAT: ChatOptions = { maxTokens: MAX_TOKENS, windowSize: 32, threads: THREADS };

let model: Model;
beforeAll(async () => {
  model = await loadModel(testModelPath(), { threads: THREADS });
});
afterAll(() => model?.dispose());

const running: FiniteMemoryServer[] = [];
afterEach(async () => {
  await Promise.all(running.splice(0).map((s) => s.close()));
});

async function start(options: ServerOptions = {}) {
  const server = await createServer(model, { chat: CHAT, ...options });
  running.push(server);
  const url = await server.listen({ port: 0, host: '127.0.0.1' });
  const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: options.apiKey ?? 'unused', maxRetries: 0 });
  return { server, url, client };
}

type Completion = OpenAI.Chat.Completions.ChatCompletion & { finite_memory: FiniteMemory };
interface FiniteMemory {
  session_id: string | null;
  restored: boolean;
  restored_from: 'full' | 'ledger' | 'transcript' | null;
  messages_seen: number | null;
  stop_reason: string;
  turn: { turn: number; promptTokens: number; generatedTokens: number; retainedTokens: number };
  chat: ReturnType<import('../../src/local/chat.ts').Chat['stats']>;
  pins: { turn: number; tokens: number }[];
}

const post = (url: string, body: unknown, headers: Record<string, string> = {}, signal?: AbortSignal) =>
  fetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
    ...(signal ? { signal } : {}),
  });

// Long enough that a one-off request importing it evicts several times (slow with testPolicyDelayMs).
const HISTORY = Array.from({ length: 8 }, (_, i) => [
  { role: 'user', content: `question ${i} about the long river and the lighthouse` },
  { role: 'assistant', content: `answer ${i} about the river and the lighthouse` },
]).flat();

const errorOf = async (r: Response) => ((await r.json()) as { error: { message: string; type: string; code: string | null } }).error;

let dirs = 0;
const freshDir = () => {
  const d = join(testDir, `sessions-${dirs++}`);
  mkdirSync(d, { recursive: true });
  return d;
};

describe('OpenAI-compatible server', () => {
  it('answers non-streaming completions like a direct chat, with usage and finite_memory', async () => {
    const { client, server } = await start();
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual([server.modelId]);

    const r = (await client.chat.completions.create({
      model: server.modelId,
      messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hello there' }],
      max_tokens: 8,
      temperature: 0,
    })) as Completion;
    expect(r.object).toBe('chat.completion');
    expect(r.model).toBe(server.modelId);
    const direct = model.createChat({ ...CHAT, systemPrompt: 'Be brief.' });
    const ref = await direct.send('Hello there', { maxNewTokens: 8, temperature: 0 });
    expect(r.choices[0]!.message.content).toBe(ref.response);
    expect(r.choices[0]!.finish_reason).toBe(ref.stopReason === 'maxTokens' ? 'length' : 'stop');
    expect(r.usage).toEqual({ prompt_tokens: ref.stats.promptTokens, completion_tokens: ref.stats.generatedTokens, total_tokens: ref.stats.promptTokens + ref.stats.generatedTokens });
    expect(r.finite_memory.session_id).toBeNull();
    expect(r.finite_memory.chat).toEqual(direct.stats());
    direct.dispose();

    // A one-off request with history: earlier pairs are prefilled (importTranscript), only the last is answered.
    const history = [
      { role: 'user' as const, content: 'first question' },
      { role: 'assistant' as const, content: 'first answer' },
      { role: 'user' as const, content: 'second question' },
    ];
    const h = (await client.chat.completions.create({ messages: history, model: server.modelId, max_tokens: 8, temperature: 0 })) as Completion;
    const imported = await model.importTranscript({ format: 'finite-memory-llm/transcript', version: 1, systemPrompt: '', messages: history.slice(0, 2) }, CHAT);
    const importedTokens = imported.stats().tokensSeen;
    const ref2 = await imported.send('second question', { maxNewTokens: 8, temperature: 0 });
    expect(h.choices[0]!.message.content).toBe(ref2.response);
    expect(h.usage!.prompt_tokens).toBe(importedTokens + ref2.stats.promptTokens);
    imported.dispose();
    // User messages in a row before the answer (a context message, then the question): one turn.
    const joined = (await client.chat.completions.create({ messages: [{ role: 'user', content: 'Some context.' }, { role: 'user', content: 'The question?' }], model: server.modelId, max_tokens: 4, temperature: 0 })) as Completion;
    const together = model.createChat(CHAT);
    const ref3 = await together.send('Some context.\n\nThe question?', { maxNewTokens: 4, temperature: 0 });
    expect(joined.finite_memory.chat.turns).toBe(1);
    expect(joined.choices[0]!.message.content).toBe(ref3.response);
    together.dispose();
    expect(server.sessions()).toEqual({ live: 0, stored: 0 }); // one-off chats are disposed
  });

  it('streams chat.completion.chunk events ending with data: [DONE]', async () => {
    const { client, server, url } = await start();
    const body = { model: server.modelId, messages: [{ role: 'user' as const, content: 'Tell me a story' }], max_tokens: 12, temperature: 0 };
    const plain = await client.chat.completions.create(body);
    const stream = await client.chat.completions.create({ ...body, stream: true, stream_options: { include_usage: true } });
    const pieces: string[] = [];
    let finish: string | null = null;
    let usage: OpenAI.Completions.CompletionUsage | null | undefined;
    for await (const chunk of stream) {
      expect(chunk.object).toBe('chat.completion.chunk');
      if (chunk.choices[0]?.delta.content) pieces.push(chunk.choices[0].delta.content);
      if (chunk.choices[0]?.finish_reason) finish = chunk.choices[0].finish_reason;
      if (chunk.usage) usage = chunk.usage;
    }
    expect(pieces.length).toBeGreaterThan(1);
    expect(pieces.join('')).toBe(plain.choices[0]!.message.content);
    expect(finish).toBe(plain.choices[0]!.finish_reason);
    expect(usage).toEqual(plain.usage);

    const raw = await post(url, { ...body, stream: true });
    expect(raw.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const text = await raw.text();
    expect(text.startsWith('data: {')).toBe(true);
    expect(text.endsWith('data: [DONE]\n\n')).toBe(true);
  });

  it('keeps a 50-turn session (user field or X-Session-Id) within its budget, evicting in place', async () => {
    const { client, server } = await start();
    let evictions = 0;
    for (let t = 1; t <= 50; t++) {
      const message = { role: 'user' as const, content: `turn ${t}: tell me one short thing about the river and the old lighthouse` };
      // Both ways of naming the session reach the same chat.
      const r = (t % 2
        ? await client.chat.completions.create({ model: server.modelId, messages: [message], user: 'long', max_tokens: 8, seed: t })
        : await client.chat.completions.create({ model: server.modelId, messages: [message], max_tokens: 8, seed: t }, { headers: { 'X-Session-Id': 'long' } })) as Completion;
      const fm = r.finite_memory;
      expect(fm.session_id).toBe('long');
      expect(fm.chat.turns).toBe(t);
      expect(fm.chat.tokensRetained).toBeLessThanOrEqual(MAX_TOKENS);
      expect(fm.turn.retainedTokens).toBe(fm.chat.tokensRetained);
      // Only the new message is prefilled, never the history.
      expect(r.usage!.prompt_tokens).toBe(fm.turn.promptTokens);
      expect(fm.turn.promptTokens).toBeLessThan(MAX_TOKENS / 2);
      evictions = fm.chat.evictions;
    }
    expect(evictions).toBeGreaterThan(0);
    expect(server.sessions()).toEqual({ live: 1, stored: 0 });
  });

  it('reconciles a client that resends the whole conversation: only the new user message is sent', async () => {
    const { client, server } = await start();
    const messages: OpenAI.Chat.Completions.ChatCompletionMessageParam[] = [{ role: 'system', content: 'Be kind.' }];
    const direct = model.createChat({ ...CHAT, systemPrompt: 'Be kind.' });
    for (let t = 1; t <= 4; t++) {
      messages.push({ role: 'user', content: `question ${t}` });
      const r = (await client.chat.completions.create({ model: server.modelId, messages, user: 'resend', max_tokens: 6, seed: t })) as Completion;
      const ref = await direct.send(`question ${t}`, { maxNewTokens: 6, seed: t });
      expect(r.choices[0]!.message.content).toBe(ref.response);
      expect(r.finite_memory.messages_seen).toBe(2 * t);
      expect(r.finite_memory.chat).toEqual(direct.stats());
      messages.push({ role: 'assistant', content: r.choices[0]!.message.content ?? '' });
    }
    direct.dispose();
  });

  it('checkpoints the least recently used session (maxSessions 1) and restores it exactly', async () => {
    const dir = freshDir();
    const { client, server } = await start({ maxSessions: 1, checkpointDir: dir });
    const refs = { a: model.createChat(CHAT), b: model.createChat(CHAT) };
    for (let round = 1; round <= 4; round++) {
      for (const id of ['a', 'b'] as const) {
        const content = `round ${round} for session ${id}, with a few more words to fill the memory`;
        const r = (await client.chat.completions.create({ model: server.modelId, messages: [{ role: 'user', content }], user: id, max_tokens: 8, temperature: 0.8, seed: round })) as Completion;
        const ref = await refs[id].send(content, { maxNewTokens: 8, temperature: 0.8, seed: round });
        expect(r.finite_memory.restored).toBe(round > 1); // the other session evicted it in between
        expect(r.choices[0]!.message.content).toBe(ref.response);
        const { promptTokens, generatedTokens, evictedTokens, retainedTokens } = ref.stats;
        expect(r.finite_memory.turn).toMatchObject({ promptTokens, generatedTokens, evictedTokens, retainedTokens });
        expect(r.finite_memory.chat).toEqual(refs[id].stats());
        expect(r.finite_memory.chat.turns).toBe(round);
        // Every turn is written through: the store holds both sessions from their first turn on.
        expect(server.sessions()).toEqual({ live: 1, stored: round === 1 && id === 'a' ? 1 : 2 });
        if (round > 1) expect(r.finite_memory.restored_from).toBe('full'); // written back when it left memory
      }
    }
    expect(refs.a.stats().evictions).toBeGreaterThan(0);
    const files = (ext: string) => readdirSync(dir).filter((f) => f.endsWith(ext));
    expect(files('.session')).toHaveLength(2);
    expect(files('.full')).toHaveLength(1); // the session that left memory; the live one's turns are in its ledger

    // Restart on the same dir: close() writes back the live session, a new server picks both up.
    await server.close();
    expect(files('.full')).toHaveLength(2);
    const again = await start({ maxSessions: 1, checkpointDir: dir });
    expect(again.server.sessions()).toEqual({ live: 0, stored: 2 });
    const content = 'after the restart';
    const r = (await again.client.chat.completions.create({ model: again.server.modelId, messages: [{ role: 'user', content }], user: 'b', max_tokens: 8, seed: 9 })) as Completion;
    const ref = await refs.b.send(content, { maxNewTokens: 8, seed: 9 });
    expect(r.finite_memory).toMatchObject({ restored: true, restored_from: 'full' });
    expect(r.choices[0]!.message.content).toBe(ref.response);
    expect(r.finite_memory.chat).toEqual(refs.b.stats());
    refs.a.dispose();
    refs.b.dispose();
  });

  it('pins, unpins and forgets through the finite_memory request field', async () => {
    const { url } = await start();
    const headers = { 'x-session-id': 'pins' };
    const send = async (content: string, finite_memory?: unknown) => {
      const r = await post(url, { messages: [{ role: 'user', content }], max_tokens: 4, temperature: 0, ...(finite_memory ? { finite_memory } : {}) }, headers);
      return { status: r.status, body: (await r.json()) as Completion & { error?: { code: string; param: string } } };
    };
    const first = await send('remember the lantern', { pin: true });
    expect(first.status).toBe(200);
    const pinnedTurn = first.body.finite_memory.turn.turn;
    expect(pinnedTurn).toBe(1);
    expect(first.body.finite_memory.pins).toEqual([{ turn: 1, tokens: expect.any(Number) }]);
    for (let i = 0; i < 12; i++) await send(`filler ${i} about the river and the lighthouse`);
    const later = await send('and now');
    expect(later.body.finite_memory.chat.tokensEvicted).toBeGreaterThan(0);
    expect(later.body.finite_memory.pins.map((p) => p.turn)).toEqual([1]);
    // forget evicts the pinned turn (its pin goes with it); unpin releases a pin and keeps the turn.
    const forgot = await send('forget it', { forget: [1] });
    expect(forgot.status).toBe(200);
    expect(forgot.body.finite_memory.pins).toEqual([]);
    const again = await send('pin this one', { pin: true });
    expect(again.body.finite_memory.pins.map((p) => p.turn)).toEqual([again.body.finite_memory.turn.turn]);
    const unpinned = await send('unpin it', { unpin: [again.body.finite_memory.turn.turn] });
    expect(unpinned.status).toBe(200);
    expect(unpinned.body.finite_memory.pins).toEqual([]);
    // A request refused for one of its turns changes nothing: its unpin is not applied either.
    const kept = (await send('pin this too', { pin: true })).body.finite_memory.turn.turn;
    const refused = await send('x', { unpin: [kept], forget: [999] });
    expect(refused.status).toBe(400);
    expect(refused.body.error?.param).toBe('finite_memory.forget');
    const refusedUnpin = await send('x', { unpin: [kept, 999] });
    expect(refusedUnpin.body.error?.param).toBe('finite_memory.unpin');
    expect((await send('still pinned?')).body.finite_memory.pins.map((p) => p.turn)).toEqual([kept]);
    // A turn no longer in memory, a bad field, forget without a session: 400s, OpenAI-style.
    expect((await send('x', { unpin: [1] })).status).toBe(400);
    const bad = await send('x', { pinn: true });
    expect(bad.status).toBe(400);
    expect(bad.body.error?.param).toBe('finite_memory.pinn');
    expect((await send('x', { pin: 'yes' })).status).toBe(400);
    const oneOff = await post(url, { messages: [{ role: 'user', content: 'hi' }], finite_memory: { forget: [1] } });
    expect(oneOff.status).toBe(400);
    expect((await errorOf(oneOff)).code).toBe('session_required');
  });

  it('expires idle sessions after the TTL and deletes their checkpoints', async () => {
    const dir = freshDir();
    const { client, server } = await start({ maxSessions: 1, sessionTtlMs: 300, checkpointDir: dir });
    for (const user of ['x', 'y']) await client.chat.completions.create({ model: server.modelId, messages: [{ role: 'user', content: 'hi' }], user, max_tokens: 4 });
    expect(server.sessions()).toEqual({ live: 1, stored: 2 });
    await new Promise((r) => setTimeout(r, 900));
    expect(server.sessions()).toEqual({ live: 0, stored: 0 });
    expect(readdirSync(dir).filter((f) => !f.endsWith('.lock'))).toEqual([]);   // the lock is the server's own, given up at close()
    const r = (await client.chat.completions.create({ model: server.modelId, messages: [{ role: 'user', content: 'hi' }], user: 'x', max_tokens: 4 })) as Completion;
    expect(r.finite_memory.chat.turns).toBe(1);
  });

  it('requires the API key when one is set (401), except on /health', async () => {
    const { url, server } = await start({ apiKey: 'sekret' });
    const wrong = new OpenAI({ baseURL: `${url}/v1`, apiKey: 'nope', maxRetries: 0 });
    await expect(wrong.chat.completions.create({ model: server.modelId, messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 })).rejects.toMatchObject({ status: 401 });
    const none = await post(url, { messages: [{ role: 'user', content: 'hi' }] });
    expect(none.status).toBe(401);
    expect(await errorOf(none)).toMatchObject({ type: 'invalid_request_error', code: 'invalid_api_key' });
    expect((await fetch(`${url}/metrics`)).status).toBe(401);
    expect((await fetch(`${url}/health`)).status).toBe(200);
    const right = new OpenAI({ baseURL: `${url}/v1`, apiKey: 'sekret', maxRetries: 0 });
    const r = await right.chat.completions.create({ model: server.modelId, messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 });
    expect(r.choices[0]!.message.role).toBe('assistant');
  });

  it('rejects a body over the limit with 413 and malformed JSON with 400, OpenAI-style', async () => {
    const { url, client } = await start({ bodyLimit: 16 * 1024 });
    const huge = await post(url, { messages: [{ role: 'user', content: 'x'.repeat(100_000) }] });
    expect(huge.status).toBe(413);
    expect(await errorOf(huge)).toMatchObject({ type: 'invalid_request_error', code: 'request_too_large' });

    const bad = await post(url, '{"model": "m", "messages": [');
    expect(bad.status).toBe(400);
    const err = await errorOf(bad);
    expect(err).toMatchObject({ type: 'invalid_request_error', code: 'invalid_json' });
    expect(typeof err.message).toBe('string');

    const unknown = await post(url, { model: 'gpt-nothing', messages: [{ role: 'user', content: 'hi' }] });
    expect(unknown.status).toBe(404);
    expect((await errorOf(unknown)).code).toBe('model_not_found');

    const noUser = await post(url, { messages: [{ role: 'assistant', content: 'hi' }] });
    expect(noUser.status).toBe(400);

    await expect(client.chat.completions.create({ model: 'unused', messages: [{ role: 'user', content: 'word '.repeat(400) }] })).rejects.toMatchObject({ status: 404 });
    const tooLarge = await post(url, { messages: [{ role: 'user', content: 'word '.repeat(400) }], max_tokens: 4 });
    expect(tooLarge.status).toBe(400);
    expect((await errorOf(tooLarge)).code).toBe('context_length_exceeded');
  });

  it('answers 429 with Retry-After when the decode slots and queues are full', async () => {
    // Slow turns on purpose: every eviction waits 150 ms (test hook), and the history forces evictions.
    const { url } = await start({ maxConcurrent: 1, maxQueue: 0, maxSessionQueue: 0, chat: { ...CHAT, maxTokens: 64, testPolicyDelayMs: 150, maxPolicyMs: 0 } });
    const body = { messages: [...HISTORY, { role: 'user', content: 'and now?' }], max_tokens: 4 };
    const global = await Promise.all(Array.from({ length: 4 }, () => post(url, body)));
    const statuses = global.map((r) => r.status).sort();
    expect(statuses.filter((s) => s === 200)).toHaveLength(1);
    expect(statuses.filter((s) => s === 429)).toHaveLength(3);
    const rejected = global.find((r) => r.status === 429)!;
    expect(rejected.headers.get('retry-after')).toBe('1');
    expect(await errorOf(rejected)).toMatchObject({ type: 'rate_limit_error', code: 'rate_limit_exceeded' });

    // One session at a time: a second request for a busy session with no session queue is refused.
    const same = await Promise.all([post(url, { ...body, user: 's' }), post(url, { ...body, user: 's' })]);
    expect(same.map((r) => r.status).sort()).toEqual([200, 429]);
  });

  it('aborts the turn when the client disconnects mid-stream; the session stays usable', async () => {
    const chat = { ...CHAT, maxTokens: 48, windowSize: 8, maxPolicyMs: 0 };
    const prompt = 'please tell me a very long story about the river, the lighthouse and the small cat';
    // A seed whose reply is long when nothing aborts it.
    let seed = 0;
    let full = 0;
    for (let s = 1; s <= 40 && full < 100; s++) {
      const c = model.createChat(chat);
      const r = await c.send(prompt, { maxNewTokens: 120, temperature: 0.9, seed: s });
      if (r.stats.generatedTokens > full) [seed, full] = [s, r.stats.generatedTokens];
      c.dispose();
    }
    expect(full).toBeGreaterThanOrEqual(80);
    const { url } = await start({ chat: { ...chat, testPolicyDelayMs: 100 } });
    const ac = new AbortController();
    const res = await post(url, { messages: [{ role: 'user', content: prompt }], user: 'gone', stream: true, max_tokens: 120, temperature: 0.9, seed }, {}, ac.signal);
    await res.body!.getReader().read(); // the first chunk: the turn is running
    ac.abort();
    const next = (await (await post(url, { messages: [{ role: 'user', content: 'still there?' }], user: 'gone', max_tokens: 2 })).json()) as Completion;
    const fm = next.finite_memory;
    expect(fm.chat.turns).toBe(2);
    const seenAfterAbortedTurn = fm.chat.tokensSeen - fm.turn.promptTokens - fm.turn.generatedTokens;
    const ref = model.createChat(chat);
    await ref.send(prompt, { maxNewTokens: 120, temperature: 0.9, seed });
    expect(seenAfterAbortedTurn).toBeLessThan(ref.stats().tokensSeen - 30);
    ref.dispose();
  });

  it('exports Prometheus metrics, and close() lets in-flight requests finish', async () => {
    const { url, client, server } = await start({ chat: { ...CHAT, maxTokens: 64, testPolicyDelayMs: 100, maxPolicyMs: 0 } });
    await client.chat.completions.create({ model: server.modelId, messages: [{ role: 'user', content: 'count me' }], user: 'm', max_tokens: 4 });
    await new Promise((r) => setImmediate(r)); // telemetry hooks run on a later tick
    const metrics = await (await fetch(`${url}/metrics`)).text();
    const policy = model.info.backend === 'cpu' ? 'importance' : 'sliding';   // the default policy
    expect(metrics).toMatch(new RegExp(`finite_memory_turns_total\\{policy="${policy}"\\} 1`));
    expect(metrics).toMatch(/finite_memory_server_sessions\{state="live"\} 1/);
    expect(metrics).toMatch(/finite_memory_server_requests_total\{route="\/v1\/chat\/completions",status="200"\} 1/);
    // A request its client leaves is not counted as a 200.
    const leaving = new AbortController();
    const left = post(url, { messages: [{ role: 'user', content: 'leave me' }], max_tokens: 60, ignore_eos: true }, {}, leaving.signal).catch(() => undefined);
    await new Promise((r) => setTimeout(r, 30));
    leaving.abort();
    await left;
    await new Promise((r) => setTimeout(r, 50));
    const after = await (await fetch(`${url}/metrics`)).text();
    expect(after).toMatch(/finite_memory_server_requests_total\{route="\/v1\/chat\/completions",status="200"\} 1\n/);
    expect(after).toMatch(/finite_memory_server_requests_total\{route="\/v1\/chat\/completions",status="499"\} 1/);

    // A slow one-off request (its history evicts, 100 ms each) is still running when close() starts.
    const inFlight = post(url, { messages: [...HISTORY, { role: 'user', content: 'finish me' }], max_tokens: 4 });
    await new Promise((r) => setTimeout(r, 50));
    const t0 = performance.now();
    await server.close();
    expect(performance.now() - t0).toBeGreaterThan(50);
    const r = await inFlight;
    expect(r.status).toBe(200);
    expect(((await r.json()) as Completion).choices[0]!.message.role).toBe('assistant');
    await expect(post(url, { messages: [{ role: 'user', content: 'late' }] })).rejects.toThrow();
  });
});
