/**
 * A session's memory over HTTP. GET /v1/sessions/:id/memory: what its chat remembers (every retained token with its position,
 * turn, role, pin and summary flags and text), its budget and policy, and its latest evictions (what
 * went, when, why). The session is served as a turn would be: one request at a time, under its lease
 * (a session leased by another instance: 409 session_busy); a session stored but not in memory here is
 * restored first. An unknown session is a 404, never created. Pin, unpin and forget a turn:
 * POST / DELETE /v1/sessions/:id/turns/:turn/pin, DELETE /v1/sessions/:id/turns/:turn; each change is
 * written through to the store like a turn, and answered with the memory view.
 */
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Chat } from '../local/chat.js';
import { QueueAbortedError, type Release } from './admission.js';
import { enterSession, restoreSession, shutdownError, takeDecodeSlot, type CompletionContext } from './completion.js';
import { SESSION_EVICTIONS_KEPT, type Session, type TurnLease } from './sessions.js';
import { badRequest, checkInMemory, checkSessionId, HttpError, isObject } from './wire.js';

/** Evictions a memory view returns by default (`?evictions=N`, at most what a session keeps). */
const DEFAULT_EVICTIONS = 20;

type SessionRequest = FastifyRequest<{ Params: { id: string; turn?: string }; Querystring: { evictions?: string }; Body: unknown }>;

/** GET /v1/sessions/:id/memory */
export function handleMemory(ctx: CompletionContext, req: SessionRequest, reply: FastifyReply): Promise<unknown> {
  return withSession(ctx, req, reply, undefined);
}

/** POST /v1/sessions/:id/turns/:turn/pin (body `{ "reply": true }` pins its reply too), then the memory view. */
export function handlePin(ctx: CompletionContext, req: SessionRequest, reply: FastifyReply): Promise<unknown> {
  const body = req.body ?? {};
  if (!isObject(body) || Object.keys(body).some((k) => k !== 'reply') || (body.reply !== undefined && typeof body.reply !== 'boolean')) {
    throw badRequest("The body is optional: { \"reply\": boolean }", 'reply');
  }
  return withSession(ctx, req, reply, (chat, turn) => void chat.pin(turn, { reply: body.reply === true }));
}

/** DELETE /v1/sessions/:id/turns/:turn/pin, then the memory view. */
export function handleUnpin(ctx: CompletionContext, req: SessionRequest, reply: FastifyReply): Promise<unknown> {
  return withSession(ctx, req, reply, (chat, turn) => void chat.unpin(turn));
}

/** DELETE /v1/sessions/:id/turns/:turn: the turn leaves the memory now (forget), then the memory view. */
export function handleForget(ctx: CompletionContext, req: SessionRequest, reply: FastifyReply): Promise<unknown> {
  return withSession(ctx, req, reply, async (chat, turn) => {
    checkInMemory(chat, [turn], 'turn');
    await chat.forget(turn);
  });
}

/**
 * Runs `change` on the session's chat as a turn would run (its gate, its lease; restored when stored
 * elsewhere), writes a change through to the store, and answers with the memory view.
 */
async function withSession(ctx: CompletionContext, req: SessionRequest, reply: FastifyReply, change: ((chat: Chat, turn: number) => void | Promise<void>) | undefined): Promise<unknown> {
  const id = checkSessionId(req.params.id);
  let turn = 0;
  if (change) {
    turn = Number(req.params.turn);
    if (!Number.isInteger(turn) || turn < 1 || turn > 0xffffffff) throw badRequest('The turn must be a positive integer (finite_memory.turn.turn of its response)', 'turn');
  }
  const raw = req.query.evictions;
  const limit = raw === undefined ? DEFAULT_EVICTIONS : Number(raw);
  if (!Number.isInteger(limit) || limit < 0 || limit > SESSION_EVICTIONS_KEPT) throw badRequest(`'evictions' must be an integer between 0 and ${SESSION_EVICTIONS_KEPT}`, 'evictions');
  if (ctx.shuttingDown()) throw shutdownError({ connection: 'close' });
  const ac = new AbortController();
  const onClose = () => ac.abort();
  reply.raw.once('close', onClose);
  ctx.controllers.add(ac);   // a shutdown's deadline aborts a restore too
  // An unknown id gets a chat-less session for this request; end() drops it again (nothing is created).
  const session = ctx.store.session(id);
  let release: Release | undefined;
  let lease: TurnLease | undefined;
  let releaseSlot: Release | undefined;
  try {
    release = await enterSession(session, ac.signal);
    lease = await ctx.store.begin(session, ac.signal);
    if (!session.chat || change) {
      // A restore prefills and a change can decode (a forget's repair or K-shift): a decode slot as
      // a turn takes one, so these routes queue with the turns and count against maxConcurrent.
      releaseSlot = await takeDecodeSlot(ctx, ac.signal);
    }
    if (!session.chat) await restore(ctx, session, lease, ac.signal);
    if (change) {
      await change(session.chat!, turn);
      await ctx.store.commit(session, lease);
    }
    return view(ctx, session, limit);
  } catch (err) {
    if (err instanceof QueueAbortedError) throw shutdownError();
    throw err;
  } finally {
    reply.raw.off('close', onClose);
    ctx.controllers.delete(ac);
    releaseSlot?.();
    ctx.store.end(session, lease, release);
  }
}

/** A stored session's chat, back in memory; an unknown session is a 404 (and is not created). */
async function restore(ctx: CompletionContext, session: Session, lease: TurnLease, signal: AbortSignal): Promise<void> {
  const notFound = () => new HttpError(404, 'invalid_request_error', 'session_not_found', `No session '${session.id}' on this server`, 'id');
  if (lease.storedVersion === 0) throw notFound();
  await ctx.store.makeRoom();
  const restored = await restoreSession(ctx, session, signal);
  if (restored === 'gone') throw notFound();
  if (restored === 'failed') throw new HttpError(409, 'invalid_request_error', 'session_restore_failed', 'This session could not be restored (its next message starts it over, with X-Session-Reset)');
}

function view(ctx: CompletionContext, session: Session, limit: number): unknown {
  const chat = session.chat!;
  const stats = chat.stats();
  return {
    object: 'finite_memory.session',
    session_id: session.id,
    instance: ctx.options.instanceId,
    policy: chat.options.policy,
    budget: chat.options.maxTokens,
    retained_tokens: stats.tokensRetained,
    turns: stats.turns,
    tokens: chat.memory().map((e) => ({ position: e.position, turn: e.turn, role: e.role, pinned: e.pinned, summary: e.role === 'summary', text: e.text })),
    pins: chat.pins(),
    evictions: session.evictions.slice(-limit).map((e) => ({
      at: new Date(e.at).toISOString(), turn: e.turn, phase: e.phase, tokens: e.evictedTokens, positions: e.positions,
      policy: e.policy, policy_ms: e.policyMs, evict_ms: e.evictMs, fallback: e.fallback, summary_tokens: e.summaryTokens, summary_prompt_tokens: e.summaryPromptTokens,
    })),
    stats,
  };
}
