// Checkpoints: exact round trips (logits and seeded continuations), the pending-K-shift case, atomic
// writes, and typed errors for wrong model / truncated / corrupted / newer files.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { getBinding } from '../../src/local/binding.ts';
import { writeModel } from '../../src/gguf/index.ts';
import { CheckpointError, loadModel, POLICIES, type Model } from '../../src/index.ts';
import { checkCache, THREADS, maxAbsDiff, testDir, testModelPath, expectTurnRan } from '../helpers.ts';

let model: Model;
let other: Model;
beforeAll(async () => {
  model = await loadModel(testModelPath(), { threads: THREADS });
  other = await loadModel(testModelPath({ seed: 99 }), { threads: THREADS });
});
afterAll(() => {
  model?.dispose();
  other?.dispose();
});

let n = 0;
const file = (name: string) => join(testDir, `${name}-${n++}.fmlckpt`);

/** FNV-1a 64, as native/util/hash.h: the checkpoint's trailing checksum. */
function fnv1a64(bytes: Uint8Array): bigint {
  let h = 0xcbf29ce484222325n;
  for (const b of bytes) h = BigInt.asUintN(64, (h ^ BigInt(b)) * 0x100000001b3n);
  return h;
}

/** A copy of a (format 2) checkpoint with one stored numeric option replaced, checksum recomputed. */
function withStoredNumber(bytes: Buffer, option: string, value: number): Buffer {
  const out = Buffer.from(bytes);
  const name = Buffer.alloc(8 + option.length);
  name.writeBigUInt64LE(BigInt(option.length));
  name.write(option, 8);
  const at = out.indexOf(name);
  expect(at).toBeGreaterThan(0);
  expect(out[at + name.length]).toBe(3); // option_value::NUMBER
  out.writeDoubleLE(value, at + name.length + 1);
  out.writeBigUInt64LE(fnv1a64(out.subarray(0, out.length - 8)), out.length - 8);
  return out;
}

describe.each(POLICIES)('checkpoint round trip (%s)', (policy) => {
  it('restores identical logits, memory, stats and seeded continuations', async () => {
    const chat = model.createChat({ policy, maxTokens: 96, windowSize: 16, kvType: 'f32', flashAttention: false, systemPrompt: 'Be brief.', maxPolicyMs: 0 });
    for (let t = 0; t < 12; t++) await chat.send(`message ${t}. More words here!`, { maxNewTokens: 8, temperature: 0.8, seed: t });
    expect(chat.stats().evictions).toBeGreaterThan(0);
    const path = file(policy);
    await chat.saveCheckpoint(path);
    const restored = await model.loadChat(path);
    expect(restored.options.policy).toBe(policy);
    expect(restored.memory()).toEqual(chat.memory());
    expect(restored.stats()).toEqual(chat.stats());
    const probe = model.tokenize('the')[0]!;
    expect(maxAbsDiff(chat._internals().probeLogits(probe), restored._internals().probeLogits(probe))).toBeLessThan(1e-4);
    for (let t = 0; t < 4; t++) {
      const a = await chat.send(`next ${t}`, { maxNewTokens: 10, temperature: 0.9, seed: 100 + t });
      const b = await restored.send(`next ${t}`, { maxNewTokens: 10, temperature: 0.9, seed: 100 + t });
      expect(b.response).toBe(a.response);
    }
    chat.dispose();
    restored.dispose();
  });
});

describe('checkpoints', () => {
  it('a K-shift still pending at save time is applied first (restored logits match)', async () => {
    const chat = model.createChat({ maxTokens: 128, kvType: 'f32', flashAttention: false });
    await chat.send('a few words to fill the cache with', { maxNewTokens: 12, temperature: 0 });
    const internals = chat._internals();
    const probe = model.tokenize('sea')[0]!;
    const before = internals.probeLogits(probe);
    internals.shiftPositions(37); // seq_add only: the K-shift is pending until the next decode
    const path = file('pending-shift');
    await chat.saveCheckpoint(path);
    const restored = await model.loadChat(path);
    restored._internals().shiftPositions(-37);
    internals.shiftPositions(-37);
    expect(maxAbsDiff(before, restored._internals().probeLogits(probe))).toBeLessThan(1e-4);
    expect(maxAbsDiff(before, internals.probeLogits(probe))).toBeLessThan(1e-4);
    chat.dispose();
    restored.dispose();
  });

  it('refuses a checkpoint from another model, a truncated, a corrupted and a newer one; the chat is untouched', async () => {
    const chat = model.createChat({ maxTokens: 64 });
    await chat.send('hello', { maxNewTokens: 6, temperature: 0 });
    const path = file('good');
    await chat.saveCheckpoint(path);
    const memory = chat.memory();

    await expect(other.loadChat(path)).rejects.toMatchObject({ code: 'CHECKPOINT_MODEL_MISMATCH' });
    const bytes = readFileSync(path);
    const truncated = file('truncated');
    writeFileSync(truncated, bytes.subarray(0, Math.floor(bytes.length / 2)));
    await expect(model.loadChat(truncated)).rejects.toMatchObject({ code: 'CHECKPOINT_CORRUPT' });
    const flipped = Buffer.from(bytes);
    flipped[Math.floor(flipped.length / 2)]! ^= 0xff;
    const corrupted = file('corrupted');
    writeFileSync(corrupted, flipped);
    await expect(model.loadChat(corrupted)).rejects.toMatchObject({ code: 'CHECKPOINT_CORRUPT' });
    const newer = Buffer.from(bytes);
    newer.writeUInt32LE(999, 8);
    const newerPath = file('newer');
    writeFileSync(newerPath, newer);
    await expect(model.loadChat(newerPath)).rejects.toMatchObject({ code: 'CHECKPOINT_VERSION' });
    const notOne = file('not-a-checkpoint');
    writeFileSync(notOne, 'hello');
    await expect(model.loadChat(notOne)).rejects.toBeInstanceOf(CheckpointError);
    await expect(model.loadChat(join(testDir, 'missing.fmlckpt'))).rejects.toMatchObject({ code: 'CHECKPOINT_IO' });
    expect(chat.memory()).toEqual(memory);
    await expectTurnRan(chat.send('still fine', { maxNewTokens: 3 }));
    chat.dispose();
  });

  it('saving to a directory or an unwritable place fails with CHECKPOINT_IO and leaves no temp files', async () => {
    const chat = model.createChat({ maxTokens: 64 });
    await chat.send('hi', { maxNewTokens: 3, temperature: 0 });
    const dir = join(testDir, 'ckpt-dir');
    mkdirSync(dir, { recursive: true });
    await expect(chat.saveCheckpoint(dir)).rejects.toMatchObject({ code: 'CHECKPOINT_IO' });
    await expect(chat.saveCheckpoint(join(testDir, 'no', 'such', 'dir', 'x.ckpt'))).rejects.toMatchObject({ code: 'CHECKPOINT_IO' });
    expect(readdirSync(testDir).filter((f) => f.includes('.tmp-'))).toEqual([]);
    await expectTurnRan(chat.send('ok', { maxNewTokens: 2 }));
    chat.dispose();
  });

  it('overwrites atomically: the old checkpoint stays valid until the new one is in place', async () => {
    const chat = model.createChat({ maxTokens: 64 });
    await chat.send('first', { maxNewTokens: 3, temperature: 0 });
    const path = file('overwrite');
    await chat.saveCheckpoint(path);
    await chat.send('second', { maxNewTokens: 3, temperature: 0 });
    await chat.saveCheckpoint(path);
    const restored = await model.loadChat(path);
    expect(restored.stats().turns).toBe(2);
    restored.dispose();
    chat.dispose();
  });

  it('validates the options a checkpoint stores exactly like createChat (a recomputed checksum does not help)', async () => {
    const chat = model.createChat({ maxTokens: 64 });
    await chat.send('hello', { maxNewTokens: 3, temperature: 0 });
    const path = file('options');
    await chat.saveCheckpoint(path);
    chat.dispose();
    const bytes = readFileSync(path);
    for (const [option, value] of [['threads', 100000], ['threads', 0], ['threads', -7], ['maxTokens', 5], ['windowSize', 1e9], ['batchSize', 0.5]] as const) {
      const forged = withStoredNumber(bytes, option, value);
      const forgedPath = file(`forged-${option}`);
      writeFileSync(forgedPath, forged);
      const t0 = performance.now();
      const err = await model.loadChat(forgedPath).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(CheckpointError);
      expect(err).toMatchObject({ code: 'CHECKPOINT_CORRUPT', message: expect.stringContaining(`for ${option} but received number ${value}`) });
      expect(performance.now() - t0).toBeLessThan(5000); // threads: 100000 used to hang here
    }
    // The same validator: createChat says the same thing about the same value.
    expect(() => model.createChat({ threads: 100000 })).toThrow('Expected an integer between 1 and 256 for threads but received number 100000');
    await expect(model.loadChat(path, { threads: 0 })).rejects.toMatchObject({ code: 'INVALID_OPTION' });
    // An override may not exceed the model's thread budget (every decode of its chats shares it).
    await expect(model.loadChat(path, { threads: THREADS + 1 })).rejects.toMatchObject({ code: 'INVALID_OPTION', message: expect.stringContaining("the model's thread budget") });
    const ok = await model.loadChat(path, { threads: THREADS });
    expect(ok.options.threads).toBe(THREADS);
    ok.dispose();
  });

  it('refuses a path with a NUL character instead of writing to the part before it', async () => {
    const chat = model.createChat({ maxTokens: 64 });
    const dir = join(testDir, 'nul-dir');
    mkdirSync(dir, { recursive: true });
    await expect(chat.saveCheckpoint(join(dir, 'a\0b'))).rejects.toMatchObject({ code: 'INVALID_OPTION' });
    await expect(model.loadChat(join(dir, 'a\0b'))).rejects.toMatchObject({ code: 'INVALID_OPTION' });
    expect(readdirSync(dir)).toEqual([]);
    chat.dispose();
  });

  it('removes temp files that a killed save left behind (its process is gone), and only those', async () => {
    const chat = model.createChat({ maxTokens: 64 });
    await chat.send('hello', { maxNewTokens: 3, temperature: 0 });
    const dir = join(testDir, 'stale-temps');
    mkdirSync(dir, { recursive: true });
    const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' }).stdout;
    const stale = `s.fmlckpt.tmp-${dead}-12345`;
    const live = `s.fmlckpt.tmp-${process.ppid}-999`; // the test runner: alive, may be mid-save
    const otherTarget = `t.fmlckpt.tmp-${dead}-1`;
    for (const name of [stale, live, otherTarget, 's.fmlckpt.tmp-notapid']) writeFileSync(join(dir, name), 'partial');
    await chat.saveCheckpoint(join(dir, 's.fmlckpt'));
    expect(readdirSync(dir).sort()).toEqual(['s.fmlckpt', 's.fmlckpt.tmp-notapid', live, otherTarget].sort());
    // A server cleans its whole directory at start (any target).
    expect(getBinding().removeStaleCheckpointTemps(dir)).toBe(1);
    expect(readdirSync(dir)).not.toContain(otherTarget);
    chat.dispose();
  });

  it('save during a turn is refused with ChatBusyError', async () => {
    const chat = model.createChat({ maxTokens: 64 });
    const turn = chat.send('x', { maxNewTokens: 20, temperature: 0 });
    await expect(chat.saveCheckpoint(file('busy'))).rejects.toMatchObject({ code: 'CHAT_BUSY' });
    await turn;
    chat.dispose();
  });
});

describe('checkpoint positions', () => {
  it('refuses a checkpoint whose token positions are negative (checksum valid)', async () => {
    const chat = model.createChat({ maxTokens: 128, kvType: 'f32', flashAttention: false });
    await chat.send('hello there', { maxNewTokens: 4, temperature: 0 });
    // The probe moves every position (the ledger's too) by -3: consecutive, but from -3.
    chat._internals().shiftPositions(-3);
    const path = file('negative');
    await chat.saveCheckpoint(path);
    await expect(model.loadChat(path)).rejects.toMatchObject({ code: 'CHECKPOINT_CORRUPT', message: expect.stringContaining('negative') });
    chat.dispose();
  });
});

/** The KV blob a full checkpoint carries last, before its checksum ([u64 size][bytes][u64 checksum]). */
function kvBlob(bytes: Buffer): { at: number; size: number } {
  // The largest size that fits (a smaller one can match by chance inside the blob).
  for (let size = bytes.length - 24; size >= 16; size--) {
    const at = bytes.length - 8 - size;
    if (bytes.readBigUInt64LE(at - 8) === BigInt(size)) return { at, size };
  }
  throw new Error('no KV blob found');
}
const resum = (b: Buffer) => {
  b.writeBigUInt64LE(fnv1a64(b.subarray(0, b.length - 8)), b.length - 8);
  return b;
};

describe('hostile KV states (valid checksums): a typed error, never an abort, and no cell left behind', () => {
  // The one-stream blob: [magic, seq id: 8 bytes][u32 streams = 1][u32 cells][cell: i32 pos, u32 seq ids, i32 seq id]...
  const CELLS = 8 + 4;
  const cellAt = (blob: number, i: number) => blob + CELLS + 4 + i * 12;
  const saved = async () => {
    const chat = model.createChat({ maxTokens: 128, kvType: 'f32', flashAttention: false });
    await chat.send('hello there, how are you today', { maxNewTokens: 4, temperature: 0 });
    const bytes = Buffer.from(await chat.checkpoint());
    chat.dispose();
    return bytes;
  };
  const stillClean = async () => {
    // Every slot serves new chats as if nothing had been loaded (a cell left at a position seq_rm
    // cannot reach, below 0 or at INT32_MAX, would stay in the slot for the next chat placed there;
    // those two were refused before this check too, by llama.cpp and by the min/max comparison).
    const chats = [0, 1].map(() => model.createChat({ maxTokens: 128 }));
    for (const c of chats) {
      await expectTurnRan(c.send('fresh start', { maxNewTokens: 2, temperature: 0 }));
      checkCache(c, 128);
      c.dispose();
    }
  };

  it.each([['negative', -1], ['INT32_MAX', 2 ** 31 - 1]] as const)('a cell at a %s position', async (_what, pos) => {
    const bytes = await saved();
    const { at } = kvBlob(bytes);
    expect(bytes.readUInt32LE(at + 8)).toBe(1);   // one stream
    bytes.writeInt32LE(pos, cellAt(at, 1));
    await expect(model.loadChat(resum(bytes))).rejects.toMatchObject({ code: 'CHECKPOINT_CORRUPT' });
    await stillClean();
  });

  it('a cell duplicating another\'s position (the smallest and largest unchanged)', async () => {
    const bytes = await saved();
    const { at } = kvBlob(bytes);
    bytes.writeInt32LE(bytes.readInt32LE(cellAt(at, 1)), cellAt(at, 2));
    await expect(model.loadChat(resum(bytes))).rejects.toMatchObject({ code: 'CHECKPOINT_CORRUPT' });
    await stillClean();
  });

  it('a hybrid\'s recurrent state with more cells than one sequence has', async () => {
    const path = join(testDir, 'ckpt-qwen35.gguf');
    writeModel(path, { family: 'qwen35', seed: 3 });
    const hybrid = await loadModel(path, { threads: THREADS });
    try {
      const chat = hybrid.createChat({ maxTokens: 128 });
      await chat.send('hello there, how are you today', { maxNewTokens: 4, temperature: 0 });
      const last = chat.memory().at(-1)!.position;
      const bytes = Buffer.from(await chat.checkpoint());
      chat.dispose();
      // The recurrent tail: [u32 cells = 1][i32 pos = the last token's][u32 seq ids = 0][u32 s_trans = 0][u32 n_layer].
      const { at, size } = kvBlob(bytes);
      const tail = Buffer.alloc(20);
      tail.writeUInt32LE(1, 0);
      tail.writeInt32LE(last, 4);
      tail.writeUInt32LE(hybrid.info.nLayer, 16);
      const found = bytes.subarray(at, at + size).indexOf(tail);
      expect(found).toBeGreaterThan(0);
      // Two cells for the one sequence, each well formed: llama.cpp finds a slot for them and then
      // asserts that they are where it put them.
      const extra = Buffer.alloc(8);
      extra.writeInt32LE(last + 1, 0);
      const start = at + found;
      const hostile = Buffer.concat([bytes.subarray(0, at - 8), Buffer.alloc(8), bytes.subarray(at, start), Buffer.from([2, 0, 0, 0]),
        bytes.subarray(start + 4, start + 12), extra, bytes.subarray(start + 12)]);
      hostile.writeBigUInt64LE(BigInt(size + 8), at - 8);
      await expect(hybrid.loadChat(resum(hostile))).rejects.toMatchObject({ code: 'CHECKPOINT_CORRUPT' });
      const fresh = hybrid.createChat({ maxTokens: 128 });
      await expectTurnRan(fresh.send('fresh start', { maxNewTokens: 2, temperature: 0 }));
      fresh.dispose();
    } finally {
      hybrid.dispose();
    }
  });
});

describe('transcripts', () => {
  it('export is the whole conversation; import into another model replays it within the budget', async () => {
    const chat = model.createChat({ maxTokens: 96, windowSize: 16, systemPrompt: 'Be brief.' });
    const sent: string[] = [];
    for (let t = 0; t < 10; t++) {
      sent.push(`question ${t}`);
      await chat.send(`question ${t}`, { maxNewTokens: 6, temperature: 0 });
    }
    const transcript = chat.exportTranscript();
    expect(transcript.systemPrompt).toBe('Be brief.');
    expect(transcript.messages.filter((m) => m.role === 'user').map((m) => m.content)).toEqual(sent);
    expect(transcript.messages).toHaveLength(20);
    const json = JSON.parse(JSON.stringify(transcript));
    const moved = await other.importTranscript(json, { maxTokens: 96, windowSize: 16 });
    expect(moved.stats().turns).toBe(10);
    expect(moved.stats().tokensRetained).toBeLessThanOrEqual(96);
    expect(moved.stats().evictions).toBeGreaterThan(0);
    expect(moved.exportTranscript().messages).toEqual(transcript.messages);
    checkCache(moved, 96);
    await expectTurnRan(moved.send('and now?', { maxNewTokens: 4 }));
    await expect(other.importTranscript({ format: 'nope' } as never)).rejects.toMatchObject({ code: 'INVALID_OPTION' });
    chat.dispose();
    moved.dispose();
  });

  it('messages of one role in a row are one message (no empty turn between them); a leading reply gets an empty user message', async () => {
    const u = (content: string) => ({ role: 'user' as const, content });
    const a = (content: string) => ({ role: 'assistant' as const, content });
    const chat = await model.importTranscript({ format: 'finite-memory-llm/transcript', version: 1, systemPrompt: '',
      messages: [a('Welcome!'), a('Ask me.'), u('one'), u('two'), a('yes'), u('three')] }, { maxTokens: 256 });
    expect(chat.exportTranscript().messages).toEqual([u(''), a('Welcome!\n\nAsk me.'), u('one\n\ntwo'), a('yes'), u('three'), a('')]);
    expect(chat.stats().turns).toBe(3);
    const text = chat.memory().map((e) => e.text).join('');
    expect(text).toContain('one\n\ntwo');
    expect(text.match(/<\|im_start\|> ?user/g)).toHaveLength(3);   // the framing of three user messages, none empty but the first
    chat.dispose();
  });
});

describe('checkpoints as bytes', () => {
  const talk = async (chat: Awaited<ReturnType<Model['loadChat']>>, turns: number, from = 0) => {
    const out: string[] = [];
    for (let t = from; t < from + turns; t++) out.push((await chat.send(`message ${t}: the cat sat on the mat`, { maxNewTokens: 6, temperature: 0.8, seed: t })).response);
    return out;
  };

  it('full: restores memory, counters, transcript and seeded continuations exactly, with no decode', async () => {
    const chat = model.createChat({ policy: 'sliding', maxTokens: 80, windowSize: 16, kvType: 'f32', flashAttention: false, systemPrompt: 'Be brief.' });
    await talk(chat, 10);
    chat.pin(9);
    expect(chat.stats().evictions).toBeGreaterThan(0);
    const bytes = await chat.checkpoint();
    expect(bytes).toBeInstanceOf(Uint8Array);
    const restored = await model.loadChat(bytes);
    expect(restored.memory()).toEqual(chat.memory());
    expect(restored.pins()).toEqual(chat.pins());
    expect(restored.exportTranscript()).toEqual(chat.exportTranscript());
    expect(restored.exportTranscript().messages).toHaveLength(20);
    const { kvBytes: _a, ...s1 } = chat.stats();
    const { kvBytes: _b, ...s2 } = restored.stats();
    expect(s2).toEqual(s1);
    const probe = model.tokenize('the')[0]!;
    expect(maxAbsDiff(chat._internals().probeLogits(probe), restored._internals().probeLogits(probe))).toBeLessThan(1e-4);
    expect(await talk(restored, 4, 10)).toEqual(await talk(chat, 4, 10));
    expect(restored.exportTranscript()).toEqual(chat.exportTranscript());
    chat.dispose();
    restored.dispose();
  });

  it('ledger: a few bytes a token; restores the same memory (positions 0..n-1) by one prefill, as the chat re-prefilled would be', async () => {
    const chat = model.createChat({ maxTokens: 80, windowSize: 16, kvType: 'f32', flashAttention: false, policy: 'importance', systemPrompt: 'Be brief.' });
    await talk(chat, 10);
    const full = await chat.checkpoint({ kind: 'full' });
    const ledger = await chat.checkpoint({ kind: 'ledger' });
    const retained = chat.stats().tokensRetained;
    expect(ledger.length).toBeLessThan(full.length / 10);
    expect(ledger.length).toBeLessThan(1500 + 40 * retained); // header, options and transcript, then per token
    const restored = await model.loadChat(ledger);
    const strip = (m: ReturnType<typeof chat.memory>) => m.map(({ position: _p, ...e }) => e);
    expect(strip(restored.memory())).toEqual(strip(chat.memory()));
    expect(restored.memory().map((e) => e.position)).toEqual(restored.memory().map((_, i) => i));
    expect(restored.exportTranscript()).toEqual(chat.exportTranscript());
    expect(restored.stats().turns).toBe(chat.stats().turns);
    checkCache(restored, 80);
    // What a ledger restore computes is what re-prefilling the retained tokens computes.
    chat._internals().replayHistory();
    const probe = model.tokenize('the')[0]!;
    expect(maxAbsDiff(chat._internals().probeLogits(probe), restored._internals().probeLogits(probe))).toBeLessThan(1e-4);
    // A ledger-restored chat saved again before its first turn is still a ledger checkpoint, and valid.
    const again = await model.loadChat(await restored.checkpoint());
    expect(strip(again.memory())).toEqual(strip(chat.memory()));
    await talk(restored, 3, 10);
    checkCache(restored, 80);
    for (const c of [chat, restored, again]) c.dispose();
  });

  it('the transcript travels in file checkpoints too', async () => {
    const chat = model.createChat({ maxTokens: 64, windowSize: 16 });
    await talk(chat, 6);
    const path = file('transcript');
    await chat.saveCheckpoint(path);
    const restored = await model.loadChat(path);
    expect(restored.exportTranscript()).toEqual(chat.exportTranscript());
    expect(restored.exportTranscript().messages).toHaveLength(12);
    chat.dispose();
    restored.dispose();
  });

  it('refuses bytes from another model, truncated, corrupted, or with a transcript that is not one; the source chat is untouched', async () => {
    const chat = model.createChat({ maxTokens: 64 });
    await talk(chat, 3);
    const bytes = await chat.checkpoint();
    await expect(other.loadChat(bytes)).rejects.toMatchObject({ code: 'CHECKPOINT_MODEL_MISMATCH' });
    await expect(model.loadChat(bytes.subarray(0, bytes.length - 9))).rejects.toMatchObject({ code: 'CHECKPOINT_CORRUPT' });
    const flipped = Uint8Array.from(bytes);
    flipped[Math.floor(flipped.length / 2)]! ^= 0xff;
    await expect(model.loadChat(flipped)).rejects.toMatchObject({ code: 'CHECKPOINT_CORRUPT' });
    await expect(model.loadChat(new Uint8Array(0))).rejects.toMatchObject({ code: 'CHECKPOINT_CORRUPT' });
    // A valid checksum over a transcript that is not a message list: refused by the JS side.
    const json = Buffer.from(JSON.stringify(chat.exportTranscript().messages));
    const forged = Buffer.from(bytes);
    const at = forged.indexOf(json);
    expect(at).toBeGreaterThan(0);
    forged.write('{'.padEnd(json.length, ' '), at);
    forged.writeBigUInt64LE(fnv1a64(forged.subarray(0, forged.length - 8)), forged.length - 8);
    await expect(model.loadChat(forged)).rejects.toMatchObject({ code: 'CHECKPOINT_CORRUPT', message: expect.stringMatching(/transcript/) });
    await expect(chat.checkpoint({ kind: 'kv' as never })).rejects.toMatchObject({ code: 'INVALID_OPTION' });
    await expectTurnRan(chat.send('still fine', { maxNewTokens: 2 }));
    chat.dispose();
  });
});
