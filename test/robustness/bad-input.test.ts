// Bad input gets a typed error, never a crash, and the chat stays usable.
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  CallbackError, ChatBusyError, InferenceError, InvalidOptionError, loadModel, ModelInvalidError, ModelNotFoundError, PromptTooLargeError, type Model, type TurnResult,
} from '../../src/index.ts';
import { GGUFValueType, writeModel, type ModelFamily } from '../../src/gguf/index.ts';
import { getBinding } from '../../src/local/binding.ts';
import { editGGUF, type ParsedGGUF } from '../gguf-file.ts';
import { checkCache, testDir, testModelPath, THREADS, expectTurnRan } from '../helpers.ts';

let model: Model;
beforeAll(async () => {
  model = await loadModel(testModelPath(), { threads: THREADS });
});
afterAll(() => model?.dispose());

describe('model files', () => {
  it('missing file', async () => {
    await expect(loadModel(join(testDir, 'nope.gguf'))).rejects.toBeInstanceOf(ModelNotFoundError);
  });

  it('a directory, an empty file, a text file', async () => {
    mkdirSync(join(testDir, 'dir.gguf'), { recursive: true });
    await expect(loadModel(join(testDir, 'dir.gguf'))).rejects.toBeInstanceOf(ModelInvalidError);
    writeFileSync(join(testDir, 'empty.gguf'), '');
    await expect(loadModel(join(testDir, 'empty.gguf'))).rejects.toBeInstanceOf(ModelInvalidError);
    writeFileSync(join(testDir, 'text.gguf'), 'hello, I am not a model');
    await expect(loadModel(join(testDir, 'text.gguf'))).rejects.toMatchObject({ code: 'MODEL_INVALID' });
  });

  it('truncated GGUF (header intact, tensor data cut)', async () => {
    const bytes = readFileSync(testModelPath());
    for (const keep of [bytes.length - 100, Math.floor(bytes.length / 2), 64, 8]) {
      const p = join(testDir, `trunc-${keep}.gguf`);
      writeFileSync(p, bytes.subarray(0, keep));
      await expect(loadModel(p)).rejects.toBeInstanceOf(ModelInvalidError);
    }
  });

  it('a GGUF with a wrong tensor count', async () => {
    const bytes = Buffer.from(readFileSync(testModelPath()));
    // Header: magic u32, version u32, n_tensors u64, n_kv u64.
    bytes.writeBigUInt64LE(bytes.readBigUInt64LE(8) + 5n, 8);
    const p = join(testDir, 'wrong-count.gguf');
    writeFileSync(p, bytes);
    await expect(loadModel(p)).rejects.toMatchObject({ code: expect.stringMatching(/MODEL_INVALID|MODEL_LOAD_FAILED/) });
  });

  it('hyperparameters llama.cpp would abort on are refused with MODEL_INVALID (the process lives)', async () => {
    const { UINT32: U32, FLOAT32: F32, STRING: STR, INT32 } = GGUFValueType;
    const cases: [ModelFamily, string, (m: ParsedGGUF['kv']) => void][] = [
      ['llama', 'no layers', (m) => m.set('llama.block_count', { type: U32, value: 0 })],
      ['llama', '513 layers', (m) => m.set('llama.block_count', { type: U32, value: 513 })],
      ['llama', 'a NaN epsilon', (m) => m.set('llama.attention.layer_norm_rms_epsilon', { type: F32, value: NaN })],
      ['llama', 'a negative epsilon', (m) => m.set('llama.attention.layer_norm_rms_epsilon', { type: F32, value: -1e-5 })],
      ['llama', 'an unknown RoPE scaling', (m) => m.set('llama.rope.scaling.type', { type: STR, value: 'zzz' })],
      ['llama', 'no tokenizer', (m) => m.set('tokenizer.ggml.model', { type: STR, value: 'none' })],
      ['llama', 'a token twice', (m) => {
        const tokens = m.get('tokenizer.ggml.tokens')!.value as string[];
        tokens[40] = tokens[41]!;
      }],
      ['qwen3moe', 'no expert used per token', (m) => m.set('qwen3moe.expert_used_count', { type: U32, value: 0 })],
      ['qwen3moe', 'more experts used than exist', (m) => m.set('qwen3moe.expert_used_count', { type: U32, value: 9 })],
      ['qwen35', 'an attention interval of 0', (m) => m.set('qwen35.full_attention_interval', { type: U32, value: 0 })],
      ['qwen2vl', 'M-RoPE sections all 0', (m) => m.set('qwen2vl.rope.dimension_sections', { type: INT32, value: [0, 0, 0, 0] })],
      ['qwen2vl', 'M-RoPE sections wider than a head', (m) => m.set('qwen2vl.rope.dimension_sections', { type: INT32, value: [1000, 1000, 1000, 0] })],
      ['gemma4', 'every layer reusing another\'s KV', (m) => m.set('gemma4.attention.shared_kv_layers', { type: U32, value: 100 })],
      // Each of these aborted the process (GGML_ASSERT at load or at the first decode) before it was checked.
      ['deepseek2', 'latent keys no wider than their rotary dims', (m) => m.set('deepseek2.attention.key_length_mla', { type: U32, value: 8 })],
      ['deepseek2', 'latent keys without rope.dimension_count', (m) => m.delete('deepseek2.rope.dimension_count')],
      ['deepseek2', 'latent attention with two KV heads', (m) => m.set('deepseek2.attention.head_count_kv', { type: U32, value: 2 })],
      ['granite4', 'a Mamba-2 inner size of 3 x embd', (m) => m.set('granitehybrid.ssm.inner_size', { type: U32, value: 192 })],
      ['nemotron3', 'Mamba-2 heads that do not divide its inner size', (m) => m.set('nemotron_h_moe.ssm.time_step_rank', { type: U32, value: 3 })],
      ['qwen3next', 'a DeltaNet inner size that is not state x heads', (m) => m.set('qwen3next.ssm.inner_size', { type: U32, value: 48 })],
      ['qwen35', 'a DeltaNet inner size that is not state x heads', (m) => m.set('qwen35.ssm.inner_size', { type: U32, value: 48 })],
    ];
    for (const family of new Set(cases.map(([f]) => f))) {
      // The unedited file loads and chats: what is refused below is the edit.
      const m = await loadModel(writeModel(join(testDir, `fam-${family}.gguf`), { family }).path, { threads: THREADS });
      await expectTurnRan(m.createChat({ maxTokens: 64 }).send('hello', { maxNewTokens: 2 }));
      m.dispose();
    }
    for (const [family, what, edit] of cases) {
      const p = join(testDir, `hostile-${family}-${what.replace(/\W+/g, '-')}.gguf`);
      editGGUF(join(testDir, `fam-${family}.gguf`), p, edit);
      await expect(loadModel(p, { threads: THREADS }), what).rejects.toMatchObject({ code: 'MODEL_INVALID' });
    }
  });

  it('applyTemplate refuses a NUL (the text after it was dropped); plain framing honours addAssistant', async () => {
    expect(() => model.applyTemplate([{ role: 'user', content: 'secret\0 tail' }])).toThrow(InvalidOptionError);
    const base = await loadModel(writeModel(join(testDir, 'plain.gguf'), { chatTemplate: null }).path, { threads: THREADS });
    expect(base.info.framing).toBe('plain');
    expect(base.applyTemplate([{ role: 'user', content: 'Hi' }], { addAssistant: true })).toBe('User: Hi\nAssistant:');
    expect(base.applyTemplate([{ role: 'user', content: 'Hi' }])).toBe('User: Hi\n');
    base.dispose();
  });

  it('loading still works after all that', async () => {
    const p = join(testDir, 'copy.gguf');
    copyFileSync(testModelPath(), p);
    const m = await loadModel(p, { threads: THREADS });
    expect(m.info.architecture).toBe('llama');
    m.dispose();
  });

  it('wrong argument types', async () => {
    await expect(loadModel(42 as unknown as string)).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(loadModel(testModelPath(), { gpuLayers: -3 })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(loadModel(testModelPath(), { threads: 0 })).rejects.toBeInstanceOf(InvalidOptionError);
  });
});

describe('chat options', () => {
  const bad: [string, unknown][] = [
    ['negative maxTokens', { maxTokens: -1 }],
    ['NaN maxTokens', { maxTokens: Number.NaN }],
    ['fractional maxTokens', { maxTokens: 100.5 }],
    ['huge maxTokens', { maxTokens: 2 ** 40 }],
    ['windowSize > maxTokens', { maxTokens: 64, windowSize: 65 }],
    ['windowSize == maxTokens', { maxTokens: 64, windowSize: 64 }],
    ['unknown policy', { policy: 'lru' }],
    ['unknown option', { maxTokenz: 10 }],
    ['sinkTokens too large', { maxTokens: 64, sinkTokens: 40 }],
    ['bad kvType', { kvType: 'q4' }],
    ['string maxTokens', { maxTokens: '100' }],
    ['systemPrompt not a string', { systemPrompt: 5 }],
    ['options not an object', 'sliding'],
  ];
  for (const [name, opts] of bad) {
    it(name, () => {
      expect(() => model.createChat(opts as never)).toThrow(InvalidOptionError);
    });
  }

  it('a system prompt larger than the budget', () => {
    expect(() => model.createChat({ maxTokens: 32, systemPrompt: 'word '.repeat(100) })).toThrow(PromptTooLargeError);
  });
});

describe('send', () => {
  it('invalid send options and message types', async () => {
    const chat = model.createChat({ maxTokens: 64 });
    await expect(chat.send(123 as unknown as string)).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(chat.send('x', { maxNewTokens: -1 })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(chat.send('x', { temperature: Number.NaN })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(chat.send('x', { stop: 'abc' as unknown as string[] })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(chat.send('x', { signal: {} as AbortSignal })).rejects.toBeInstanceOf(InvalidOptionError);
    chat.dispose();
  });

  it('a message larger than the budget is refused and nothing is lost', async () => {
    const chat = model.createChat({ maxTokens: 64, windowSize: 16, systemPrompt: 'keep me' });
    await chat.send('hello', { maxNewTokens: 4, temperature: 0 });
    const memoryBefore = chat.memory();
    const statsBefore = chat.stats();
    await expect(chat.send('word '.repeat(500))).rejects.toBeInstanceOf(PromptTooLargeError);
    expect(chat.memory()).toEqual(memoryBefore);
    expect(chat.stats()).toEqual(statsBefore);
    const r = await chat.send('small', { maxNewTokens: 4, temperature: 0 });
    expect(r.stats.retainedTokens).toBeLessThanOrEqual(64);
    chat.dispose();
  });

  it('rejections keep the caller stack (the line that called, not the addon or the event loop)', async () => {
    const chat = model.createChat({ maxTokens: 64, threads: THREADS });
    const errors = await Promise.all([
      chat.send('word '.repeat(500)).catch((e: unknown) => e),
      loadModel(join(testDir, 'nope.gguf')).catch((e: unknown) => e),
      model.loadChat(join(testDir, 'no-such.fmlckpt')).catch((e: unknown) => e),
    ]);
    for (const err of errors.filter(Boolean)) expect(String((err as Error).stack)).toContain('bad-input.test.ts');
    chat.dispose();
  });

  it('a second send while one runs is rejected with ChatBusyError; the first completes', async () => {
    const chat = model.createChat({ maxTokens: 128 });
    const first = chat.send('one', { maxNewTokens: 20, temperature: 0 });
    await expect(chat.send('two')).rejects.toBeInstanceOf(ChatBusyError);
    expect(() => chat.reset()).toThrow(ChatBusyError);
    const r = await first;
    expect(r.stopReason).not.toBe('abort');
    await expectTurnRan(chat.send('three', { maxNewTokens: 2 }));
    chat.dispose();
  });

  it('NUL bytes, lone surrogates and a 1 MB string', async () => {
    const chat = model.createChat({ maxTokens: 128 });
    await expectTurnRan(chat.send('a\u0000b', { maxNewTokens: 2 }));
    await expectTurnRan(chat.send('bad \uD800 surrogate', { maxNewTokens: 2 }));
    await expect(chat.send('x'.repeat(1 << 20))).rejects.toBeInstanceOf(PromptTooLargeError);
    await expectTurnRan(chat.send('fine', { maxNewTokens: 2 }));
    chat.dispose();
  });

  it('an onToken callback that throws rejects the turn and the chat stays usable', async () => {
    const chat = model.createChat({ maxTokens: 128 });
    await expect(
      chat.send('x', { maxNewTokens: 20, temperature: 1.5, seed: 1, onToken: () => { throw new Error('boom'); } }),
    ).rejects.toThrow('boom');
    await expectTurnRan(chat.send('y', { maxNewTokens: 2 }));
    chat.dispose();
  });
});

describe('a throwing onToken callback', () => {
  it('ends the turn, keeps it (memory, stats and transcript agree) and reports the caller\'s error as cause', async () => {
    // 10 ms a token (a test hook): the abort the throw causes must land before the 40 tokens are done,
    // which on this tiny model under a loaded CI machine it did not always (stopReason 'maxTokens').
    const chat = model.createChat({ maxTokens: 128, testTokenDelayMs: 10 });
    await chat.send('first', { maxNewTokens: 4 });
    const boom = new Error('the caller broke');
    let pieces = 0;
    const err = await chat.send('second', { maxNewTokens: 40, ignoreEos: true, onToken: () => { if (++pieces === 3) throw boom; } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CallbackError);
    expect(err).toMatchObject({ code: 'CALLBACK_FAILED', cause: boom });
    const result = (err as CallbackError<TurnResult>).result;
    expect(result.stopReason).toBe('abort');
    expect(result.stats.generatedTokens).toBeLessThan(40);
    // The turn is turn 2 everywhere: stats, transcript, and the next turn is 3.
    expect(chat.stats().turns).toBe(2);
    const t = chat.exportTranscript().messages;
    expect(t).toHaveLength(4);
    expect(t[3]).toEqual({ role: 'assistant', content: result.response });
    const third = await chat.send('third', { maxNewTokens: 4 });
    expect(third.stats.turn).toBe(3);
    expect(chat.exportTranscript().messages).toHaveLength(6);
    chat.dispose();
  });
});

describe('the internal binding', () => {
  it('checks the class of the objects it is given and the type of typed arrays (no reinterpretation, no over-read)', async () => {
    const b = getBinding();
    const nativeModel = await b.loadModel(testModelPath(), { threads: 1 });
    const nativeChat = new b.NativeChat(nativeModel, {});
    const asModel = nativeChat as unknown as Parameters<typeof b.loadChat>[0];
    expect(() => new b.NativeChat(asModel, {})).toThrow(/expected a NativeModel/);
    await expect(Promise.resolve().then(() => b.loadChat(asModel, new Uint8Array(16), 1))).rejects.toThrow(/expected a NativeModel/);
    expect(() => nativeModel.detokenize(new Uint8Array(1000) as unknown as Int32Array, false)).toThrow(/Int32Array/);
    expect(nativeModel.detokenize(Int32Array.from([1]), false)).toEqual(expect.any(String));
    nativeChat.dispose();
    nativeModel.dispose();
  });
});

describe('an onToken that throws something other than an Error', () => {
  it.each(['stop', 42, undefined, null])('throwing %s ends the turn with CallbackError, its value as cause', async (value) => {
    // A thrown primitive could not be referenced by the binding: the turn went on, onToken was
    // called again for every token, and the error was lost.
    const chat = model.createChat({ maxTokens: 128, testTokenDelayMs: 5 });
    let calls = 0;
    const err = await chat.send('hi', { maxNewTokens: 20, ignoreEos: true, onToken: () => { calls++; throw value; } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CallbackError);
    expect((err as CallbackError<TurnResult>).cause).toBe(value);
    expect((err as CallbackError<TurnResult>).result.stopReason).toBe('abort');
    expect(calls).toBe(1);
    chat.dispose();
  });
});

describe('a decode that fails mid-reply', () => {
  it('rolls the whole turn back: memory, carried tokens, stats and transcript as before it, and the chat goes on', async () => {
    const chat = model.createChat({ maxTokens: 128, testFailAfterTokens: 3 });
    await chat.send('first', { maxNewTokens: 2, temperature: 0 });   // stops before the hook fires
    const memory = chat.memory();
    const carried = chat._internals().cacheState().carriedTokens;
    const err = await chat.send('second', { maxNewTokens: 10, ignoreEos: true, temperature: 0 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InferenceError);
    expect(err).toMatchObject({ code: 'DECODE_FAILED' });
    expect(chat.memory()).toEqual(memory);
    expect(chat._internals().cacheState().carriedTokens).toBe(carried);
    expect(chat.stats().turns).toBe(1);
    expect(chat.exportTranscript().messages).toHaveLength(2);
    checkCache(chat, 128);
    const next = await chat.send('third', { maxNewTokens: 2, temperature: 0 });
    expect(next.stats.turn).toBe(2);
    expect(chat.memory().filter((e) => e.turn === 2 && e.role === 'user').map((e) => e.text).join('')).toContain('third');
    checkCache(chat, 128);
    chat.dispose();
  });
});

describe('an unexpected error inside a step (a bug, not a failed decode)', () => {
  it('ends the turns of that engine with INTERNAL instead of the process; their memory is as before, rebuilt at the next turn', async () => {
    const chat = model.createChat({ maxTokens: 128, testInternalErrorAfterTokens: 3 });
    const neighbour = model.createChat({ maxTokens: 128, testInternalErrorAfterTokens: 3 });   // the same engine
    await chat.send('first', { maxNewTokens: 2, temperature: 0 });   // stops before the hook fires
    const memory = chat.memory();
    const seen = chat.stats().tokensSeen;
    const [err, other] = await Promise.all([
      chat.send('second', { maxNewTokens: 10, ignoreEos: true, temperature: 0 }).catch((e: unknown) => e),
      neighbour.send('hello', { maxNewTokens: 10, ignoreEos: true, temperature: 0 }).catch((e: unknown) => e),
    ]);
    expect(err).toBeInstanceOf(InferenceError);
    expect(err).toMatchObject({ code: 'INTERNAL' });
    expect(other).toMatchObject({ code: 'INTERNAL' });
    expect(chat.memory()).toEqual(memory);
    expect(chat.stats().turns).toBe(1);
    expect(chat.stats().tokensSeen).toBe(seen);
    checkCache(chat, 128);
    const next = await chat.send('third', { maxNewTokens: 2, temperature: 0 });
    expect(next.stats.turn).toBe(2);
    expect(chat.memory().slice(0, memory.length).map((e) => e.token)).toEqual(memory.map((e) => e.token));
    checkCache(chat, 128);
    await expectTurnRan(neighbour.send('again', { maxNewTokens: 2, temperature: 0 }));
    checkCache(neighbour, 128);
    chat.dispose();
    neighbour.dispose();
  });

  it('a neighbour stopped inside its system prompt starts over with it, counted once', async () => {
    const failing = model.createChat({ maxTokens: 256, batchSize: 16, testInternalErrorAfterTokens: 2 });
    const system = 'You are a careful assistant who answers in short sentences about rivers, mills and lighthouses. '.repeat(4);
    // 16 tokens a step, each of its steps 5 ms apart: its system prompt is still going in when the
    // other chat's error comes, whichever of the two turns reached the scheduler first.
    const starting = model.createChat({ maxTokens: 256, batchSize: 16, systemPrompt: system, testTokenDelayMs: 5 });
    const [b, a] = await Promise.all([
      starting.send('hello', { maxNewTokens: 2 }).catch((e: unknown) => e),
      failing.send('hi', { maxNewTokens: 8, ignoreEos: true }).catch((e: unknown) => e),
    ]);
    expect(a).toMatchObject({ code: 'INTERNAL' });
    expect(b).toMatchObject({ code: 'INTERNAL' });
    expect(starting.memory()).toEqual([]);
    expect(starting.stats().tokensSeen).toBe(0);
    await expectTurnRan(starting.send('hello', { maxNewTokens: 2, temperature: 0 }));
    const fresh = model.createChat({ maxTokens: 256, batchSize: 16, systemPrompt: system });
    await fresh.send('hello', { maxNewTokens: 2, temperature: 0 });
    expect(starting.stats().tokensSeen).toBe(fresh.stats().tokensSeen);
    expect(starting.memory()).toEqual(fresh.memory());
    checkCache(starting, 256);
    for (const c of [failing, starting, fresh]) c.dispose();
  });
});

describe('loadModel progress', () => {
  it('reports llama.cpp\'s load progress up to 1; a throwing callback fails the load with CallbackError and keeps no model', async () => {
    const seen: number[] = [];
    const m = await loadModel(testModelPath(), { threads: THREADS, onProgress: (f) => seen.push(f) });
    expect(seen.length).toBeGreaterThan(0);
    expect(seen.at(-1)).toBe(1);
    expect(seen).toEqual([...seen].sort((a, b) => a - b));
    m.dispose();
    const { getProbes } = await import('../../src/local/binding.ts');
    const before = getProbes().liveObjects().models;
    const err = await loadModel(testModelPath(), { threads: THREADS, onProgress: () => { throw new Error('bar broke'); } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CallbackError);
    expect((err as Error).cause).toEqual(new Error('bar broke'));
    await new Promise((r) => setTimeout(r, 10));
    expect(getProbes().liveObjects().models).toBe(before);
    await expect(loadModel(testModelPath(), { onProgress: 'yes' as never })).rejects.toBeInstanceOf(InvalidOptionError);
  });
});
