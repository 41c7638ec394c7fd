/**
 * POST /v1/chat/completions: one request's way through the server.
 *
 *   parse -> session gate -> lease (sessions.ts) -> decode slot -> the chat (live, restored or new:
 *   chats.ts) -> unpin/forget -> chat.send (streamed: sse.ts) -> write-through -> response
 *
 * A client that goes away aborts its turn (or leaves its queue); what it generated stays in the
 * session's memory.
 */
import { randomUUID } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Chat } from '../local/chat.js';
import type { Model } from '../local/model.js';
import type { ToolDefinition } from '../shared/types.js';
import { InvalidOptionError, UnsupportedModelError } from '../shared/errors.js';
import type { ChatStats, StopReason, TurnResult, TurnStats } from '../shared/types.js';
import { QueueAbortedError, type Gate, type Release } from './admission.js';
import type { ChatSource, RestoredFrom } from './chats.js';
import type { ServerMetrics } from './metrics.js';
import type { ResolvedServerOptions } from './options.js';
import type { Session, SessionStore, TurnLease } from './sessions.js';
import { openAiToolCalls } from '../shared/chat-surface.js';
import { EventStream } from './sse.js';
import { badRequest, checkInMemory, checkTools, finishReason, HttpError, overloaded, parseCompletion, responseGrammar, toHttpError, type ParsedCompletion } from './wire.js';

export const SHUTDOWN_ERROR = { message: 'The server is shutting down', type: 'server_error', param: null, code: 'server_shutting_down' } as const;

/** 503 for a request the shutdown refuses (its connection closes: `headers`), takes out of a queue or cuts short (`message`). */
export function shutdownError(headers: Record<string, string> = {}, message: string = SHUTDOWN_ERROR.message): HttpError {
  return new HttpError(503, SHUTDOWN_ERROR.type, SHUTDOWN_ERROR.code, message, null, headers);
}

/** The session's turn, one request at a time (429 when its queue is full); the turns and the memory routes. */
export function enterSession(session: Session, signal: AbortSignal): Promise<Release> {
  const entering = session.gate.enter(signal);
  if (!entering) throw overloaded('Too many requests queued for this session');
  return entering;
}

/** A decode slot, server-wide (429 when the queue is full). */
export function takeDecodeSlot(ctx: CompletionContext, signal: AbortSignal): Promise<Release> {
  const slot = ctx.slots.enter(signal);
  if (!slot) throw overloaded('The server is at capacity');
  return slot;
}

/** What the handler needs of the server around it. */
export interface CompletionContext {
  readonly model: Model;
  readonly options: ResolvedServerOptions;
  readonly store: SessionStore;
  readonly chats: ChatSource;
  /** Decode slots, server-wide. */
  readonly slots: Gate;
  readonly metrics: ServerMetrics;
  /** Every running request's controller: the shutdown deadline aborts them. */
  readonly controllers: Set<AbortController>;
  shuttingDown(): boolean;
}

/** The chat a request runs on, and how it came to be. */
interface TurnChat {
  chat: Chat;
  /** The chat was made for this request (its earlier messages were prefilled: usage counts them). */
  created: boolean;
  restoredFrom: RestoredFrom | undefined;
  sessionReset: 'restore_failed' | undefined;
}

export async function handleCompletion(ctx: CompletionContext, req: FastifyRequest, reply: FastifyReply): Promise<unknown> {
  const { options: o, store } = ctx;
  const parsed = parseCompletion(req.body, req.headers, req.raw.rawHeaders, o.modelId, o);
  await responseGrammar(parsed);
  await prepareTools(ctx, parsed);
  const res = reply.raw;
  if (ctx.shuttingDown()) throw shutdownError({ connection: 'close' });
  const ac = new AbortController();
  // The client went away before the response was complete: abort the turn (or leave the queue).
  let clientGone = false;
  const onClose = () => {
    if (res.writableFinished) return;
    clientGone = true;
    ac.abort();
  };
  res.once('close', onClose);
  ctx.controllers.add(ac);

  const session = parsed.sessionId !== undefined ? store.session(parsed.sessionId) : undefined;
  let releaseSession: Release | undefined;
  let lease: TurnLease | undefined;
  let releaseSlot: Release | undefined;
  let oneOff: Chat | undefined;
  try {
    if (session) {
      releaseSession = await enterSession(session, ac.signal);
      // The lease before a decode slot: waiting for another instance must not hold a slot here.
      lease = await store.begin(session, ac.signal);
    }
    releaseSlot = await takeDecodeSlot(ctx, ac.signal);

    const turnChat = session ? await sessionChat(ctx, session, lease!, parsed, ac.signal) : { chat: (oneOff = await ctx.chats.build(parsed, ac.signal)), created: true, restoredFrom: undefined, sessionReset: undefined };
    const { chat } = turnChat;
    const importedTokens = turnChat.created ? chat.stats().tokensSeen : 0;

    const base = { id: `chatcmpl-${randomUUID()}`, created: Math.floor(Date.now() / 1000), model: o.modelId, system_fingerprint: `fml-${ctx.model.info.fingerprint.slice(0, 12)}` };
    const sessionHeaders: Record<string, string> = session ? { 'x-session-id': encodeURIComponent(session.id) } : {};
    if (turnChat.sessionReset) sessionHeaders['x-session-reset'] = turnChat.sessionReset;
    const stream = new EventStream(reply, base, () => ({ connection: ctx.shuttingDown() ? 'close' : 'keep-alive', ...sessionHeaders }));

    checkTools(chat.options.tools, parsed);
    // A session's chat keeps its own tools and system prompt (the request's may be the same in another
    // key order, or left out): the turn is set up (and checked) with those, as the chat will run it.
    if (!turnChat.created && chat.options.tools !== undefined) await prepareToolTurn(ctx, chat.options.tools, chat.options.systemPrompt ?? '', parsed, 'tool_choice');
    // Unpin and forget before the turn, so the room they free is there for it; checked before either
    // changes anything (a turn no longer in memory is a 400 that leaves the memory as it was).
    checkInMemory(chat, parsed.memory.unpin, 'finite_memory.unpin', true);
    checkInMemory(chat, parsed.memory.forget, 'finite_memory.forget');
    let memoryChanged = false;
    for (const turn of parsed.memory.unpin) memoryChanged = chat.unpin(turn) > 0 || memoryChanged;
    for (const turn of parsed.memory.forget) memoryChanged = (await chat.forget(turn)) > 0 || memoryChanged;
    let result: TurnResult;
    let persisted: boolean | null = null;
    let storeMs: number | null = null;
    try {
      const message = parsed.toolResults ? { toolResults: parsed.toolResults } : turnChat.created ? parsed.firstTurn : parsed.last;
      result = await chat.send(message, {
        ...parsed.send,
        pin: parsed.memory.pin,
        signal: ac.signal,
        // Reasoning streams as `reasoning_content` deltas (llama-server's and DeepSeek's field).
        ...(parsed.stream ? {
          onToken: (piece: string) => { stream.start(); stream.chunk({ content: piece }, null); },
          onReasoning: (piece: string) => { stream.start(); stream.chunk({ reasoning_content: piece }, null); },
        } : {}),
      });
      if (session && (result.stats.promptTokens > 0 || memoryChanged)) {
        // Reconciliation: a longer array means the client resends the whole conversation.
        if (result.stats.promptTokens > 0) session.messagesSeen = Math.max(parsed.conversation.length, session.messagesSeen + (parsed.toolResults?.length ?? 1)) + 1;
        // Write-through: the store holds this turn (or, aborted in its prefill, its unpins and forgets)
        // before its response completes.
        const t0 = performance.now();
        persisted = await store.commit(session, lease!);
        if (persisted !== null) storeMs = performance.now() - t0;
      }
    } catch (err) {
      // The turn was refused (a pin over the limit, a message too large, ...) after its unpins and
      // forgets were applied: they stay, and are stored, so the store holds what the memory does.
      if (session && memoryChanged) await store.commit(session, lease!).catch(() => { /* commit logs and retries its failures; a takeover dropped the session */ });
      if (!stream.started) throw err;
      const http = toHttpError(err);
      stream.fail({ message: http.message, type: http.type, param: http.param, code: http.code });
      return;
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
      instance: o.instanceId, session_id: session?.id ?? null, restored: turnChat.restoredFrom !== undefined, restored_from: turnChat.restoredFrom ?? null,
      session_reset: turnChat.sessionReset ?? null, messages_seen: session?.messagesSeen ?? null, persisted, store_ms: storeMs, stop_reason: result.stopReason,
      turn: result.stats, chat: stats, pins: chat.pins(),
    };
    if (clientGone) {
      reply.hijack();
      res.destroy();
      return;
    }
    if (parsed.stream) {
      stream.start();
      // The calls go out whole once the reply is read (a delta per call, as OpenAI's streams end them).
      if (result.toolCalls.length > 0) stream.chunk({ tool_calls: openAiToolCalls(result.toolCalls).map((call, index) => ({ index, ...call })) }, null);
      stream.chunk({}, finishReason(result.stopReason, result.toolCalls.length), { finite_memory });
      // Cut short by the shutdown deadline (not by its client): the stream says so before it ends.
      if (result.stopReason === 'abort' && ctx.shuttingDown()) stream.write({ error: SHUTDOWN_ERROR });
      if (parsed.includeUsage) stream.write({ ...base, object: 'chat.completion.chunk', choices: [], usage });
      stream.end();
      return;
    }
    // Cut short by the shutdown deadline: a 200 would pass a truncated answer off as a whole one.
    if (result.stopReason === 'abort' && ctx.shuttingDown()) {
      // Aborted in its prefill, the turn was rolled back: then the message is not in the session.
      const kept = session !== undefined && result.stats.promptTokens > 0;
      throw shutdownError({ connection: 'close', ...sessionHeaders }, kept
        ? 'The server shut down while answering; the turn and the part of the reply generated are kept in the session (resending the message would repeat it)'
        : 'The server shut down before answering; the message is not in the session (resend it)');
    }
    for (const [k, v] of Object.entries(sessionHeaders)) reply.header(k, v);
    return {
      ...base,
      object: 'chat.completion',
      choices: [{
        index: 0,
        message: {
          role: 'assistant',
          // A reply of calls alone has no content (null, as OpenAI's).
          content: result.toolCalls.length > 0 && result.response === '' ? null : result.response,
          ...(result.reasoning ? { reasoning_content: result.reasoning } : {}),
          ...(result.toolCalls.length > 0 ? { tool_calls: openAiToolCalls(result.toolCalls) } : {}),
          refusal: null,
        },
        logprobs: null,
        finish_reason: finishReason(result.stopReason, result.toolCalls.length),
      }],
      usage,
      finite_memory,
    };
  } catch (err) {
    if (clientGone) {
      reply.hijack();
      res.destroy();
      return;
    }
    if (err instanceof QueueAbortedError) throw shutdownError();
    throw err;
  } finally {
    res.off('close', onClose);
    ctx.controllers.delete(ac);
    releaseSlot?.();
    oneOff?.dispose();
    if (session) store.end(session, lease, releaseSession);
  }
}

/**
 * The request's tools set up on a worker thread before any work: createChat sets tools up on the
 * calling thread, so the chat made for the request (or its next one) finds it done; a session's
 * existing chat does not need it. Tools the chat would refuse are a 400 naming `tools`.
 */
async function prepareTools(ctx: CompletionContext, parsed: ParsedCompletion): Promise<void> {
  if (parsed.tools === undefined) return;
  await prepareToolTurn(ctx, parsed.tools as ToolDefinition[], parsed.system ?? ctx.options.chat.systemPrompt ?? '', parsed);
}

/**
 * The set-up of the request's turn with these tools (its toolChoice, parallelToolCalls, thinking: a
 * grammar and a parser of their own) on a worker thread, before the request changes anything: a
 * choice the tools refuse is a 400 naming `param` while the memory is as it was (send would set the
 * turn up on a worker too, but after unpin and forget). A set-up already made costs a lookup there.
 */
async function prepareToolTurn(ctx: CompletionContext, tools: ToolDefinition[] | string, systemPrompt: string, parsed: ParsedCompletion, param = 'tools'): Promise<void> {
  const { toolChoice, parallelToolCalls, thinking } = parsed.send;
  try {
    await ctx.model.prepareTools(tools, { systemPrompt, toolChoice, parallelToolCalls, thinking });
  } catch (err) {
    // A session's kept tools were taken when it began: what fails now is the turn's choice.
    if (err instanceof InvalidOptionError) throw badRequest(`Invalid '${param}': ${err.message}`, param);
    if (err instanceof UnsupportedModelError) throw badRequest(err.message, 'tools', 'unsupported_by_model');
    throw err;
  }
}

/** The session's chat: live in memory, restored from the store, or new (a stored one that cannot be restored: new, and said so). */
export async function sessionChat(ctx: CompletionContext, session: Session, lease: TurnLease, parsed: ParsedCompletion, signal: AbortSignal): Promise<TurnChat> {
  // A session's own policy and budget are chosen when it is created (at most the server's budget).
  const own = parsed.memory.chat;
  if (own && (session.chat || lease.storedVersion > 0)) {
    throw badRequest("'finite_memory.chat' chooses a new session's policy and budget; this session exists (start another session id)", 'finite_memory.chat', 'session_exists');
  }
  if (own?.maxTokens !== undefined && own.maxTokens > ctx.options.chatMaxTokens) {
    throw badRequest(`'finite_memory.chat.max_tokens' is at most the server's budget, ${ctx.options.chatMaxTokens}`, 'finite_memory.chat.max_tokens');
  }
  if (session.chat) return { chat: session.chat, created: false, restoredFrom: undefined, sessionReset: undefined };
  const events = ctx.metrics.sessionEvents;
  await ctx.store.makeRoom();
  let sessionReset: 'restore_failed' | undefined;
  if (lease.storedVersion > 0) {
    const restored = await restoreSession(ctx, session, signal);
    if (restored !== 'gone' && restored !== 'failed') return { chat: session.chat!, created: false, restoredFrom: restored, sessionReset: undefined };
    // Another model whose tokens no longer fit, a newer format, corrupt bytes, or gone between the
    // lease and the read (the caps, the TTL): the session starts fresh (and says so) instead of
    // failing every request from now on.
    sessionReset = 'restore_failed';
    session.messagesSeen = 0;
    events.inc({ event: 'restore_failed' });
  }
  const chat = await ctx.chats.build(parsed, signal, session.evictions, own);
  session.messagesSeen = parsed.conversation.length - (parsed.toolResults?.length ?? 1);
  events.inc({ event: 'created' });
  session.chat = chat;
  return { chat, created: true, restoredFrom: undefined, sessionReset };
}

/**
 * A stored session's chat back in memory (session.chat set): where it came from, or 'gone' (the store
 * holds nothing now) or 'failed' (what it holds cannot be restored). The caller has made room.
 */
export async function restoreSession(ctx: CompletionContext, session: Session, signal: AbortSignal): Promise<RestoredFrom | 'gone' | 'failed'> {
  const stored = await ctx.store.read(session);
  if (!stored) return 'gone';
  const restored = await ctx.chats.restore(stored, signal, session.evictions);
  if (!restored) return 'failed';
  session.chat = restored.chat;
  session.messagesSeen = stored.messagesSeen;
  ctx.metrics.sessionEvents.inc({ event: 'restored' });
  return restored.from;
}
