/**
 * The server's options: what `createServer` takes, their defaults (one table, SERVER_DEFAULTS) and
 * their validation. The CLI's `serve` flags map onto these one to one.
 */
import { hostname } from 'node:os';
import { basename, extname } from 'node:path';
import type { FastifyServerOptions } from 'fastify';
import type { Registry } from 'prom-client';
import type { Model } from '../local/model.js';
import { resolveChatOptions, type ChatOptions } from '../local/options.js';
import { InvalidOptionError } from '../shared/errors.js';
import { redactUrl } from './store/redis.js';

export interface ServerOptions {
  /** The id clients pass as `model` (and /v1/models lists). Default: the model file's name without extension. */
  modelId?: string;
  /** Options of every chat the server creates (sessions and one-off requests). A request's system message overrides `systemPrompt`. */
  chat?: Omit<ChatOptions, 'telemetry'>;
  /** Require `Authorization: Bearer <apiKey>` on every route except /health. */
  apiKey?: string;
  /**
   * Without an apiKey, host names (Host header) the server answers besides IP addresses and localhost
   * (others get 403 forbidden_host: a guard against DNS rebinding); `['*']`: any. Default none.
   */
  allowedHosts?: string[];
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
   * (TLS). Instead of checkpointDir. Every turn's ledger is written through to it; see docs/server.md's
   * "Sessions that outlive a process".
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
  /** Serve the memory inspector page at `/` (chat with a session and watch its memory). Default true. */
  ui?: boolean;
  /** This instance's name in responses (`finite_memory.instance`): which instance behind a load balancer served a turn. Default host:pid. */
  instanceId?: string;
}

/** Every integer option's default and lower bound (the defaults that depend on the model are functions of it). */
export const SERVER_DEFAULTS = {
  maxSessions: { def: 32, min: 1 },
  sessionTtlMs: { def: 30 * 60_000, min: 0 },
  maxTokensPerRequest: { def: 1024, min: 1 },
  defaultMaxTokens: { def: 256, min: 1 },
  bodyLimit: { def: 1 << 20, min: 1 },
  maxConcurrent: { def: (m: Model) => m.info.slots, min: 1 },
  maxQueue: { def: 64, min: 0 },
  maxSessionQueue: { def: 4, min: 0 },
  headersTimeoutMs: { def: 10_000, min: 1 },
  requestTimeoutMs: { def: 30_000, min: 1 },
  keepAliveTimeoutMs: { def: 5_000, min: 1 },
  maxHistoryTokens: { def: (_m: Model, maxTokens: number) => 8 * maxTokens, min: 0 },
  maxStoredSessions: { def: 256, min: 0 },
  maxStoredBytes: { def: 8 * 1024 ** 3, min: 0 },
  leaseMs: { def: 10_000, min: 100 },
  leaseWaitMs: { def: 2_000, min: 0 },
  snapshotIdleMs: { def: 30_000, min: 0 },
} as const;

type IntOption = keyof typeof SERVER_DEFAULTS;

export type ResolvedServerOptions = Required<Pick<ServerOptions, IntOption>> & {
  modelId: string;
  chat: Omit<ChatOptions, 'telemetry'>;
  /** The chat options' maxTokens, resolved. */
  chatMaxTokens: number;
  apiKey: string | undefined;
  allowedHosts: string[];
  checkpointDir: string | undefined;
  store: string | undefined;
  storeCa: string | undefined;
  storeNamespace: string;
  fullSnapshots: boolean;
  ui: boolean;
  instanceId: string;
  registry: Registry | undefined;
  logger: FastifyServerOptions['logger'];
};

/** Validates `options` (InvalidOptionError) and fills in the defaults. */
export function resolveServerOptions(model: Model, options: ServerOptions): ResolvedServerOptions {
  const chat = { ...(options.chat ?? {}) };
  const chatMaxTokens = resolveChatOptions(chat, 1).maxTokens; // invalid chat options fail here, not on the first request
  const ints = {} as Record<IntOption, number>;
  for (const name of Object.keys(SERVER_DEFAULTS) as IntOption[]) {
    const { def, min } = SERVER_DEFAULTS[name];
    const v = options[name];
    if (v !== undefined && (!Number.isInteger(v) || v < min)) throw new InvalidOptionError(`Expected an integer >= ${min} for ${name} but received ${String(v)}`);
    ints[name] = v ?? (typeof def === 'function' ? def(model, chatMaxTokens) : def);
  }
  ints.defaultMaxTokens = Math.min(ints.defaultMaxTokens, ints.maxTokensPerRequest);
  if (options.store !== undefined && options.checkpointDir !== undefined) throw new InvalidOptionError('Give either store (Redis) or checkpointDir, not both');
  if (options.store !== undefined && !/^rediss?:\/\/[^\s]+$/.test(options.store)) throw new InvalidOptionError(`store must be a redis:// or rediss:// URL but received ${JSON.stringify(redactUrl(options.store))}`);
  if (options.storeNamespace !== undefined && !/^[A-Za-z0-9._-]{1,64}$/.test(options.storeNamespace)) throw new InvalidOptionError('storeNamespace must be 1-64 characters of A-Z a-z 0-9 . _ -');
  if (options.apiKey !== undefined && options.apiKey.length === 0) throw new InvalidOptionError('apiKey must not be empty');
  if (options.allowedHosts !== undefined && (!Array.isArray(options.allowedHosts) || options.allowedHosts.some((h) => typeof h !== 'string' || h === '' || /[\s/:@]/.test(h)))) {
    throw new InvalidOptionError('allowedHosts must be an array of host names (no ports, schemes or spaces), or [\'*\']');
  }
  return {
    ...ints,
    modelId: options.modelId ?? basename(model.info.path, extname(model.info.path)),
    chat, chatMaxTokens,
    apiKey: options.apiKey,
    allowedHosts: [...(options.allowedHosts ?? [])],
    checkpointDir: options.checkpointDir,
    store: options.store,
    storeCa: options.storeCa,
    storeNamespace: options.storeNamespace ?? model.info.fingerprint.slice(0, 16),
    fullSnapshots: options.fullSnapshots ?? true,
    ui: options.ui ?? true,
    instanceId: options.instanceId ?? `${hostname()}:${process.pid}`,
    registry: options.registry,
    logger: options.logger ?? false,
  };
}
