/**
 * An OpenAI-compatible HTTP server (fastify) whose sessions each keep a finite, in-place KV memory.
 *
 *   const server = await createServer(model, { chat: { policy: 'hybrid', maxTokens: 2048 }, apiKey });
 *   await server.listen({ port: 8080 });     // POST /v1/chat/completions, GET /v1/models, /health, /metrics
 *   await server.close();                     // stop accepting, finish in-flight, checkpoint or free sessions
 *
 * A session (header `X-Session-Id`, else the request's `user` field) keeps its `Chat` between requests,
 * so a client sends only the new message. Idle sessions beyond `maxSessions` are checkpointed to disk
 * (least recently used first) and restored on their next request; idle sessions past `sessionTtlMs`
 * are dropped with their checkpoint. Admission: one request at a time per session (a small queue
 * behind it), `maxConcurrent` turns decoding at once server-wide (a bounded queue behind them), 429
 * with Retry-After beyond that.
 */
import { createHash, randomUUID, timingSafeEqual } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import { mkdir, mkdtemp, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, extname, join } from 'node:path';
import { fastify, type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify';
import { Counter, Gauge, Registry } from 'prom-client';
import { getBinding } from '../local/binding.js';
import type { Chat } from '../local/chat.js';
import { CheckpointError, FiniteMemoryError, InvalidOptionError, PinLimitError, PromptTooLargeError } from '../shared/errors.js';
import type { Model } from '../local/model.js';
import { resolveChatOptions, type ChatOptions } from '../local/options.js';
import { createPrometheusTelemetry, type PrometheusTelemetry } from '../shared/prometheus.js';
import type { ChatStats, StopReason, Transcript, TurnStats } from '../shared/types.js';

export interface ServerOptions {
  /** The id clients pass as `model` (and /v1/models lists). Default: the model file's name without extension. */
  modelId?: string;
  /** Options of every chat the server creates (sessions and one-off requests). A request's system message overrides `systemPrompt`. */
  chat?: Omit<ChatOptions, 'telemetry'>;
  /** Require `Authorization: Bearer <apiKey>` on every route except /health. */
  apiKey?: string;
  /** Sessions kept live in memory; the least recently used idle ones beyond this are checkpointed to disk. Default 32. */
  maxSessions?: number;
  /** An idle session (live or checkpointed) older than this is disposed and its checkpoint deleted. Default 30 min; 0 = never. */
  sessionTtlMs?: number;
  /**
   * Where evicted sessions are checkpointed. When set, sessions also survive a restart: live ones are
   * checkpointed on close() and the directory is read back at start. Default: a temp dir, removed on close().
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
  /** Checkpointed sessions kept on disk; beyond it the least recently used are deleted. Default 256. */
  maxStoredSessions?: number;
  /** Bytes of checkpoints kept on disk; beyond it the least recently used are deleted. Default 8 GiB. */
  maxStoredBytes?: number;
}

export interface FiniteMemoryServer {
  readonly app: FastifyInstance;
  readonly modelId: string;
  readonly telemetry: PrometheusTelemetry;
  /** Starts listening; resolves with the address (e.g. http://127.0.0.1:8080). */
  listen(options?: { port?: number; host?: string }): Promise<string>;
  /**
   * Graceful shutdown: stops accepting (new requests get 503), closes idle connections, lets in-flight
   * and queued requests finish (after `abortAfterMs`, running turns are aborted and every connection
   * still open is closed), then checkpoints live sessions when a checkpointDir is configured, and frees
   * every chat. Idempotent. Does not dispose the model.
   */
  close(options?: { abortAfterMs?: number }): Promise<void>;
  /** Sessions live in memory and checkpointed on disk. */
  sessions(): { live: number; stored: number };
}

/** One API error, rendered as `{ error: { message, type, param, code } }`. */
class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly type: string,
    readonly code: string | null,
    message: string,
    readonly param: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

const badRequest = (message: string, param: string | null = null, code: string | null = 'invalid_value') =>
  new HttpError(400, 'invalid_request_error', code, message, param);
const overloaded = (what: string) =>
  new HttpError(429, 'rate_limit_error', 'rate_limit_exceeded', `${what}; retry later`, null, { 'retry-after': '1' });

class QueueAbortedError extends Error {}

type Release = () => void;

/** A counting semaphore with a bounded FIFO queue; a waiter whose signal aborts leaves the queue. */
class Gate {
  #active = 0;
  readonly #waiting: { grant: () => void }[] = [];
  constructor(readonly capacity: number, readonly maxQueue: number) {}

  get active(): number {
    return this.#active;
  }

  get waiting(): number {
    return this.#waiting.length;
  }

  get idle(): boolean {
    return this.#active === 0 && this.#waiting.length === 0;
  }

  tryEnter(): Release | undefined {
    if (this.#active >= this.capacity || this.#waiting.length > 0) return undefined;
    this.#active++;
    return this.#release();
  }

  /** Undefined when the queue is full. Rejects with QueueAbortedError if `signal` aborts while waiting. */
  enter(signal?: AbortSignal): Promise<Release> | undefined {
    const now = this.tryEnter();
    if (now) return Promise.resolve(now);
    if (this.#waiting.length >= this.maxQueue) return undefined;
    return new Promise<Release>((resolve, reject) => {
      const onAbort = () => {
        const i = this.#waiting.indexOf(waiter);
        if (i >= 0) this.#waiting.splice(i, 1);
        reject(new QueueAbortedError());
      };
      const waiter = {
        grant: () => {
          signal?.removeEventListener('abort', onAbort);
          resolve(this.#release());
        },
      };
      if (signal?.aborted) return reject(new QueueAbortedError());
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#waiting.push(waiter);
    });
  }

  #release(): Release {
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const next = this.#waiting.shift();
      if (next) next.grant(); // the slot passes straight to the next waiter
      else this.#active--;
    };
  }
}

interface Session {
  readonly id: string;
  /** File name stem (hash of the id): session ids never reach the file system. */
  readonly key: string;
  readonly gate: Gate;
  chat: Chat | undefined;
  /** A checkpoint of this session is on disk and current. */
  stored: boolean;
  /** Conversation messages (user + assistant, not system) the server has seen; see reconciliation in the README. */
  messagesSeen: number;
  lastUsed: number;
  /** Size of the checkpoint on disk (when stored). */
  storedBytes: number;
}

interface SessionMeta {
  id: string;
  messagesSeen: number;
  lastUsed: number;
}

type Message = { role: 'user' | 'assistant'; content: string };

interface ParsedCompletion {
  system: string | undefined;
  /** Conversation messages (system messages removed), the last one being the user's new turn. */
  conversation: Message[];
  last: string;
  send: { maxNewTokens: number; temperature?: number; topP?: number; seed?: number; stop?: string[] };
  stream: boolean;
  includeUsage: boolean;
  sessionId: string | undefined;
  /** The request's `finite_memory` field: pin the new message; unpin / forget earlier turns first. */
  memory: { pin: boolean; unpin: number[]; forget: number[] };
}

const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);

function contentText(v: unknown, param: string, allowNull: boolean): string {
  if (typeof v === 'string') return v;
  if ((v === null || v === undefined) && allowNull) return '';
  if (Array.isArray(v)) {
    return v
      .map((part, i) => {
        if (isObject(part) && part.type === 'text' && typeof part.text === 'string') return part.text;
        throw badRequest(`Invalid '${param}[${i}]': only text content parts are supported`, `${param}[${i}]`);
      })
      .join('');
  }
  throw badRequest(`Invalid '${param}': expected a string or an array of text parts`, param);
}

/**
 * Session ids come from a header or from `user` (any JSON string): checked before any work, so a bad
 * one never runs a turn. Control characters and broken UTF-16 are refused; the id is echoed in the
 * X-Session-Id response header percent-encoded (encodeURIComponent: letters, digits and -_.!~*'()
 * unchanged), never raw, because header values are Latin-1 only.
 */
function checkSessionId(raw: unknown): string {
  if (typeof raw !== 'string' || raw.length > 256) throw badRequest('The session id (X-Session-Id or user) must be a string of at most 256 characters', 'user', 'invalid_session_id');
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f-\u009f]/.test(raw) || !raw.isWellFormed()) {
    throw badRequest('The session id (X-Session-Id or user) must not contain control characters or unpaired surrogates', 'user', 'invalid_session_id');
  }
  return raw;
}

function parseCompletion(body: unknown, headers: FastifyRequest['headers'], rawHeaders: string[], modelId: string, limits: { maxTokensPerRequest: number; defaultMaxTokens: number }): ParsedCompletion {
  if (!isObject(body)) throw badRequest('The request body must be a JSON object', null, 'invalid_body');
  if (body.model !== undefined && body.model !== modelId) {
    throw new HttpError(404, 'invalid_request_error', 'model_not_found', `The model '${String(body.model)}' does not exist; this server serves '${modelId}'`, 'model');
  }
  if (!Array.isArray(body.messages) || body.messages.length === 0) throw badRequest("'messages' must be a non-empty array", 'messages');
  const systems: string[] = [];
  const conversation: Message[] = [];
  body.messages.forEach((m: unknown, i: number) => {
    const param = `messages[${i}]`;
    if (!isObject(m)) throw badRequest(`Invalid '${param}': expected an object`, param);
    if (m.role === 'system' || m.role === 'developer') systems.push(contentText(m.content, `${param}.content`, false));
    else if (m.role === 'user' || m.role === 'assistant') conversation.push({ role: m.role, content: contentText(m.content, `${param}.content`, m.role === 'assistant') });
    else throw badRequest(`Invalid '${param}.role': ${JSON.stringify(m.role)} is not supported (system, developer, user, assistant)`, `${param}.role`);
  });
  const lastMessage = conversation.at(-1);
  if (!lastMessage || lastMessage.role !== 'user') throw badRequest('The last message must be a user message', 'messages');

  const send: ParsedCompletion['send'] = { maxNewTokens: limits.defaultMaxTokens };
  const maxTokens = body.max_completion_tokens ?? body.max_tokens;
  if (maxTokens !== undefined && maxTokens !== null) {
    if (typeof maxTokens !== 'number' || !Number.isInteger(maxTokens) || maxTokens < 1) throw badRequest("'max_tokens' must be a positive integer", 'max_tokens');
    send.maxNewTokens = Math.min(maxTokens, limits.maxTokensPerRequest);
  }
  const num = (name: string, min: number, max: number): number | undefined => {
    const v = body[name];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max) throw badRequest(`'${name}' must be a number between ${min} and ${max}`, name);
    return v;
  };
  const temperature = num('temperature', 0, 2);
  if (temperature !== undefined) send.temperature = temperature;
  const topP = num('top_p', 0, 1);
  if (topP !== undefined) send.topP = topP;
  if (body.seed !== undefined && body.seed !== null) {
    if (typeof body.seed !== 'number' || !Number.isSafeInteger(body.seed)) throw badRequest("'seed' must be an integer", 'seed');
    send.seed = ((body.seed % 0xffffffff) + 0xffffffff) % 0xffffffff; // the sampler takes 0..2^32-2
  }
  if (body.stop !== undefined && body.stop !== null) {
    const stop = typeof body.stop === 'string' ? [body.stop] : body.stop;
    if (!Array.isArray(stop) || stop.length > 16 || stop.some((s) => typeof s !== 'string' || s.length > 1024)) {
      throw badRequest("'stop' must be a string or an array of at most 16 strings", 'stop');
    }
    send.stop = stop as string[];
  }
  if (body.n !== undefined && body.n !== null && body.n !== 1) throw badRequest("Only 'n': 1 is supported", 'n');
  if (Array.isArray(body.tools) && body.tools.length > 0) throw badRequest('Tools are not supported by this server', 'tools');
  if (body.stream !== undefined && body.stream !== null && typeof body.stream !== 'boolean') throw badRequest("'stream' must be a boolean", 'stream');
  const includeUsage = isObject(body.stream_options) && body.stream_options.include_usage === true;

  let sessionId: string | undefined;
  // Node joins repeated headers into "a, b": two ids in one request are ambiguous, so refuse them.
  if (rawHeaders.filter((h, i) => i % 2 === 0 && h.toLowerCase() === 'x-session-id').length > 1) {
    throw badRequest('Send one X-Session-Id header, not several', 'x-session-id', 'duplicate_session_id');
  }
  const header = headers['x-session-id'];
  const rawId = (Array.isArray(header) ? header[0] : header) ?? body.user;
  if (rawId !== undefined && rawId !== null && rawId !== '') sessionId = checkSessionId(rawId);
  const memory = parseMemoryField(body.finite_memory, sessionId !== undefined);
  return {
    memory,
    system: systems.length > 0 ? systems.join('\n\n') : undefined,
    conversation,
    last: lastMessage.content,
    send,
    stream: body.stream === true,
    includeUsage,
    sessionId,
  };
}

/**
 * `finite_memory: { pin?: boolean, unpin?: number[], forget?: number[] }`: pin keeps the new user
 * message through every eviction; unpin and forget take turn numbers (`finite_memory.turn.turn` of
 * earlier responses) and need a session, since a one-off request has no earlier turns.
 */
function parseMemoryField(v: unknown, hasSession: boolean): ParsedCompletion['memory'] {
  const out: ParsedCompletion['memory'] = { pin: false, unpin: [], forget: [] };
  if (v === undefined || v === null) return out;
  if (!isObject(v)) throw badRequest("'finite_memory' must be an object", 'finite_memory');
  for (const key of Object.keys(v)) {
    if (key !== 'pin' && key !== 'unpin' && key !== 'forget') throw badRequest(`Unknown field 'finite_memory.${key}' (pin, unpin, forget)`, `finite_memory.${key}`);
  }
  if (v.pin !== undefined && v.pin !== null) {
    if (typeof v.pin !== 'boolean') throw badRequest("'finite_memory.pin' must be a boolean", 'finite_memory.pin');
    out.pin = v.pin;
  }
  for (const key of ['unpin', 'forget'] as const) {
    const list = v[key];
    if (list === undefined || list === null) continue;
    if (!Array.isArray(list) || list.length > 64 || list.some((t) => typeof t !== 'number' || !Number.isInteger(t) || t < 1 || t > 0xffffffff)) {
      throw badRequest(`'finite_memory.${key}' must be an array of at most 64 turn numbers (positive integers)`, `finite_memory.${key}`);
    }
    if (list.length > 0 && !hasSession) throw badRequest(`'finite_memory.${key}' needs a session (X-Session-Id or user)`, `finite_memory.${key}`, 'session_required');
    out[key] = list as number[];
  }
  return out;
}

/** Maps anything thrown while serving to an OpenAI-style error. */
function toHttpError(err: unknown): HttpError {
  if (err instanceof HttpError) return err;
  if (err instanceof PromptTooLargeError) return badRequest(err.message, 'messages', 'context_length_exceeded');
  if (err instanceof PinLimitError) return badRequest(err.message, 'finite_memory.pin', 'pin_limit');
  if (err instanceof InvalidOptionError) return badRequest(err.message, null, 'invalid_value');
  // Server-side failures say what failed, never the details: those (file paths among them) go to the log.
  if (err instanceof CheckpointError) return new HttpError(500, 'server_error', 'session_store_failed', 'The session could not be stored or restored');
  if (err instanceof FiniteMemoryError) {
    if (err.code === 'CHAT_BUSY') return overloaded('The session is busy');
    return new HttpError(500, 'server_error', err.code.toLowerCase(), `The model failed to answer (${err.code})`);
  }
  const e = err as { statusCode?: unknown; code?: unknown; message?: unknown };
  const status = typeof e?.statusCode === 'number' ? e.statusCode : 500;
  const message = typeof e?.message === 'string' ? e.message : 'Internal server error';
  if (status === 413) return new HttpError(413, 'invalid_request_error', 'request_too_large', message);
  if (status === 415) return new HttpError(415, 'invalid_request_error', 'unsupported_media_type', message);
  if (status === 400) {
    const json = e.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || e.code === 'FST_ERR_CTP_EMPTY_JSON_BODY' || err instanceof SyntaxError;
    return badRequest(json ? `Could not parse the JSON body: ${message}` : message, null, json ? 'invalid_json' : 'invalid_request');
  }
  if (status >= 400 && status < 500) return new HttpError(status, 'invalid_request_error', typeof e.code === 'string' ? e.code.toLowerCase() : null, message);
  return new HttpError(500, 'server_error', 'internal_error', 'Internal server error');
}

function sendError(reply: FastifyReply, err: HttpError): FastifyReply {
  reply.code(err.status);
  for (const [k, v] of Object.entries(err.headers)) reply.header(k, v);
  return reply.send({ error: { message: err.message, type: err.type, param: err.param, code: err.code } });
}

const finishReason = (stop: StopReason): 'stop' | 'length' => (stop === 'maxTokens' ? 'length' : 'stop');
const sha256 = (s: string | Buffer) => createHash('sha256').update(s).digest();

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
  const apiKeyHash = options.apiKey !== undefined ? sha256(options.apiKey) : undefined;
  if (options.apiKey !== undefined && options.apiKey.length === 0) throw new InvalidOptionError('apiKey must not be empty');

  const persist = options.checkpointDir !== undefined;
  const dir = options.checkpointDir ?? (await mkdtemp(join(tmpdir(), 'fml-sessions-')));
  await mkdir(dir, { recursive: true });
  const ckptPath = (s: Session) => join(dir, `${s.key}.fmlckpt`);
  const metaPath = (s: Session) => join(dir, `${s.key}.json`);

  const registry = options.registry ?? new Registry();
  const telemetry = createPrometheusTelemetry({ registry });
  const sessions = new Map<string, Session>();
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

  const counts = () => {
    let live = 0;
    let stored = 0;
    for (const s of sessions.values()) {
      if (s.chat) live++;
      else if (s.stored) stored++;
    }
    return { live, stored };
  };
  new Gauge({
    name: 'finite_memory_server_sessions', help: 'Sessions live in memory and checkpointed on disk', labelNames: ['state'] as const, registers: [registry],
    collect() {
      const c = counts();
      this.set({ state: 'live' }, c.live);
      this.set({ state: 'stored' }, c.stored);
    },
  });
  new Gauge({ name: 'finite_memory_server_decoding', help: 'Requests holding a decode slot', registers: [registry], collect() { this.set(global.active); } });
  new Gauge({ name: 'finite_memory_server_queued', help: 'Requests waiting for a decode slot', registers: [registry], collect() { this.set(global.waiting); } });
  const requests = new Counter({ name: 'finite_memory_server_requests_total', help: 'HTTP requests by route and status', labelNames: ['route', 'status'] as const, registers: [registry] });
  const sessionEvents = new Counter({ name: 'finite_memory_server_session_events_total', help: 'Sessions created, checkpointed (LRU), restored and expired', labelNames: ['event'] as const, registers: [registry] });

  // Node's own limits on slow clients (fastify's default requestTimeout 0 turns them off): headers and
  // the whole request must arrive in time, idle keep-alive connections close, and the timers are
  // checked often enough to act within the limit (Node checks every 30 s by default).
  const app = fastify({
    bodyLimit, logger: options.logger ?? false, return503OnClosing: true,
    requestTimeout: requestTimeoutMs, keepAliveTimeout: keepAliveTimeoutMs,
    http: { headersTimeout: Math.min(headersTimeoutMs, requestTimeoutMs), connectionsCheckingInterval: Math.max(50, Math.min(1000, Math.floor(headersTimeoutMs / 4))) },
  });

  // ---- sessions: LRU eviction to checkpoints, restore, TTL ----

  const writeMeta = async (s: Session) => {
    const meta: SessionMeta = { id: s.id, messagesSeen: s.messagesSeen, lastUsed: s.lastUsed };
    const tmp = `${metaPath(s)}.tmp`;
    await writeFile(tmp, JSON.stringify(meta));
    await rename(tmp, metaPath(s));
  };
  const deleteFiles = (s: Session) => Promise.all([rm(ckptPath(s), { force: true }), rm(metaPath(s), { force: true })]);

  /** Checkpoints an idle live session and frees its chat. False when it is busy (or saving failed: it stays live). */
  const evict = async (s: Session): Promise<boolean> => {
    const release = s.gate.tryEnter();
    if (!release) return false;
    try {
      const chat = s.chat;
      if (!chat) return false;
      await chat.saveCheckpoint(ckptPath(s));
      await writeMeta(s);
      s.chat = undefined;
      s.stored = true;
      s.storedBytes = (await stat(ckptPath(s))).size;
      chat.dispose();
      sessionEvents.inc({ event: 'checkpointed' });
      return true;
    } catch (err) {
      app.log.error({ err, session: s.id }, 'checkpointing an idle session failed; it stays in memory');
      return false;
    } finally {
      release();
    }
  };

  /** Checkpoints least recently used idle sessions while more than `limit` are live. */
  const shrink = async (limit: number) => {
    while (counts().live > limit) {
      let victim: Session | undefined;
      for (const s of sessions.values()) if (s.chat && s.gate.idle && (!victim || s.lastUsed < victim.lastUsed)) victim = s;
      if (!victim || !(await evict(victim))) return;
      await capStored();
    }
  };

  /** Forgets a session that is not live: its checkpoint and metadata go. */
  const drop = async (s: Session, event: 'expired' | 'dropped') => {
    sessions.delete(s.id);
    sessionEvents.inc({ event });
    if (s.stored) await deleteFiles(s);
  };

  /** Deletes the least recently used checkpoints beyond maxStoredSessions / maxStoredBytes. */
  const capStored = async () => {
    const stored = [...sessions.values()].filter((s) => s.stored && !s.chat && s.gate.idle).sort((a, b) => a.lastUsed - b.lastUsed);
    let count = counts().stored;
    let bytes = stored.reduce((n, s) => n + s.storedBytes, 0);
    for (const s of stored) {
      if (count <= maxStoredSessions && bytes <= maxStoredBytes) break;
      count--;
      bytes -= s.storedBytes;
      await drop(s, 'dropped');
    }
  };

  const expire = () => {
    if (sessionTtlMs === 0) return;
    const now = Date.now();
    for (const s of sessions.values()) {
      if (!s.gate.idle || now - s.lastUsed <= sessionTtlMs) continue;
      s.chat?.dispose();
      s.chat = undefined;
      track(drop(s, 'expired')).catch((err) => app.log.warn({ err }, 'deleting an expired checkpoint failed'));
    }
  };
  const sweeper = sessionTtlMs > 0 ? setInterval(expire, Math.max(250, Math.min(60_000, Math.floor(sessionTtlMs / 4)))) : undefined;
  sweeper?.unref();

  const newSession = (id: string): Session => ({
    id, key: sha256(id).toString('hex').slice(0, 40), gate: new Gate(1, maxSessionQueue), chat: undefined, stored: false, messagesSeen: 0, lastUsed: Date.now(), storedBytes: 0,
  });

  // What a process killed mid-write left here: checkpoint temp files (native naming, only those of
  // dead processes) and session metadata temp files.
  getBinding().removeStaleCheckpointTemps(dir);

  // A configured checkpoint dir is read back: its sessions are restored on their next request.
  if (persist) {
    for (const name of await readdir(dir)) {
      if (name.endsWith('.json.tmp')) await rm(join(dir, name), { force: true });
      if (!name.endsWith('.json')) continue;
      try {
        const meta = JSON.parse(await readFile(join(dir, name), 'utf8')) as SessionMeta;
        const s = newSession(String(meta.id));
        if (`${s.key}.json` !== name) continue;
        s.messagesSeen = Number(meta.messagesSeen) || 0;
        s.lastUsed = Number(meta.lastUsed) || 0;
        const st = await stat(ckptPath(s)).catch(() => undefined);
        s.stored = st?.isFile() ?? false;
        s.storedBytes = st?.size ?? 0;
        if (!s.stored || (sessionTtlMs > 0 && Date.now() - s.lastUsed > sessionTtlMs)) await deleteFiles(s);
        else sessions.set(s.id, s);
      } catch (err) {
        app.log.warn({ err, file: name }, 'ignoring an unreadable session file');
      }
    }
    await capStored();
  }

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

  app.get('/health', async () => {
    const c = counts();
    return { status: 'ok', model: modelId, sessions: c, decoding: global.active, queued: global.waiting };
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
    if (shuttingDown) throw new HttpError(503, 'server_error', 'server_shutting_down', 'The server is shutting down', null, { connection: 'close' });
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

    const session = parsed.sessionId !== undefined ? (sessions.get(parsed.sessionId) ?? newSession(parsed.sessionId)) : undefined;
    if (session) sessions.set(session.id, session);
    let releaseSession: Release | undefined;
    let releaseSlot: Release | undefined;
    let oneOff: Chat | undefined;
    try {
      if (session) {
        const entering = session.gate.enter(ac.signal);
        if (!entering) throw overloaded('Too many requests queued for this session');
        releaseSession = await entering;
      }
      const slot = global.enter(ac.signal);
      if (!slot) throw overloaded('The server is at capacity');
      releaseSlot = await slot;

      // The chat: the session's (live, restored from its checkpoint, or new), or a one-off.
      let chat: Chat;
      let sessionReset: 'restore_failed' | undefined;
      let restored = false;
      let created = false;
      if (session?.chat) {
        chat = session.chat;
      } else if (session) {
        await shrink(maxSessions - 1);
        let restoredChat: Chat | undefined;
        if (session.stored) {
          try {
            restoredChat = await model.loadChat(ckptPath(session), { telemetry });
            restored = true;
            sessionEvents.inc({ event: 'restored' });
          } catch (err) {
            // Another model since a restart, a corrupt or vanished file: a session that cannot be
            // restored starts fresh (and says so) instead of failing every request from now on.
            app.log.warn({ err, session: session.id }, 'a stored session could not be restored; it starts fresh');
            sessionReset = 'restore_failed';
            session.messagesSeen = 0;
            sessionEvents.inc({ event: 'restore_failed' });
          }
          // A checkpoint exists only for a session that is not in memory (it would be stale from the next turn on).
          await deleteFiles(session);
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
        session.stored = false; // the checkpoint is stale from the first new turn on
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
      if (session && result.stats.promptTokens > 0) {
        // Reconciliation: a longer array means the client resends the whole conversation.
        session.messagesSeen = Math.max(parsed.conversation.length, session.messagesSeen + 1) + 1;
      }
      const stats: ChatStats = chat.stats();
      const usage = {
        prompt_tokens: importedTokens + result.stats.promptTokens,
        completion_tokens: result.stats.generatedTokens,
        total_tokens: importedTokens + result.stats.promptTokens + result.stats.generatedTokens,
      };
      const finite_memory: {
        session_id: string | null; restored: boolean; session_reset: 'restore_failed' | null; messages_seen: number | null; stop_reason: StopReason; turn: TurnStats; chat: ChatStats;
        pins: { turn: number; tokens: number }[];
      } = {
        session_id: session?.id ?? null, restored, session_reset: sessionReset ?? null, messages_seen: session?.messagesSeen ?? null, stop_reason: result.stopReason, turn: result.stats, chat: stats,
        pins: chat.pins(),
      };
      if (clientGone) {
        reply.hijack();
        res.destroy();
        return;
      }
      if (parsed.stream) {
        start();
        chunk({}, finishReason(result.stopReason), { finite_memory });
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
      if (err instanceof QueueAbortedError) throw new HttpError(503, 'server_error', 'server_shutting_down', 'The server is shutting down');
      throw err;
    } finally {
      res.off('close', onClose);
      controllers.delete(ac);
      releaseSlot?.();
      oneOff?.dispose();
      if (session) {
        session.lastUsed = Date.now();
        releaseSession?.();
        if (!session.chat && !session.stored && session.gate.idle) sessions.delete(session.id); // never got a chat
        void track(shrink(maxSessions));
      }
    }
  }

  // ---- shutdown ----

  let closing: Promise<void> | undefined;
  app.addHook('preClose', async () => {
    shuttingDown = true;
  });
  app.addHook('onClose', async () => {
    shuttingDown = true;
    clearInterval(sweeper);
    while (inflight.size > 0) await Promise.allSettled([...inflight]);
    for (const s of sessions.values()) {
      const chat = s.chat;
      if (!chat) continue;
      if (persist) {
        try {
          await chat.saveCheckpoint(ckptPath(s));
          await writeMeta(s);
          s.stored = true;
          s.storedBytes = (await stat(ckptPath(s))).size;
        } catch (err) {
          app.log.error({ err, session: s.id }, 'checkpointing a session at shutdown failed');
        }
      }
      s.chat = undefined;
      chat.dispose();
    }
    sessions.clear();
    if (!persist) await rm(dir, { recursive: true, force: true });
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
            controllers.forEach((c) => c.abort());
            app.server.closeAllConnections();
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
