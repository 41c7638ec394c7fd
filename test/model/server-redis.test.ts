// Sessions that outlive a process and move between instances: real redis-server, real HAProxy
// (consistent hashing on X-Session-Id), real `serve` processes killed with SIGKILL. Skipped with a
// message when the Debian packages are missing; under CI=true they must be there.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createClient, RESP_TYPES } from 'redis';
import { connect, createServer as createNetServer, type Socket } from 'node:net';
import { loadModel, readCheckpointMessages, type Model } from '../../src/index.ts';
import { createServer, type ServerOptions } from '../../src/server/index.ts';
import { sessionKey } from '../../src/server/wire.ts';
import { RedisBackend } from '../../src/server/store/redis.ts';
import { StaleWriteError } from '../../src/server/store/backend.ts';
import { testModelPath, THREADS } from '../helpers.ts';
import { freePort, requireBinary, startHaproxy, startRedis, startRedisTls, startServe, type Service } from '../services.ts';

const redisBin = requireBinary('redis-server', 'redis-server');
const haproxyBin = requireBinary('haproxy', 'haproxy');
const run = redisBin !== undefined && haproxyBin !== undefined;

interface Reply {
  status: number;
  headers: Headers;
  text: string;
  body: {
    error?: { code: string };
    finite_memory: {
      instance: string; restored: boolean; restored_from: string | null; session_reset: string | null; persisted: boolean | null; messages_seen: number;
      turn: { promptTokens: number; generatedTokens: number };
      chat: { turns: number; tokensSeen: number; tokensRetained: number; tokensEvicted: number };
    };
  };
}

async function post(port: number, session: string, content: string, extra: Record<string, unknown> = {}): Promise<Reply> {
  const r = await fetch(`http://127.0.0.1:${port}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-session-id': session },
    body: JSON.stringify({ messages: [{ role: 'user', content }], max_tokens: 6, temperature: 0, ...extra }),
  });
  const text = await r.text();
  let body: Reply['body'];
  try {
    body = JSON.parse(text) as Reply['body'];
  } catch {
    body = {} as Reply['body'];
  }
  return { status: r.status, headers: r.headers, text, body };
}

const health = async (port: number) => (await (await fetch(`http://127.0.0.1:${port}/health`)).json()) as { status: string; store: { available: boolean; pendingWrites: number } };

async function until(what: string, fn: () => Promise<boolean>, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await fn())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe.skipIf(!run)('sessions across instances (Redis, HAProxy)', () => {
  const modelPath = testModelPath();
  const CHAT = ['--model', modelPath, '--max-tokens', '96', '--lease-ms', '1500', '--lease-wait-ms', '4000', '--snapshot-idle-ms', '0'];
  let redis: Awaited<ReturnType<typeof startRedis>>;
  let lb: Service;
  const instances: Service[] = [];
  const ports: number[] = [];
  const byId = new Map<string, number>(); // instance id -> index

  const startInstance = async (i: number) => {
    instances[i] = await startServe(ports[i]!, [...CHAT, '--store', redis.url, '--instance-id', `i${i}`]);
    byId.set(`i${i}`, i);
  };

  beforeAll(async () => {
    redis = await startRedis(redisBin!);
    ports.push(await freePort(), await freePort());
    await Promise.all([startInstance(0), startInstance(1)]);
    lb = await startHaproxy(haproxyBin!, ports);
  });
  afterAll(async () => {
    await lb?.kill9();
    await Promise.all(instances.map((s) => s?.kill9()));
    await redis?.kill9();
  });
  /** Both instances up again (a test may have killed one) and HAProxy seeing them. */
  afterEach(async () => {
    for (let i = 0; i < 2; i++) if (instances[i]!.process.exitCode !== null || instances[i]!.process.signalCode !== null) await startInstance(i);
    await new Promise((r) => setTimeout(r, 500));
  });

  it('kill -9 of the instance between turns: the next turn continues on the other one with the same memory', async () => {
    let last: Reply | undefined;
    for (const m of ['my name is Ada', 'I live by the river', 'my cat is called Pip']) {
      last = await post(lb.port, 'failover', m);
      expect(last.status).toBe(200);
      expect(last.body.finite_memory.persisted).toBe(true);
    }
    const served = last!.body.finite_memory.instance;
    await instances[byId.get(served)!]!.kill9();
    const next = await post(lb.port, 'failover', 'what is my name?');
    expect(next.status).toBe(200);
    const fm = next.body.finite_memory;
    expect(fm.instance).not.toBe(served);
    expect(fm).toMatchObject({ restored: true, restored_from: 'ledger', session_reset: null, messages_seen: 8 });
    // The conversation goes on: the turn count, and every token seen before plus this turn's (its last
    // sampled token enters the memory with the next turn, as in a chat that never moved).
    const before = last!.body.finite_memory.chat;
    expect(fm.chat.turns).toBe(before.turns + 1);
    expect(fm.chat.tokensSeen).toBe(before.tokensSeen + fm.turn.promptTokens + fm.turn.generatedTokens - 1);
    expect(fm.chat.tokensEvicted).toBeGreaterThanOrEqual(before.tokensEvicted);
  });

  it('kill -9 mid-turn: that turn fails for its client, the earlier turns are kept, and the retry succeeds elsewhere', async () => {
    let last: Reply | undefined;
    for (const m of ['first', 'second']) last = await post(lb.port, 'midturn', m);
    const served = last!.body.finite_memory.instance;
    const res = await fetch(`http://127.0.0.1:${lb.port}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-session-id': 'midturn' },
      body: JSON.stringify({ messages: [{ role: 'user', content: 'a long story please' }], max_tokens: 100_000, stream: true, ignore_eos: true }),
    }).catch((err: Error) => err);
    // The stream is running (its first bytes came): kill the instance under it.
    expect(res).toBeInstanceOf(Response);
    const reader = (res as Response).body!.getReader();
    await reader.read();
    await instances[byId.get(served)!]!.kill9();
    let failed = false;
    let text = '';
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        text += Buffer.from(value).toString();
      }
    } catch {
      failed = true;
    }
    expect(failed || !text.includes('data: [DONE]')).toBe(true);
    // The dead instance's lease expires (1.5 s), within the other instance's wait (4 s).
    const retry = await post(lb.port, 'midturn', 'a long story please');
    expect(retry.status).toBe(200);
    expect(retry.body.finite_memory).toMatchObject({ restored: true, restored_from: 'ledger' });
    expect(retry.body.finite_memory.instance).not.toBe(served);
    expect(retry.body.finite_memory.chat.turns).toBe(last!.body.finite_memory.chat.turns + 1);
  });

  it('SIGTERM writes every live session\'s full checkpoint: after a rolling restart the next turn needs no prefill', async () => {
    let last: Reply | undefined;
    for (const m of ['alpha', 'beta', 'gamma']) last = await post(lb.port, 'rolling', m);
    const served = byId.get(last!.body.finite_memory.instance)!;
    expect(await instances[served]!.terminate()).toBe(0);
    const next = await post(lb.port, 'rolling', 'delta');
    expect(next.status).toBe(200);
    expect(next.body.finite_memory).toMatchObject({ restored: true, restored_from: 'full', session_reset: null });
    expect(next.body.finite_memory.chat.turns).toBe(4);
  });

  it('Redis stopped: live sessions answer from memory, /health is degraded, nothing crashes; back, the store catches up', async () => {
    let last: Reply | undefined;
    for (const m of ['one', 'two']) last = await post(lb.port, 'outage', m);
    const served = byId.get(last!.body.finite_memory.instance)!;
    const direct = ports[served]!;
    const other = ports[1 - served]!;
    await redis.kill9();
    const during = await post(direct, 'outage', 'three');
    expect(during.status).toBe(200);
    expect(during.body.finite_memory).toMatchObject({ persisted: false });
    expect(during.body.finite_memory.chat.turns).toBe(3);
    expect((await health(direct)).status).toBe('degraded');
    // A session that is not in memory here cannot be restored now: 503, not a silent restart.
    const cold = await post(other, 'outage', 'hello?');
    expect(cold.status).toBe(503);
    expect(cold.body.error?.code).toBe('session_store_unavailable');
    expect(cold.headers.get('retry-after')).toBe('1');
    // Redis back (same port, same append-only file): the pending turn is written by itself.
    redis = await startRedis(redisBin!, redis.port, redis.dir);
    await until('the store to catch up', async () => (await health(direct)).status === 'ok');
    await instances[served]!.kill9();
    const after = await post(other, 'outage', 'four');
    expect(after.status).toBe(200);
    expect(after.body.finite_memory).toMatchObject({ restored: true });
    expect(after.body.finite_memory.chat.turns).toBe(4);
  });
});

describe.skipIf(!redisBin)('the Redis store (one process)', () => {
  let redis: Awaited<ReturnType<typeof startRedis>>;
  let model: Model;
  beforeAll(async () => {
    redis = await startRedis(redisBin!);
    model = await loadModel(testModelPath(), { threads: THREADS });
  });
  afterAll(async () => {
    model?.dispose();
    await redis?.kill9();
  });
  const log = { warn() {}, info() {} };
  /** A server on `m` listening on a free port. */
  const up = async (m: Model, options: ServerOptions) => {
    const server = await createServer(m, options);
    const port = await freePort();
    await server.listen({ port });
    return { server, port };
  };
  const limits = { maxStoredSessions: 100, maxStoredBytes: 1 << 30, sessionTtlMs: 0 };

  it('fencing: a write with a lost lease or an older version is refused', async () => {
    const a = await RedisBackend.open({ url: redis.url, namespace: 'fence', limits, log });
    const b = await RedisBackend.open({ url: redis.url, namespace: 'fence', limits, log });
    const ledger = new Uint8Array([1, 2, 3]);
    const w = (version: number) => ({ id: 's', version, messagesSeen: 0, lastUsed: Date.now(), ledger });
    const first = await a.acquire('k', 100);
    if (!('token' in first)) throw new Error('expected the lease');
    expect(await b.acquire('k', 100)).toMatchObject({ heldMs: expect.any(Number) });
    await new Promise((r) => setTimeout(r, 150)); // a stalls past its lease
    const second = await b.acquire('k', 5000);
    if (!('token' in second)) throw new Error('expected the lease');
    expect(second.token).toBeGreaterThan(first.token);
    await b.writeLedger('k', second.token, w(1));
    await expect(a.writeLedger('k', first.token, w(2))).rejects.toEqual(new StaleWriteError('lease'));
    await expect(b.writeLedger('k', second.token, w(1))).rejects.toEqual(new StaleWriteError('version'));
    await expect(b.writeFull('k', second.token, 2, ledger)).rejects.toEqual(new StaleWriteError('version'));
    await b.writeFull('k', second.token, 1, new Uint8Array([9]));
    expect(await b.read('k')).toMatchObject({ id: 's', version: 1, full: Buffer.from([9]) });
    await b.writeLedger('k', second.token, w(2)); // a newer turn: the full of version 1 is no longer offered
    expect((await b.read('k'))?.full).toBeUndefined();
    await a.close();
    await b.close();
  });

  it('a full checkpoint that takes longer than a command\'s timeout to arrive is read whole, on its own connection: other sessions are not held up', async () => {
    // Redis's replies reach this backend at 1 MB/s (a slow link): 3 MB take 3 s, over the 2 s a command may take.
    const RATE = 1_000_000;
    const proxy = createNetServer((client) => {
      const upstream = connect(redis.port, '127.0.0.1');
      client.pipe(upstream);
      const queue: Buffer[] = [];
      let sending = false;
      const pump = () => {
        if (sending) return;
        const next = queue.shift();
        if (!next) return;
        const chunk = next.subarray(0, 16_384);
        if (next.length > chunk.length) queue.unshift(next.subarray(chunk.length));
        sending = true;
        client.write(chunk);
        setTimeout(() => { sending = false; pump(); }, (chunk.length / RATE) * 1000);
      };
      upstream.on('data', (d: Buffer) => { queue.push(d); pump(); });
      for (const s of [client, upstream]) {
        s.on('error', () => {});
        s.on('close', () => { client.destroy(); upstream.destroy(); });
      }
    });
    const proxyPort = await freePort();
    await new Promise<void>((r) => proxy.listen(proxyPort, '127.0.0.1', r));
    const be = await RedisBackend.open({ url: `redis://127.0.0.1:${proxyPort}/0`, namespace: 'bulk', limits, log });
    try {
      const lease = await be.acquire('big', 30_000);
      if (!('token' in lease)) throw new Error('expected the lease');
      await be.writeLedger('big', lease.token, { id: 'big', version: 1, messagesSeen: 0, lastUsed: Date.now(), ledger: new Uint8Array([1, 2, 3]) });
      const full = Buffer.alloc(3_000_000, 7);
      await be.writeFull('big', lease.token, 1, full);
      const t0 = Date.now();
      const reading = be.read('big');
      await new Promise((r) => setTimeout(r, 300));   // the full checkpoint is on its way
      const other = await be.acquire('other', 1000);   // another session's command
      const otherMs = Date.now() - t0;
      const stored = await reading;
      expect(Date.now() - t0).toBeGreaterThan(2_000);
      expect(Buffer.from(stored!.full!).equals(full)).toBe(true);
      expect(other).toMatchObject({ token: expect.any(Number) });
      expect(otherMs).toBeLessThan(1_500);
    } finally {
      await be.close();
      proxy.close();
    }
  });

  it('keys are namespaced by the model and hash the session id; TTL and the caps hold in Redis', async () => {
    const { server, port } = await up(model, { store: redis.url, chat: { maxTokens: 64 }, maxStoredSessions: 2, sessionTtlMs: 60_000 });
    for (const id of ['n1', 'n2', 'n3']) expect((await post(port, id, 'hi')).status).toBe(200);
    const c = createClient({ url: redis.url });
    await c.connect();
    const ns = `fml:{${model.info.fingerprint.slice(0, 16)}}:`;
    const keys = await c.keys(`${ns}s:*`);
    expect(keys).toHaveLength(2);
    expect(keys.join()).not.toMatch(/n1|n2|n3/);
    for (const k of keys) {
      const ttl = await c.pTTL(k);
      expect(ttl).toBeGreaterThan(50_000);
      expect(ttl).toBeLessThanOrEqual(60_000);
    }
    expect(await c.zCard(`${ns}index`)).toBe(2);
    expect(server.sessions().stored).toBe(2);
    await c.close();
    await server.close();
  });

  it('fullSnapshots: false keeps ledgers only in Redis (a restore prefills them)', async () => {
    const opts = { store: redis.url, storeNamespace: 'ledgers', chat: { maxTokens: 64 }, fullSnapshots: false } as const;
    const { server: a, port: pa } = await up(model, opts);
    for (const m of ['one', 'two']) await post(pa, 'lean', m);
    await a.close(); // would write the full checkpoint
    const c = createClient({ url: redis.url });
    await c.connect();
    const key = `fml:{ledgers}:s:${sessionKey('lean')}`;
    expect(Boolean(await c.hExists(key, 'ledger'))).toBe(true);
    expect(Boolean(await c.hExists(key, 'full'))).toBe(false);
    await c.close();
    const { server: b, port: pb } = await up(model, opts);
    expect((await post(pb, 'lean', 'three')).body.finite_memory).toMatchObject({ restored: true, restored_from: 'ledger', chat: { turns: 3 } });
    await b.close();
  });

  it('a partitioned instance\'s turns lose to the line the store kept: it drops its chat instead of overwriting', async () => {
    // A reaches Redis through a proxy the test can cut; B reaches it directly.
    const sockets = new Set<Socket>();
    let open = true;
    const proxy = createNetServer((client) => {
      if (!open) return client.destroy();
      const upstream = connect(redis.port, '127.0.0.1');
      for (const s of [client, upstream]) {
        sockets.add(s);
        s.on('error', () => {});
        s.on('close', () => sockets.delete(s));
      }
      client.pipe(upstream).pipe(client);
    });
    const proxyPort = await freePort();
    await new Promise<void>((r) => proxy.listen(proxyPort, '127.0.0.1', r));
    // A's last lease may never have been released (cut with the partition): it expires within B's wait.
    const opts = { storeNamespace: 'partition', chat: { maxTokens: 64 }, leaseMs: 1000, leaseWaitMs: 3000 } as const;
    const { server: a, port: pa } = await up(model, { ...opts, store: `redis://127.0.0.1:${proxyPort}/0` });
    const { server: b, port: pb } = await up(model, { ...opts, store: redis.url });
    const healthA = async () => ((await (await fetch(`http://127.0.0.1:${pa}/health`)).json()) as { status: string }).status;

    expect((await post(pa, 'split', 'turn one on A')).body.finite_memory.persisted).toBe(true);
    open = false;
    for (const s of sockets) s.destroy();
    await until('A to see the outage', async () => (await healthA()) === 'degraded' || (await post(pa, 'probe-a', 'x')).status === 503);
    for (const m of ['A, partitioned, turn two', 'A, partitioned, turn three']) {
      expect((await post(pa, 'split', m)).body.finite_memory).toMatchObject({ persisted: false });
    }
    const onB = await post(pb, 'split', 'B serves turn two');
    expect(onB.body.finite_memory).toMatchObject({ restored: true, persisted: true, chat: { turns: 2 } });
    open = true;
    await until('A to catch up', async () => (await healthA()) === 'ok');
    // A's line was dropped, not written over B's: its next turn continues B's conversation.
    const next = await post(pa, 'split', 'turn three, back on A');
    expect(next.body.finite_memory).toMatchObject({ restored: true, persisted: true, chat: { turns: 3 } });
    const c = createClient({ url: redis.url });
    await c.connect();
    const ledger = await c.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer }).hGet(`fml:{partition}:s:${sessionKey('split')}`, 'ledger');
    await c.close();
    const said = readCheckpointMessages(ledger!).filter((m) => m.role === 'user').map((m) => m.content);
    expect(said).toEqual(['turn one on A', 'B serves turn two', 'turn three, back on A']);
    await a.close();
    await b.close();
    proxy.close();
  });

  it('Redis that stops answering but keeps its connections (SIGSTOP): turns fail fast, /health says so, close() ends; answering again, it catches up', async () => {
    const frozen = await startRedis(redisBin!);
    try {
      const { server, port } = await up(model, { store: frozen.url, storeNamespace: 'frozen', chat: { maxTokens: 64 } });
      const status = async () => ((await (await fetch(`http://127.0.0.1:${port}/health`)).json()) as { status: string }).status;
      expect((await post(port, 'live', 'hello')).body.finite_memory.persisted).toBe(true);
      frozen.process.kill('SIGSTOP');
      // A session not in memory cannot be restored: 503 after the command timeout, not a hang.
      let t0 = Date.now();
      const cold = await post(port, 'cold', 'hi');
      expect(cold.status).toBe(503);
      expect(cold.body.error?.code).toBe('session_store_unavailable');
      expect(Date.now() - t0).toBeLessThan(8_000);
      // A live one answers from memory, its turn written later.
      t0 = Date.now();
      const live = await post(port, 'live', 'again');
      expect(live.status).toBe(200);
      expect(live.body.finite_memory.persisted).toBe(false);
      expect(Date.now() - t0).toBeLessThan(8_000);
      await until('/health to say the store is gone', async () => (await status()) === 'degraded', 15_000);
      frozen.process.kill('SIGCONT');
      await until('the store to catch up', async () => (await status()) === 'ok', 15_000);
      frozen.process.kill('SIGSTOP');
      t0 = Date.now();
      await server.close();   // writes what it can, within the command timeouts
      expect(Date.now() - t0).toBeLessThan(15_000);
    } finally {
      frozen.process.kill('SIGCONT');
      await frozen.kill9();
    }
  });

  it('a lease that expired under a turn (no other instance took it): the turn is kept and written later, not a 409', async () => {
    const { server, port } = await up(model, { store: redis.url, storeNamespace: 'expired', chat: { maxTokens: 64, testTokenDelayMs: 20 }, leaseMs: 5_000 });
    expect((await post(port, 'lapsed', 'one')).status).toBe(200);
    const c = createClient({ url: redis.url });
    await c.connect();
    const turn = post(port, 'lapsed', 'two', { max_tokens: 20 });
    // The lease key goes as an expiry would take it (Redis unreachable past leaseMs, say).
    const leaseKey = `fml:{expired}:lease:${sessionKey('lapsed')}`;
    await until('the turn to hold its lease', async () => (await c.exists(leaseKey)) === 1, 5_000);
    await c.del(leaseKey);
    const r = await turn;
    expect(r.status).toBe(200);
    expect(r.body.finite_memory).toMatchObject({ persisted: false, chat: { turns: 2 } });
    const stored = async () => readCheckpointMessages((await c.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer }).hGet(`fml:{expired}:s:${sessionKey('lapsed')}`, 'ledger'))!);
    await until('the turn to be written', async () => (await stored()).filter((m) => m.role === 'user').length === 2, 5_000);
    expect((await post(port, 'lapsed', 'three')).body.finite_memory).toMatchObject({ restored: false, persisted: true, chat: { turns: 3 } });
    await c.close();
    await server.close();
  });

  it('a session leased by another instance waits, then gets 409 with Retry-After', async () => {
    const { server, port } = await up(model, { store: redis.url, storeNamespace: 'busy', chat: { maxTokens: 64 }, leaseWaitMs: 300 });
    const other = await RedisBackend.open({ url: redis.url, namespace: 'busy', limits, log });
    expect(await other.acquire(sessionKey('held'), 5_000)).toMatchObject({ token: expect.any(Number) });
    const t0 = Date.now();
    const r = await post(port, 'held', 'hello');
    expect(Date.now() - t0).toBeGreaterThanOrEqual(280);
    expect(r.status).toBe(409);
    expect(r.body.error?.code).toBe('session_busy');
    expect(Number(r.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    // Waiting for that lease when the shutdown's deadline comes: the server is going, not the session busy.
    const { server: going, port: goingPort } = await up(model, { store: redis.url, storeNamespace: 'busy', chat: { maxTokens: 64 }, leaseWaitMs: 10_000 });
    const waiting = post(goingPort, 'held', 'hello');
    await new Promise((res) => setTimeout(res, 200));
    await going.close({ abortAfterMs: 100 });
    const cut = await waiting;
    expect(cut.status).toBe(503);
    expect(cut.body.error?.code).toBe('server_shutting_down');
    await other.close();
    await server.close();
  });

  it('a session stored by another model is rebuilt from its conversation; one of a newer format starts fresh and says so', async () => {
    const other = await loadModel(testModelPath({ seed: 7 }), { threads: THREADS });
    expect(other.info.fingerprint).not.toBe(model.info.fingerprint);
    const { server: a, port: pa } = await up(model, { store: redis.url, storeNamespace: 'upgrade', chat: { maxTokens: 64 } });
    // The session's own system prompt, policy and budget, chosen when it was created.
    await post(pa, 'moved', 'my name is Ada', { messages: [{ role: 'system', content: 'Answer in French.' }, { role: 'user', content: 'my name is Ada' }], finite_memory: { chat: { policy: 'sliding', max_tokens: 48 } } });
    await post(pa, 'moved', 'I like tea');
    await a.close();
    const { server: b, port: pb } = await up(other, { store: redis.url, storeNamespace: 'upgrade', chat: { maxTokens: 64, systemPrompt: 'The server default.' } });
    const r = await post(pb, 'moved', 'what is my name?');
    expect(r.status).toBe(200);
    expect(r.body.finite_memory).toMatchObject({ restored: true, restored_from: 'transcript', session_reset: null });
    expect(r.body.finite_memory.chat.turns).toBe(3);
    const view = (await (await fetch(`http://127.0.0.1:${pb}/v1/sessions/moved/memory`)).json()) as { policy: string; budget: number; tokens: { role: string; text: string }[] };
    expect(view).toMatchObject({ policy: 'sliding', budget: 48 });
    expect(view.tokens.filter((t) => t.role === 'system').map((t) => t.text).join('')).toContain('Answer in French.');
    await b.close();

    // Both checkpoints from a later format: nothing here can read them.
    const c = createClient({ url: redis.url });
    await c.connect();
    const key = `fml:{upgrade}:s:${sessionKey('moved')}`;
    for (const field of ['ledger', 'full']) {
      const v = await c.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer }).hGet(key, field);
      if (!v) continue;
      v.writeUInt32LE(99, 8);
      await c.hSet(key, field, v);
    }
    await c.close();
    const { server: again, port: pc } = await up(other, { store: redis.url, storeNamespace: 'upgrade', chat: { maxTokens: 64 } });
    const fresh = await post(pc, 'moved', 'hello again');
    expect(fresh.status).toBe(200);
    expect(fresh.headers.get('x-session-reset')).toBe('restore_failed');
    expect(fresh.body.finite_memory).toMatchObject({ restored: false, session_reset: 'restore_failed' });
    expect(fresh.body.finite_memory.chat.turns).toBe(1);
    await again.close();
    other.dispose();
  });

  it('connects with a password and over TLS (rediss:// with the server\'s CA); a wrong password is a typed error that does not echo it', async () => {
    const locked = await startRedis(redisBin!, undefined, undefined, ['--requirepass', 's3cret-pw']);
    try {
      const port = locked.port;
      const { server: ok, port: p } = await up(model, { store: `redis://:s3cret-pw@127.0.0.1:${port}/0`, chat: { maxTokens: 64 } });
      expect((await post(p, 'pw', 'hello')).body.finite_memory).toMatchObject({ persisted: true });
      await ok.close();
      const err = await createServer(model, { store: `redis://:wrong-pw@127.0.0.1:${port}/0` }).catch((e: Error) => e);
      expect(err).toMatchObject({ code: 'STORE_UNAVAILABLE' });
      expect((err as Error).message).not.toMatch(/wrong-pw|s3cret-pw/);
    } finally {
      await locked.kill9();
    }
    const tls = await startRedisTls(redisBin!);
    if (!tls) return;
    try {
      const { server: server, port: p } = await up(model, { store: tls.url, storeCa: tls.ca, chat: { maxTokens: 64 } });
      expect((await post(p, 'tls', 'hello')).body.finite_memory).toMatchObject({ persisted: true });
      expect((await post(p, 'tls', 'again')).body.finite_memory.chat.turns).toBe(2);
      await server.close();
      // Without the CA the certificate is not trusted: refused, not downgraded.
      await expect(createServer(model, { store: tls.url })).rejects.toMatchObject({ code: 'STORE_UNAVAILABLE' });
    } finally {
      await tls.kill9();
    }
  });

  it('refuses a store that is not a Redis URL, and one it cannot reach, with typed errors', async () => {
    await expect(createServer(model, { store: 'http://nope' })).rejects.toMatchObject({ code: 'INVALID_OPTION' });
    await expect(createServer(model, { store: `redis://127.0.0.1:${await freePort()}/0` })).rejects.toMatchObject({ code: 'STORE_UNAVAILABLE' });
  });
});
