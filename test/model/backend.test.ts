// Which backend and device do the work (model.info), and, on the CUDA variant, that the weights and
// the KV cache live on the GPU and that eviction + K-shift work there. The CUDA part runs only where
// the CUDA variant loaded (scripts/gpu-check.sh runs the suite with FINITE_MEMORY_BACKEND=cuda); on a
// CPU-only machine it is skipped with a message.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, systemInfo, type Model } from '../../src/index.ts';
import { THREADS, checkCache, maxAbsDiff, testModelPath } from '../helpers.ts';

const info = systemInfo();
const onCuda = info.variant === 'cuda';
if (!onCuda) console.log(`[backend.test] CUDA checks skipped: the ${info.variant} variant is loaded (${info.binary}); run scripts/gpu-check.sh on a GPU machine`);

const maxAbs = (a: Float32Array) => a.reduce((m, v) => Math.max(m, Math.abs(v)), 0);

describe('model.info: backend and device', () => {
  let model: Model;
  beforeAll(async () => {
    model = await loadModel(testModelPath(), { threads: THREADS, gpuLayers: 'auto' });
  });
  afterAll(() => model?.dispose());

  it('names the backend and the device doing the work', () => {
    expect(typeof model.info.device).toBe('string');
    expect(model.info.device.length).toBeGreaterThan(0);
    if (onCuda) {
      expect(model.info.backend).toBe('cuda');
      expect(model.info.gpuLayers).toBe(model.info.nLayer); // 'auto' offloads every layer
    } else {
      expect(model.info.backend).toBe('cpu');
      expect(model.info.gpuLayers).toBe(0);
      expect(info.gpuDevices).toBe(0);
    }
  });

  it('gpuLayers: 0 keeps the work on the CPU on any variant', async () => {
    const cpu = await loadModel(testModelPath(), { threads: THREADS, gpuLayers: 0 });
    expect(cpu.info.backend).toBe('cpu');
    expect(cpu.info.gpuLayers).toBe(0);
    cpu.dispose();
  });
});

describe.skipIf(!onCuda)('CUDA backend (KV cache on the GPU)', () => {
  let model: Model;
  beforeAll(async () => {
    model = await loadModel(testModelPath(), { threads: THREADS, gpuLayers: 'auto' });
  });
  afterAll(() => model?.dispose());

  it('a K-shift on the GPU leaves the next-token logits unchanged', async () => {
    const chat = model.createChat({ maxTokens: 256, kvType: 'f32', flashAttention: false, systemPrompt: 'You are terse.' });
    await chat.send('Tell me about the sea and the sky.', { maxNewTokens: 16, temperature: 0 });
    const internals = chat._internals();
    const probe = model.tokenize('the')[0]!;
    const before = internals.probeLogits(probe);
    internals.shiftPositions(40);
    const shifted = internals.probeLogits(probe);
    const other = internals.probeLogits(model.tokenize('sea')[0]!);
    // cuBLAS may run F32 GEMMs in TF32, so allow more than the CPU test's 1e-4, relative to the logits.
    const tolerance = 1e-2 * Math.max(1, maxAbs(before));
    expect(maxAbsDiff(before, shifted)).toBeLessThan(tolerance);
    expect(maxAbsDiff(before, other)).toBeGreaterThan(10 * maxAbsDiff(before, shifted));
    chat.dispose();
  });

  it('keeps the budget and contiguous positions over 200 turns of eviction', async () => {
    const maxTokens = 128;
    for (const policy of ['sliding', 'importance', 'hybrid'] as const) {
      const chat = model.createChat({ maxTokens, policy, windowSize: 32, sinkTokens: 4 });
      for (let t = 0; t < 200; t++) {
        const r = await chat.send(`message ${t}: ${'lorem ipsum '.repeat(t % 5)}ok`, { maxNewTokens: 8, temperature: 0.8, seed: t });
        expect(r.stats.retainedTokens).toBeLessThanOrEqual(maxTokens);
        checkCache(chat, maxTokens);
      }
      expect(chat.stats().evictions).toBeGreaterThan(20);
      chat.dispose();
    }
  });
});
