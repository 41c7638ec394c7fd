/**
 * An OpenAI-compatible HTTP server (fastify) whose sessions each keep a finite, in-place KV memory.
 *
 *   const server = await createServer(model, { chat: { policy: 'hybrid', maxTokens: 2048 }, apiKey });
 *   await server.listen({ port: 8080 });     // POST /v1/chat/completions, GET /v1/models, /health, /metrics
 *   await server.close();                     // stop accepting, finish in-flight, write sessions back, free them
 *
 * A session (header `X-Session-Id`, else the request's `user` field) keeps its `Chat` between requests,
 * so a client sends only the new message. Its state also lives in a session store (sessions.ts,
 * store/): every turn's ledger is written through before the response completes, the full checkpoint
 * written back when it idles, leaves memory (beyond `maxSessions`, least recently used first) or the
 * server stops; a directory (`checkpointDir`, or a temp dir) or Redis (`store`, shared by instances,
 * one owner at a time by lease). Idle sessions past `sessionTtlMs` are forgotten. Admission: one
 * request at a time per session (a small queue behind it), `maxConcurrent` turns decoding at once
 * server-wide (a bounded queue behind them), 429 with Retry-After beyond that.
 *
 * The files: options.ts (options, defaults), completion.ts (a request's path), chats.ts (new and
 * restored chats), sse.ts (streaming), sessions.ts + store/ (sessions and where they are kept),
 * admission.ts (queues), auth.ts, metrics.ts, wire.ts (request parsing, errors).
 */
import { fastify, type FastifyInstance } from 'fastify';
import { Registry } from 'prom-client';
import type { Model } from '../local/model.js';
import { createPrometheusTelemetry, type PrometheusTelemetry } from '../shared/prometheus.js';
import { Gate } from './admission.js';
import { apiKeyCheck, hostCheck } from './auth.js';
import { ChatSource } from './chats.js';
import { handleCompletion, shutdownError } from './completion.js';
import { handleForget, handleMemory, handlePin, handleUnpin } from './memory.js';
import { memoryPage } from './ui/page.js';
import { createServerMetrics } from './metrics.js';
import { resolveServerOptions, type ServerOptions } from './options.js';
import { SessionStore } from './sessions.js';
import { DirBackend } from './store/dir.js';
import { RedisBackend } from './store/redis.js';
import { HttpError, MAX_SESSION_ID_IN_PATH, sendError, sessionKey, toHttpError } from './wire.js';

export { SERVER_DEFAULTS, type ServerOptions } from './options.js';

/** After the shutdown deadline's aborts, how long answers may take to flush before connections are closed. */
const SHUTDOWN_FLUSH_MS = 250;

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
  const o = resolveServerOptions(model, options);
  const registry = o.registry ?? new Registry();
  const telemetry = createPrometheusTelemetry({ registry });
  const slots = new Gate(o.maxConcurrent, o.maxQueue);
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

  // Node's own limits on slow clients (fastify's default requestTimeout 0 turns them off): headers and
  // the whole request must arrive in time, idle keep-alive connections close, and the timers are
  // checked often enough to act within the limit (Node checks every 30 s by default).
  const app = fastify({
    bodyLimit: o.bodyLimit, logger: o.logger, return503OnClosing: false, routerOptions: { maxParamLength: MAX_SESSION_ID_IN_PATH },
    requestTimeout: o.requestTimeoutMs, keepAliveTimeout: o.keepAliveTimeoutMs,
    http: { headersTimeout: Math.min(o.headersTimeoutMs, o.requestTimeoutMs), connectionsCheckingInterval: Math.max(50, Math.min(1000, Math.floor(o.headersTimeoutMs / 4))) },
  });

  const limits = { maxStoredSessions: o.maxStoredSessions, maxStoredBytes: o.maxStoredBytes, sessionTtlMs: o.sessionTtlMs };
  const backend = o.store !== undefined
    ? await RedisBackend.open({ url: o.store, ...(o.storeCa !== undefined ? { ca: o.storeCa } : {}), namespace: o.storeNamespace, limits, log: app.log })
    : await DirBackend.open(o.checkpointDir, limits, sessionKey, (why) => app.log.error(`the checkpoint dir lock was lost (${why}): no session is written any more; restart this server`));
  const counts = () => store.counts();
  const metrics = createServerMetrics(registry, { sessions: counts, decoding: () => slots.active, queued: () => slots.waiting });
  const store = new SessionStore({
    backend, maxSessions: o.maxSessions, sessionTtlMs: o.sessionTtlMs, maxSessionQueue: o.maxSessionQueue, leaseMs: o.leaseMs, leaseWaitMs: o.leaseWaitMs,
    snapshotIdleMs: o.snapshotIdleMs, fullSnapshots: o.fullSnapshots, events: metrics.sessionEvents, writeSeconds: metrics.storeWrites, log: app.log, track,
  });
  const chats = new ChatSource(model, o.chat, telemetry, o.maxHistoryTokens, app.log);
  const ctx = { model, options: o, store, chats, slots, metrics, controllers, shuttingDown: () => shuttingDown };

  // ---- HTTP ----

  const authorize = apiKeyCheck(o.apiKey);
  const checkHost = hostCheck(o.apiKey, o.allowedHosts);
  app.addHook('onRequest', async (req, reply) => {
    const res = reply.raw;
    res.once('close', () => {
      // A response that never completed (its client left, or the connection was cut) is 499, as in
      // nginx: its statusCode is still the default 200 when nothing was sent.
      metrics.requests.inc({ route: req.routeOptions.url ?? 'unmatched', status: res.writableFinished ? String(res.statusCode) : '499' });
      // Shutting down: a keep-alive connection whose last response just ended must not hold close() up
      // until its keep-alive timeout.
      if (shuttingDown) setImmediate(() => app.server.closeIdleConnections());
    });
    // A request that arrives while the server shuts down (on a connection kept alive or pipelined):
    // the 503 every route gives then, in the server's error shape and counted (fastify's own skipped both).
    if (shuttingDown) return sendError(reply, shutdownError({ connection: 'close' }));
    const denied = checkHost(req.url, req.headers.host) ?? authorize(req.url, req.headers.authorization);
    if (denied) return sendError(reply, denied);
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
    const st = store.health();
    const status = st.available && st.pendingWrites === 0 ? 'ok' : 'degraded';
    return { status, model: o.modelId, instance: o.instanceId, sessions: counts(), decoding: slots.active, queued: slots.waiting, store: st };
  });

  app.get('/metrics', async (_req, reply) => {
    reply.header('content-type', registry.contentType);
    return registry.metrics();
  });

  const modelObject = () => ({ id: o.modelId, object: 'model', created: 0, owned_by: 'finite-memory-llm' });
  app.get('/v1/models', async () => ({ object: 'list', data: [modelObject()] }));
  app.get<{ Params: { id: string } }>('/v1/models/:id', async (req) => {
    if (req.params.id !== o.modelId) throw new HttpError(404, 'invalid_request_error', 'model_not_found', `The model '${req.params.id}' does not exist`, 'model');
    return modelObject();
  });

  app.post('/v1/chat/completions', (req, reply) => track(handleCompletion(ctx, req, reply)));

  // A session's memory, and pins / forget on its turns (memory.ts).
  type SessionRoute = { Params: { id: string; turn?: string }; Querystring: { evictions?: string }; Body: unknown };
  app.get<SessionRoute>('/v1/sessions/:id/memory', (req, reply) => track(handleMemory(ctx, req, reply)));
  app.post<SessionRoute>('/v1/sessions/:id/turns/:turn/pin', (req, reply) => track(handlePin(ctx, req, reply)));
  app.delete<SessionRoute>('/v1/sessions/:id/turns/:turn/pin', (req, reply) => track(handleUnpin(ctx, req, reply)));
  app.delete<SessionRoute>('/v1/sessions/:id/turns/:turn', (req, reply) => track(handleForget(ctx, req, reply)));

  // The memory inspector page (ui/page.ts): static, no secrets; its API calls carry the key.
  if (o.ui) {
    app.get('/', async (_req, reply) => {
      reply.header('content-type', 'text/html; charset=utf-8').header('cache-control', 'no-cache')
        .header('content-security-policy', "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:");
      return memoryPage(o.modelId);
    });
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
    modelId: o.modelId,
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
