// Checkpoints: exact round trips (logits and seeded continuations), the pending-K-shift case, atomic
// writes, and typed errors for wrong model / truncated / corrupted / newer files.
import { mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CheckpointError, loadModel, POLICIES, type Model } from '../src/index.ts';
import { THREADS, maxAbsDiff, testDir, testModelPath } from './helpers.ts';

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
    await expect(chat.send('still fine', { maxNewTokens: 3 })).resolves.toBeDefined();
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
    await expect(chat.send('ok', { maxNewTokens: 2 })).resolves.toBeDefined();
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

  it('save during a turn is refused with ChatBusyError', async () => {
    const chat = model.createChat({ maxTokens: 64 });
    const turn = chat.send('x', { maxNewTokens: 20, temperature: 0 });
    await expect(chat.saveCheckpoint(file('busy'))).rejects.toMatchObject({ code: 'CHAT_BUSY' });
    await turn;
    chat.dispose();
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
    const cache = moved._internals().cacheState();
    expect(cache.positionsContiguous).toBe(true);
    await expect(moved.send('and now?', { maxNewTokens: 4 })).resolves.toBeDefined();
    await expect(other.importTranscript({ format: 'nope' } as never)).rejects.toMatchObject({ code: 'INVALID_OPTION' });
    chat.dispose();
    moved.dispose();
  });
});
