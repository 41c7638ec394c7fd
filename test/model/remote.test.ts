// The remote backend: finite memory at the message level against this project's own OpenAI-compatible
// server (sliding over 100 turns, rolling summaries), and the transport against a fault-injecting
// node:http server (Retry-After, retry limits, dropped connections, timeouts, prompt aborts, no retry
// after a stream started, circuit breaker).
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CallbackError, InvalidOptionError, loadModel, type Model } from '../../src/index.ts';
import { CircuitOpenError, connectRemote, RemoteHttpError, RemoteTimeoutError, RemoteUnavailableError, type RemoteOptions } from '../../src/remote/index.ts';
import { SUMMARIZER_PROMPT } from '../../src/remote/index.ts';
import { parseRetryAfter } from '../../src/remote/transport.ts';
import { createServer, type FiniteMemoryServer } from '../../src/server/index.ts';
import type { ChatSurface } from '../../src/shared/chat-surface.ts';
import { testModelPath, THREADS } from '../helpers.ts';

type Body = { model: string; messages: { role: string; content: string }[]; stream?: boolean; max_tokens?: number };

/** fetch that records every request body. */
function recordingFetch(bodies: Body[]): typeof fetch {
  return (input, init) => {
    bodies.push(JSON.parse(String(init?.body)) as Body);
    return fetch(input, init);
  };
}

describe('remote backend against the project server', () => {
  let model: Model;
  let server: FiniteMemoryServer;
  let url: string;
  beforeAll(async () => {
    model = await loadModel(testModelPath(), { threads: THREADS });
    server = await createServer(model, { chat: { maxTokens: 1024, threads: THREADS } });
    url = await server.listen({ port: 0, host: '127.0.0.1' });
  });
  afterAll(async () => {
    await server?.close();
    model?.dispose();
  });

  it('sliding: 100 turns stay within maxTokens (estimate counter) and old messages leave', async () => {
    const bodies: Body[] = [];
    const remote = connectRemote({ baseURL: `${url}/v1`, model: server.modelId, apiKey: 'unused', fetch: recordingFetch(bodies) });
    const turns: number[] = [];
    const chat = remote.createChat({ policy: 'sliding', maxTokens: 200, systemPrompt: 'You are a river guide.' });
    for (let t = 1; t <= 100; t++) {
      const r = await chat.send(`turn ${t}: tell me one short thing about the river and the lighthouse`, { maxNewTokens: 6, seed: t });
      expect(['eos', 'maxTokens']).toContain(r.stopReason);
      expect(r.stats.tokenCounter).toBe('estimate');
      const mem = chat.memory();
      const retained = mem.reduce((n, m) => n + m.tokens, 0);
      expect(retained).toBeLessThanOrEqual(200);
      expect(r.stats.retainedTokens).toBe(retained);
      expect(chat.stats().tokensRetained).toBe(retained);
      expect(mem[0]).toMatchObject({ role: 'system', content: 'You are a river guide.' });
      expect(mem[1]!.role).toBe('user'); // whole exchanges leave
      // The request itself carried at most the budget (system + retained history + the new message).
      const sent = bodies.at(-1)!.messages;
      expect(sent.at(-1)).toEqual({ role: 'user', content: `turn ${t}: tell me one short thing about the river and the lighthouse` });
      expect(sent.reduce((n, m) => n + Math.ceil(m.content.length / 4) + 4, 0)).toBeLessThanOrEqual(200);
      turns.push(mem.length);
    }
    const stats = chat.stats();
    expect(stats.turns).toBe(100);
    expect(stats.evictions).toBeGreaterThan(0);
    expect(stats.tokensSeen).toBeGreaterThan(5 * stats.tokensRetained);
    // The oldest turns are gone, the newest are kept.
    const contents = chat.memory().map((m) => m.content).join('\n');
    expect(contents).not.toContain('turn 1:');
    expect(contents).toContain('turn 100:');
    expect(chat.exportTranscript().messages).toHaveLength(200); // the transcript keeps everything
    expect(bodies).toHaveLength(100); // no summary requests with sliding
    chat.dispose();
    remote.dispose();
  });

  it('rolling_summary: summaries roll (each new one is made from the previous one)', async () => {
    const bodies: Body[] = [];
    const remote = connectRemote({ baseURL: `${url}/v1`, model: server.modelId, fetch: recordingFetch(bodies), tokenizer: model });
    const chat = remote.createChat({ policy: 'rolling_summary', maxTokens: 160, summaryTokens: 24, systemPrompt: 'Be brief.' });
    const summaries: string[] = [];
    for (let t = 1; t <= 24; t++) {
      const r = await chat.send(`turn ${t}: the lighthouse keeper has a cat named number ${t}`, { maxNewTokens: 8, seed: t });
      expect(r.stats.tokenCounter).toBe('model');
      expect(r.stats.retainedTokens).toBeLessThanOrEqual(160);
      const s = chat.stats().summary;
      if (s && s !== summaries.at(-1)) summaries.push(s);
    }
    const stats = chat.stats();
    expect(stats.summaries).toBeGreaterThanOrEqual(3);
    expect(summaries.length).toBeGreaterThanOrEqual(2);
    const mem = chat.memory();
    expect(mem[0]!.role).toBe('system');
    expect(mem[1]).toMatchObject({ role: 'summary', content: stats.summary });
    expect(mem[2]!.role).toBe('user');
    // Each chat request carries the summary right after the system prompt.
    const last = bodies.filter((b) => b.messages[0]!.content !== SUMMARIZER_PROMPT).at(-1)!;
    expect(last.messages[1]!.content).toContain(stats.summary);
    // A later summary request contained the previous summary.
    const summaryRequests = bodies.filter((b) => b.messages[0]!.content === SUMMARIZER_PROMPT);
    expect(summaryRequests.length).toBe(stats.summaries);
    const rolled = summaryRequests.filter((b) => summaries.slice(0, -1).some((s) => b.messages[1]!.content.includes(`Previous summary:\n${s}`)));
    expect(rolled.length).toBeGreaterThan(0);
    chat.dispose();
    remote.dispose();
  });

  it('rolling_summary with a short summaryTokens keeps summaries (its prefix is not counted in it)', async () => {
    const remote = connectRemote({ baseURL: `${url}/v1`, model: server.modelId });   // the estimate counter: the prefix is 14 tokens
    const chat = remote.createChat({ policy: 'rolling_summary', maxTokens: 96, summaryTokens: 8 });
    for (let t = 1; t <= 12; t++) {
      const r = await chat.send(`turn ${t}: the lighthouse keeper has a cat named number ${t}`, { maxNewTokens: 6, seed: t });
      expect(r.stats.retainedTokens).toBeLessThanOrEqual(96);
    }
    expect(chat.stats().summaries).toBeGreaterThan(0);
    expect(chat.memory().some((m) => m.role === 'summary' && m.content.length > 0)).toBe(true);
    remote.dispose();
  });

  it('streams over SSE, exports the transcript, refuses KV-cache policies', async () => {
    const remote = connectRemote({ baseURL: `${url}/v1`, model: server.modelId });
    const chat = remote.createChat({ policy: 'hybrid', maxTokens: 300 });
    const pieces: string[] = [];
    const gen = chat.stream('Tell me a story', { maxNewTokens: 10, seed: 3 });
    let next = await gen.next();
    while (!next.done) {
      pieces.push(next.value);
      next = await gen.next();
    }
    expect(next.value.response).toBe(pieces.join(''));
    expect(chat.exportTranscript()).toEqual({ format: 'finite-memory-llm/transcript', version: 1, systemPrompt: '', messages: [{ role: 'user', content: 'Tell me a story' }, { role: 'assistant', content: next.value.response }] });
    for (const policy of ['importance', 'semantic', 'bogus']) {
      expect(() => remote.createChat({ policy: policy as 'sliding' })).toThrow(InvalidOptionError);
      expect(() => remote.createChat({ policy: policy as 'sliding' })).toThrow(/local KV cache/);
    }
    chat.reset();
    expect(chat.memory()).toEqual([]);
    remote.dispose();
    expect(chat.disposed).toBe(true);
  });

  it('one piece of code runs on a local and a remote chat (ChatSurface), with the same results', async () => {
    // What a user writes once and points at either backend: send, stream (broken off early), stats,
    // the transcript, telemetry, reset, await using.
    const conversation = async (chat: ChatSurface) => {
      // A stop string inside the reply: 'stop' on both (OpenAI's finish_reason alone says 'stop' for an
      // end of turn too). The same first turn again after reset() gives the same reply.
      const probe = await chat.send('Hello there', { maxNewTokens: 6, temperature: 0 });
      chat.reset();
      const stop = probe.response.trim().slice(1, 3);
      expect(stop).toHaveLength(2);
      expect((await chat.send('Hello there', { maxNewTokens: 6, temperature: 0, stop: [stop] })).stopReason).toBe('stop');
      chat.reset();
      const first = await chat.send('Hello there', { maxNewTokens: 6, temperature: 0 });
      const pieces: string[] = [];
      for await (const piece of chat.stream('Tell me more', { maxNewTokens: 6, temperature: 0 })) pieces.push(piece);
      let broken = 0;
      for await (const _ of chat.stream('And again', { maxNewTokens: 32, temperature: 0 })) if (++broken === 1) break;
      const transcript = chat.exportTranscript();
      const stats = chat.stats();
      expect(chat.busy).toBe(false);
      chat.reset();
      expect(chat.stats().turns).toBe(0);
      expect(chat.exportTranscript().messages).toEqual([]);
      return { first: first.response, streamed: pieces.join(''), turns: stats.turns, users: transcript.messages.filter((m) => m.role === 'user').map((m) => m.content) };
    };
    const events: { local: number; remote: number } = { local: 0, remote: 0 };
    const remote = connectRemote({ baseURL: `${url}/v1`, model: server.modelId });
    const got = [];
    {
      await using local = model.createChat({ maxTokens: 1024, threads: THREADS, telemetry: { onTurn: () => void events.local++ } });
      got.push(await conversation(local));
    }
    {
      await using far = remote.createChat({ maxTokens: 1024, telemetry: { onTurn: () => void events.remote++ } });
      got.push(await conversation(far));
      expect(far.disposed).toBe(false);
    }
    remote.dispose();
    await new Promise((r) => setImmediate(r));
    // The server runs the same model greedily: both backends said the same, and counted the same.
    expect(got[1]).toEqual(got[0]);
    expect(got[0]!.users).toEqual(['Hello there', 'Tell me more', 'And again']);
    expect(events.local).toBeGreaterThanOrEqual(2);
    expect(events.remote).toBe(events.local);
  });
});

// ---- fault injection ----

type Handler = (req: IncomingMessage, res: ServerResponse, n: number) => void;
let fault: Server | undefined;
let handler: Handler = () => {};
let hits = 0;
const seenHeaders: IncomingMessage['headers'][] = [];

const ok = (res: ServerResponse, content = 'fine') => {
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ choices: [{ index: 0, message: { role: 'assistant', content }, finish_reason: 'stop' }], usage: { prompt_tokens: 3, completion_tokens: 1 } }));
};
const status = (res: ServerResponse, code: number, headers: Record<string, string> = {}) => {
  res.writeHead(code, { 'content-type': 'application/json', ...headers });
  res.end(JSON.stringify({ error: { message: `failure ${code}`, type: 'server_error' } }));
};

/** A fresh server (new port) per call: no keep-alive connection of an earlier one can be reused. */
async function startFault(h: Handler): Promise<string> {
  handler = h;
  hits = 0;
  seenHeaders.length = 0;
  await stopFault();
  fault = createHttpServer((req, res) => {
    seenHeaders.push(req.headers);
    req.resume();
    req.on('end', () => handler(req, res, ++hits));
  });
  await new Promise<void>((r) => fault!.listen(0, '127.0.0.1', r));
  return `http://127.0.0.1:${(fault.address() as AddressInfo).port}/v1`;
}
async function stopFault(): Promise<void> {
  const s = fault;
  fault = undefined;
  if (!s) return;
  s.closeAllConnections();
  await new Promise<void>((r) => s.close(() => r()));
}
afterEach(async () => {
  handler = () => {};
  await stopFault();
});

const connect = (baseURL: string, o: Partial<RemoteOptions> = {}) =>
  connectRemote({ baseURL, model: 'm', apiKey: 'sk-secret-123', retry: { retries: 3, minDelayMs: 5, maxDelayMs: 20 }, ...o });

describe('remote transport under faults', () => {
  it('waits for Retry-After (seconds) on 429, then succeeds', async () => {
    const url = await startFault((_req, res, n) => (n === 1 ? status(res, 429, { 'retry-after': '1' }) : ok(res, 'after wait')));
    const chat = connect(url).createChat();
    const t0 = performance.now();
    const r = await chat.send('hi');
    const waited = performance.now() - t0;
    expect(r.response).toBe('after wait');
    expect(r.stats.attempts).toBe(2);
    expect(hits).toBe(2);
    expect(waited).toBeGreaterThanOrEqual(950);
    expect(parseRetryAfter(new Date(Date.now() + 5000).toUTCString())).toBeGreaterThan(3000);
    expect(parseRetryAfter('2')).toBe(2000);
  });

  it('retries 500s up to the limit (exact attempts), then throws a typed error without the API key', async () => {
    const url = await startFault((req, res) => {
      // A hostile server echoing the Authorization header back in its error message.
      res.writeHead(500, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { message: `bad ${req.headers.authorization}` } }));
    });
    const chat = connect(url).createChat();
    const err = await chat.send('hi').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RemoteHttpError);
    expect(err).toMatchObject({ code: 'REMOTE_HTTP_ERROR', status: 500, attempts: 4 });
    expect(hits).toBe(4);
    expect(seenHeaders[0]!.authorization).toBe('Bearer sk-secret-123');
    expect(String((err as Error).message)).not.toContain('sk-secret-123');
    expect(String((err as Error).stack)).not.toContain('sk-secret-123');
    // A 400 is not retried.
    const url400 = await startFault((_req, res) => status(res, 400));
    await expect(connect(url400).createChat().send('hi')).rejects.toMatchObject({ status: 400, attempts: 1 });
    expect(hits).toBe(1);
  });

  it('retries dropped connections', async () => {
    const url = await startFault((req, res, n) => (n <= 2 ? req.socket.destroy() : ok(res, 'third time')));
    const r = await connect(url).createChat().send('hi');
    expect(r.response).toBe('third time');
    expect(r.stats.attempts).toBe(3);
    expect(hits).toBe(3);
    // Until the retries run out: REMOTE_UNAVAILABLE.
    const url2 = await startFault((req) => req.socket.destroy());
    await expect(connect(url2, { retry: { retries: 1, minDelayMs: 1, maxDelayMs: 1 } }).createChat().send('hi')).rejects.toBeInstanceOf(RemoteUnavailableError);
    expect(hits).toBe(2);
  });

  it('times out a slow body with REMOTE_TIMEOUT', async () => {
    const url = await startFault((_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.write('{"choices": ['); // and never more
    });
    const t0 = performance.now();
    const err = await connect(url, { timeoutMs: 200, retry: { retries: 1, minDelayMs: 1, maxDelayMs: 1 } }).createChat().send('hi').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RemoteTimeoutError);
    expect(err).toMatchObject({ code: 'REMOTE_TIMEOUT', attempts: 2 });
    expect(hits).toBe(2);
    expect(performance.now() - t0).toBeLessThan(2000);
  });

  it('aborts promptly during a backoff sleep', async () => {
    const url = await startFault((_req, res) => status(res, 503, { 'retry-after': '10' }));
    const chat = connect(url).createChat();
    const ac = new AbortController();
    const turn = chat.send('hi', { signal: ac.signal });
    await new Promise((r) => setTimeout(r, 150));
    expect(hits).toBe(1); // sleeping for Retry-After now
    const t0 = performance.now();
    ac.abort();
    const r = await turn;
    expect(performance.now() - t0).toBeLessThan(200);
    expect(r.stopReason).toBe('abort');
    expect(hits).toBe(1);
    expect(chat.busy).toBe(false);
    expect(chat.memory()).toEqual([]);
  });

  it('does not retry a stream that broke after delivering tokens (one request)', async () => {
    const url = await startFault((req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      for (const piece of ['Once', ' upon', ' a']) res.write(`data: ${JSON.stringify({ choices: [{ index: 0, delta: { content: piece }, finish_reason: null }] })}\n\n`);
      setTimeout(() => req.socket.destroy(), 50);
    });
    const chat = connect(url).createChat();
    const pieces: string[] = [];
    const err = await (async () => {
      for await (const p of chat.stream('story')) pieces.push(p);
    })().catch((e: unknown) => e);
    expect(pieces).toEqual(['Once', ' upon', ' a']);
    expect(err).toBeInstanceOf(RemoteUnavailableError);
    expect((err as Error).message).toMatch(/not retried/);
    await new Promise((r) => setTimeout(r, 100));
    expect(hits).toBe(1);
    expect(chat.stats().turns).toBe(0);
  });

  it('opens the circuit after N failures, fails fast while open, closes after a successful trial', async () => {
    let healthy = false;
    const url = await startFault((_req, res) => (healthy ? ok(res, 'back') : status(res, 502)));
    const remote = connect(url, { retry: { retries: 0, minDelayMs: 1, maxDelayMs: 1 }, circuit: { failureThreshold: 2, cooldownMs: 300 } });
    const chat = remote.createChat();
    await expect(chat.send('a')).rejects.toBeInstanceOf(RemoteHttpError);
    await expect(chat.send('b')).rejects.toBeInstanceOf(RemoteHttpError);
    expect(hits).toBe(2);
    const other = remote.createChat(); // the breaker belongs to the connection
    for (const c of [chat, other]) await expect(c.send('c')).rejects.toMatchObject({ code: 'CIRCUIT_OPEN' });
    await expect(chat.send('d')).rejects.toBeInstanceOf(CircuitOpenError);
    expect(hits).toBe(2); // nothing reached the server while open

    // After the cooldown one trial goes through; a failing trial opens it again at once.
    await new Promise((r) => setTimeout(r, 350));
    await expect(chat.send('e')).rejects.toBeInstanceOf(RemoteHttpError);
    expect(hits).toBe(3);
    await expect(chat.send('f')).rejects.toBeInstanceOf(CircuitOpenError);
    expect(hits).toBe(3);

    await new Promise((r) => setTimeout(r, 350));
    healthy = true;
    expect((await chat.send('g')).response).toBe('back');
    expect((await other.send('h')).response).toBe('back'); // closed again
    expect(hits).toBe(5);
    remote.dispose();
  });
});

describe('remote transport: streams that fail, and the circuit', () => {
  const event = (o: unknown) => `data: ${JSON.stringify(o)}\n\n`;
  it('an error event before any token is a failure of the remote: retried, and counted by the circuit', async () => {
    const url = await startFault((_req, res, n) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      if (n <= 2) res.end(event({ error: { message: 'overloaded' } }) + 'data: [DONE]\n\n');
      else res.end(event({ choices: [{ index: 0, delta: { content: 'fine' }, finish_reason: 'stop' }] }) + 'data: [DONE]\n\n');
    });
    const r = await connect(url).createChat().send('hi', { onToken: () => {} });
    expect(r.response).toBe('fine');
    expect(r.stats.attempts).toBe(3);
    // Always failing: the circuit opens (a 200 with an error event used to count as a success).
    await startFault((_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.end(event({ error: { message: 'overloaded' } }));
    });
    const remote = connect(`http://127.0.0.1:${(fault!.address() as AddressInfo).port}/v1`, { retry: { retries: 0, minDelayMs: 1, maxDelayMs: 1 }, circuit: { failureThreshold: 2, cooldownMs: 60_000 } });
    const chat = remote.createChat();
    for (let i = 0; i < 2; i++) await expect(chat.send('a', { onToken: () => {} })).rejects.toBeInstanceOf(RemoteUnavailableError);
    await expect(chat.send('b', { onToken: () => {} })).rejects.toBeInstanceOf(CircuitOpenError);
    remote.dispose();
  });

  it('a stream cut after its finish_reason is a complete reply; a stream asks for its usage', async () => {
    const bodies: Body[] = [];
    const url = await startFault((req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write(event({ choices: [{ index: 0, delta: { content: 'all' }, finish_reason: null }] }));
      res.write(event({ choices: [{ index: 0, delta: {}, finish_reason: 'stop' }] }));
      res.write(event({ choices: [], usage: { prompt_tokens: 3, completion_tokens: 7 } }));
      setTimeout(() => req.socket.destroy(), 30);   // no [DONE]
    });
    const chat = connect(url, { fetch: recordingFetch(bodies) }).createChat();
    const r = await chat.send('hi', { onToken: () => {} });
    expect(r.response).toBe('all');
    expect(r.stats.generatedTokens).toBe(7);
    expect(hits).toBe(1);
    expect((bodies[0] as Body & { stream_options?: unknown }).stream_options).toEqual({ include_usage: true });
  });

  it('timeoutMs bounds each wait in a stream, not the whole stream: a long reply that keeps coming completes; a stall fails', async () => {
    const url = await startFault((_req, res, n) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      let i = 0;
      const tick = setInterval(() => {
        if (n > 1 && i === 2) return clearInterval(tick);   // the second request stalls after two pieces
        if (i < 6) res.write(event({ choices: [{ index: 0, delta: { content: `p${i}` }, finish_reason: null }] }));
        else {
          clearInterval(tick);
          res.end(event({ choices: [{ index: 0, delta: {}, finish_reason: 'stop' }] }) + 'data: [DONE]\n\n');
        }
        i++;
      }, 80);
    });
    const chat = connect(url, { timeoutMs: 200 }).createChat();
    const t0 = performance.now();
    const r = await chat.send('long', { onToken: () => {} });
    expect(performance.now() - t0).toBeGreaterThan(400);   // twice timeoutMs in all
    expect(r.response).toBe('p0p1p2p3p4p5');
    const err = await chat.send('stall', { onToken: () => {} }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RemoteTimeoutError);
    expect((err as Error).message).toMatch(/not retried/);
  });

  it('a half-open circuit with its trial in flight tells callers to wait, and a 4xx trial does not close it', async () => {
    let mode: 'fail' | 'slow' | 'bad' = 'fail';
    const url = await startFault((_req, res) => {
      if (mode === 'fail') return status(res, 502);
      if (mode === 'bad') return status(res, 401);
      setTimeout(() => ok(res, 'late'), 300);
    });
    const remote = connect(url, { retry: { retries: 0, minDelayMs: 1, maxDelayMs: 1 }, circuit: { failureThreshold: 1, cooldownMs: 200 } });
    const chat = remote.createChat();
    const other = remote.createChat();
    await expect(chat.send('a')).rejects.toBeInstanceOf(RemoteHttpError);
    await new Promise((r) => setTimeout(r, 250));
    mode = 'bad';
    await expect(chat.send('b')).rejects.toMatchObject({ status: 401 });   // the trial: a client error
    mode = 'slow';
    const trial = other.send('c');   // the circuit is not closed by the 401: this is a trial again
    await new Promise((r) => setTimeout(r, 50));
    const err = await chat.send('d').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CircuitOpenError);
    expect((err as CircuitOpenError).retryAfterMs).toBeGreaterThan(0);
    expect((await trial).response).toBe('late');
    remote.dispose();
  });
});

describe('remote chat state', () => {
  it('asyncDispose waits for the running turn, not for a second send refused as busy', async () => {
    const url = await startFault((_req, res) => setTimeout(() => ok(res, 'slow'), 200));
    const chat = connect(url).createChat();
    const first = chat.send('a');
    await expect(chat.send('b')).rejects.toMatchObject({ code: 'CHAT_BUSY' });
    await chat[Symbol.asyncDispose]();
    expect(chat.busy).toBe(false);
    await first.catch(() => {});
  });

  it('a failed turn leaves the memory as it was; telemetry gets onTurn and onError; onToken errors propagate', async () => {
    let fail = false;
    const url = await startFault((_req, res) => (fail ? status(res, 500) : ok(res, 'fine')));
    const turns: number[] = [];
    const errors: unknown[] = [];
    const chat = connect(url, { retry: { retries: 0, minDelayMs: 1, maxDelayMs: 1 } }).createChat({
      maxTokens: 40,
      telemetry: { onTurn: (e) => void turns.push(e.stats.retainedTokens), onError: (e) => void errors.push(e) },
    });
    await chat.send('x'.repeat(40));
    const before = chat.memory();
    expect(before.map((m) => m.role)).toEqual(['user', 'assistant']);
    fail = true;
    await expect(chat.send('y'.repeat(40))).rejects.toBeInstanceOf(RemoteHttpError); // its eviction is undone
    expect(chat.memory()).toEqual(before);
    expect(chat.stats().turns).toBe(1);
    await new Promise((r) => setImmediate(r));
    expect(turns).toEqual([before.reduce((n, m) => n + m.tokens, 0)]);
    expect(errors).toHaveLength(1);
    expect(errors[0]).toBeInstanceOf(RemoteHttpError);
    await expect(chat.send('z'.repeat(200))).rejects.toMatchObject({ code: 'PROMPT_TOO_LARGE' });
    chat.dispose();
    await expect(chat.send('hi')).rejects.toMatchObject({ code: 'DISPOSED' });
  });

  it('an onToken that throws keeps the turn and rejects with CallbackError, as a local chat (not retried, circuit untouched)', async () => {
    const url = await startFault((_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write(`data: ${JSON.stringify({ choices: [{ index: 0, delta: { content: 'a' }, finish_reason: null }] })}\n\n`);
      res.end(`data: ${JSON.stringify({ choices: [{ index: 0, delta: {}, finish_reason: 'stop' }] })}\n\ndata: [DONE]\n\n`);
    });
    const remote = connect(url, { circuit: { failureThreshold: 1, cooldownMs: 60_000 } });
    const chat = remote.createChat();
    const boom = new Error('boom');
    const err = await chat.send('hi', { onToken: () => { throw boom; } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CallbackError);
    expect(err).toMatchObject({ code: 'CALLBACK_FAILED', cause: boom, result: { response: 'a', stopReason: 'abort' } });
    expect(hits).toBe(1);
    // Kept: memory, stats and transcript agree.
    expect(chat.stats().turns).toBe(1);
    expect(chat.exportTranscript().messages).toEqual([{ role: 'user', content: 'hi' }, { role: 'assistant', content: 'a' }]);
    const r = await chat.send('hi', { onToken: () => {} });
    expect(r.response).toBe('a');
    expect(r.stopReason).toBe('eos');
    remote.dispose();
  });
});
