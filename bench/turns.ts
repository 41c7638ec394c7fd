// Turn latency benchmark: a long multi-turn conversation with the KV budget full.
//
// Every contender gets the same user messages (cycled in order), the same generation length, greedy
// sampling and the same thread count (1 by default, see THREADS). Each warms up until it has evicted (or shifted its context) at least once,
// then a few more turns; then N turns each are measured, round-robin across the contenders (so load from
// other processes hits all alike); steady-state turn latency is their median.
//   1. this project, each policy: per-turn latency = TurnStats.latencyMs
//   2. naive re-prefill (what the original Python library does): our sliding chat, but before each
//      turn the KV cache is cleared and every retained token is prefilled again (replayHistory)
//   3. node-llama-cpp 3.21.1 LlamaChatSession with its default context shift, same context size,
//      prebuilt CPU binary of the same llama.cpp release; wall time per prompt (own process)
// Plus decode speed with memory management on vs bare llama_decode + greedy sampling on the same context.
//
//   npx tsx bench/turns.ts              (writes the table into bench/RESULTS.md and bench/turns.svg)
//   npx tsx bench/turns.ts --no-write   (prints only)
//   npx tsx bench/turns.ts --quick      (short smoke run: maxTokens 512, few turns; implies --no-write)
//   npx tsx bench/turns.ts --model=generated   (one model only; implies --no-write)
//   npx tsx bench/turns.ts --threads=2          (every contender on 2 threads instead of 1)
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import { writeLlamaModel, type LlamaModelInput } from '../src/gguf/index.ts';
import { loadModel, POLICIES, type Chat, type Model, type PolicyName } from '../src/index.ts';
import { GENERATED_MODEL, machine, median, realisticModel, ROOT, SHARED_MODELS, SUMMARY_EVICT_POLICIES, SUMMARY_EVICT_VARIANT, writeResultsSection } from './common.ts';
import { barChart } from './svg.ts';
import { BUDGETS, GENERATED, MAX_NEW, MAX_OTHER_CPU, MAX_REDOS_PER_CONTENDER, MEASURED, ModelSpec, NLC_VERSION, ONLY_MODEL, PROMPTS, QUICK, Result, SLOW_FACTOR, THREADS, WARMUP_AFTER_EVICT, WRITE, args, errorText, fmt, log } from './turns/config.ts';
import { Calibrator, cpuLog, calibration } from './turns/noise.ts';
import { Contender, NlcJob, nlcContender, nlcWorker, oursContender, runContenders } from './turns/contenders.ts';
import { decodeGoal, decodeTable, goals, latencyTable, rows } from './turns/report.ts';

// Main

async function main(): Promise<void> {
  const started = performance.now();
  const load0 = loadavg()[0]!;
  const tmp = mkdtempSync(join(tmpdir(), 'fml-turns-'));
  const models: ModelSpec[] = [];
  const skipped: string[] = [];
  // The realistic-geometry model first: on the 5M one a turn is all overhead. One budget (1024): its
  // naive re-prefill of a full 2048 cache takes ~14 s a turn on these 2 cores.
  if (!QUICK) {
    const r = realisticModel();
    models.push({ name: r.name, path: r.path, shape: r.about, budgets: [1024] });
  }
  try {
    const genPath = join(tmp, 'generated.gguf');
    const w = writeLlamaModel(genPath, { ...GENERATED, name: 'finite-memory-llm turns bench' });
    const o = w.options;
    models.push({
      name: 'generated',
      path: genPath,
      shape:
        `${o.layers} layers, ${o.heads} heads / ${o.kvHeads} KV heads x ${o.headDim}, n_embd ${o.embd}, ffn ${o.ffn}, vocab ${w.nVocab}, ` +
        `${o.type.toUpperCase()} weights, ${(w.nParams / 1e6).toFixed(1)}M params, seeded random weights (seed ${o.seed}), ChatML template`,
    });
  } catch (err) {
    skipped.push(`generated model: ${errorText(err)}`);
  }
  const stories = join(SHARED_MODELS, 'stories260K.gguf');
  if (existsSync(stories)) {
    models.push({ name: 'stories260K', path: stories, shape: '' });
  } else {
    skipped.push(`stories260K: ${stories} not found, skipped`);
  }

  const results: Result[] = [];
  if (ONLY_MODEL) models.splice(0, models.length, ...models.filter((m) => m.name === ONLY_MODEL));
  for (const spec of models) {
    let model: Model | undefined;
    try {
      model = await loadModel(spec.path, { threads: THREADS });
      const i = model.info;
      if (!spec.shape) {
        spec.shape =
          `${i.nLayer} layers, ${i.nHead} heads / ${i.nHeadKv} KV heads, n_embd ${i.nEmbd}, vocab ${i.nVocab}, ` +
          `${(i.nParams / 1e3).toFixed(0)}K params, trained TinyStories model, ${i.chatTemplate ? 'chat template' : 'no chat template'}`;
      }
      log(`model ${spec.name}: ${spec.shape}`);
    } catch (err) {
      skipped.push(`${spec.name}: load failed: ${errorText(err)}`);
      continue;
    }
    try {
      calibration.current = await Calibrator.create(model);
    } catch (err) {
      calibration.current = undefined;
      log(`  calibration chat failed (${errorText(err)}); turns are checked for other processes' CPU use only`);
    }
    for (const maxTokens of spec.budgets ?? BUDGETS) {
      const contenders: Contender[] = [];
      for (const policy of POLICIES) contenders.push(oursContender(model, spec, maxTokens, policy, false));
      const variant = { label: SUMMARY_EVICT_VARIANT.label, options: SUMMARY_EVICT_VARIANT.perBudget(maxTokens) };
      for (const policy of SUMMARY_EVICT_POLICIES) contenders.push(oursContender(model, spec, maxTokens, policy, false, variant));
      contenders.push(oursContender(model, spec, maxTokens, 'sliding', true));
      contenders.push(await nlcContender(spec, maxTokens));
      await runContenders(contenders, `${spec.name} @${maxTokens}`);
      results.push(...contenders.map((c) => c.result));
    }
    if (calibration.current) cpuLog.calibration.push(`${spec.name} ${fmt(calibration.current.best, 2)} ms`);
    calibration.current?.dispose();
    calibration.current = undefined;
    model.dispose();
  }
  rmSync(tmp, { recursive: true, force: true });

  // Order: per model, per budget: ours policies, re-prefill, node-llama-cpp.
  const order = (r: Result) =>
    models.findIndex((m) => m.name === r.model) * 1000 + (models.find((m) => m.name === r.model)?.budgets ?? BUDGETS).indexOf(r.maxTokens) * 100 + (r.kind === 'ours' ? POLICIES.indexOf(r.policy!) + (r.variant ? 0.5 : 0) : r.kind === 'reprefill' ? 10 : 20);
  results.sort((a, b) => order(a) - order(b));
  const all = rows(results);
  // The goals of the turn benchmark are stated at maxTokens 2048: judged on the first model run there.
  const primary = models.find((m) => (m.budgets ?? BUDGETS).includes(2048))?.name ?? models[0]?.name ?? 'generated';
  const load1 = loadavg()[0]!;

  const setup = [
    `- machine: ${machine()}`,
    ...models.map((m) => `- model ${m.name}: ${m.shape}`),
    ...skipped.map((s) => `- skipped: ${s}`),
    `- threads ${THREADS} for every contender, KV cache F16, flash attention off for every contender (this library's CPU default; node-llama-cpp's createContext({ flashAttention: false })), batch 512`,
    `- maxTokens ${models.map((m) => `${(m.budgets ?? BUDGETS).join(' and ')} (${m.name})`).join(', ')} (node-llama-cpp: contextSize = maxTokens); window = maxTokens / 4, 4 sink tokens, policy defaults`,
    `- ${PROMPTS.length} user messages of similar length cycled in order, system prompt pinned, maxNewTokens ${MAX_NEW}, greedy (temperature 0)`,
    `- warm-up: turns until the first eviction (ours) or context shift (node-llama-cpp), then ${WARMUP_AFTER_EVICT} more; then ${MEASURED} measured turns each, taken round-robin across the contenders of a model and budget; median and p90 (nearest rank) over them`,
    `- node-llama-cpp ${NLC_VERSION}: prebuilt CPU binary (@node-llama-cpp/linux-x64, llama.cpp v0.4.0), getLlama({ gpu: false, build: 'never', skipDownload: true }), ` +
      `LlamaChatSession with its default context shift, temperature 0, no repeat penalty; run in a child process`,
    `- shared machine: a measured turn is redone when other processes used more than ${MAX_OTHER_CPU * 100}% of the CPU during it, or when a ` +
      `calibration probe just before or after it (the faster of two plainDecode(8) on a separate 256-token chat of the same model; best: ${cpuLog.calibration.join(', ')}) ` +
      `took more than ${SLOW_FACTOR}x its best: ${cpuLog.redoneBusy} + ${cpuLog.redoneSlow} redone of ${cpuLog.turns} measured turns ` +
      `(at most ${MAX_REDOS_PER_CONTENDER} per contender and budget; ${cpuLog.acceptedDirty} kept anyway once that was used up), ` +
      `${cpuLog.plainRedone} plain-decode runs redone; during the kept turns other processes used ` +
      `median ${fmt(median(cpuLog.kept) * 100)}%, max ${fmt(Math.max(...cpuLog.kept) * 100)}%; 1-minute load average ${load0.toFixed(2)} at start, ` +
      `${load1.toFixed(2)} at end; total ${fmt((performance.now() - started) / 1000, 0)} s`,
  ];

  const tableMd = latencyTable(all);
  const decodeMd = decodeTable(results);
  const goalParas = goals(all, primary);
  goalParas.push(decodeGoal(results, primary));

  const sliding2048 = results.find((r) => r.model === primary && r.maxTokens === 2048 && r.kind === 'ours' && r.policy === 'sliding' && !r.error);
  const wallNote = sliding2048
    ? `Wall-clock per \`send\` (JS call included) for ours-sliding at 2048 on ${primary}: median ${fmt(median(sliding2048.turns.map((t) => t.wallMs ?? NaN)))} ms ` +
      `vs ${fmt(median(sliding2048.turns.map((t) => t.ms)))} ms latencyMs.`
    : '';
  const notes = results
    .filter((r) => r.note || r.error)
    .map((r) => `- ${r.model} @${r.maxTokens} ${r.contender}: ${r.error ? 'error: ' + r.error : r.note}; ${r.warmupTurns} warm-up turns`);

  const chartBars = all
    .filter((x) => x.r.model === primary && x.r.maxTokens === 2048 && !x.r.error)
    .map((x) => ({ label: x.r.contender, value: x.med }));

  const md = [
    '## Turn latency with the budget full (`npx tsx bench/turns.ts`)',
    '',
    ...setup,
    '',
    tableMd,
    '',
    '"mean prompt tokens" is what each turn prefilled: for ours the new message (plus the previous reply\'s end-of-turn tokens), ' +
      'for re-prefill the whole retained history again plus the message, for node-llama-cpp the tokens it evaluated ' +
      '(after a context shift, the history after the system prompt). Ratio = contender median / ours-sliding median at the same budget.',
    '',
    chartBars.length ? '![turn latency](turns.svg)' : '',
    '',
    '### Decode speed: memory management on vs plain llama.cpp decode',
    '',
    decodeMd,
    '',
    '### Goals',
    '',
    ...goalParas.flatMap((p) => [p, '']),
    wallNote,
    '',
    '### Notes',
    '',
    ...notes,
  ].join('\n');

  console.log(md);
  if (WRITE) {
    writeResultsSection('turns', md);
    if (chartBars.length) {
      writeFileSync(
        join(ROOT, 'bench', 'turns.svg'),
        barChart({ title: `Median turn latency, budget full, maxTokens 2048 (${primary} model, ${THREADS} thread${THREADS === 1 ? "" : "s"})`, unit: 'ms', bars: chartBars, logScale: true }),
      );
    }
    log('wrote bench/RESULTS.md (turns section) and bench/turns.svg');
  }
}

if (args[0] === '--nlc-worker') {
  nlcWorker(JSON.parse(args[1]!) as NlcJob).catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
} else {
  main().catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
}

