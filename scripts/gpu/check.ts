/**
 * The GPU check, in plain Node: scripts/gpu-check.sh runs it inside the bundle that
 * scripts/gpu-bundle.sh writes, on a machine with a GPU, CUDA's compiler and no Node.js or npm (the
 * bundle brings node). Each step prints what it found and appends it to $FML_GPU_RESULTS/check.md;
 * a step that fails says why and the others still run; a step that would not finish before the
 * deadline ($FML_GPU_DEADLINE, epoch seconds) is skipped, saying so. Exit status 1 when a check
 * failed (benchmarks only report).
 *
 * FML_ADDON_PATH: the test build of the addon (with probes) the script loads. FML_GPU_REHEARSAL=1:
 * the CPU rehearsal (scripts/gpu-rehearsal.sh): the same steps on the CPU variant, with small models
 * and the quick benchmarks, and no backend expected to be CUDA.
 */
import { spawnSync } from 'node:child_process';
import { appendFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { writeLlamaModel, writeModel, type ModelInput } from '../../src/gguf/index.ts';
import { loadModel, type Chat, type ChatOptions, type Model } from '../../src/index.ts';

const REHEARSAL = process.env.FML_GPU_REHEARSAL === '1';
const RESULTS = process.env.FML_GPU_RESULTS ?? join(process.cwd(), 'gpu-results');
const DEADLINE = Number(process.env.FML_GPU_DEADLINE ?? Math.floor(Date.now() / 1000) + 480);
const APP = join(import.meta.dirname, '..', '..');
const MODELS = join(RESULTS, '..', 'models');
mkdirSync(RESULTS, { recursive: true });
mkdirSync(MODELS, { recursive: true });
const REPORT = join(RESULTS, 'check.md');
writeFileSync(REPORT, `# GPU check (${REHEARSAL ? 'CPU rehearsal' : 'CUDA'}), ${new Date().toISOString()}\n\n`);

const say = (line: string) => {
  console.log(line);
  appendFileSync(REPORT, `${line}\n`);
};
const secondsLeft = () => DEADLINE - Date.now() / 1000;
let failed = 0;

/** Runs a step unless fewer than `needs` seconds are left; a throw fails it, the others go on. */
async function step(name: string, needs: number, run: () => Promise<string[]> | string[]): Promise<void> {
  if (secondsLeft() < needs) {
    say(`## ${name}: SKIPPED (${Math.floor(secondsLeft())} s left, it needs about ${needs})\n`);
    return;
  }
  const t0 = performance.now();
  try {
    const lines = await run();
    say(`## ${name}: ok (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
    for (const l of lines) say(`- ${l}`);
  } catch (err) {
    failed++;
    say(`## ${name}: FAILED (${((performance.now() - t0) / 1000).toFixed(1)} s): ${(err as Error).message}`);
  }
  say('');
}

function check(ok: boolean, what: string): void {
  if (!ok) throw new Error(what);
}

const maxAbsDiff = (a: Float32Array, b: Float32Array) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - (b[i] ?? NaN))), 0);
const EXACT: ChatOptions = { kvType: 'f32', flashAttention: false };
const GPU = REHEARSAL ? ({ gpuLayers: 0 } as const) : ({ gpuLayers: 'auto' } as const);
// Never more threads than cores: ggml's threads spin at barriers, and oversubscribed they crawl.
const THREADS = Math.min(4, availableParallelism());

/** Turns past the budget; every one prefills only its new tokens, and the cache is what the chat holds. */
async function evictingTurns(chat: Chat, turns: number, maxTokens: number): Promise<void> {
  for (let t = 0; t < turns; t++) {
    const internals = chat._internals();
    const before = internals.cacheState();
    const message = `turn ${t}: the cat sat on the mat and looked at the sea.`;
    const expected = internals.countTurnTokens(message) + before.carriedTokens + before.pendingSystemTokens;
    const r = await chat.send(message, { maxNewTokens: 4 + (t % 5), temperature: 0.9, seed: t });
    const c = internals.cacheState();
    check(r.stats.promptTokens === expected, `turn ${t} prefilled ${r.stats.promptTokens} tokens, not its ${expected} new ones`);
    check(c.ledgerTokens <= maxTokens, `turn ${t}: ${c.ledgerTokens} tokens retained, budget ${maxTokens}`);
    check(c.positionsIncreasing && c.cachePosMin === c.ledgerPosFirst && c.cachePosMax === c.ledgerPosLast,
      `turn ${t}: the cache (${c.cachePosMin}..${c.cachePosMax}) is not the chat's (${c.ledgerPosFirst}..${c.ledgerPosLast})`);
  }
}

/** How far shifting every position of a short chat by 40 moves its next-token logits (a pure rotation: float noise). */
async function shiftDrift(m: Model, options: ChatOptions): Promise<number> {
  const chat = m.createChat({ maxTokens: 256, ...options });
  await chat.send('Tell me about the sea and the sky.', { maxNewTokens: 12, temperature: 0 });
  const probe = m.tokenize('the')[0]!;
  const before = chat._internals().probeLogits(probe);
  chat._internals().shiftPositions(40);
  const d = maxAbsDiff(before, chat._internals().probeLogits(probe));
  chat.dispose();
  return d;
}

/** Greedy tokens of a fixed conversation: `n` replies' worth. */
async function greedy(model: Model, turns: number): Promise<string[]> {
  // sliding on both: the default differs between the CPU and a GPU.
  const chat = model.createChat({ ...EXACT, policy: 'sliding', maxTokens: 128, windowSize: 32 });
  const out: string[] = [];
  for (let t = 0; t < turns; t++) out.push((await chat.send(`question ${t}: why is the sky blue?`, { maxNewTokens: 8, temperature: 0 })).response);
  chat.dispose();
  return out;
}

/** A benchmark script of the bundle, its output kept in the results folder. */
function bench(name: string, script: string, args: string[], env: Record<string, string>): string[] {
  const timeout = Math.floor(Math.max(10, secondsLeft() - 5) * 1000);
  const r = spawnSync(process.execPath, [join(APP, 'bench', script), ...args], { env: { ...process.env, ...env }, encoding: 'utf8', timeout });
  writeFileSync(join(RESULTS, `${name}.md`), `${r.stdout}\n${r.stderr}`);
  if (r.status !== 0) throw new Error(`${script} ${args.join(' ')} exited ${r.status ?? r.signal}: ${(r.stderr || r.stdout).trim().split('\n').slice(-3).join(' / ')}`);
  return r.stdout.trim().split('\n').filter((l) => l.startsWith('|') || l.startsWith('K=') || l.startsWith('long'));
}

async function main(): Promise<void> {
  const tiny = join(MODELS, 'llama-tiny.gguf');
  writeLlamaModel(tiny, { layers: 4, embd: 128, heads: 4, kvHeads: 2, headDim: 32, ffn: 256, seed: 3 });
  const hybrid = join(MODELS, 'qwen35-tiny.gguf');
  // The DeltaNet head size CUDA has kernels for (16..128) and a convolution of 128 channels (it runs on the GPU then).
  writeModel(hybrid, { family: 'qwen35', layers: 4, embd: 128, heads: 4, kvHeads: 2, headDim: 32, ffn: 256, ssmStateSize: 32, ssmGroups: 1, ssmHeads: 2, seed: 3 });

  let model: Model | undefined;
  await step('backend', 30, async () => {
    model = await loadModel(tiny, { ...GPU, threads: THREADS });
    const i = model.info;
    if (!REHEARSAL) check(i.backend === 'cuda' && i.gpuLayers > 0, `the model runs on ${i.backend} (${i.gpuLayers} layers offloaded), not CUDA`);
    return [`backend ${i.backend}, device ${i.device}, ${i.gpuLayers} of ${i.nLayer} layers offloaded`];
  });
  if (!model) model = await loadModel(tiny, { threads: THREADS });

  await step('K-shift invariance (F32 KV on the device)', 30, async () => {
    const chat = model!.createChat({ ...EXACT, maxTokens: 256 });
    await chat.send('Tell me about the sea and the sky.', { maxNewTokens: 12, temperature: 0 });
    const probe = model!.tokenize('the')[0]!;
    const before = chat._internals().probeLogits(probe);
    chat._internals().shiftPositions(40);
    const shifted = chat._internals().probeLogits(probe);
    const other = chat._internals().probeLogits(model!.tokenize('sea')[0]!);
    chat.dispose();
    const d = maxAbsDiff(before, shifted);
    check(d < 1e-3, `a shift of 40 positions changed the logits by ${d}`);
    check(maxAbsDiff(before, other) > 1e-2, 'the probe does not tell tokens apart');
    return [`max |logit difference| after shifting every position by 40: ${d.toExponential(2)}`];
  });

  await step('200 turns of eviction with the KV cache on the device (positions kept, and compacted at a limit of 400)', 90, async () => {
    const chat = model!.createChat({ maxTokens: 96, windowSize: 24, systemPrompt: 'Be brief.', positionLimit: 400 });
    await evictingTurns(chat, 200, 96);
    const s = chat.stats();
    chat.dispose();
    check(s.evictions > 20 && s.compactions > 3, `${s.evictions} evictions and ${s.compactions} compactions: not enough to say anything`);
    return [`${s.evictions} evictions, ${s.compactions} compactions, ${s.tokensSeen} tokens seen, ${s.tokensRetained} retained`];
  });

  await step('hybrid model (Qwen3.5 layout: Gated DeltaNet + attention, IMROPE) on the device: M-RoPE key rotation, 100 turns, compactions, abort rollback', 90, async () => {
    const m = await loadModel(hybrid, { ...GPU, threads: THREADS });
    try {
      // IMROPE keys are rotated by this library's own graph (llama.cpp has no K-shift for them): on the device's keys.
      const rotated = await shiftDrift(m, EXACT);
      check(rotated < 1e-3, `rotating the IMROPE keys by 40 positions changed the logits by ${rotated}`);
      // q8_0 keys: back to F32, turned, quantized again (re-quantization noise only).
      const q8Rotated = await shiftDrift(m, { kvType: 'q8_0' });
      check(q8Rotated < 0.5, `rotating the IMROPE keys of a q8_0 cache by 40 positions changed the logits by ${q8Rotated}`);
      const chat = m.createChat({ maxTokens: 96, windowSize: 24, systemPrompt: 'Be brief.', positionLimit: 300 });
      const sideBefore = chat._internals().engineStats(true).sideTokens;
      await evictingTurns(chat, 100, 96);
      const s = chat.stats();
      const side = chat._internals().engineStats(true).sideTokens - sideBefore;
      chat.dispose();
      // An aborted prefill (small steps, each held back 5 ms) leaves neither tokens nor recurrent state behind.
      const slow = m.createChat({ maxTokens: 1024, batchSize: 8, testTokenDelayMs: 5 });
      await slow.send('hello there', { maxNewTokens: 4, temperature: 0 });
      const state = slow._internals().recurrentState();
      const memory = JSON.stringify(slow.memory());
      const r = await slow.send('word '.repeat(300), { maxNewTokens: 4, signal: AbortSignal.timeout(60) });
      check(r.stopReason === 'abort' && r.stats.promptTokens === 0 && JSON.stringify(slow.memory()) === memory, 'an aborted prefill left tokens behind');
      check(Buffer.from(slow._internals().recurrentState()).equals(Buffer.from(state)), 'an aborted prefill changed the recurrent state');
      slow.dispose();
      check(s.compactions > 2, `${s.compactions} compactions`);
      check(side === 0, `${side} tokens re-prefilled: the compactions did not rotate the keys`);
      return [
        `backend ${m.info.backend}; max |logit difference| after rotating every key by 40 positions: ${rotated.toExponential(2)} (F32 KV), ${q8Rotated.toExponential(2)} (q8_0 KV)`,
        `${s.evictions} evictions, ${s.compactions} compactions (keys rotated, nothing re-prefilled), recurrent state ${m.info.recurrentBytes} bytes per chat`,
      ];
    } finally {
      m.dispose();
    }
  });

  await step("keys llama.cpp's shift gets wrong, moved on the device: gpt-oss YaRN (sliding-window caches; F32, q8_0), Phi-3 q8_0 heads of 96, Granite NoPE at its limit", 60, async () => {
    const lines: string[] = [];
    const shifted = async (name: string, options: ModelInput, kvType: 'f32' | 'q8_0', bound: number) => {
      const path = join(MODELS, `${name}.gguf`);
      writeModel(path, { seed: 9, ...options });
      const m = await loadModel(path, { ...GPU, threads: THREADS });
      try {
        const d = await shiftDrift(m, { kvType, flashAttention: kvType !== 'f32' });
        check(d < bound, `${name} (${kvType} keys): a shift of 40 positions changed the logits by ${d}`);
        lines.push(`${name} (${kvType} keys, ${m.info.backend}): max |logit difference| after shifting every position by 40: ${d.toExponential(2)}`);
      } finally {
        m.dispose();
      }
    };
    await shifted('gptoss-tiny', { family: 'gptoss', headDim: 64, embd: 128 }, 'f32', 1e-3);
    await shifted('gptoss-tiny', { family: 'gptoss', headDim: 64, embd: 128 }, 'q8_0', 1);
    await shifted('phi3-heads96', { family: 'phi3', headDim: 96, heads: 4, kvHeads: 4, embd: 384 }, 'q8_0', 1);
    const granite = join(MODELS, 'granite4-tiny.gguf');
    writeModel(granite, { family: 'granite4', layers: 4, embd: 128, heads: 4, kvHeads: 2, headDim: 32, ffn: 256, seed: 3 });
    const m = await loadModel(granite, { ...GPU, threads: THREADS });
    try {
      const chat = m.createChat({ maxTokens: 96, windowSize: 24, positionLimit: 300 });
      await evictingTurns(chat, 60, 96);
      const s = chat.stats();
      chat.dispose();
      check(s.compactions > 2, `granite4: ${s.compactions} compactions`);
      lines.push(`granite4 (NoPE, ${m.info.backend}): ${s.compactions} compactions at a position limit of 300, ${s.evictions} evictions`);
    } finally {
      m.dispose();
    }
    return lines;
  });

  await step('greedy output, CPU vs the device, same model and build', 60, async () => {
    const cpu = await loadModel(tiny, { gpuLayers: 0, threads: THREADS });
    const a = await greedy(cpu, 4);
    cpu.dispose();
    const b = await greedy(model!, 4);
    const first = a.map((x, i) => x.slice(0, 4) === (b[i] ?? '').slice(0, 4));
    check(first[0]!, `the first reply starts differently: ${JSON.stringify(a[0])} vs ${JSON.stringify(b[0])}`);
    return [`replies equal: ${a.filter((x, i) => x === b[i]).length} of ${a.length}; first characters equal: ${first.filter(Boolean).length} of ${a.length}`, `CPU: ${JSON.stringify(a)}`, `device: ${JSON.stringify(b)}`];
  });
  await step('the default policy on the device, and what importance costs there against sliding', 90, async () => {
    // The default is importance on the CPU and sliding on a GPU, where reading attention weights
    // had not been measured: with flash attention off the graph's weights of every layer are copied
    // to the host; with it on they are recomputed on the host from the flash node's inputs (the
    // keys and queries copied from the device: engine/flash-weights.h).
    const expected = model!.info.backend === 'cpu' ? 'importance' : 'sliding';
    const byDefault = model!.createChat({ maxTokens: 256 });
    check(byDefault.options.policy === expected, `the default policy on ${model!.info.backend} is ${byDefault.options.policy}, not ${expected}`);
    byDefault.dispose();
    const contenders: { label: string; options: ChatOptions }[] = [
      { label: 'sliding', options: { policy: 'sliding' } },
      { label: 'importance (flash off: graph weights)', options: { policy: 'importance' } },
      { label: 'sliding, flash on', options: { policy: 'sliding', flashAttention: true } },
      { label: 'importance, flash on (weights recomputed)', options: { policy: 'importance', flashAttention: true } },
    ];
    const best = new Map<string, number>();
    for (let rep = 0; rep < 2; rep++) {
      for (const c of contenders) {
        const chat = model!.createChat({ ...c.options, maxTokens: 256 });
        await chat.send('warm up', { maxNewTokens: 2, temperature: 0 });
        const t0 = performance.now();
        const r = await chat.send('Tell me a long story about the sea.', { maxNewTokens: 64, temperature: 0, ignoreEos: true });
        best.set(c.label, Math.min(best.get(c.label) ?? Infinity, (performance.now() - t0) / r.stats.generatedTokens));
        if (c.options.policy === 'importance') {
          const cache = chat._internals().cacheState();
          check(r.stats.importanceSignal === 'attention', `${c.label}: importance read ${r.stats.importanceSignal}, not attention weights`);
          check(cache.signalLayoutMismatches === 0 && cache.causalViolations === 0 && cache.attentionRowsChecked > 0,
            `${c.label}: signal checks ${JSON.stringify({ rows: cache.attentionRowsChecked, causal: cache.causalViolations, layout: cache.signalLayoutMismatches })}`);
        }
        chat.dispose();
      }
    }
    const ms = (label: string) => best.get(label)!;
    return [
      `default policy: ${expected}; ms per generated token (best of 2, 64 tokens, this 4-layer model):`,
      ...contenders.map((c) => `  ${c.label}: ${ms(c.label).toFixed(3)}`),
      `importance / sliding: flash off ${(ms(contenders[1]!.label) / ms(contenders[0]!.label)).toFixed(2)}x, flash on ${(ms(contenders[3]!.label) / ms(contenders[2]!.label)).toFixed(2)}x`,
    ];
  });
  model.dispose();

  const benchEnv = { FML_BENCH_GPU_LAYERS: REHEARSAL ? '0' : 'auto' };
  await step('eviction microbenchmark (positions kept vs compacted; K-shift on the device)', REHEARSAL ? 120 : 150, () =>
    bench('evict', 'evict.js', ['--no-write', ...(REHEARSAL ? ['--quick'] : [])], benchEnv));
  for (const k of REHEARSAL ? [1] : [1, 8]) {
    await step(`concurrency benchmark, K = ${k}`, REHEARSAL ? 120 : 150, () =>
      bench(`concurrency-k${k}`, 'concurrency.js', [`--k=${k}`, '--no-write', '--short-only', ...(REHEARSAL ? ['--quick', '--no-server'] : ['--gpu'])], {}));
  }
  // Last: what reading attention costs with flash attention on and off, on the realistic geometry
  // (the model is generated there first, ~20 s; the bench fails unless the weights were read).
  await step('attention weights under flash attention (Qwen2.5-0.5B shape)', REHEARSAL ? 150 : 120, () =>
    bench('flash-weights', 'flash-weights.js', ['--no-write', ...(REHEARSAL ? ['--quick'] : ['--rounds=4'])], {}));
  say(failed ? `${failed} check(s) FAILED` : 'every check passed');
  process.exitCode = failed ? 1 : 0;
}

main().catch((err) => {
  say(`check script failed: ${(err as Error).stack ?? err}`);
  process.exitCode = 1;
});
