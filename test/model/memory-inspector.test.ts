/// <reference lib="dom" />
// See what a chat remembers: the memory API (GET /v1/sessions/:id/memory, pin / unpin / forget a turn)
// and the page at `/` driven in a real browser (Debian's chromium through playwright-core; skipped with
// a message naming the package when it is missing, a failure under CI=true).
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeModel } from '../../src/gguf/index.ts';
import { loadModel, type ChatOptions, type Model } from '../../src/index.ts';
import { createServer, type FiniteMemoryServer } from '../../src/server/index.ts';
import { testDir, testModelPath, THREADS } from '../helpers.ts';
import { requireBinary } from '../services.ts';

let model: Model;
let server: FiniteMemoryServer;
let base: string;
const BUDGET = 96;

beforeAll(async () => {
  model = await loadModel(testModelPath(), { threads: THREADS });
  // sliding: the pin test below needs to know which turn goes first.
  server = await createServer(model, { chat: { policy: 'sliding', maxTokens: BUDGET, windowSize: 24, sinkTokens: 4 } });
  base = await server.listen({ port: 0 });
});
afterAll(async () => {
  await server?.close();
  model?.dispose();
});

const json = async (method: string, path: string, body?: unknown, headers: Record<string, string> = {}) => {
  const r = await fetch(base + path, { method, headers: { ...(body === undefined ? {} : { 'content-type': 'application/json' }), ...headers }, body: body === undefined ? undefined : JSON.stringify(body) });
  return { status: r.status, body: (await r.json()) as Record<string, any> }; // eslint-disable-line @typescript-eslint/no-explicit-any
};
const say = (session: string, content: string, fm?: unknown) =>
  json('POST', '/v1/chat/completions', { messages: [{ role: 'user', content }], max_tokens: 12, temperature: 0, ...(fm ? { finite_memory: fm } : {}) }, { 'x-session-id': session });

describe('the memory API', () => {
  it('shows every retained token, the budget, the policy and the latest evictions', async () => {
    for (let i = 0; i < 12; i++) expect((await say('mem', `message ${i} about the lighthouse and the river`)).status).toBe(200);
    const { status, body } = await json('GET', '/v1/sessions/mem/memory');
    expect(status).toBe(200);
    expect(body).toMatchObject({ object: 'finite_memory.session', session_id: 'mem', policy: 'sliding', budget: BUDGET, turns: 12 });
    expect(body.tokens.length).toBe(body.retained_tokens);
    expect(body.retained_tokens).toBeLessThanOrEqual(BUDGET);
    expect(body.tokens[0]).toEqual({ position: expect.any(Number), turn: expect.any(Number), role: expect.any(String), pinned: expect.any(Boolean), summary: false, text: expect.any(String) });
    expect(body.evictions.length).toBeGreaterThan(0);
    expect(body.evictions.at(-1)).toMatchObject({ at: expect.any(String), turn: expect.any(Number), tokens: expect.any(Number), policy: 'sliding', fallback: false });
    // What it reports is the chat's own view, token for token.
    const positions = body.tokens.map((t: { position: number }) => t.position);
    expect(positions).toEqual([...positions].sort((a: number, b: number) => a - b));
    expect((await json('GET', '/v1/sessions/mem/memory?evictions=2')).body.evictions).toHaveLength(2);
  });

  it('a session id of up to 256 characters, any of them percent-encoded, reaches the memory routes', async () => {
    const id = `${'ü'.repeat(200)}/?#%`;   // 1,212 characters in the path
    expect((await say(id, 'hello')).status).toBe(200);
    const { status, body } = await json('GET', `/v1/sessions/${encodeURIComponent(id)}/memory`);
    expect(status).toBe(200);
    expect(body).toMatchObject({ session_id: id, turns: 1 });
  });

  it('an empty X-Session-Id header leaves the session to `user`', async () => {
    const r = await json('POST', '/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, user: 'by-user' }, { 'x-session-id': '' });
    expect(r.status).toBe(200);
    expect((await json('GET', '/v1/sessions/by-user/memory')).body).toMatchObject({ session_id: 'by-user', turns: 1 });
  });

  it('pins, unpins and forgets a turn, and a new session can choose its own policy and budget', async () => {
    await say('steer', 'remember the red door');
    await say('steer', 'and the blue window');
    type Tok = { turn: number; role: string; pinned: boolean; position: number };
    const userTokens = (b: { tokens: Tok[] }, turn: number) => b.tokens.filter((t) => t.turn === turn && t.role === 'user');
    const pinned = await json('POST', '/v1/sessions/steer/turns/1/pin');
    expect(pinned.status).toBe(200);
    expect(pinned.body.pins).toEqual([{ turn: 1, tokens: expect.any(Number) }]);
    const kept = userTokens(pinned.body as { tokens: Tok[] }, 1).length;
    for (let i = 0; i < 10; i++) await say('steer', `filler ${i} with a few more words in it`);
    const later = await json('GET', '/v1/sessions/steer/memory');
    expect(later.body.evictions.length).toBeGreaterThan(0);
    expect(userTokens(later.body as { tokens: Tok[] }, 1).length).toBe(kept); // the pinned message stayed whole
    expect(later.body.tokens.some((t: Tok) => t.turn === 2)).toBe(false); // turn 2 was evicted
    expect((await json('DELETE', '/v1/sessions/steer/turns/1/pin')).body.pins).toEqual([]);
    const forgot = await json('DELETE', '/v1/sessions/steer/turns/1');
    // Only the attention sinks (the first sinkTokens positions) outlive forget.
    expect(forgot.body.tokens.filter((t: Tok) => t.turn === 1).every((t: Tok) => t.position < 4)).toBe(true);
    expect(userTokens(forgot.body as { tokens: Tok[] }, 1).length).toBeLessThan(kept);
    // A turn no longer in memory, a bad turn number: 400s.
    expect((await json('POST', '/v1/sessions/steer/turns/1/pin')).status).toBe(400);
    expect((await json('DELETE', '/v1/sessions/steer/turns/1')).status).toBe(400);
    expect((await json('DELETE', '/v1/sessions/steer/turns/99')).status).toBe(400);
    expect((await say('steer', 'hi', { forget: [99] })).body.error).toMatchObject({ code: 'invalid_value', param: 'finite_memory.forget' });
    expect((await json('POST', '/v1/sessions/steer/turns/x/pin')).status).toBe(400);
    // Its own policy and budget, chosen when the session is created; refused for an existing one.
    const own = await say('own', 'hello', { chat: { policy: 'importance', max_tokens: 64 } });
    expect(own.status).toBe(200);
    expect((await json('GET', '/v1/sessions/own/memory')).body).toMatchObject({ policy: 'importance', budget: 64 });
    expect((await say('own', 'again', { chat: { policy: 'sliding' } })).body.error.code).toBe('session_exists');
    expect((await say('big', 'hi', { chat: { max_tokens: BUDGET * 2 } })).status).toBe(400);
  });

  it('refuses unknown sessions (404, nothing created) and bad ids, and requires the key when one is set', async () => {
    const unknown = await json('GET', '/v1/sessions/nobody/memory');
    expect(unknown.status).toBe(404);
    expect(unknown.body.error.code).toBe('session_not_found');
    expect(server.sessions().live).toBeGreaterThan(0);
    expect((await json('GET', `/v1/sessions/${encodeURIComponent('a\u0001b')}/memory`)).status).toBe(400);
    const locked = await createServer(model, { apiKey: 'k3y', chat: { maxTokens: 64 } });
    const url = await locked.listen({ port: 0 });
    expect((await fetch(`${url}/v1/sessions/x/memory`)).status).toBe(401);
    const page = await fetch(`${url}/`);
    expect(page.status).toBe(200); // the page holds no data; its API calls carry the key
    expect(await page.text()).toContain('Memory inspector');
    await locked.close();
    const noUi = await createServer(model, { ui: false });
    expect((await noUi.app.inject({ method: 'GET', url: '/' })).statusCode).toBe(404);
    await noUi.close();
  });
});

const chromium = requireBinary('chromium', 'chromium');

describe('the memory routes and admission', () => {
  it('a change or a restore takes a decode slot like a turn (429 at capacity); a view of a live chat does not', async () => {
    const s = await createServer(model, { chat: { maxTokens: BUDGET, testTokenDelayMs: 20 }, maxConcurrent: 1, maxQueue: 0 });
    const url = await s.listen({ port: 0 });
    const call = async (method: string, path: string, body?: unknown, headers: Record<string, string> = {}) => {
      const r = await fetch(url + path, { method, headers: { ...(body === undefined ? {} : { 'content-type': 'application/json' }), ...headers }, body: body === undefined ? undefined : JSON.stringify(body) });
      return { status: r.status, body: (await r.json()) as Record<string, any> }; // eslint-disable-line @typescript-eslint/no-explicit-any
    };
    const turn = (session: string, max_tokens: number) => call('POST', '/v1/chat/completions', { messages: [{ role: 'user', content: 'hello there' }], max_tokens, temperature: 0 }, { 'x-session-id': session });
    expect((await turn('a', 2)).status).toBe(200);
    const running = turn('b', 40);   // holds the only slot for ~1 s
    await new Promise((r) => setTimeout(r, 200));
    const forget = await call('DELETE', '/v1/sessions/a/turns/1');
    expect(forget.status).toBe(429);
    expect(forget.body.error.code).toBe('rate_limit_exceeded');
    expect((await call('GET', '/v1/sessions/a/memory')).status).toBe(200);
    expect((await running).status).toBe(200);
    expect((await call('DELETE', '/v1/sessions/a/turns/1')).status).toBe(200);
    await s.close();
  });
});

describe.skipIf(!chromium)('the memory inspector page in a real browser', () => {
  it('chats, shows tokens as they come, keeps the bar within the budget, evicts old turns and keeps a pinned one', async () => {
    const { chromium: pw } = await import('playwright-core');
    const browser = await pw.launch({ executablePath: chromium!, args: ['--no-sandbox'] });
    try {
      const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
      await page.goto(base + '/');
      await page.getByRole('textbox', { name: 'message' }).waitFor();
      const send = async (text: string, pin = false) => {
        if (pin) await page.getByRole('checkbox').check();
        await page.getByRole('textbox', { name: 'message' }).fill(text);
        await page.keyboard.press('Enter');   // keyboard: Enter sends
        await page.waitForFunction(() => /^turn \d+:/.test(document.getElementById('status')!.textContent ?? ''), undefined, { timeout: 30_000 });
        await page.waitForFunction(() => !(document.getElementById('sendBtn') as HTMLButtonElement).disabled);
      };
      await send('remember the code 4817', true);
      expect(await page.locator('#tokens .tok').count()).toBeGreaterThan(5);
      const pinnedMessage = await page.locator('#tokens .tok.user.pinned[data-turn="1"]').count();
      expect(pinnedMessage).toBeGreaterThan(4);   // the whole message, not only the attention sinks
      for (let i = 0; i < 10; i++) {
        await send(`tell me about the river, number ${i}`);
        const [retained, budget] = await page.locator('#bar').evaluate((el) => [Number(el.dataset.retained), Number(el.dataset.budget)]);
        expect(budget).toBe(BUDGET);
        expect(retained).toBeGreaterThan(0);
        expect(retained).toBeLessThanOrEqual(budget);
      }
      // Old turns left the memory (rows of the turn table), the pinned first turn stayed.
      await page.waitForTimeout(1500);   // evicted tokens fade out, then go
      const turns = await page.locator('#turns tbody tr').evaluateAll((rows) => rows.map((r) => Number((r as HTMLElement).dataset.turn)));
      expect(turns).toContain(1);
      expect(turns).not.toContain(2);
      expect(await page.locator('#tokens .tok.user.pinned[data-turn="1"]').count()).toBe(pinnedMessage);   // the pinned turn stayed whole
      expect(await page.locator('#tokens .tok[data-turn="2"]').count()).toBe(0);
      expect(await page.locator('#evictions li').count()).toBeGreaterThan(0);
      expect(await page.locator('#chart rect').count()).toBeGreaterThan(10);
      // Unpin, then forget, from the page.
      await page.getByRole('button', { name: 'unpin turn 1', exact: true }).click();
      await page.getByRole('button', { name: 'pin turn 1', exact: true }).waitFor();
      const newest = Math.max(...turns);
      await page.getByRole('button', { name: `forget turn ${newest}`, exact: true }).click();
      await page.waitForFunction((t) => !document.querySelector(`#turns tr[data-turn="${t}"]`), newest);
      await page.waitForTimeout(1500);
      expect(await page.locator(`#tokens .tok[data-turn="${newest}"]`).count()).toBe(0);
      // A new session with another policy and budget, from the header's form.
      await page.getByRole('combobox', { name: 'policy of a new session' }).selectOption('importance');
      await page.getByRole('spinbutton', { name: 'budget of a new session (tokens)' }).fill('64');
      await page.getByRole('button', { name: 'New session' }).click();
      await send('a fresh start');
      await page.waitForFunction(() => /importance, budget 64/.test(document.getElementById('policyName')!.textContent ?? ''));
      await send('and a second turn');
      expect(await page.locator('#bar').evaluate((el) => Number(el.dataset.budget))).toBe(64);
      // Screenshots are the test's artifacts: test-artifacts/ (git-ignored) in the repository.
      const dir = join(import.meta.dirname, '..', '..', 'test-artifacts');
      mkdirSync(dir, { recursive: true });
      await page.screenshot({ path: join(dir, 'memory-inspector-1280x800.png'), fullPage: true });
      // A phone's width: one column, nothing cut off sideways.
      await page.setViewportSize({ width: 390, height: 844 });
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      expect(overflow).toBeLessThanOrEqual(1);
      await page.screenshot({ path: join(dir, 'memory-inspector-390.png'), fullPage: true });
    } finally {
      await browser.close();
    }
  });

  it("shows a reasoning model's thinking apart from its answer, and its reasoning tokens leave at the next turn", async () => {
    const path = join(testDir, 'inspector-qwen3.gguf');
    writeModel(path, { family: 'qwen3', seed: 7 });
    const qwen3 = await loadModel(path, { threads: THREADS });
    const thinking = await createServer(qwen3, { chat: { policy: 'sliding', maxTokens: 256, testReply: '<think>\nplan a greeting\n</think>\n\nHello there.' } as ChatOptions });
    const url = await thinking.listen({ port: 0 });
    const { chromium: pw } = await import('playwright-core');
    const browser = await pw.launch({ executablePath: chromium!, args: ['--no-sandbox'] });
    try {
      const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
      await page.goto(url + '/');
      const send = async (text: string) => {
        await page.getByRole('textbox', { name: 'message' }).fill(text);
        await page.keyboard.press('Enter');
        await page.waitForFunction(() => /^turn \d+:/.test(document.getElementById('status')!.textContent ?? ''), undefined, { timeout: 30_000 });
        await page.waitForFunction(() => !(document.getElementById('sendBtn') as HTMLButtonElement).disabled);
      };
      await send('hi');
      const reply = page.locator('#log .msg').last();
      expect((await reply.locator('.thought').textContent())?.trim()).toBe('plan a greeting');
      expect(await reply.evaluate((el) => el.lastChild!.textContent)).toBe('Hello there.');
      await page.waitForFunction(() => document.querySelectorAll('#tokens .tok.reasoning[data-turn="1"]').length > 0);
      await send('and again');
      await page.waitForTimeout(1500);   // evicted tokens fade out, then go
      expect(await page.locator('#tokens .tok.reasoning[data-turn="1"]').count()).toBe(0);
      expect(await page.locator('#tokens .tok.reasoning[data-turn="2"]').count()).toBeGreaterThan(0);
    } finally {
      await browser.close();
      await thinking.close();
      qwen3.dispose();
    }
  });
});
