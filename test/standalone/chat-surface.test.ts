// The chat surface shared by local and remote chats: what differs is stated by a type, checked here
// at compile time (npm test typechecks the tests), and the shared streaming helper at run time.
import { describe, expect, expectTypeOf, it } from 'vitest';
import type { LocalOnly, RemoteOnly } from '../../src/index.ts';
import { streamFromSend } from '../../src/shared/chat-surface.ts';

describe('ChatSurface', () => {
  it('names exactly what only one kind of chat has', () => {
    // memory() and options exist on both, with different shapes (tokens vs messages, KV vs message policies).
    expectTypeOf<LocalOnly>().toEqualTypeOf<'options' | 'lastTurn' | 'memory' | 'saveCheckpoint' | 'checkpoint' | 'pin' | 'unpin' | 'pins' | 'forget' | '_ingest' | '_ingestTools' | '_internals' | '_restoreTranscript'>();
    expectTypeOf<RemoteOnly>().toEqualTypeOf<'options' | 'memory' | 'tokenCounter'>();
  });

  it('streamFromSend: pieces in order, the result as the return value, an early break aborts and waits', async () => {
    let aborted = false;
    const send = async (onToken: (p: string) => void, signal: AbortSignal) => {
      for (const p of ['a', 'b', 'c']) {
        if (signal.aborted) break;
        onToken(p);
        await new Promise((r) => setTimeout(r, 5));
      }
      aborted = signal.aborted;
      return { response: 'abc', aborted: signal.aborted };
    };
    const all: string[] = [];
    const gen = streamFromSend(send, undefined);
    let next = await gen.next();
    while (!next.done) {
      all.push(next.value);
      next = await gen.next();
    }
    expect(all).toEqual(['a', 'b', 'c']);
    expect(next.value).toEqual({ response: 'abc', aborted: false });
    for await (const _ of streamFromSend(send, undefined)) break;
    expect(aborted).toBe(true); // the turn saw the abort and settled before the loop ended
    const failing = streamFromSend(async () => Promise.reject(new Error('boom')), undefined);
    await expect(failing.next()).rejects.toThrow('boom');
  });
});
