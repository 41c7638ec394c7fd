/**
 * The OpenAI wire format: request parsing and validation (every bad field a 400 naming it), API
 * errors as `{ error: { message, type, param, code } }`, and the mapping of library errors to them.
 */
import { createHash } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Chat } from '../local/chat.js';
import { jsonSchemaToGrammarAsync } from '../local/grammar.js';
import { exchangesOf } from '../shared/chat-surface.js';
import { CheckpointError, FiniteMemoryError, InvalidOptionError, PinLimitError, PromptTooLargeError, UnsupportedModelError } from '../shared/errors.js';
import { POLICIES, type ConversationMessage, type PolicyName, type StopReason, type ToolCall, type ToolResult } from '../shared/types.js';
import type { ToolChoice } from '../shared/types.js';
import { StoreUnavailableError } from './store/backend.js';

/** One API error, rendered as `{ error: { message, type, param, code } }`. */
export class HttpError extends Error {
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

export const badRequest = (message: string, param: string | null = null, code: string | null = 'invalid_value') =>
  new HttpError(400, 'invalid_request_error', code, message, param);
export const overloaded = (what: string) =>
  new HttpError(429, 'rate_limit_error', 'rate_limit_exceeded', `${what}; retry later`, null, { 'retry-after': '1' });
/** The store cannot be reached and the session is not in memory here (or a store command failed mid-request). */
export const storeUnavailable = () =>
  new HttpError(503, 'server_error', 'session_store_unavailable', 'The session store is unreachable and this session is not in memory here; retry shortly', null, { 'retry-after': '1' });

export type Message = ConversationMessage;

export interface ParsedCompletion {
  system: string | undefined;
  /** Conversation messages (system messages removed), the last one being the user's new turn. */
  conversation: Message[];
  last: string;
  /**
   * What a chat made for this request (one-off, or a new session) prefills before its turn, and the
   * turn's message: user messages in a row before the last one are joined to it (blank lines between),
   * so a stateless client's context message and question are one turn, not a turn with an empty reply.
   */
  history: Message[];
  firstTurn: string;
  /** The request ends with tool messages: their results are the turn (a session's or a new chat's), not `last`. */
  toolResults: ToolResult[] | undefined;
  /** `tools` (OpenAI's list; undefined when none): a new chat's, and a session's must stay the same. */
  tools: object[] | undefined;
  /** The tools as canonical JSON (keys sorted): what a session's are compared with. */
  toolsKey: string | undefined;
  send: {
    maxNewTokens: number; temperature?: number; topP?: number; seed?: number; stop?: string[]; ignoreEos?: boolean; thinking?: boolean; grammar?: string;
    toolChoice?: WireToolChoice; parallelToolCalls?: boolean;
  };
  /** `response_format`'s schema: the grammar of `send` once responseGrammar converted it. */
  responseSchema: object | undefined;
  stream: boolean;
  includeUsage: boolean;
  sessionId: string | undefined;
  /**
   * The request's `finite_memory` field: pin the new message; unpin / forget earlier turns first;
   * `chat`: a new session's own policy and budget (to compare them side by side).
   */
  memory: { pin: boolean; unpin: number[]; forget: number[]; chat?: { policy?: PolicyName; maxTokens?: number } };
}

export const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);

export function contentText(v: unknown, param: string, allowNull: boolean): string {
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
export const MAX_SESSION_ID_LENGTH = 256;
/** The longest session id once percent-encoded in a URL path (/v1/sessions/:id): 9 bytes of %XX per UTF-16 unit at most. */
export const MAX_SESSION_ID_IN_PATH = MAX_SESSION_ID_LENGTH * 9;

/**
 * A header's value as text. Node reads header bytes as Latin-1, so an id sent as UTF-8 (curl, most
 * HTTP libraries) arrived as mojibake, some of its bytes as C1 control characters (refused), and named
 * another session than the same id in `user` or a memory route's path. Bytes that are valid UTF-8 are
 * read as UTF-8; others (Latin-1, as fetch sends a string of code points below 256) stay as they are.
 */
export function headerText(value: string): string {
  if (!/[\u0080-\u00ff]/.test(value)) return value;
  const bytes = Buffer.from(value, 'latin1');
  const text = bytes.toString('utf8');
  return Buffer.from(text, 'utf8').equals(bytes) ? text : value;
}

export function checkSessionId(raw: unknown): string {
  if (typeof raw !== 'string' || raw.length > MAX_SESSION_ID_LENGTH) {
    throw badRequest(`The session id (X-Session-Id or user) must be a string of at most ${MAX_SESSION_ID_LENGTH} characters`, 'user', 'invalid_session_id');
  }
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f-\u009f]/.test(raw) || !raw.isWellFormed()) {
    throw badRequest('The session id (X-Session-Id or user) must not contain control characters or unpaired surrogates', 'user', 'invalid_session_id');
  }
  return raw;
}

export function parseCompletion(body: unknown, headers: FastifyRequest['headers'], rawHeaders: string[], modelId: string, limits: { maxTokensPerRequest: number; defaultMaxTokens: number }): ParsedCompletion {
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
    else if (m.role === 'user') conversation.push({ role: m.role, content: contentText(m.content, `${param}.content`, false) });
    else if (m.role === 'assistant') conversation.push({ role: m.role, content: contentText(m.content, `${param}.content`, true), ...toolCallsOf(m.tool_calls, `${param}.tool_calls`) });
    else if (m.role === 'tool') conversation.push(toolMessageOf(m, param));
    else throw badRequest(`Invalid '${param}.role': ${JSON.stringify(m.role)} is not supported (system, developer, user, assistant, tool)`, `${param}.role`);
  });
  const lastMessage = conversation.at(-1);
  if (!lastMessage || lastMessage.role === 'assistant') throw badRequest('The last message must be a user message (or tool results)', 'messages');
  const tools = toolsOf(body.tools);
  const toolsKey = tools === undefined ? undefined : canonicalJson(tools, 'tools');

  const send: ParsedCompletion['send'] = { maxNewTokens: limits.defaultMaxTokens };
  let responseSchema: object | undefined;
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
  // llama-server's extension: generate max_tokens whatever the model says (benchmarks of equal work).
  if (body.ignore_eos !== undefined && body.ignore_eos !== null) {
    if (typeof body.ignore_eos !== 'boolean') throw badRequest("'ignore_eos' must be a boolean", 'ignore_eos');
    send.ignoreEos = body.ignore_eos;
  }
  // llama-server's and vLLM's way to turn a reasoning model's thinking off: the template's variable.
  if (body.chat_template_kwargs !== undefined && body.chat_template_kwargs !== null) {
    const kwargs = body.chat_template_kwargs;
    if (!isObject(kwargs)) throw badRequest("'chat_template_kwargs' must be an object", 'chat_template_kwargs');
    if (kwargs.enable_thinking !== undefined && kwargs.enable_thinking !== null) {
      if (typeof kwargs.enable_thinking !== 'boolean') throw badRequest("'chat_template_kwargs.enable_thinking' must be a boolean", 'chat_template_kwargs.enable_thinking');
      send.thinking = kwargs.enable_thinking;
    }
  }
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
  if (body.response_format !== undefined && body.response_format !== null) {
    // Converted once, before any work (responseGrammar); the turn takes the grammar.
    responseSchema = jsonSchemaOf(body.response_format);
  }
  if (body.n !== undefined && body.n !== null && body.n !== 1) throw badRequest("Only 'n': 1 is supported", 'n');
  // Without `tools`, a session's own apply (checkTools, once the chat is known).
  if (body.tool_choice !== undefined && body.tool_choice !== null) {
    send.toolChoice = toolChoiceOf(body.tool_choice);
    if (typeof send.toolChoice === 'object' && tools !== undefined) checkToolNamed(tools, send.toolChoice.name);
    if (send.toolChoice !== 'auto' && send.toolChoice !== 'none' && responseSchema !== undefined) {
      throw badRequest("A required tool call and 'response_format' hold the answer to different things: give one", 'tool_choice');
    }
  }
  if (body.parallel_tool_calls !== undefined && body.parallel_tool_calls !== null) {
    if (typeof body.parallel_tool_calls !== 'boolean') throw badRequest("'parallel_tool_calls' must be a boolean", 'parallel_tool_calls');
    send.parallelToolCalls = body.parallel_tool_calls;
  }
  if (body.stream !== undefined && body.stream !== null && typeof body.stream !== 'boolean') throw badRequest("'stream' must be a boolean", 'stream');
  const includeUsage = isObject(body.stream_options) && body.stream_options.include_usage === true;

  let sessionId: string | undefined;
  // Node joins repeated headers into "a, b": two ids in one request are ambiguous, so refuse them.
  if (rawHeaders.filter((h, i) => i % 2 === 0 && h.toLowerCase() === 'x-session-id').length > 1) {
    throw badRequest('Send one X-Session-Id header, not several', 'x-session-id', 'duplicate_session_id');
  }
  const header = headers['x-session-id'];
  const fromHeader = headerText((Array.isArray(header) ? header[0] : header) ?? '');
  // An empty header names no session: `user` still can (as when the header is absent).
  const rawId = fromHeader !== '' ? fromHeader : body.user;
  if (rawId !== undefined && rawId !== null && rawId !== '') sessionId = checkSessionId(rawId);
  const memory = parseMemoryField(body.finite_memory, sessionId !== undefined);
  return {
    memory,
    system: systems.length > 0 ? systems.join('\n\n') : undefined,
    conversation,
    last: lastMessage.content,
    ...firstTurnOf(conversation),
    tools,
    toolsKey,
    send,
    responseSchema,
    stream: body.stream === true,
    includeUsage,
    sessionId,
  };
}

/**
 * Converts the request's response_format schema to the grammar its turn takes, on a worker thread
 * (tens of ms at the converter's limits would hold the event loop): a schema the converter refuses
 * is a 400 naming response_format.
 */
export async function responseGrammar(parsed: ParsedCompletion): Promise<void> {
  if (parsed.responseSchema === undefined) return;
  try {
    parsed.send.grammar = await jsonSchemaToGrammarAsync(parsed.responseSchema);
  } catch (err) {
    if (err instanceof InvalidOptionError) throw badRequest(`Invalid 'response_format': ${err.message}`, 'response_format');
    throw err;
  }
}

/**
 * OpenAI's `response_format`: 'text' (no constraint), 'json_object' (any JSON object; llama-server's
 * `schema` beside it is taken too) or 'json_schema' (`json_schema.schema`; none: any JSON value). The
 * schema's own faults (an unsupported keyword, nesting too deep) are responseGrammar's 400.
 * `strict` is taken and needs nothing more: the answer always follows the schema here.
 */
export function jsonSchemaOf(v: unknown): object | undefined {
  if (!isObject(v)) throw badRequest("'response_format' must be an object", 'response_format');
  const schemaAt = (holder: Record<string, unknown>, param: string, absent: object): object => {
    const schema = holder.schema;
    if (schema === undefined || schema === null) return absent;
    if (!isObject(schema)) throw badRequest(`'${param}' must be a JSON schema (an object)`, param);
    return schema;
  };
  switch (v.type) {
    case 'text':
      return undefined;
    case 'json_object':
      return schemaAt(v, 'response_format.schema', { type: 'object' });
    case 'json_schema': {
      const js = v.json_schema;
      if (!isObject(js)) throw badRequest("'response_format.json_schema' must be an object", 'response_format.json_schema');
      return schemaAt(js, 'response_format.json_schema.schema', {});
    }
    default:
      throw badRequest("'response_format.type' must be 'text', 'json_object' or 'json_schema'", 'response_format.type');
  }
}

/**
 * `finite_memory: { pin?: boolean, unpin?: number[], forget?: number[] }`: pin keeps the new user
 * message through every eviction; unpin and forget take turn numbers (`finite_memory.turn.turn` of
 * earlier responses) and need a session, since a one-off request has no earlier turns.
 */
export function parseMemoryField(v: unknown, hasSession: boolean): ParsedCompletion['memory'] {
  const out: ParsedCompletion['memory'] = { pin: false, unpin: [], forget: [] };
  if (v === undefined || v === null) return out;
  if (!isObject(v)) throw badRequest("'finite_memory' must be an object", 'finite_memory');
  for (const key of Object.keys(v)) {
    if (key !== 'pin' && key !== 'unpin' && key !== 'forget' && key !== 'chat') throw badRequest(`Unknown field 'finite_memory.${key}' (pin, unpin, forget, chat)`, `finite_memory.${key}`);
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
  if (v.chat !== undefined && v.chat !== null) {
    const c = v.chat;
    if (!isObject(c)) throw badRequest("'finite_memory.chat' must be an object", 'finite_memory.chat');
    if (!hasSession) throw badRequest("'finite_memory.chat' needs a session (X-Session-Id or user)", 'finite_memory.chat', 'session_required');
    for (const key of Object.keys(c)) {
      if (key !== 'policy' && key !== 'max_tokens') throw badRequest(`Unknown field 'finite_memory.chat.${key}' (policy, max_tokens)`, `finite_memory.chat.${key}`);
    }
    out.chat = {};
    if (c.policy !== undefined) {
      if (typeof c.policy !== 'string' || !(POLICIES as readonly string[]).includes(c.policy)) throw badRequest(`'finite_memory.chat.policy' must be one of ${POLICIES.join(', ')}`, 'finite_memory.chat.policy');
      out.chat.policy = c.policy as PolicyName;
    }
    if (c.max_tokens !== undefined) {
      if (typeof c.max_tokens !== 'number' || !Number.isInteger(c.max_tokens) || c.max_tokens < 16) throw badRequest("'finite_memory.chat.max_tokens' must be an integer >= 16", 'finite_memory.chat.max_tokens');
      out.chat.maxTokens = c.max_tokens;
    }
  }
  return out;
}

function firstTurnOf(conversation: Message[]): { history: Message[]; firstTurn: string; toolResults: ToolResult[] | undefined } {
  const role = conversation.at(-1)!.role;
  let start = conversation.length - 1;
  while (start > 0 && conversation[start - 1]!.role === role) start--;
  const turn = conversation.slice(start);
  if (role === 'tool') {
    if (turn.length > 128) throw badRequest('At most 128 tool results in a row end a request', 'messages');
    return { history: conversation.slice(0, start), firstTurn: '', toolResults: turn.map((m) => ({ toolCallId: m.toolCallId ?? '', name: m.name ?? '', content: m.content })) };
  }
  // Joined as an import joins them.
  return { history: conversation.slice(0, start), firstTurn: exchangesOf(turn.map(({ role: r, content }) => ({ role: r as 'user', content })))[0]!.user, toolResults: undefined };
}

/** `tools`: OpenAI's function tools (the chat checks each one); none or [] is no tools. */
function toolsOf(v: unknown): object[] | undefined {
  if (v === undefined || v === null) return undefined;
  if (!Array.isArray(v)) throw badRequest("'tools' must be an array of tools", 'tools');
  if (v.length === 0) return undefined;
  if (v.length > 128) throw badRequest("'tools' holds at most 128 tools", 'tools');
  v.forEach((t, i) => {
    if (!isObject(t) || t.type !== 'function' || !isObject(t.function) || typeof t.function.name !== 'string') {
      throw badRequest(`Invalid 'tools[${i}]': expected { type: 'function', function: { name, description?, parameters? } }`, `tools[${i}]`);
    }
  });
  return v as object[];
}

/** tool_choice as send takes it: the word, or { name }. */
type WireToolChoice = Extract<ToolChoice, string | { name: string }>;

function toolChoiceOf(v: unknown): WireToolChoice {
  if (v === 'auto' || v === 'none' || v === 'required') return v;
  if (isObject(v) && v.type === 'function' && isObject(v.function) && typeof v.function.name === 'string') return { name: v.function.name };
  throw badRequest("'tool_choice' must be 'auto', 'none', 'required' or { type: 'function', function: { name } }", 'tool_choice');
}

const idText = (v: unknown, param: string, max: number): string => {
  if (typeof v !== 'string' || v.length > max) throw badRequest(`'${param}' must be a string of at most ${max} characters`, param);
  return v;
};

/** An assistant message's `tool_calls` (what an earlier reply called), as the chat takes them. */
function toolCallsOf(v: unknown, param: string): { toolCalls?: ToolCall[] } {
  if (v === undefined || v === null) return {};
  if (!Array.isArray(v) || v.length > 128) throw badRequest(`'${param}' must be an array of at most 128 tool calls`, param);
  if (v.length === 0) return {};
  return {
    toolCalls: v.map((c: unknown, i: number) => {
      const at = `${param}[${i}]`;
      if (!isObject(c) || (c.type !== undefined && c.type !== 'function') || !isObject(c.function)) throw badRequest(`Invalid '${at}': expected { id, type: 'function', function: { name, arguments } }`, at);
      return { id: idText(c.id ?? '', `${at}.id`, 256), name: idText(c.function.name, `${at}.function.name`, 64), arguments: argumentsOf(c.function.arguments ?? '{}', `${at}.function.arguments`) };
    }),
  };
}

/** A call's arguments as JSON text (OpenAI's are a string; an object is taken too): JSON, or a 400. */
function argumentsOf(v: unknown, param: string): string {
  let text: string;
  try {
    text = typeof v === 'string' ? v : JSON.stringify(v);
    JSON.parse(text);
  } catch {
    throw badRequest(`'${param}' must be JSON (a call's arguments)`, param);
  }
  return text;
}

/**
 * JSON with every object's keys sorted, nested at most 100 deep: two lists of the same tools compare
 * equal whatever order a client writes their keys in.
 */
export function canonicalJson(v: unknown, param: string, depth = 0): string {
  if (depth > 100) throw badRequest(`'${param}' nests more than 100 deep`, param);
  if (Array.isArray(v)) return `[${v.map((x) => canonicalJson(x, param, depth + 1)).join(',')}]`;
  if (isObject(v)) {
    return `{${Object.keys(v).sort().filter((k) => v[k] !== undefined).map((k) => `${JSON.stringify(k)}:${canonicalJson(v[k], param, depth + 1)}`).join(',')}}`;
  }
  return JSON.stringify(v) ?? 'null';
}

const toolNames = (tools: readonly object[]): string[] => tools.map((t) => String((t as { function: { name: unknown } }).function.name));

function checkToolNamed(tools: readonly object[], name: string): void {
  if (!toolNames(tools).includes(name)) throw badRequest(`'tool_choice' names '${name}', which is not one of the tools`, 'tool_choice');
}

/**
 * What a request asks of tools, against its chat's (a session's are fixed when it is made): checked
 * before the request changes anything. Other tools are a 400 `tools_changed`; none leaves the
 * session's. Tool results and `tool_choice` need tools.
 */
export function checkTools(chatTools: string | undefined, parsed: ParsedCompletion): void {
  const own = chatTools === undefined ? undefined : (JSON.parse(chatTools) as object[]);
  if (parsed.toolsKey !== undefined && (own === undefined || canonicalJson(own, 'tools') !== parsed.toolsKey)) {
    throw badRequest("'tools' differ from this session's (they are fixed when it is created: start another session id to change them)", 'tools', 'tools_changed');
  }
  if (own === undefined && (parsed.toolResults !== undefined || parsed.send.toolChoice !== undefined)) {
    throw badRequest("Tool results and 'tool_choice' need 'tools'", 'tools');
  }
  const choice = parsed.send.toolChoice;
  if (own !== undefined && typeof choice === 'object') checkToolNamed(own, choice.name);
}

/** A `tool` message: the result of the call `tool_call_id` names. */
function toolMessageOf(m: Record<string, unknown>, param: string): Message {
  if ((m.tool_call_id === undefined || m.tool_call_id === null || m.tool_call_id === '') && (m.name === undefined || m.name === null || m.name === '')) {
    throw badRequest(`'${param}.tool_call_id' must name the call this result answers`, `${param}.tool_call_id`);
  }
  return {
    role: 'tool',
    content: contentText(m.content, `${param}.content`, false),
    toolCallId: idText(m.tool_call_id ?? '', `${param}.tool_call_id`, 256),
    ...(m.name !== undefined && m.name !== null ? { name: idText(m.name, `${param}.name`, 64) } : {}),
  };
}

/**
 * A turn to forget or unpin must be in memory (400 otherwise), checked before anything changes: the
 * library's forget resolves 0 for one that is not, and its unpin throws after earlier unpins of the
 * request were applied. In memory means as they count it: a token of the turn past the attention
 * sinks, that is not the system prompt's for forget (`withSystem`: unpin accepts it, and keeps it pinned).
 */
export function checkInMemory(chat: Pick<Chat, 'memory' | 'options'>, turns: readonly number[], param: string, withSystem = false): void {
  const sinks = chat.options.sinkTokens;
  const present = new Set(chat.memory().filter((e, i) => i >= sinks && (withSystem || e.role !== 'system')).map((e) => e.turn));
  for (const turn of turns) {
    if (!present.has(turn)) throw badRequest(`Turn ${turn} is not in memory (evicted or forgotten already)`, param);
  }
}

/** Maps anything thrown while serving to an OpenAI-style error. */
export function toHttpError(err: unknown): HttpError {
  if (err instanceof HttpError) return err;
  if (err instanceof PromptTooLargeError) return badRequest(err.message, 'messages', 'context_length_exceeded');
  if (err instanceof PinLimitError) return badRequest(err.message, 'finite_memory.pin', 'pin_limit');
  if (err instanceof InvalidOptionError) return badRequest(err.message, null, 'invalid_value');
  // What this model cannot do for the request (tools its chat template does not render).
  if (err instanceof UnsupportedModelError) return badRequest(err.message, null, 'unsupported_by_model');
  // Server-side failures say what failed, never the details: those (file paths among them) go to the log.
  if (err instanceof CheckpointError) return new HttpError(500, 'server_error', 'session_store_failed', 'The session could not be stored or restored');
  if (err instanceof StoreUnavailableError) return storeUnavailable();
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

export function sendError(reply: FastifyReply, err: HttpError): FastifyReply {
  reply.code(err.status);
  for (const [k, v] of Object.entries(err.headers)) reply.header(k, v);
  return reply.send({ error: { message: err.message, type: err.type, param: err.param, code: err.code } });
}

/** A reply that called tools (and was not cut short) finishes with 'tool_calls', as OpenAI's do. */
export const finishReason = (stop: StopReason, calls = 0): 'stop' | 'length' | 'tool_calls' => (stop === 'maxTokens' ? 'length' : calls > 0 ? 'tool_calls' : 'stop');

export const sha256 = (s: string | Buffer) => createHash('sha256').update(s).digest();

/** A session's key in the store: a hash of its id (ids never reach a file name or a Redis key). */
export const sessionKey = (id: string): string => sha256(id).toString('hex').slice(0, 40);
