// Pinning and forgetting: send({ pin }), chat.pin / unpin / pins / forget, the budget rule (pins
// count against maxTokens; PIN_LIMIT changes nothing), checkpoints keep pins, and the cache stays
// consistent with llama.cpp's view after every operation.
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ChatBusyError, InvalidOptionError, loadModel, PinLimitError, POLICIES, type Chat, type Model } from '../../src/index.ts';
import { THREADS, checkCache, testDir, testModelPath } from '../helpers.ts';

let model: Model;
beforeAll(async () => {
  model = await loadModel(testModelPath(), { threads: THREADS });
});
afterAll(() => model?.dispose());

const GEN = { temperature: 0, maxNewTokens: 6 } as const;
const turnTokens = (chat: Chat, turn: number) => chat.memory().filter((e) => e.turn === turn);
const userTokens = (chat: Chat, turn: number) => turnTokens(chat, turn).filter((e) => e.role === 'user');

async function talk(chat: Chat, turns: number, from = 0): Promise<void> {
  for (let i = 0; i < turns; i++) await chat.send(`filler message number ${from + i} about the weather`, GEN);
}

describe('send({ pin: true })', () => {
  for (const policy of POLICIES) {
    it(`keeps the message through every eviction (${policy})`, async () => {
      const maxTokens = 96;
      // A system prompt holds the attention sinks, so turn 1 is only the message.
      const chat = model.createChat({ policy, maxTokens, windowSize: 32, summaryTokens: 8, systemPrompt: 'be brief', threads: THREADS });
      const first = await chat.send('remember the secret word is lantern', { ...GEN, pin: true });
      expect(first.stats.turn).toBe(1);
      const pinned = userTokens(chat, 1);
      expect(pinned.length).toBeGreaterThan(5);
      expect(pinned.every((e) => e.pinned)).toBe(true);
      await talk(chat, 25);
      expect(chat.stats().tokensEvicted).toBeGreaterThan(0);
      // Every token of the pinned message is still there, in order, still pinned.
      expect(userTokens(chat, 1).map((e) => e.token)).toEqual(pinned.map((e) => e.token));
      expect(chat.pins()).toEqual([{ turn: 1, tokens: pinned.length }]);
      checkCache(chat, maxTokens);
      chat.dispose();
    });
  }

  it('without pin, the same message is evicted', async () => {
    const chat = model.createChat({ policy: 'sliding', maxTokens: 96, windowSize: 32, systemPrompt: 'be brief', threads: THREADS });
    await chat.send('remember the secret word is lantern', GEN);
    await talk(chat, 25);
    expect(userTokens(chat, 1)).toEqual([]);
    expect(chat.pins()).toEqual([]);
    chat.dispose();
  });

  it('a pin that leaves no room for the next turn is PinLimitError and the turn does not run', async () => {
    const maxTokens = 64;
    const chat = model.createChat({ maxTokens, threads: THREADS });
    await chat.send('hello', GEN);
    const before = { memory: chat.memory(), stats: chat.stats(), transcript: chat.exportTranscript() };
    // The longest message that fits as a prompt (pinned + carry + message + 1 reply token): pinned,
    // it would leave no room for the next turn's framing.
    const cache = chat._internals().cacheState();
    const room = maxTokens - cache.pinnedTokens - cache.carriedTokens - 1;
    let words = 1;
    while (chat._internals().countTurnTokens(Array.from({ length: words + 1 }, (_, i) => `w${i}`).join(' ')) <= room) words++;
    const long = Array.from({ length: words }, (_, i) => `w${i}`).join(' ');
    expect(chat._internals().countTurnTokens(long)).toBeGreaterThan(room - 4);
    await expect(chat.send(long, { ...GEN, pin: true })).rejects.toBeInstanceOf(PinLimitError);
    expect(chat.memory()).toEqual(before.memory);
    expect(chat.stats()).toEqual(before.stats);
    expect(chat.exportTranscript()).toEqual(before.transcript);
    // The same message unpinned is an ordinary turn.
    await chat.send(long, GEN);
    checkCache(chat, maxTokens);
    chat.dispose();
  });

  it('rejects a pin that is not a boolean', async () => {
    const chat = model.createChat({ threads: THREADS });
    await expect(chat.send('hi', { pin: 'yes' as never })).rejects.toBeInstanceOf(InvalidOptionError);
    chat.dispose();
  });
});

describe('pin / unpin / forget', () => {
  it('pins a turn after the fact, and unpinning lets it go', async () => {
    const maxTokens = 96;
    const chat = model.createChat({ policy: 'sliding', maxTokens, windowSize: 32, systemPrompt: 'be brief', threads: THREADS });
    await chat.send('the meeting is on tuesday', GEN);
    const n = chat.pin(1);
    expect(n).toBe(userTokens(chat, 1).length);
    expect(chat.pin(1)).toBe(0); // already pinned
    const withReply = chat.pin(1, { reply: true });
    expect(withReply).toBe(turnTokens(chat, 1).filter((e) => e.role === 'assistant').length);
    await talk(chat, 20);
    expect(turnTokens(chat, 1).every((e) => e.pinned)).toBe(true);
    expect(chat.unpin(1)).toBe(n + withReply);
    expect(chat.pins()).toEqual([]);
    await talk(chat, 20, 100);
    expect(turnTokens(chat, 1)).toEqual([]);
    checkCache(chat, maxTokens);
    chat.dispose();
  });

  it('never unpins the system prompt or the attention sinks', async () => {
    const chat = model.createChat({ systemPrompt: 'you are terse', sinkTokens: 4, threads: THREADS });
    await chat.send('hello', GEN);
    const system = chat.memory().filter((e) => e.role === 'system');
    expect(system.length).toBeGreaterThan(0);
    expect(chat.unpin(0)).toBe(0);
    expect(chat.memory().filter((e) => e.role === 'system').every((e) => e.pinned)).toBe(true);
    expect(chat.pins()).toEqual([]);
    chat.dispose();
  });

  it('PinLimitError when pins would leave no room; nothing changes', async () => {
    const maxTokens = 80;
    const chat = model.createChat({ policy: 'sliding', maxTokens, windowSize: 16, sinkTokens: 4, threads: THREADS });
    const words = Array.from({ length: 14 }, (_, i) => `x${i}`).join(' ');
    for (let i = 0; i < 3; i++) await chat.send(`${words} ${i}`, GEN);
    // Turns with user tokens past the sinks (a turn of which only sinks are left is not in memory).
    const turns = [...new Set(chat.memory().slice(4).filter((e) => e.role === 'user').map((e) => e.turn))];
    let failed = false;
    for (const t of turns) {
      const before = chat.memory();
      try {
        chat.pin(t, { reply: true });
      } catch (err) {
        expect(err).toBeInstanceOf(PinLimitError);
        expect(chat.memory()).toEqual(before);
        failed = true;
        break;
      }
    }
    expect(failed).toBe(true);
    // Whatever was pinned, the next turn still fits.
    await chat.send('ok', GEN);
    checkCache(chat, maxTokens);
    chat.dispose();
  });

  it('forget evicts a turn now, in place, pinned or not', async () => {
    const maxTokens = 256;
    const chat = model.createChat({ maxTokens, threads: THREADS });
    await talk(chat, 4);
    chat.pin(2);
    const before = chat.memory();
    const gone = before.filter((e) => e.turn === 2 && e.role !== 'system');
    const evicted = await chat.forget(2);
    expect(evicted).toBe(gone.length);
    const after = chat.memory();
    expect(after.some((e) => e.turn === 2)).toBe(false);
    expect(after.map((e) => e.token)).toEqual(before.filter((e) => e.turn !== 2).map((e) => e.token));
    // The others keep their positions (positions 'keep'): a gap where turn 2 was, nothing shifted.
    expect(after.map((e) => e.position)).toEqual(before.filter((e) => e.turn !== 2).map((e) => e.position));
    expect(chat.stats().compactions).toBe(0);
    expect(chat.pins()).toEqual([]);
    expect(chat.stats().tokensEvicted).toBe(evicted);
    expect(await chat.forget(2)).toBe(0);
    checkCache(chat, maxTokens);
    // The chat goes on from the cache with the gap.
    await chat.send('and now?', GEN);
    checkCache(chat, maxTokens);
    // The transcript keeps every turn.
    expect(chat.exportTranscript().messages).toHaveLength(10);
    chat.dispose();
  });

  it('forgetting the newest turn forgets its reply\'s last token and closing too (they wait to be decoded)', async () => {
    const maxTokens = 256;
    const chat = model.createChat({ maxTokens, threads: THREADS });
    await talk(chat, 2);
    await chat.send('the newest turn', { maxNewTokens: 6, temperature: 0 });   // stops at maxNewTokens: its last token is carried
    expect(chat._internals().cacheState().carriedTokens).toBeGreaterThan(0);
    const before = chat.memory();
    await chat.forget(3);
    expect(chat._internals().cacheState().carriedTokens).toBe(0);
    expect(chat.memory()).toEqual(before.filter((e) => e.turn !== 3));
    await chat.send('and now?', GEN);
    expect(chat.memory().filter((e) => e.turn === 3)).toEqual([]);   // nothing of turn 3 came back
    checkCache(chat, maxTokens);
    chat.dispose();
  });

  it("with positions 'compact', forget renumbers the rest 0..n-1", async () => {
    const maxTokens = 256;
    const chat = model.createChat({ maxTokens, threads: THREADS, positions: 'compact' });
    await talk(chat, 4);
    const before = chat.memory();
    await chat.forget(2);
    const after = chat.memory();
    expect(after.map((e) => e.token)).toEqual(before.filter((e) => e.turn !== 2).map((e) => e.token));
    expect(after.map((e) => e.position)).toEqual(after.map((_, i) => i));
    expect(chat.stats().compactions).toBe(1);
    await chat.send('and now?', GEN);
    checkCache(chat, maxTokens);
    chat.dispose();
  });

  it('a forgotten turn is gone for pin and unpin too, even when its first tokens are sinks', async () => {
    const chat = model.createChat({ sinkTokens: 4, threads: THREADS });
    await talk(chat, 3);
    const sinksOfTurn1 = chat.memory().slice(0, 4).filter((e) => e.turn === 1).length;
    expect(sinksOfTurn1).toBeGreaterThan(0); // no system prompt: turn 1 opens among the sinks (after BOS)
    await chat.forget(1);
    expect(chat.memory().filter((e) => e.turn === 1)).toHaveLength(sinksOfTurn1); // only the sinks stay
    expect(() => chat.unpin(1)).toThrow(/turn 1 is not in memory/);
    expect(() => chat.pin(1)).toThrow(InvalidOptionError);
    expect(await chat.forget(1)).toBe(0);
    chat.dispose();
  });

  it('typed errors: unknown turns, bad arguments, a running turn, a disposed chat', async () => {
    const chat = model.createChat({ threads: THREADS });
    expect(() => chat.pin(1)).toThrow(InvalidOptionError); // nothing in memory yet
    expect(await chat.forget(1)).toBe(0);
    await chat.send('hello', GEN);
    expect(() => chat.pin(7)).toThrow(InvalidOptionError);
    expect(() => chat.unpin(7)).toThrow(InvalidOptionError);
    expect(() => chat.pin(-1)).toThrow(InvalidOptionError);
    expect(() => chat.pin(1.5)).toThrow(InvalidOptionError);
    expect(() => chat.pin(1, { reply: 1 } as never)).toThrow(InvalidOptionError);
    expect(() => chat.pin(1, { replies: true } as never)).toThrow(InvalidOptionError);
    const turn = chat.send('a longer reply please', { temperature: 0, maxNewTokens: 32 });
    expect(() => chat.pin(1)).toThrow(ChatBusyError);
    await expect(chat.forget(1)).rejects.toBeInstanceOf(ChatBusyError);
    await turn;
    chat.dispose();
    expect(() => chat.pins()).toThrow(/disposed/);
  });
});

describe('checkpoints keep pins', () => {
  it('save, load: the same pins, and they still hold', async () => {
    const maxTokens = 96;
    const chat = model.createChat({ policy: 'importance', maxTokens, windowSize: 32, threads: THREADS });
    await chat.send('remember the code 4817', { ...GEN, pin: true });
    await talk(chat, 10);
    const path = join(testDir, 'pins.fmlckpt');
    await chat.saveCheckpoint(path);
    const restored = await model.loadChat(path);
    expect(restored.pins()).toEqual(chat.pins());
    expect(restored.memory().map((e) => [e.token, e.pinned])).toEqual(chat.memory().map((e) => [e.token, e.pinned]));
    await talk(restored, 10, 50);
    expect(userTokens(restored, 1).every((e) => e.pinned)).toBe(true);
    expect(restored.pins()[0]?.turn).toBe(1);
    checkCache(restored, maxTokens);
    chat.dispose();
    restored.dispose();
  });
});
