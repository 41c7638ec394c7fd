/** The remote chat's options: defaults (one table), validation of createChat's and send's options. */
import { InvalidOptionError } from '../shared/errors.js';
import { checkInt, checkKnownKeys, checkNumber, checkObject, checkString } from '../shared/checks.js';
import { checkTelemetry } from '../shared/telemetry.js';
import type { ToolDefinition } from '../shared/types.js';
import type { RemotePolicyName, RemoteTelemetry } from './types.js';

const REMOTE_POLICIES: readonly RemotePolicyName[] = ['sliding', 'rolling_summary', 'hybrid'];

export interface ResolvedRemoteChatOptions {
  policy: RemotePolicyName;
  maxTokens: number;
  systemPrompt: string;
  summaryTokens: number;
  windowSize: number;
  /** Sent with every request as `tools` (the remote renders them; they count in no budget here). */
  tools?: ToolDefinition[];
}

/**
 * The remote chat's defaults. Where one differs from the local chat's (native/engine/options.cpp),
 * `differs` says why; a test checks that every other shared option has the local default, and that
 * docs/remote.md gives each reason.
 */
export const REMOTE_CHAT_DEFAULTS = {
  policy: {
    value: (): RemotePolicyName => 'sliding',
    differs: 'importance reads the attention a local KV cache received, which a hosted model does not expose',
  },
  systemPrompt: { value: () => '' },
  maxTokens: {
    value: () => 4096,
    differs: 'a hosted model\'s context is larger, and the budget counts the tokens each request resends, not a KV cache kept between turns',
  },
  summaryTokens: {
    value: (maxTokens: number) => Math.max(8, Math.min(256, Math.floor(maxTokens / 8))),
    differs: 'the summary is written by the hosted model in its own request (its max_tokens), so it may be longer; at least 8 tokens to say anything',
  },
  windowSize: {
    value: (maxTokens: number) => Math.floor(maxTokens / 2),
    differs: 'for hybrid it is the newest history kept verbatim when summarizing, in messages rather than tokens of a cache: half the budget keeps whole recent exchanges',
  },
} as const;

export function resolveRemoteChatOptions(raw: unknown): ResolvedRemoteChatOptions & { telemetry?: RemoteTelemetry } {
  const o = checkObject('options', raw);
  checkKnownKeys('options', o, ['policy', 'maxTokens', 'systemPrompt', 'summaryTokens', 'windowSize', 'tools', 'telemetry']);
  const d = REMOTE_CHAT_DEFAULTS;
  const policy = o.policy ?? d.policy.value();
  if (typeof policy !== 'string' || !(REMOTE_POLICIES as readonly string[]).includes(policy)) {
    throw new InvalidOptionError(`The remote backend supports policies ${REMOTE_POLICIES.join(', ')}; ${JSON.stringify(policy)} needs the local KV cache (use loadModel)`);
  }
  const maxTokens = o.maxTokens === undefined ? d.maxTokens.value() : checkInt('maxTokens', o.maxTokens, 16, 1 << 24);
  const out: ResolvedRemoteChatOptions & { telemetry?: RemoteTelemetry } = {
    policy: policy as RemotePolicyName,
    maxTokens,
    systemPrompt: o.systemPrompt === undefined ? d.systemPrompt.value() : checkString('systemPrompt', o.systemPrompt),
    summaryTokens: o.summaryTokens === undefined ? d.summaryTokens.value(maxTokens) : checkInt('summaryTokens', o.summaryTokens, 1, Math.floor(maxTokens / 2)),
    windowSize: o.windowSize === undefined ? d.windowSize.value(maxTokens) : checkInt('windowSize', o.windowSize, 0, maxTokens),
  };
  if (o.tools !== undefined) out.tools = checkTools(o.tools);
  const telemetry = checkTelemetry<RemoteTelemetry>(o.telemetry, ['onTurn', 'onError', 'onClose']);
  if (telemetry) out.telemetry = telemetry;
  return out;
}

/** OpenAI's function tools (the remote checks their schemas): 1 to 128, each named, as JSON. */
function checkTools(v: unknown): ToolDefinition[] {
  if (!Array.isArray(v) || v.length === 0 || v.length > 128) throw new InvalidOptionError('Expected an array of 1 to 128 tools for tools');
  v.forEach((t: unknown, i: number) => {
    const f = (t as { function?: { name?: unknown } } | null)?.function;
    if (t === null || typeof t !== 'object' || (t as { type?: unknown }).type !== 'function' || typeof f?.name !== 'string' || !/^[A-Za-z0-9_-]{1,64}$/.test(f.name)) {
      throw new InvalidOptionError(`Expected { type: 'function', function: { name (1-64 letters, digits, _ or -), description?, parameters? } } for tools[${i}]`);
    }
  });
  try {
    return JSON.parse(JSON.stringify(v)) as ToolDefinition[];
  } catch (err) {
    throw new InvalidOptionError(`Expected JSON-serializable tools: ${(err as Error).message}`);
  }
}

export interface ResolvedRemoteSendOptions {
  maxNewTokens: number;
  temperature?: number;
  seed?: number;
  stop: string[];
  onToken?: (piece: string) => void;
  onReasoning?: (piece: string) => void;
  thinking?: boolean;
  jsonSchema?: object;
  /** OpenAI's tool_choice as sent. */
  toolChoice?: 'auto' | 'none' | 'required' | { type: 'function'; function: { name: string } };
  parallelToolCalls?: boolean;
  signal?: AbortSignal;
}

export function resolveRemoteSendOptions(raw: unknown): ResolvedRemoteSendOptions {
  const o = checkObject('options', raw);
  checkKnownKeys('options', o, ['maxNewTokens', 'temperature', 'seed', 'stop', 'onToken', 'onReasoning', 'thinking', 'jsonSchema', 'toolChoice', 'parallelToolCalls', 'signal']);
  const out: ResolvedRemoteSendOptions = { maxNewTokens: o.maxNewTokens === undefined ? 256 : checkInt('maxNewTokens', o.maxNewTokens, 1, 1 << 24), stop: [] };
  if (o.temperature !== undefined) out.temperature = checkNumber('temperature', o.temperature, 0, 2);
  if (o.seed !== undefined) out.seed = checkInt('seed', o.seed, 0, Number.MAX_SAFE_INTEGER);
  if (o.stop !== undefined) {
    if (!Array.isArray(o.stop) || o.stop.length > 16) throw new InvalidOptionError('Expected an array of at most 16 strings for stop');
    out.stop = o.stop.map((s, i) => checkString(`stop[${i}]`, s, 1024)).filter((s) => s.length > 0);
  }
  if (o.onToken !== undefined) {
    if (typeof o.onToken !== 'function') throw new InvalidOptionError('Expected a function for onToken');
    out.onToken = o.onToken as (piece: string) => void;
  }
  if (o.thinking !== undefined) {
    if (typeof o.thinking !== 'boolean') throw new InvalidOptionError('Expected a boolean for thinking');
    out.thinking = o.thinking;
  }
  if (o.jsonSchema !== undefined) {
    // Sent as it is (the remote converts it); text is parsed here so a typo fails before a request.
    let schema: unknown = o.jsonSchema;
    if (typeof schema === 'string') {
      try {
        schema = JSON.parse(schema);
      } catch {
        throw new InvalidOptionError('Expected a JSON schema (an object, or its JSON text) for jsonSchema: the text is not JSON');
      }
    }
    if (schema === null || typeof schema !== 'object' || Array.isArray(schema)) throw new InvalidOptionError('Expected a JSON schema (an object, or its JSON text) for jsonSchema');
    out.jsonSchema = schema;
  }
  if (o.toolChoice !== undefined) {
    const c = o.toolChoice as { name?: unknown; function?: { name?: unknown } } | string;
    const name = typeof c === 'object' && c !== null ? (c.name ?? c.function?.name) : undefined;
    if (c === 'auto' || c === 'none' || c === 'required') out.toolChoice = c;
    else if (typeof name === 'string') out.toolChoice = { type: 'function', function: { name } };
    else throw new InvalidOptionError("Expected 'auto', 'none', 'required', { name } or { type: 'function', function: { name } } for toolChoice");
  }
  if (o.parallelToolCalls !== undefined) {
    if (typeof o.parallelToolCalls !== 'boolean') throw new InvalidOptionError('Expected a boolean for parallelToolCalls');
    out.parallelToolCalls = o.parallelToolCalls;
  }
  if (o.onReasoning !== undefined) {
    if (typeof o.onReasoning !== 'function') throw new InvalidOptionError('Expected a function for onReasoning');
    out.onReasoning = o.onReasoning as (piece: string) => void;
  }
  if (o.signal !== undefined) {
    if (!(o.signal instanceof AbortSignal)) throw new InvalidOptionError('Expected an AbortSignal for signal');
    out.signal = o.signal;
  }
  return out;
}
