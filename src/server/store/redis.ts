/**
 * The Redis session backend: instances share sessions. Keys are namespaced by the model's fingerprint
 * (or a namespace the deployment names) inside one hash tag, `fml:{<namespace>}:...`, so each script
 * below touches one slot (laid out for Redis Cluster, which this client does not speak: it connects
 * to one Redis and does not follow MOVED redirections).
 *
 *   fml:{ns}:s:<key>      hash: id, version, messagesSeen, lastUsed, ledger, full, fullVersion (TTL)
 *   fml:{ns}:lease:<key>  the lease: its fencing token, with an expiry
 *   fml:{ns}:fence        the counter fencing tokens come from (only grows)
 *   fml:{ns}:index        sorted set of keys by last use (TTL sweep, LRU caps)
 *   fml:{ns}:sizes        hash key -> bytes stored;  fml:{ns}:total  their sum
 *
 * Writes are compare-and-set in Lua: refused unless the lease holds the writer's token and the stored
 * version is older (ledger) or equal (full). Caps on sessions and bytes are enforced in the same script.
 * Commands fail fast while Redis is unreachable (no offline queue, a timeout each, also once sent);
 * a Redis that keeps its connections but stops answering (a stopped process, a hung host) is seen by
 * the pings going unanswered: the socket closes and the client reconnects by itself, and `available`
 * says which state it is in.
 */
import { createHash } from 'node:crypto';
import { createClient, RESP_TYPES } from 'redis';
import { StaleWriteError, StoreUnavailableError, type AcquireResult, type BackendLimits, type LedgerWrite, type SessionBackend, type StoredSession } from './backend.js';

/** How long one Redis command may take before the store counts as unavailable. */
const COMMAND_TIMEOUT_MS = 2_000;
/**
 * A full checkpoint can be hundreds of MiB on a large model (256 MiB: over 2 s at 1 Gbit/s): its
 * write and read get longer, on a connection of their own, so that other sessions' commands do not
 * wait behind it (one connection answers in order) and time out.
 */
const FULL_TRANSFER_TIMEOUT_MS = 60_000;
/**
 * A PING this often keeps the connection busy, so that a socket silent for SOCKET_TIMEOUT_MS means a
 * Redis that stopped answering: the socket closes, `available` turns false (/health: degraded) and the
 * client reconnects. Without it a stopped Redis left every command and shutdown waiting for ever.
 */
const PING_INTERVAL_MS = 1_000;
const SOCKET_TIMEOUT_MS = 5_000;

// Drops one member (its data, size and index entry). Used by the limits below.
const DROP = `
local function drop(prefix, index, sizes, total, m)
  redis.call('DEL', prefix .. 's:' .. m)
  local sz = tonumber(redis.call('HGET', sizes, m) or '0')
  redis.call('HDEL', sizes, m)
  redis.call('INCRBY', total, -sz)
  redis.call('ZREM', index, m)
end
local function limits(prefix, index, sizes, total, keep, now, ttl, maxSessions, maxBytes)
  if ttl > 0 then
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now - ttl)) do
      if m ~= keep then drop(prefix, index, sizes, total, m) end
    end
  end
  -- The least recently used first, never the session just written nor one leased (a turn runs on it).
  while redis.call('ZCARD', index) > maxSessions or tonumber(redis.call('GET', total) or '0') > maxBytes do
    local victim = nil
    for _, m in ipairs(redis.call('ZRANGE', index, 0, 31)) do
      if m ~= keep and redis.call('EXISTS', prefix .. 'lease:' .. m) == 0 then victim = m break end
    end
    if not victim then break end
    drop(prefix, index, sizes, total, victim)
  end
end
local function usage(index, total)
  return {'ok', redis.call('ZCARD', index), tonumber(redis.call('GET', total) or '0')}
end
local function resize(index, sizes, total, m, size, now)
  local old = tonumber(redis.call('HGET', sizes, m) or '0')
  redis.call('HSET', sizes, m, size)
  redis.call('INCRBY', total, size - old)
  if now then redis.call('ZADD', index, now, m) end
end
`;

const SCRIPTS = {
  // KEYS lease fence data; ARGV ms -> {token, version} or {-1, pttl}
  acquire: `
local t = redis.call('PTTL', KEYS[1])
if t ~= -2 then return {-1, t} end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return {token, tonumber(redis.call('HGET', KEYS[3], 'version') or '0')}`,
  // KEYS lease; ARGV token ms
  renew: `
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1`,
  release: `
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1`,
  // KEYS lease data index sizes total; ARGV token version id messagesSeen lastUsed ledger member now ttl maxSessions maxBytes prefix
  writeLedger: `${DROP}
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'lease'} end
if tonumber(redis.call('HGET', KEYS[2], 'version') or '0') >= tonumber(ARGV[2]) then return {'version'} end
redis.call('HDEL', KEYS[2], 'full', 'fullVersion')
redis.call('HSET', KEYS[2], 'id', ARGV[3], 'version', ARGV[2], 'messagesSeen', ARGV[4], 'lastUsed', ARGV[5], 'ledger', ARGV[6])
local ttl = tonumber(ARGV[9])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
resize(KEYS[3], KEYS[4], KEYS[5], ARGV[7], string.len(ARGV[6]), ARGV[8])
limits(ARGV[12], KEYS[3], KEYS[4], KEYS[5], ARGV[7], tonumber(ARGV[8]), ttl, tonumber(ARGV[10]), tonumber(ARGV[11]))
return usage(KEYS[3], KEYS[5])`,
  // KEYS lease data index sizes total; ARGV token version full member now ttl maxSessions maxBytes prefix
  writeFull: `${DROP}
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'lease'} end
if redis.call('HGET', KEYS[2], 'version') ~= ARGV[2] then return {'version'} end
redis.call('HSET', KEYS[2], 'full', ARGV[3], 'fullVersion', ARGV[2])
resize(KEYS[3], KEYS[4], KEYS[5], ARGV[4], redis.call('HSTRLEN', KEYS[2], 'ledger') + string.len(ARGV[3]), nil)
limits(ARGV[9], KEYS[3], KEYS[4], KEYS[5], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]))
return usage(KEYS[3], KEYS[5])`,
  // KEYS index sizes total; ARGV member prefix
  delete: `${DROP}
drop(ARGV[2], KEYS[1], KEYS[2], KEYS[3], ARGV[1])
return usage(KEYS[1], KEYS[3])`,
} as const;

type ScriptName = keyof typeof SCRIPTS;
const SHA = Object.fromEntries(Object.entries(SCRIPTS).map(([k, v]) => [k, createHash('sha1').update(v).digest('hex')])) as Record<ScriptName, string>;

export interface RedisBackendOptions {
  /** redis://[user:password@]host:port/db, or rediss:// for TLS. */
  url: string;
  /** PEM of the CA that signed a rediss:// server's certificate (default: Node's trusted CAs). */
  ca?: string;
  /** Key namespace (default: the model's fingerprint): instances of one model share sessions. */
  namespace: string;
  limits: BackendLimits;
  log: { warn(obj: object, msg: string): void; info(obj: object, msg: string): void };
}

/** What this backend uses of node-redis's client. */
interface Client {
  readonly isReady: boolean;
  connect(): Promise<unknown>;
  close(): Promise<void>;
  destroy(): void;
  on(event: string, listener: (...args: any[]) => void): unknown; // eslint-disable-line @typescript-eslint/no-explicit-any
  sendCommand<T>(args: (string | Buffer)[], options: { timeout: number; rejectInFlight: boolean; typeMapping: object }): Promise<T>;
}

export class RedisBackend implements SessionBackend {
  readonly kind = 'redis';
  readonly durable = true;
  readonly #client: Client;
  /** Full checkpoints' reads and writes (see FULL_TRANSFER_TIMEOUT_MS). */
  readonly #bulk: Client;
  readonly #o: RedisBackendOptions;
  readonly #prefix: string;
  #available = false;
  #closed = false;
  #everReady = false;
  #usage = { sessions: 0, bytes: 0 };

  private constructor(client: Client, bulk: Client, o: RedisBackendOptions) {
    this.#client = client;
    this.#bulk = bulk;
    this.#o = o;
    this.#prefix = `fml:{${o.namespace}}:`;
  }

  get available(): boolean {
    return this.#available && this.#client.isReady;
  }

  /** Connects (within a few seconds, else StoreUnavailableError): a server does not start on a store it cannot reach. */
  static async open(o: RedisBackendOptions): Promise<RedisBackend> {
    const options = {
      url: o.url,
      disableOfflineQueue: true,
      pingInterval: PING_INTERVAL_MS,
      // Before the first connection a few quick tries (then open() fails); after it, reconnect for ever.
      socket: {
        ...(o.url.startsWith('rediss:') ? { tls: true as const, ...(o.ca !== undefined ? { ca: o.ca } : {}) } : {}),
        connectTimeout: COMMAND_TIMEOUT_MS,
        socketTimeout: SOCKET_TIMEOUT_MS,
        reconnectStrategy: (retries: number, cause: Error) => (!b.#everReady && retries >= 3 ? cause : Math.min(50 * 2 ** Math.min(retries, 6), 2_000)),
      },
    };
    const client: Client = createClient(options);
    const bulk: Client = createClient(options);
    const b = new RedisBackend(client, bulk, o);
    client.on('error', (err: Error) => {
      if (b.#available) o.log.warn({ err: err.message }, 'the session store (Redis) is unreachable; sessions are served from memory and their writes retried');
      b.#available = false;
    });
    // The main connection says whether Redis is reachable; a failed full transfer is retried (a write)
    // or falls back to the ledger (a read). Its connection's errors are said once, till it is back.
    let bulkDown = false;
    bulk.on('error', (err: Error) => {
      if (!bulkDown && !b.#closed) o.log.warn({ err: err.message }, 'the session store\'s connection for full checkpoints failed; sessions are restored from their ledgers meanwhile');
      bulkDown = true;
    });
    bulk.on('ready', () => {
      bulkDown = false;
    });
    client.on('ready', () => {
      b.#everReady = true;
      if (!b.#available && !b.#closed) o.log.info({}, 'the session store (Redis) is reachable');
      b.#available = true;
    });
    const timeout = new Promise<never>((_, reject) => setTimeout(() => reject(new StoreUnavailableError(`Cannot reach the session store at ${redactUrl(o.url)}`)), 5_000).unref());
    try {
      await Promise.race([Promise.all([client.connect(), bulk.connect()]), timeout]);
    } catch (err) {
      client.destroy();
      bulk.destroy();
      throw err instanceof StoreUnavailableError ? err : new StoreUnavailableError(`Cannot reach the session store at ${redactUrl(o.url)}: ${(err as Error).message}`, { cause: err });
    }
    b.#available = true;
    try {
      await b.refreshUsage();
    } catch (err) {
      client.destroy();
      bulk.destroy();
      throw err instanceof StoreUnavailableError ? err : new StoreUnavailableError(`The session store at ${redactUrl(o.url)} refused a command: ${(err as Error).message}`, { cause: err });
    }
    return b;
  }

  #k(kind: 's' | 'lease', key: string): string {
    return `${this.#prefix}${kind}:${key}`;
  }

  /** One command on the main connection, or (`bulk`) on the one for full checkpoints with their timeout. */
  async #send<T>(args: (string | Buffer)[], bulk = false): Promise<T> {
    if (!this.available) throw new StoreUnavailableError('The session store (Redis) is unreachable');
    const conn = bulk ? this.#bulk : this.#client;
    try {
      // rejectInFlight: the timeout holds after the command was sent too (node-redis's applies only
      // while it waits to be sent). A write that timed out may still land: the versions then say the
      // store holds this instance's turn, which a restore brings back, never an older one.
      const timeout = bulk ? FULL_TRANSFER_TIMEOUT_MS : COMMAND_TIMEOUT_MS;
      return await conn.sendCommand<T>(args, { timeout, rejectInFlight: true, typeMapping: { [RESP_TYPES.BLOB_STRING]: Buffer } });
    } catch (err) {
      if (err instanceof Error && /ERR|WRONGTYPE|NOSCRIPT/.test(err.message) && conn.isReady) throw err;
      throw new StoreUnavailableError(`The session store (Redis) failed: ${(err as Error).message}`, { cause: err });
    }
  }

  /** EVALSHA, loading the script on NOSCRIPT (a restarted Redis has none cached). */
  async #run<T>(name: ScriptName, keys: string[], args: (string | number | Buffer | Uint8Array)[], bulk = false): Promise<T> {
    const a = args.map((v) => (v instanceof Uint8Array ? Buffer.from(v.buffer, v.byteOffset, v.byteLength) : String(v)));
    try {
      return await this.#send<T>(['EVALSHA', SHA[name], String(keys.length), ...keys, ...a], bulk);
    } catch (err) {
      if (!(err instanceof Error) || !err.message.includes('NOSCRIPT')) throw err;
      return this.#send<T>(['EVAL', SCRIPTS[name], String(keys.length), ...keys, ...a], bulk);
    }
  }

  #shared(): string[] {
    return [`${this.#prefix}index`, `${this.#prefix}sizes`, `${this.#prefix}total`];
  }

  async acquire(key: string, leaseMs: number): Promise<AcquireResult> {
    const [token, v] = await this.#run<[number, number]>('acquire', [this.#k('lease', key), `${this.#prefix}fence`, this.#k('s', key)], [leaseMs]);
    return token < 0 ? { heldMs: Math.max(1, v) } : { token, version: v };
  }

  async renew(key: string, token: number, leaseMs: number): Promise<boolean> {
    return (await this.#run<number>('renew', [this.#k('lease', key)], [token, leaseMs])) === 1;
  }

  async release(key: string, token: number): Promise<void> {
    await this.#run('release', [this.#k('lease', key)], [token]);
  }

  async read(key: string): Promise<StoredSession | undefined> {
    const r = await this.#send<(Buffer | null)[]>(['HMGET', this.#k('s', key), 'id', 'version', 'messagesSeen', 'lastUsed', 'ledger', 'fullVersion']);
    const [id, version, messagesSeen, lastUsed, ledger, fullVersion] = r;
    if (!id || !version || !ledger) return undefined;
    const v = Number(version.toString());
    return {
      id: id.toString('utf8'), version: v, messagesSeen: Number(messagesSeen?.toString()) || 0, lastUsed: Number(lastUsed?.toString()) || 0,
      ledger, full: Number(fullVersion?.toString()) === v ? await this.#readFull(key, v) : undefined,
    };
  }

  /** The full checkpoint of `version`, on the bulk connection; undefined (a ledger restore) when that fails. */
  async #readFull(key: string, version: number): Promise<Buffer | undefined> {
    try {
      const [full, fullVersion] = await this.#send<(Buffer | null)[]>(['HMGET', this.#k('s', key), 'full', 'fullVersion'], true);
      return full && Number(fullVersion?.toString()) === version ? full : undefined;
    } catch (err) {
      this.#o.log.warn({ err: (err as Error).message }, 'reading a full checkpoint from the session store failed; the session is restored from its ledger');
      return undefined;
    }
  }

  /** A write script's reply: refused (StaleWriteError), or the store's usage after it. */
  #check(reply: unknown): void {
    const [status, sessions, bytes] = reply as [Buffer | string, number, number];
    const r = String(status);
    if (r === 'lease' || r === 'version') throw new StaleWriteError(r);
    this.#usage = { sessions: Number(sessions), bytes: Number(bytes) };
  }

  #limitArgs(): number[] {
    const l = this.#o.limits;
    return [l.sessionTtlMs, l.maxStoredSessions, l.maxStoredBytes];
  }

  async writeLedger(key: string, token: number, w: LedgerWrite): Promise<void> {
    this.#check(await this.#run('writeLedger', [this.#k('lease', key), this.#k('s', key), ...this.#shared()],
      [token, w.version, w.id, w.messagesSeen, w.lastUsed, w.ledger, key, Date.now(), ...this.#limitArgs(), this.#prefix]));
  }

  async writeFull(key: string, token: number, version: number, full: Uint8Array): Promise<void> {
    this.#check(await this.#run('writeFull', [this.#k('lease', key), this.#k('s', key), ...this.#shared()],
      [token, version, full, key, Date.now(), ...this.#limitArgs(), this.#prefix], true));
  }

  async delete(key: string): Promise<void> {
    this.#check(await this.#run('delete', this.#shared(), [key, this.#prefix]));
  }

  async expire(): Promise<void> {}

  usage(): { sessions: number; bytes: number } {
    return this.#usage;
  }

  async refreshUsage(): Promise<void> {
    const [index, , total] = this.#shared();
    const sessions = await this.#send<number>(['ZCARD', index!]);
    const bytes = await this.#send<Buffer | null>(['GET', total!]);
    this.#usage = { sessions: Number(sessions), bytes: Number(bytes?.toString() ?? 0) };
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#available = false;
    // close() waits for the replies of commands already sent, which a Redis that stopped answering
    // never gives (their callers gave up at their timeouts): then the socket is destroyed.
    await Promise.all([this.#client, this.#bulk].map(async (conn) => {
      let timer: NodeJS.Timeout | undefined;
      try {
        if (!conn.isReady) conn.destroy();
        else await Promise.race([conn.close(), new Promise<void>((_, reject) => { timer = setTimeout(() => reject(new Error('close timed out')), COMMAND_TIMEOUT_MS); })]);
      } catch {
        conn.destroy();
      } finally {
        clearTimeout(timer);
      }
    }));
  }
}

/** The URL without its password (for messages). */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return '(an invalid URL)';
  }
}
