/**
 * An OpenAI-compatible HTTP server (fastify) whose sessions each keep a finite, in-place KV memory.
 *
 *   const server = await createServer(model, { chat: { policy: 'hybrid', maxTokens: 2048 }, apiKey });
 *   await server.listen({ port: 8080 });     // POST /v1/chat/completions, GET /v1/models, /health, /metrics
 *   await server.close();                     // stop accepting, finish in-flight, checkpoint or free sessions
 *
 * A session (header `X-Session-Id`, else the request's `user` field) keeps its `Chat` between requests,
 * so a client sends only the new message. Its state also lives in a session store (sessions.ts,
 * store/): every turn's ledger is written through before the response completes, the full checkpoint
 * written back when it idles, leaves memory (beyond `maxSessions`, least recently used first) or the
 * server stops; a directory (`checkpointDir`, or a temp dir) or Redis (`store`, shared by instances,
 * one owner at a time by lease). Idle sessions past `sessionTtlMs` are forgotten. Admission: one request at a time per session (a small queue
 * behind it), `maxConcurrent` turns decoding at once server-wide (a bounded queue behind them), 429
 * with Retry-After beyond that.
 */
import { randomUUID, timingSafeEqual } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import { hostname } from 'node:os';
import { basename, extname } from 'node:path';
import { fastify, type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Chat } from '../local/chat.js';
import { AbortedError, CheckpointError, InvalidOptionError } from '../shared/errors.js';
import { readCheckpointMessages, type Model } from '../local/model.js';
import { resolveChatOptions, type ChatOptions } from '../local/options.js';
import { createPrometheusTelemetry, type PrometheusTelemetry } from '../shared/prometheus.js';
import type { ChatStats, StopReason, Transcript, TurnStats } from '../shared/types.js';
import { Gate, QueueAbortedError, type Release } from './admission.js';
import { SessionStore, type TurnLease } from './sessions.js';
import type { StoredSession } from './store/backend.js';
import { DirBackend } from './store/dir.js';
import { RedisBackend, redactUrl } from './store/redis.js';
import { badRequest, finishReason, HttpError, overloaded, parseCompletion, sendError, sessionKey, sha256, toHttpError, type ParsedCompletion } from './wire.js';

/** After the shutdown deadline's aborts, how long answers may take to flush before connections are closed. */
const SHUTDOWN_FLUSH_MS = 250;
const SHUTDOWN_ERROR = { message: 'The server is shutting down', type: 'server_error', param: null, code: 'server_shutting_down' } as const;

export interface ServerOptions {
  /** The id clients pass as `model` (and /v1/models lists). Default: the model file's name without extension. */
  modelId?: string;
  /** Options of every chat the server creates (sessions and one-off requests). A request's system message overrides `systemPrompt`. */
  chat?: Omit<ChatOptions, 'telemetry'>;
  /** Require `Authorization: Bearer <apiKey>` on every route except /health. */
  apiKey?: string;
  /** Sessions kept live in memory; the least recently used idle ones beyond this are written back to the store and freed. Default 32. */
  maxSessions?: number;
  /** An idle session older than this leaves memory and the store forgets it. Default 30 min; 0 = never. */
  sessionTtlMs?: number;
  /**
   * The local-directory session store. When set, sessions survive a restart and a `kill -9`: every
   * turn's ledger is written through (crash-safe), full checkpoints are written back, and the
   * directory is read back at start. Default: a temp dir for sessions leaving memory, removed on close().
   */
  checkpointDir?: string;
  /** Cap on `max_tokens` / `max_completion_tokens`. Default 1024. */
  maxTokensPerRequest?: number;
  /** Tokens generated when the request names none. Default min(256, maxTokensPerRequest). */
  defaultMaxTokens?: number;
  /** Largest request body in bytes (beyond: 413). Default 1 MiB. */
  bodyLimit?: number;
  /**
   * Requests holding a decode slot at once, server-wide. Default the model's `slots`: that many chats
   * decode together in one batch; more would only wait inside the engine (or park each other).
   */
  maxConcurrent?: number;
  /** Requests waiting for a decode slot (beyond: 429). Default 64. */
  maxQueue?: number;
  /** Requests waiting behind the running one of the same session (beyond: 429). Default 4. */
  maxSessionQueue?: number;
  /** prom-client registry for /metrics (default: a new one). */
  registry?: Registry;
  /** fastify's logger option. Default false. */
  logger?: FastifyServerOptions['logger'];
  /** Time a client has to send a request's headers (beyond: 408, connection closed). Default 10 s. */
  headersTimeoutMs?: number;
  /** Time a client has to send a whole request, body included (beyond: 408). Default 30 s. */
  requestTimeoutMs?: number;
  /** An idle keep-alive connection is closed after this. Default 5 s. */
  keepAliveTimeoutMs?: number;
  /**
   * Tokens of earlier messages a request may bring for a new session or a one-off request (they are
   * prefilled before the turn; beyond: 400 history_too_large). Default 8 x the chat's maxTokens.
   */
  maxHistoryTokens?: number;
  /** Sessions kept in the store; beyond it the least recently used are deleted. Default 256. */
  maxStoredSessions?: number;
  /** Bytes of checkpoints kept in the store; beyond it the least recently used are deleted. Default 8 GiB. */
  maxStoredBytes?: number;
  /**
   * A Redis session store shared by instances: `redis://[user:password@]host:port/db` or `rediss://`
   * (TLS). Instead of checkpointDir. Every turn's ledger is written through to it; see the README's
   * "Sessions across instances".
   */
  store?: string;
  /** PEM of the CA that signed a `rediss://` store's certificate (default: Node's trusted CAs). */
  storeCa?: string;
  /** Redis key namespace. Default: the model's fingerprint (instances of one model share sessions). */
  storeNamespace?: string;
  /** A session's lease while a turn runs (renewed meanwhile; what a crashed instance holds it for). Default 10 s. */
  leaseMs?: number;
  /** How long a request for a session leased by another instance waits before its 409. Default 2 s. */
  leaseWaitMs?: number;
  /** An idle session's full checkpoint is written to the store after this; 0: only when it leaves memory or at shutdown. Default 30 s. */
  snapshotIdleMs?: number;
  /**
   * Whether full checkpoints (KV cache included: a restore without prefill) are written back to a
   * durable store. False: the store holds each session's ledger only, a small fraction of the bytes,
   * and every restore prefills the retained tokens. Default true. (A session leaving memory for a
   * temp dir always writes its full checkpoint.)
   */
  fullSnapshots?: boolean;
  /** This instance's name in responses (`finite_memory.instance`): which instance behind a load balancer served a turn. Default host:pid. */
  instanceId?: string;
}

/** Where a restored session came from: its full checkpoint, its ledger (re-prefilled), or another model's transcript. */
type RestoredFrom = 'full' | 'ledger' | 'transcript';

export interface FiniteMemoryServer {
  readonly app: FastifyInstance;
  readonly modelId: string;
  readonly telemetry: PrometheusTelemetry;
  /** Starts listening; resolves with the address (e.g. http://127.0.0.1:8080). */
  listen(options?: { port?: number; host?: string }): Promise<string>;
  /**
   * Graceful shutdown: stops accepting (new requests get 503), closes idle connections, lets in-flight
   * and queued requests finish (after `abortAfterMs`, running turns are aborted and every connection
   * still open is closed), then writes every live session's full checkpoint to the store (when it is a
   * checkpointDir or Redis), and frees every chat. Idempotent. Does not dispose the model.
   */
  close(options?: { abortAfterMs?: number }): Promise<void>;
  /** Sessions live in this process's memory, and those the store holds (as of this instance's last write). */
  sessions(): { live: number; stored: number };
}

export async function createServer(model: Model, options: ServerOptions = {}): Promise<FiniteMemoryServer> {
  const modelId = options.modelId ?? basename(model.info.path, extname(model.info.path));
  const chatOptions = { ...(options.chat ?? {}) };
  const resolvedChat = resolveChatOptions(chatOptions, 1); // invalid chat options fail here, not on the first request
  const int = (name: string, v: number | undefined, def: number, min: number): number => {
    if (v === undefined) return def;
    if (!Number.isInteger(v) || v < min) throw new InvalidOptionError(`Expected an integer >= ${min} for ${name} but received ${String(v)}`);
    return v;
  };
  const maxSessions = int('maxSessions', options.maxSessions, 32, 1);
  const sessionTtlMs = int('sessionTtlMs', options.sessionTtlMs, 30 * 60_000, 0);
  const maxTokensPerRequest = int('maxTokensPerRequest', options.maxTokensPerRequest, 1024, 1);
  const defaultMaxTokens = Math.min(int('defaultMaxTokens', options.defaultMaxTokens, 256, 1), maxTokensPerRequest);
  const bodyLimit = int('bodyLimit', options.bodyLimit, 1 << 20, 1);
  const maxConcurrent = int('maxConcurrent', options.maxConcurrent, model.info.slots, 1);
  const maxQueue = int('maxQueue', options.maxQueue, 64, 0);
  const maxSessionQueue = int('maxSessionQueue', options.maxSessionQueue, 4, 0);
  const headersTimeoutMs = int('headersTimeoutMs', options.headersTimeoutMs, 10_000, 1);
  const requestTimeoutMs = int('requestTimeoutMs', options.requestTimeoutMs, 30_000, 1);
  const keepAliveTimeoutMs = int('keepAliveTimeoutMs', options.keepAliveTimeoutMs, 5_000, 1);
  const maxHistoryTokens = int('maxHistoryTokens', options.maxHistoryTokens, 8 * resolvedChat.maxTokens, 0);
  const maxStoredSessions = int('maxStoredSessions', options.maxStoredSessions, 256, 0);
  const maxStoredBytes = int('maxStoredBytes', options.maxStoredBytes, 8 * 1024 ** 3, 0);
  const leaseMs = int('leaseMs', options.leaseMs, 10_000, 100);
  const leaseWaitMs = int('leaseWaitMs', options.leaseWaitMs, 2_000, 0);
  const snapshotIdleMs = int('snapshotIdleMs', options.snapshotIdleMs, 30_000, 0);
  if (options.store !== undefined && options.checkpointDir !== undefined) throw new InvalidOptionError('Give either store (Redis) or checkpointDir, not both');
  if (options.store !== undefined && !/^rediss?:\/\/[^\s]+$/.test(options.store)) throw new InvalidOptionError(`store must be a redis:// or rediss:// URL but received ${JSON.stringify(redactUrl(options.store))}`);
  if (options.storeNamespace !== undefined && !/^[A-Za-z0-9._-]{1,64}$/.test(options.storeNamespace)) throw new InvalidOptionError('storeNamespace must be 1-64 characters of A-Z a-z 0-9 . _ -');
  const instanceId = options.instanceId ?? `${hostname()}:${process.pid}`;
  const apiKeyHash = options.apiKey !== undefined ? sha256(options.apiKey) : undefined;
  if (options.apiKey !== undefined && options.apiKey.length === 0) throw new InvalidOptionError('apiKey must not be empty');

  const registry = options.registry ?? new Registry();
  const telemetry = createPrometheusTelemetry({ registry });
  const global = new Gate(maxConcurrent, maxQueue);
  const inflight = new Set<Promise<unknown>>();
  const controllers = new Set<AbortController>();
  let shuttingDown = false;
  const track = <T>(p: Promise<T>): Promise<T> => {
    inflight.add(p);
    void p.then(
      () => inflight.delete(p),
      () => inflight.delete(p),
    );
    return p;
  };

  new Gauge({
    name: 'finite_memory_server_sessions', help: 'Sessions live in this process and held by the session store', labelNames: ['state'] as const, registers: [registry],
    collect() {
      const c = counts();
      this.set({ state: 'live' }, c.live);
      this.set({ state: 'stored' }, c.stored);
    },
  });
  new Gauge({ name: 'finite_memory_server_decoding', help: 'Requests holding a decode slot', registers: [registry], collect() { this.set(global.active); } });
  new Gauge({ name: 'finite_memory_server_queued', help: 'Requests waiting for a decode slot', registers: [registry], collect() { this.set(global.waiting); } });
  const requests = new Counter({ name: 'finite_memory_server_requests_total', help: 'HTTP requests by route and status', labelNames: ['route', 'status'] as const, registers: [registry] });
  const sessionEvents = new Counter({ name: 'finite_memory_server_session_events_total', help: 'Sessions created, written back and freed (checkpointed), restored, superseded, caught up, expired', labelNames: ['event'] as const, registers: [registry] });

  // Node's own limits on slow clients (fastify's default requestTimeout 0 turns them off): headers and
  // the whole request must arrive in time, idle keep-alive connections close, and the timers are
  // checked often enough to act within the limit (Node checks every 30 s by default).
  const app = fastify({
    bodyLimit, logger: options.logger ?? false, return503OnClosing: true,
    requestTimeout: requestTimeoutMs, keepAliveTimeout: keepAliveTimeoutMs,
    http: { headersTimeout: Math.min(headersTimeoutMs, requestTimeoutMs), connectionsCheckingInterval: Math.max(50, Math.min(1000, Math.floor(headersTimeoutMs / 4))) },
  });

  // ---- sessions: the store (store/), write-through and write-back, leases, restore (sessions.ts) ----

  const limits = { maxStoredSessions, maxStoredBytes, sessionTtlMs };
  const backend = options.store !== undefined
    ? await RedisBackend.open({ url: options.store, ...(options.storeCa !== undefined ? { ca: options.storeCa } : {}), namespace: options.storeNamespace ?? model.info.fingerprint.slice(0, 16), limits, log: app.log })
    : await DirBackend.open(options.checkpointDir, limits, sessionKey);
  const writeSeconds = new Histogram({
    name: 'finite_memory_server_store_write_seconds', help: 'Writes to the session store: a turn\'s ledger (write-through, before its response completes) and full checkpoints (write-back)',
    labelNames: ['kind'] as const, buckets: [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1], registers: [registry],
  });
  const store = new SessionStore({
    backend, maxSessions, sessionTtlMs, maxSessionQueue, leaseMs, leaseWaitMs, snapshotIdleMs, fullSnapshots: options.fullSnapshots ?? true, events: sessionEvents, writeSeconds, log: app.log, track,
  });
  const counts = () => store.counts();

  /**
   * A stored session's chat: its full checkpoint when it is of the latest turn, else its ledger (the
   * retained tokens prefilled once); made with another model, its conversation re-prefilled when it
   * fits maxHistoryTokens. Undefined: it cannot be restored (a newer format, corrupt, too long).
   */
  const restoreChat = async (stored: StoredSession, parsed: ParsedCompletion, signal: AbortSignal): Promise<{ chat: Chat; from: RestoredFrom } | undefined> => {
    const kinds: [RestoredFrom, Uint8Array][] = stored.full ? [['full', stored.full], ['ledger', stored.ledger]] : [['ledger', stored.ledger]];
    let otherModel = false;
    for (const [from, bytes] of kinds) {
      try {
        return { chat: await model.loadChat(bytes, { telemetry }), from };
      } catch (err) {
        if (!(err instanceof CheckpointError)) throw err;
        otherModel ||= err.code === 'CHECKPOINT_MODEL_MISMATCH';
        app.log.warn({ err, session: stored.id, kind: from }, 'a stored checkpoint could not be restored');
      }
    }
    if (!otherModel) return undefined;
    try {
      const messages = readCheckpointMessages(stored.ledger);
      const systemPrompt = parsed.system ?? chatOptions.systemPrompt ?? '';
      let tokens = 0;
      for (const m of messages) tokens += model.tokenize(m.content).length;
      if (tokens > maxHistoryTokens) return undefined;
      const transcript: Transcript = { format: 'finite-memory-llm/transcript', version: 1, systemPrompt, messages };
      return { chat: await model.importTranscript(transcript, { ...chatOptions, systemPrompt, telemetry, signal }), from: 'transcript' };
    } catch (err) {
      if (err instanceof AbortedError) throw err;
      app.log.warn({ err, session: stored.id }, 'a stored conversation from another model could not be rebuilt');
      return undefined;
    }
  };

  /**
   * A new chat holding the conversation before the last message (prefilled, not regenerated): at most
   * maxHistoryTokens of it (400 beyond), and abortable (the client left: AbortedError).
   */
  const buildChat = async (parsed: ParsedCompletion, signal: AbortSignal): Promise<Chat> => {
    const systemPrompt = parsed.system ?? chatOptions.systemPrompt ?? '';
    const history = parsed.conversation.slice(0, -1);
    const opts: ChatOptions = { ...chatOptions, systemPrompt, telemetry };
    if (history.length === 0) return model.createChat(opts);
    let tokens = 0;
    for (const m of history) {
      tokens += model.tokenize(m.content).length;
      if (tokens > maxHistoryTokens) {
        throw badRequest(`The earlier messages hold more than ${maxHistoryTokens} tokens, the most a new session or one-off request may bring (send only the new message with a session id, or fewer messages)`, 'messages', 'history_too_large');
      }
    }
    const transcript: Transcript = { format: 'finite-memory-llm/transcript', version: 1, systemPrompt, messages: history };
    return model.importTranscript(transcript, { ...opts, signal });
  };

  // ---- HTTP ----

  app.addHook('onRequest', async (req, reply) => {
    const res = reply.raw;
    res.once('close', () => {
      requests.inc({ route: req.routeOptions.url ?? 'unmatched', status: String(res.statusCode) });
      // Shutting down: a keep-alive connection whose last response just ended must not hold close() up
      // until its keep-alive timeout.
      if (shuttingDown) setImmediate(() => app.server.closeIdleConnections());
    });
    if (shuttingDown) reply.header('connection', 'close');
    if (!apiKeyHash || req.url === '/health') return;
    const m = /^Bearer\s+(.+)$/i.exec(req.headers.authorization ?? '');
    if (!m || !timingSafeEqual(sha256(m[1]!.trim()), apiKeyHash)) {
      return sendError(reply, new HttpError(401, 'invalid_request_error', 'invalid_api_key', 'Missing or invalid API key (Authorization: Bearer <key>)'));
    }
  });

  app.setErrorHandler((err, _req, reply) => {
    const http = toHttpError(err);
    if (http.status >= 500) app.log.error({ err }, 'request failed');
    return sendError(reply, http);
  });
  app.setNotFoundHandler((req, reply) =>
    sendError(reply, new HttpError(404, 'invalid_request_error', 'not_found', `No route ${req.method} ${req.url.split('?')[0]}`)),
  );

  // Degraded (still 200: live sessions are served from memory) while the store is unreachable or
  // turns wait to be written to it.
  app.get('/health', async () => {
    const c = counts();
    const st = store.health();
    const status = st.available && st.pendingWrites === 0 ? 'ok' : 'degraded';
    return { status, model: modelId, instance: instanceId, sessions: c, decoding: global.active, queued: global.waiting, store: st };
  });

  app.get('/metrics', async (_req, reply) => {
    reply.header('content-type', registry.contentType);
    return registry.metrics();
  });

  const modelObject = () => ({ id: modelId, object: 'model', created: 0, owned_by: 'finite-memory-llm' });
  app.get('/v1/models', async () => ({ object: 'list', data: [modelObject()] }));
  app.get<{ Params: { id: string } }>('/v1/models/:id', async (req) => {
    if (req.params.id !== modelId) throw new HttpError(404, 'invalid_request_error', 'model_not_found', `The model '${req.params.id}' does not exist`, 'model');
    return modelObject();
  });

  app.post('/v1/chat/completions', (req, reply) => track(completion(req, reply)));

  async function completion(req: FastifyRequest, reply: FastifyReply): Promise<unknown> {
    const parsed = parseCompletion(req.body, req.headers, req.raw.rawHeaders, modelId, { maxTokensPerRequest, defaultMaxTokens });
    const res: ServerResponse = reply.raw;
    if (shuttingDown) throw new HttpError(503, SHUTDOWN_ERROR.type, SHUTDOWN_ERROR.code, SHUTDOWN_ERROR.message, null, { connection: 'close' });
    const ac = new AbortController();
    // The client went away before the response was complete: abort the turn (or leave the queue).
    let clientGone = false;
    const onClose = () => {
      if (res.writableFinished) return;
      clientGone = true;
      ac.abort();
    };
    res.once('close', onClose);
    controllers.add(ac);

    const session = parsed.sessionId !== undefined ? store.session(parsed.sessionId) : undefined;
    let releaseSession: Release | undefined;
    let lease: TurnLease | undefined;
    let releaseSlot: Release | undefined;
    let oneOff: Chat | undefined;
    try {
      if (session) {
        const entering = session.gate.enter(ac.signal);
        if (!entering) throw overloaded('Too many requests queued for this session');
        releaseSession = await entering;
        // The lease before a decode slot: waiting for another instance must not hold a slot here.
        lease = await store.begin(session, ac.signal);
      }
      const slot = global.enter(ac.signal);
      if (!slot) throw overloaded('The server is at capacity');
      releaseSlot = await slot;

      // The chat: the session's (live, restored from the store, or new), or a one-off.
      let chat: Chat;
      let sessionReset: 'restore_failed' | undefined;
      let restoredFrom: RestoredFrom | undefined;
      let created = false;
      if (session) {
        if (session.chat) {
          chat = session.chat;
        } else {
          await store.makeRoom();
          let restoredChat: Chat | undefined;
          if (lease!.storedVersion > 0) {
            // Gone between the lease and the read (dropped by the caps or the TTL): a reset too.
            const stored = await store.read(session);
            const r = stored ? await restoreChat(stored, parsed, ac.signal) : undefined;
            if (r) {
              restoredChat = r.chat;
              restoredFrom = r.from;
              session.messagesSeen = stored!.messagesSeen;
              sessionEvents.inc({ event: 'restored' });
            } else {
              // Another model whose tokens no longer fit, a newer format, corrupt bytes: the session
              // starts fresh (and says so) instead of failing every request from now on.
              sessionReset = 'restore_failed';
              session.messagesSeen = 0;
              sessionEvents.inc({ event: 'restore_failed' });
            }
          }
          if (restoredChat) {
            chat = restoredChat;
          } else {
            chat = await buildChat(parsed, ac.signal);
            created = true;
            session.messagesSeen = parsed.conversation.length - 1;
            sessionEvents.inc({ event: 'created' });
          }
          session.chat = chat;
        }
      } else {
        chat = oneOff = await buildChat(parsed, ac.signal);
        created = true;
      }
      const importedTokens = created ? chat.stats().tokensSeen : 0;

      const id = `chatcmpl-${randomUUID()}`;
      const createdAt = Math.floor(Date.now() / 1000);
      const base = { id, created: createdAt, model: modelId, system_fingerprint: `fml-${model.info.fingerprint.slice(0, 12)}` };
      const sessionHeader: Record<string, string> = session ? { 'x-session-id': encodeURIComponent(session.id) } : {};
      if (sessionReset) sessionHeader['x-session-reset'] = sessionReset;
      let started = false;
      const write = (data: unknown) => {
        if (!res.destroyed && !res.writableEnded) res.write(`data: ${JSON.stringify(data)}\n\n`);
      };
      const chunk = (delta: Record<string, unknown>, finish: string | null, extra: Record<string, unknown> = {}) =>
        write({ ...base, object: 'chat.completion.chunk', choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }], ...extra });
      // Headers go out with the first token, so an error before it (prompt too large) is still a plain 4xx.
      const start = () => {
        if (started) return;
        started = true;
        reply.hijack();
        res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: shuttingDown ? 'close' : 'keep-alive', ...sessionHeader });
        chunk({ role: 'assistant', content: '' }, null);
      };

      // Unpin and forget before the turn (each checked: a turn no longer in memory is a 400), so the
      // room they free is there for it.
      for (const turn of parsed.memory.unpin) chat.unpin(turn);
      for (const turn of parsed.memory.forget) await chat.forget(turn);
      let result;
      try {
        result = await chat.send(parsed.last, {
          ...parsed.send,
          pin: parsed.memory.pin,
          signal: ac.signal,
          ...(parsed.stream ? { onToken: (piece: string) => { start(); chunk({ content: piece }, null); } } : {}),
        });
      } catch (err) {
        if (!started) throw err;
        const http = toHttpError(err);
        write({ error: { message: http.message, type: http.type, param: http.param, code: http.code } });
        res.end('data: [DONE]\n\n');
        return;
      }
      let persisted: boolean | null = null;
      let storeMs: number | null = null;
      if (session && result.stats.promptTokens > 0) {
        // Reconciliation: a longer array means the client resends the whole conversation.
        session.messagesSeen = Math.max(parsed.conversation.length, session.messagesSeen + 1) + 1;
        // Write-through: the store holds this turn before its response completes.
        const t0 = performance.now();
        try {
          persisted = await store.commit(session, lease!);
          if (persisted !== null) storeMs = performance.now() - t0;
        } catch (err) {
          if (!started) throw err;
          const http = toHttpError(err);
          write({ error: { message: http.message, type: http.type, param: http.param, code: http.code } });
          res.end('data: [DONE]\n\n');
          return;
        }
      }
      const stats: ChatStats = chat.stats();
      const usage = {
        prompt_tokens: importedTokens + result.stats.promptTokens,
        completion_tokens: result.stats.generatedTokens,
        total_tokens: importedTokens + result.stats.promptTokens + result.stats.generatedTokens,
      };
      const finite_memory: {
        instance: string; session_id: string | null; restored: boolean; restored_from: RestoredFrom | null; session_reset: 'restore_failed' | null; messages_seen: number | null;
        persisted: boolean | null; store_ms: number | null; stop_reason: StopReason; turn: TurnStats; chat: ChatStats; pins: { turn: number; tokens: number }[];
      } = {
        instance: instanceId, session_id: session?.id ?? null, restored: restoredFrom !== undefined, restored_from: restoredFrom ?? null, session_reset: sessionReset ?? null,
        messages_seen: session?.messagesSeen ?? null, persisted, store_ms: storeMs, stop_reason: result.stopReason, turn: result.stats, chat: stats, pins: chat.pins(),
      };
      if (clientGone) {
        reply.hijack();
        res.destroy();
        return;
      }
      if (parsed.stream) {
        start();
        chunk({}, finishReason(result.stopReason), { finite_memory });
        // Cut short by the shutdown deadline (not by its client): the stream says so before it ends.
        if (result.stopReason === 'abort' && shuttingDown) write({ error: SHUTDOWN_ERROR });
        if (parsed.includeUsage) write({ ...base, object: 'chat.completion.chunk', choices: [], usage });
        res.end('data: [DONE]\n\n');
        return;
      }
      for (const [k, v] of Object.entries(sessionHeader)) reply.header(k, v);
      return {
        ...base,
        object: 'chat.completion',
        choices: [{ index: 0, message: { role: 'assistant', content: result.response, refusal: null }, logprobs: null, finish_reason: finishReason(result.stopReason) }],
        usage,
        finite_memory,
      };
    } catch (err) {
      if (clientGone) {
        reply.hijack();
        res.destroy();
        return;
      }
      if (err instanceof QueueAbortedError) throw new HttpError(503, SHUTDOWN_ERROR.type, SHUTDOWN_ERROR.code, SHUTDOWN_ERROR.message);
      throw err;
    } finally {
      res.off('close', onClose);
      controllers.delete(ac);
      releaseSlot?.();
      oneOff?.dispose();
      if (session) store.end(session, lease, releaseSession);
    }
  }

  // ---- shutdown ----

  let closing: Promise<void> | undefined;
  app.addHook('preClose', async () => {
    shuttingDown = true;
  });
  app.addHook('onClose', async () => {
    shuttingDown = true;
    while (inflight.size > 0) await Promise.allSettled([...inflight]);
    await store.close();
  });

  return {
    app,
    modelId,
    telemetry,
    async listen(opts = {}) {
      return app.listen({ port: opts.port ?? 8080, host: opts.host ?? '127.0.0.1' });
    },
    close(opts = {}) {
      closing ??= (async () => {
        // At the deadline: running turns are aborted and every connection still open is closed,
        // stalled ones (a body that never completes) included, so close() ends within it.
        const timer = opts.abortAfterMs !== undefined
          ? setTimeout(() => {
            // Aborting answers the queued (503) and the streaming (an error event, then [DONE]); their
            // responses get a moment to flush before every connection still open is closed.
            controllers.forEach((c) => c.abort());
            const flushed = Promise.allSettled([...inflight]);
            const grace = new Promise((r) => setTimeout(r, SHUTDOWN_FLUSH_MS));
            void Promise.race([flushed, grace]).then(() => app.server.closeAllConnections());
          }, opts.abortAfterMs)
          : undefined;
        try {
          await app.close();
        } finally {
          clearTimeout(timer);
        }
      })();
      return closing;
    },
    sessions: counts,
  };
}
