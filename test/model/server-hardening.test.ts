// The server under hostile or unlucky traffic: slow clients and shutdown, unbounded or abandoned
// history imports, disk caps for stored sessions, sessions that cannot be restored, session ids that
// are not Latin-1 or come twice.
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { request } from 'node:http';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type ChatOptions, type Model } from '../../src/index.ts';
import { createServer, type FiniteMemoryServer, type ServerOptions } from '../../src/server/index.ts';
import { testDir, testModelPath, THREADS } from '../helpers.ts';
import { freePort, startServe } from '../services.ts';

const CHAT: ChatOptions = { maxTokens: 128, windowSize: 32, threads: THREADS };

let model: Model;
beforeAll(async () => {
  model = await loadModel(testModelPath(), { threads: THREADS });
});
afterAll(() => model?.dispose());

const running: FiniteMemoryServer[] = [];
afterEach(async () => {
  await Promise.all(running.splice(0).map((s) => s.close({ abortAfterMs: 100 })));
});

async function start(options: ServerOptions = {}) {
  const server = await createServer(model, { chat: CHAT, ...options });
  running.push(server);
  const url = await server.listen({ port: 0, host: '127.0.0.1' });
  return { server, url, port: Number(new URL(url).port) };
}

interface Reply {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: { error?: { code: string; message: string }; finite_memory?: { session_id: string; session_reset: string | null; restored: boolean; restored_from: string | null; persisted: boolean | null; messages_seen: number; chat: { turns: number } } };
  text: string;
}

/** A POST with node:http, so headers can repeat (fetch's Headers would join them). */
function post(port: number, body: unknown, headers: Record<string, string | string[]> = {}, signal?: AbortSignal): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = request({ port, host: '127.0.0.1', method: 'POST', path: '/v1/chat/completions', headers: { 'content-type': 'application/json', ...headers }, ...(signal ? { signal } : {}) }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => {
        let json: Reply['body'] = {};
        try {
          json = JSON.parse(text) as Reply['body'];
        } catch {
          // SSE or empty
        }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: json, text });
      });
    });
    req.on('error', reject);
    // As bytes: with a string, Node writes the headers in the body's encoding (UTF-8), not as Latin-1.
    req.end(Buffer.from(JSON.stringify(body)));
  });
}

const user = (content: string) => ({ role: 'user', content });

/** Opens a raw connection that sends `data` and then nothing; resolves with when it was closed. */
function stall(port: number, data: string): { socket: Socket; closed: Promise<number> } {
  const t0 = performance.now();
  const socket = connect(port, '127.0.0.1', () => data && socket.write(data));
  socket.on('error', () => {});
  socket.resume(); // read what the server answers (a 408), or 'close' never comes
  const closed = new Promise<number>((resolve) => socket.on('close', () => resolve(performance.now() - t0)));
  return { socket, closed };
}

const PARTIAL_BODY = 'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"messages":';
const PARTIAL_HEADERS = 'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n';

describe('slow clients and shutdown', () => {
  it('closes connections whose headers or body never complete, and keeps serving', async () => {
    const { port } = await start({ headersTimeoutMs: 300, requestTimeoutMs: 600, keepAliveTimeoutMs: 300 });
    const stalled = [
      ...Array.from({ length: 20 }, () => stall(port, PARTIAL_BODY)),
      ...Array.from({ length: 2 }, () => stall(port, PARTIAL_HEADERS)),
      stall(port, ''),
    ];
    const times = await Promise.all(stalled.map((s) => s.closed));
    expect(Math.max(...times)).toBeLessThan(3000);
    const ok = await post(port, { messages: [user('still serving?')], max_tokens: 2 });
    expect(ok.status).toBe(200);
  });

  it('close() with a deadline ends within it although stalled connections stay open', async () => {
    const { server, port } = await start({ headersTimeoutMs: 60_000, requestTimeoutMs: 60_000 });
    const stalled = Array.from({ length: 5 }, () => stall(port, PARTIAL_BODY));
    await new Promise((r) => setTimeout(r, 100));
    const t0 = performance.now();
    await server.close({ abortAfterMs: 500 });
    expect(performance.now() - t0).toBeLessThan(2500);
    await Promise.all(stalled.map((s) => s.closed));
  });

  it('at the deadline, queued clients get their 503 and a streaming client an error event and its closing [DONE]', async () => {
    const { server, url, port } = await start({ maxConcurrent: 1, maxTokensPerRequest: 4096 });
    const streaming = post(port, { messages: [user('tell a long story')], max_tokens: 4096, stream: true, ignore_eos: true });
    await new Promise((r) => setTimeout(r, 50));
    const queued = Array.from({ length: 3 }, (_, i) => post(port, { messages: [user(`queued ${i}`)], max_tokens: 2 }));
    // In the queue before the shutdown begins (a fixed wait lost a request to the closing socket
    // once, under a full test run's load: ECONNRESET).
    await expect.poll(async () => ((await (await fetch(`${url}/health`)).json()) as { queued: number }).queued, { timeout: 5000, interval: 10 }).toBe(3);
    await server.close({ abortAfterMs: 50 });
    for (const q of await Promise.all(queued)) {
      expect(q.status).toBe(503);
      expect(q.body.error?.code).toBe('server_shutting_down');
    }
    const s = await streaming;
    expect(s.status).toBe(200);
    expect(s.text).toMatch(/data: \{"error":\{"message":"The server is shutting down","type":"server_error","param":null,"code":"server_shutting_down"\}\}/);
    expect(s.text.trimEnd().endsWith('data: [DONE]')).toBe(true);
  });

  it('a request that arrives while the server shuts down (on a connection busy with a turn) gets the server\'s 503', async () => {
    const { server, port } = await start({ maxTokensPerRequest: 4096 });
    const body = (content: string, max: number) => JSON.stringify({ messages: [user(content)], max_tokens: max, ignore_eos: true });
    const req = (b: string) => `POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(b)}\r\n\r\n${b}`;
    const socket = connect(port, '127.0.0.1');
    let text = '';
    socket.on('data', (d: Buffer) => (text += d.toString()));
    const ended = new Promise<void>((r) => socket.on('close', () => r()));
    socket.write(req(body('a long one', 4000)));
    await new Promise((r) => setTimeout(r, 100));
    const closing = server.close();
    await new Promise((r) => setTimeout(r, 20));
    socket.write(req(body('the second', 2)));   // on the busy connection, after the shutdown began
    await closing;
    await ended;
    const statuses = [...text.matchAll(/HTTP\/1\.1 (\d+)/g)].map((m) => m[1]);
    expect(statuses).toEqual(['200', '503']);
    expect(text).toContain('"code":"server_shutting_down"');
  });

  it('at the deadline, a non-streamed answer cut short is a 503, not a 200 passing a truncated answer off as whole', async () => {
    const { server, port } = await start({ maxTokensPerRequest: 4096 });
    const answering = post(port, { messages: [user('tell a long story')], max_tokens: 4096, ignore_eos: true }, { 'x-session-id': 'cut' });
    await new Promise((r) => setTimeout(r, 150));
    await server.close({ abortAfterMs: 50 });
    const r = await answering;
    expect(r.status).toBe(503);
    expect(r.body.error?.code).toBe('server_shutting_down');
    expect(r.body.error?.message).toMatch(/kept in the session/);
  });

  it('`serve` exits on SIGTERM within --shutdown-timeout-ms while slow clients hold connections', async () => {
    const cli = join(import.meta.dirname, '..', '..', 'src', 'cli.ts');
    const child = spawn(process.execPath, ['--import', 'tsx', cli, 'serve', '--model', testModelPath(), '--port', '0', '--max-tokens', '64', '--threads', '1', '--shutdown-timeout-ms', '1000', '--quiet'], { stdio: ['ignore', 'ignore', 'pipe'] });
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const port = await new Promise<number>((resolve, reject) => {
      let err = '';
      child.stderr.on('data', (d: Buffer) => {
        err += d.toString();
        const m = /http:\/\/127\.0\.0\.1:(\d+)/.exec(err);
        if (m) resolve(Number(m[1]));
      });
      void exited.then(() => reject(new Error(`serve exited early: ${err}`)));
    });
    const stalled = [...Array.from({ length: 5 }, () => stall(port, PARTIAL_BODY)), stall(port, PARTIAL_HEADERS)];
    await new Promise((r) => setTimeout(r, 200));
    const t0 = performance.now();
    child.kill('SIGTERM');
    expect(await exited).toBe(0);
    expect(performance.now() - t0).toBeLessThan(5000);
    await Promise.all(stalled.map((s) => s.closed));
  });
});

describe('history of new sessions and one-off requests', () => {
  const history = (n: number) => Array.from({ length: n }, (_, i) => [user(`question ${i} about the river and the long road`), { role: 'assistant', content: `answer ${i} about the river` }]).flat();

  it('refuses more history than maxHistoryTokens with a typed 400, before prefilling any of it', async () => {
    const { port, server } = await start({ maxHistoryTokens: 60 });
    for (const extra of [{}, { user: 'new-session' }]) {
      const t0 = performance.now();
      const r = await post(port, { messages: [...history(20), user('and now?')], max_tokens: 2, ...extra });
      expect(r.status).toBe(400);
      expect(r.body.error?.code).toBe('history_too_large');
      expect(performance.now() - t0).toBeLessThan(2000);
    }
    expect(server.sessions()).toEqual({ live: 0, stored: 0 });
    const within = await post(port, { messages: [...history(1), user('and now?')], max_tokens: 2 });
    expect(within.status).toBe(200);
  });

  it('counts the template tokens around each message: many empty messages are refused too', async () => {
    // Each message is prefilled as an exchange framed by the template, even an empty one: 400 empty
    // messages hold no text but hundreds of template tokens.
    const { port, server } = await start({ maxHistoryTokens: 60 });
    const t0 = performance.now();
    const r = await post(port, { messages: [...Array.from({ length: 200 }, () => [user(''), { role: 'assistant', content: '' }]).flat(), user('and now?')], max_tokens: 2 });
    expect(r.status).toBe(400);
    expect(r.body.error?.code).toBe('history_too_large');
    // Empty user messages in a row before the last are its turn, one message: too large for the budget.
    const joined = await post(port, { messages: [...Array.from({ length: 400 }, () => user('')), user('and now?')], max_tokens: 2 });
    expect(joined.status).toBe(400);
    expect(joined.body.error?.code).toBe('context_length_exceeded');
    expect(performance.now() - t0).toBeLessThan(2000);
    expect(server.sessions()).toEqual({ live: 0, stored: 0 });
  });

  it('aborts an import when the client leaves and frees its decode slot at once', async () => {
    // Every decode takes 20 ms and batches are 4 tokens: importing this history takes seconds.
    const { url, port } = await start({ chat: { ...CHAT, batchSize: 4, testTokenDelayMs: 20 }, maxConcurrent: 1 });
    const ac = new AbortController();
    const gone = post(port, { messages: [...history(6), user('and now?')], max_tokens: 2 }, {}, ac.signal).catch(() => undefined);
    const busy = async () => ((await (await fetch(`${url}/health`)).json()) as { decoding: number }).decoding;
    await expect.poll(busy, { timeout: 2000, interval: 20 }).toBe(1); // the import holds the only slot
    ac.abort();
    await gone;
    const t0 = performance.now();
    await expect.poll(busy, { timeout: 3000, interval: 20 }).toBe(0);
    expect(performance.now() - t0).toBeLessThan(1000);
  });
});

describe('stored sessions', () => {
  let dirs = 0;
  const freshDir = () => {
    const d = join(testDir, `hardening-sessions-${dirs++}`);
    mkdirSync(d, { recursive: true });
    return d;
  };
  const checkpoints = (dir: string, ext = '.session') => readdirSync(dir).filter((f) => f.endsWith(ext));
  /** Flips a byte in the middle of the checkpoint a session file holds (after its header). */
  const corrupt = (path: string) => {
    const bytes = readFileSync(path);
    const body = 8 + bytes.readUInt32LE(4);
    bytes[body + Math.floor((bytes.length - body) / 2)]! ^= 0xff;
    writeFileSync(path, bytes);
  };

  it('keeps at most maxStoredSessions checkpoints on disk, dropping the least recently used', async () => {
    const dir = freshDir();
    const { server, port } = await start({ maxSessions: 1, maxStoredSessions: 2, checkpointDir: dir });
    for (const id of ['s1', 's2', 's3', 's4', 's5']) {
      expect((await post(port, { messages: [user(`hello from ${id}`)], user: id, max_tokens: 2 })).status).toBe(200);
    }
    await new Promise((r) => setTimeout(r, 100)); // the LRU checkpoint of the last request runs after it
    expect(server.sessions()).toEqual({ live: 1, stored: 2 });
    expect(checkpoints(dir)).toHaveLength(2);
    // s4 was kept: it is restored; s1 was dropped: it starts over.
    const s4 = await post(port, { messages: [user('again')], user: 's4', max_tokens: 2 });
    expect(s4.body.finite_memory).toMatchObject({ restored: true, chat: { turns: 2 } });
    const s1 = await post(port, { messages: [user('again')], user: 's1', max_tokens: 2 });
    expect(s1.body.finite_memory).toMatchObject({ restored: false, chat: { turns: 1 } });
  });

  it('keeps at most maxStoredBytes of checkpoints (the session just written stays)', async () => {
    const dir = freshDir();
    const { server, port } = await start({ maxSessions: 1, maxStoredBytes: 1, checkpointDir: dir });
    for (const id of ['b1', 'b2', 'b3']) await post(port, { messages: [user('hi')], user: id, max_tokens: 2 });
    await new Promise((r) => setTimeout(r, 100));
    expect(server.sessions().stored).toBe(1);
    expect(checkpoints(dir)).toHaveLength(1);
  });

  it('one server per checkpoint dir: a second is refused while the first runs, and takes over a lock its owner left behind', async () => {
    const dir = freshDir();
    const first = await start({ checkpointDir: dir });
    await expect(createServer(model, { chat: CHAT, checkpointDir: dir })).rejects.toMatchObject({ code: 'STORE_UNAVAILABLE', message: expect.stringMatching(/in use by another server \(pid \d+/) });
    await first.server.close();
    const second = await start({ checkpointDir: dir });
    await second.server.close();
    // A lock left by a process that is gone (kill -9): its pid is checked on this host.
    const lockFile = readdirSync(dir, { withFileTypes: false }).find((f) => f.includes('lock'));
    expect(lockFile).toBeUndefined();   // close() gave it up
    const gone = spawn(process.execPath, ['-e', '']);
    await new Promise((r) => gone.once('exit', r));
    writeFileSync(join(dir, '.finite-memory-llm.lock'), JSON.stringify({ pid: gone.pid, host: hostname() }));
    const third = await start({ checkpointDir: dir });
    await third.server.close();
    // A pid another process has since: alive, but the lock is no longer touched. And a process that
    // exited but is not reaped yet (a zombie: `sleep 0`, whose parent then execs and never waits).
    const reused = spawn('sleep', ['30']);
    const zombieParent = spawn('sh', ['-c', 'sleep 0 & echo $!; exec sleep 30']);
    const zombie = Number(await new Promise<string>((r) => zombieParent.stdout.once('data', (d: Buffer) => r(d.toString()))));
    await new Promise((r) => setTimeout(r, 200));
    try {
      writeFileSync(join(dir, '.finite-memory-llm.lock'), JSON.stringify({ pid: reused.pid, host: hostname() }));
      await expect(createServer(model, { chat: CHAT, checkpointDir: dir })).rejects.toMatchObject({ message: expect.stringMatching(/in use by another server/) });
      const stale = new Date(Date.now() - 60_000);
      utimesSync(join(dir, '.finite-memory-llm.lock'), stale, stale);
      await (await start({ checkpointDir: dir })).server.close();
      // With its start time (Linux): a live owner keeps the lock untouched (stopped, say), and one whose
      // pid another process took since loses it at once.
      const startOf = (pid: number) => readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ')[19]!;
      writeFileSync(join(dir, '.finite-memory-llm.lock'), JSON.stringify({ pid: reused.pid, host: hostname(), started: startOf(reused.pid!) }));
      utimesSync(join(dir, '.finite-memory-llm.lock'), stale, stale);
      await expect(createServer(model, { chat: CHAT, checkpointDir: dir })).rejects.toMatchObject({ message: expect.stringMatching(/in use by another server/) });
      writeFileSync(join(dir, '.finite-memory-llm.lock'), JSON.stringify({ pid: reused.pid, host: hostname(), started: '1' }));
      await (await start({ checkpointDir: dir })).server.close();
      writeFileSync(join(dir, '.finite-memory-llm.lock'), JSON.stringify({ pid: zombie, host: hostname() }));
      await (await start({ checkpointDir: dir })).server.close();
    } finally {
      reused.kill();
      zombieParent.kill();
    }
    // Another host's lock is trusted while it is touched, and taken over once it is stale.
    const foreign = join(dir, '.finite-memory-llm.lock');
    writeFileSync(foreign, JSON.stringify({ pid: 1, host: 'another-host' }));
    await expect(createServer(model, { chat: CHAT, checkpointDir: dir })).rejects.toMatchObject({ message: expect.stringMatching(/pid 1 on another-host/) });
    const old = new Date(Date.now() - 60_000);
    utimesSync(foreign, old, old);
    const fourth = await start({ checkpointDir: dir });
    await fourth.server.close();
  });

  it('a server whose checkpoint dir lock another server took writes no session after, says so in /health; an rm of the lock is undone', async () => {
    const dir = freshDir();
    const { server, url, port } = await start({ checkpointDir: dir });
    const lock = join(dir, '.finite-memory-llm.lock');
    const ours = readFileSync(lock, 'utf8');
    const health = async () => (await (await fetch(`${url}/health`)).json()) as { status: string; store: { available: boolean } };
    expect((await post(port, { messages: [user('one')], user: 'kept', max_tokens: 2 })).status).toBe(200);
    // Removed (an operator's rm): put back at the next beat.
    rmSync(lock);
    await expect.poll(() => existsSync(lock) && readFileSync(lock, 'utf8') === ours, { timeout: 5000, interval: 50 }).toBe(true);
    expect((await health()).status).toBe('ok');
    // Taken by another host's server (its beats seen as stale over a shared filesystem, say).
    writeFileSync(lock, JSON.stringify({ pid: 1, host: 'another-host' }));
    await expect.poll(async () => (await health()).store.available, { timeout: 5000, interval: 100 }).toBe(false);
    expect((await health()).status).toBe('degraded');
    const stored = readFileSync(join(dir, checkpoints(dir)[0]!));
    // The live session goes on from memory, unwritten; a session not in memory cannot be served.
    const again = await post(port, { messages: [user('two')], user: 'kept', max_tokens: 2 });
    expect(again.status).toBe(200);
    expect(again.body.finite_memory?.persisted).toBe(false);
    expect(readFileSync(join(dir, checkpoints(dir)[0]!)).equals(stored)).toBe(true);
    const other = await post(port, { messages: [user('hello')], user: 'new-one', max_tokens: 2 });
    expect(other.status).toBe(503);
    expect(other.body.error?.code).toBe('session_store_unavailable');
    expect(checkpoints(dir)).toHaveLength(1);
    await server.close();
    expect(readFileSync(lock, 'utf8')).toContain('another-host');   // the other server's: left alone
  });

  it('a session whose checkpoint cannot be restored starts fresh and says so; no path leaks', async () => {
    const dir = freshDir();
    const first = await start({ checkpointDir: dir });
    await post(first.port, { messages: [user('remember me')], user: 'broken', max_tokens: 2 });
    await first.server.close();
    for (const f of [...checkpoints(dir), ...checkpoints(dir, '.full')]) corrupt(join(dir, f));

    const { port } = await start({ checkpointDir: dir });
    const r = await post(port, { messages: [user('are you there?')], user: 'broken', max_tokens: 2 });
    expect(r.status).toBe(200);
    expect(r.headers['x-session-reset']).toBe('restore_failed');
    expect(r.body.finite_memory).toMatchObject({ session_reset: 'restore_failed', restored: false, chat: { turns: 1 } });
    expect(r.text).not.toContain(dir);
    const next = await post(port, { messages: [user('and again')], user: 'broken', max_tokens: 2 });
    expect(next.headers['x-session-reset']).toBeUndefined();
    expect(next.body.finite_memory).toMatchObject({ session_reset: null, chat: { turns: 2 } });
  });

  it('a session file damaged in its header (not a session file any more) starts fresh and says so, not a 500', async () => {
    const dir = freshDir();
    const first = await start({ checkpointDir: dir });
    await post(first.port, { messages: [user('remember me')], user: 'mangled', max_tokens: 2 });
    const [file] = checkpoints(dir);
    const bytes = readFileSync(join(dir, file!));
    bytes.write('XXXX', 0);   // the magic
    writeFileSync(join(dir, file!), bytes);
    await first.server.close();
    writeFileSync(join(dir, file!), bytes);   // close() wrote it back: damage it again
    const { port } = await start({ checkpointDir: dir });
    const r = await post(port, { messages: [user('are you there?')], user: 'mangled', max_tokens: 2 });
    expect(r.status).toBe(200);
    expect(r.headers['x-session-reset']).toBe('restore_failed');
  });

  it('kill -9 of `serve --checkpoint-dir` loses no turn: the restarted server continues from the per-turn ledger', async () => {
    const dir = freshDir();
    const port = await freePort();
    const args = ['--model', testModelPath(), '--checkpoint-dir', dir, '--max-tokens', '64'];
    const first = await startServe(port, args);
    let last;
    for (const m of ['one', 'two', 'three']) last = await post(port, { messages: [user(m)], max_tokens: 2 }, { 'x-session-id': 'crash' });
    expect(last!.body.finite_memory).toMatchObject({ persisted: true, chat: { turns: 3 } });
    await first.kill9();
    const second = await startServe(port, args);
    try {
      const r = await post(port, { messages: [user('four')], max_tokens: 2 }, { 'x-session-id': 'crash' });
      expect(r.status).toBe(200);
      expect(r.body.finite_memory).toMatchObject({ restored: true, restored_from: 'ledger', session_reset: null, messages_seen: 8, chat: { turns: 4 } });
    } finally {
      await second.kill9();
    }
  });

  it('a full checkpoint that is corrupt or of a newer format falls back to the ledger of the same turn', async () => {
    for (const damage of ['corrupt', 'newer'] as const) {
      const dir = freshDir();
      const first = await start({ checkpointDir: dir });
      for (const m of ['one', 'two', 'three']) await post(first.port, { messages: [user(m)], user: 'fallback', max_tokens: 2 });
      await first.server.close();
      const [full] = checkpoints(dir, '.full');
      if (damage === 'corrupt') corrupt(join(dir, full!));
      else {
        // The checkpoint's format version (after its 8-byte magic), as a later release would write it.
        const bytes = readFileSync(join(dir, full!));
        bytes.writeUInt32LE(99, 8 + bytes.readUInt32LE(4) + 8);
        writeFileSync(join(dir, full!), bytes);
      }
      const { port } = await start({ checkpointDir: dir });
      const r = await post(port, { messages: [user('four')], user: 'fallback', max_tokens: 2 });
      expect(r.status).toBe(200);
      expect(r.headers['x-session-reset']).toBeUndefined();
      expect(r.body.finite_memory).toMatchObject({ restored: true, restored_from: 'ledger', session_reset: null, chat: { turns: 4 } });
    }
  });
});

describe('host names (DNS rebinding)', () => {
  it('without an API key, a request naming the server by another host name is refused; IPs, localhost and allowedHosts pass', async () => {
    const { port } = await start({ allowedHosts: ['models.internal'] });
    const ask = (host: string) => post(port, { messages: [user('hi')], max_tokens: 2 }, { host });
    const evil = await ask(`attacker.example:${port}`);
    expect(evil.status).toBe(403);
    expect(evil.body.error?.code).toBe('forbidden_host');
    for (const host of [`127.0.0.1:${port}`, `localhost:${port}`, `localhost.:${port}`, `[::1]:${port}`, 'models.internal', `MODELS.internal:${port}`]) {
      expect((await ask(host)).status, host).toBe(200);
    }
    const health = await new Promise<number>((resolve, reject) => {
      request({ port, host: '127.0.0.1', path: '/health?probe=1', headers: { host: 'attacker.example' } }, (res) => { res.resume(); resolve(res.statusCode ?? 0); }).on('error', reject).end();
    });
    expect(health).toBe(200);
  });

  it('with an API key any host name passes to the key check', async () => {
    const { port } = await start({ apiKey: 'k' });
    const r = await post(port, { messages: [user('hi')], max_tokens: 2 }, { host: 'anything.example', authorization: 'Bearer k' });
    expect(r.status).toBe(200);
    await expect(createServer(model, { chat: CHAT, allowedHosts: ['a b'] })).rejects.toMatchObject({ code: 'INVALID_OPTION' });
  });
});

describe('session ids', () => {
  it('accepts ids outside Latin-1 and echoes them percent-encoded, also when streaming', async () => {
    const { port } = await start();
    const r = await post(port, { messages: [user('hi')], user: '日本', max_tokens: 2 });
    expect(r.status).toBe(200);
    expect(r.headers['x-session-id']).toBe(encodeURIComponent('日本'));
    expect(r.body.finite_memory).toMatchObject({ session_id: '日本', chat: { turns: 1 } });
    const s = await post(port, { messages: [user('hi again')], user: '日本', max_tokens: 2, stream: true });
    expect(s.status).toBe(200);
    expect(s.headers['content-type']).toContain('text/event-stream');
    expect(s.headers['x-session-id']).toBe(encodeURIComponent('日本'));
    expect(s.text).toContain('"turns":2');
    expect(s.text.trim().endsWith('data: [DONE]')).toBe(true);
    const plain = await post(port, { messages: [user('hi')], user: 'user-42_a.b', max_tokens: 2 });
    expect(plain.headers['x-session-id']).toBe('user-42_a.b');
  });

  it('reads an X-Session-Id sent as UTF-8 as the same id as in `user` (and one sent as Latin-1 too)', async () => {
    const { port } = await start();
    const utf8 = (id: string) => Buffer.from(id, 'utf8').toString('latin1');   // the header's bytes, as Node sends a string's
    for (const [id, header] of [['€uro', utf8('€uro')], ['café', utf8('café')], ['café', 'café']] as const) {
      const r = await post(port, { messages: [user('hi')], max_tokens: 2 }, { 'x-session-id': header });
      expect(r.status, id).toBe(200);
      expect(r.body.finite_memory!.session_id).toBe(id);
      expect(r.headers['x-session-id']).toBe(encodeURIComponent(id));
    }
    const again = await post(port, { messages: [user('hi')], user: 'café', max_tokens: 2 });
    expect(again.body.finite_memory!.chat.turns).toBe(3);
  });

  it('refuses control characters and unpaired surrogates before any turn runs', async () => {
    const { port, server } = await start();
    for (const id of ['a\nb', 'nul\u0000', 'tab\there', '\ud800']) {
      const r = await post(port, { messages: [user('hi')], user: id, max_tokens: 2 });
      expect(r.status).toBe(400);
      expect(r.body.error?.code).toBe('invalid_session_id');
    }
    expect(server.sessions()).toEqual({ live: 0, stored: 0 });
  });

  it('refuses two X-Session-Id headers', async () => {
    const { port, server } = await start();
    const r = await post(port, { messages: [user('hi')], max_tokens: 2 }, { 'x-session-id': ['h1', 'h2'] });
    expect(r.status).toBe(400);
    expect(r.body.error?.code).toBe('duplicate_session_id');
    expect(server.sessions()).toEqual({ live: 0, stored: 0 });
  });
});
