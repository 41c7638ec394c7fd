/**
 * The finite-memory chat API for hosted OpenAI-compatible models. The remote KV cache is out of reach,
 * so memory is managed at the message level: every request carries the system prompt, the summary (if
 * any) and the newest messages that fit in `maxTokens`.
 *
 *   const remote = connectRemote({ baseURL: 'https://api.openai.com/v1', model: 'gpt-4o-mini' });
 *   const chat = remote.createChat({ policy: 'rolling_summary', maxTokens: 4000, systemPrompt: 'Be terse.' });
 *   const r = await chat.send('Hello', { maxNewTokens: 64 });
 */
import { DisposedError, InvalidOptionError } from '../shared/errors.js';
import { checkInt, checkNumber, checkObject, checkString } from '../shared/checks.js';
import { RemoteChat, type RemoteChatOptions } from './chat.js';
import { CircuitBreaker, Transport, type CircuitOptions, type RetryOptions } from './transport.js';

export { RemoteHttpError, RemoteUnavailableError, RemoteTimeoutError, CircuitOpenError } from '../shared/errors.js';
export type { RetryOptions, CircuitOptions } from './transport.js';

/** What counts tokens: anything with `tokenize(text) -> token[]`, e.g. a local `Model` from `loadModel`. */
export interface RemoteTokenizer {
  tokenize(text: string): readonly unknown[];
}

export interface RemoteOptions {
  /** The API's base URL, e.g. https://api.openai.com/v1 (requests go to `${baseURL}/chat/completions`). */
  baseURL: string;
  /** Bearer token. Default: `process.env.OPENAI_API_KEY` (none when unset). Never logged or put in errors. */
  apiKey?: string;
  /** The remote model id sent as `model`. */
  model: string;
  /** Counts tokens exactly (`tokenize(text).length`); without it, the estimate ceil(ASCII chars / 4) + other chars, + 4 per message. */
  tokenizer?: RemoteTokenizer;
  /** Default { retries: 2, minDelayMs: 250, maxDelayMs: 8000 }. */
  retry?: Partial<RetryOptions>;
  /** Per-attempt timeout, ms: for the answer (headers and a whole JSON body), and in a stream for each next event. Default 60000. */
  timeoutMs?: number;
  /** Default { failureThreshold: 5, cooldownMs: 30000 }. Shared by the chats of this connection. */
  circuit?: Partial<CircuitOptions>;
  /** fetch implementation (default: the global one). */
  fetch?: typeof fetch;
}

export interface RemoteConnection {
  createChat(options?: RemoteChatOptions): RemoteChat;
  /** Disposes every chat of this connection. */
  dispose(): void;
}

export function connectRemote(options: RemoteOptions): RemoteConnection {
  const o = checkObject('options', options);
  const baseURL = checkString('baseURL', o.baseURL);
  try {
    new URL(baseURL);
  } catch {
    throw new InvalidOptionError('Expected an absolute URL for baseURL');
  }
  const model = checkString('model', o.model);
  const apiKey = o.apiKey !== undefined ? checkString('apiKey', o.apiKey) : process.env.OPENAI_API_KEY || undefined;
  const tokenizer = o.tokenizer as RemoteTokenizer | undefined;
  if (tokenizer !== undefined && typeof tokenizer?.tokenize !== 'function') throw new InvalidOptionError('Expected an object with tokenize(text) for tokenizer');
  const r = checkObject('retry', o.retry);
  const retry: RetryOptions = {
    retries: r.retries === undefined ? 2 : checkInt('retry.retries', r.retries, 0, 100),
    minDelayMs: r.minDelayMs === undefined ? 250 : checkNumber('retry.minDelayMs', r.minDelayMs, 0, 3_600_000),
    maxDelayMs: r.maxDelayMs === undefined ? 8000 : checkNumber('retry.maxDelayMs', r.maxDelayMs, 0, 3_600_000),
  };
  const c = checkObject('circuit', o.circuit);
  const circuit: CircuitOptions = {
    failureThreshold: c.failureThreshold === undefined ? 5 : checkInt('circuit.failureThreshold', c.failureThreshold, 1, 1_000_000),
    cooldownMs: c.cooldownMs === undefined ? 30_000 : checkNumber('circuit.cooldownMs', c.cooldownMs, 0, 86_400_000),
  };
  const timeoutMs = o.timeoutMs === undefined ? 60_000 : checkNumber('timeoutMs', o.timeoutMs, 1, 3_600_000);
  const fetchImpl = (o.fetch ?? globalThis.fetch) as typeof fetch;
  if (typeof fetchImpl !== 'function') throw new InvalidOptionError('Expected a function for fetch');
  const transport = new Transport({ baseURL, apiKey, retry, timeoutMs, circuit: new CircuitBreaker(circuit), fetch: fetchImpl });
  const chats = new Set<RemoteChat>();
  let disposed = false;
  return {
    createChat(chatOptions = {}) {
      if (disposed) throw new DisposedError('remote connection');
      const chat = new RemoteChat(transport, model, tokenizer, chatOptions, () => chats.delete(chat));
      chats.add(chat);
      return chat;
    },
    dispose() {
      disposed = true;
      for (const chat of [...chats]) chat.dispose();
    },
  };
}

