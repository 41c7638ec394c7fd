// bench/turns.ts: the contenders (this project per policy, naive re-prefill, node-llama-cpp in its own
// process) and the runner that measures them round-robin.
// ---------------------------------------------------------------------------------------------------
// Contenders. Each warms up on its own; then the measured turns run round-robin across all contenders
// of a model and budget (one turn each, starting point rotating), so load from anything else on the
// machine hits them alike; then each finishes (decode check, clean-up).
import { type Chat, type ChatOptions, type Model, type PolicyName } from '../../src/index.ts';
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import { median, ROOT } from '../common.ts';
import { spawn } from 'node:child_process';
import { MAX_NEW, MAX_OTHER_CPU, MAX_REDOS_PER_CONTENDER, MAX_WARMUP, MEASURED, ModelSpec, NLC_VERSION, PLAIN_RUNS, Result, SYSTEM_PROMPT, THREADS, Turn, WARMUP_AFTER_EVICT, args, errorText, fmt, log, prompt } from './config.ts';
import { cpuLog, cpuSnapshot, otherCpu, workerPids, calibration } from './noise.ts';

export interface Contender {
  result: Result;
  warmup(): Promise<void>;
  turn(): Promise<Turn>;
  finish(): Promise<void>;
}

export function failed(result: Result, err: unknown): Contender {
  result.error = errorText(err);
  const none = async () => {
    throw new Error(result.error);
  };
  return { result, warmup: async () => {}, turn: none, finish: async () => {} };
}

export function plainRuns(internals: ReturnType<Chat['_internals']>, n: number): number[] {
  if (typeof internals.plainDecode !== 'function') throw new Error('this build has no plainDecode hook');
  const ms: number[] = [];
  if (n <= 0) return ms;
  // One untimed run first: it makes any room needed (an eviction's position shift is applied at the
  // next decode) and warms the caches, as consecutive decode steps of a turn find them.
  internals.plainDecode(MAX_NEW);
  for (let k = 0; k < n; k++) {
    // Redo a run (a few times at most) when other processes were busy or the machine slow around it.
    let v = NaN;
    for (let attempt = 0; attempt < 5; attempt++) {
      const c0 = calibration.current?.probe() ?? NaN;
      const a = cpuSnapshot();
      v = internals.plainDecode(MAX_NEW);
      const other = otherCpu(a, cpuSnapshot());
      const c1 = calibration.current?.probe() ?? NaN;
      if (!(other > MAX_OTHER_CPU) && !calibration.current?.slow(c0, c1)) break;
      cpuLog.plainRedone++;
    }
    ms.push(v);
  }
  return ms;
}

/** 1 and 2: our chat with a policy, or naive re-prefill on top of our sliding chat. */
export function oursContender(model: Model, spec: ModelSpec, maxTokens: number, policy: PolicyName, reprefill: boolean,
  variant?: { label: string; options: ChatOptions }): Contender {
  const result: Result = {
    model: spec.name,
    contender: reprefill ? 'naive re-prefill (sliding)' : `ours: ${policy}${variant ? ` ${variant.label}` : ''}`,
    kind: reprefill ? 'reprefill' : 'ours',
    policy,
    ...(variant ? { variant: variant.label } : {}),
    maxTokens,
    warmupTurns: 0,
    turns: [],
  };
  let chat: Chat;
  let internals: ReturnType<Chat['_internals']>;
  try {
    chat = model.createChat({ ...variant?.options, policy, maxTokens, threads: THREADS, systemPrompt: SYSTEM_PROMPT });
    internals = chat._internals();
    if (reprefill && typeof internals.replayHistory !== 'function') throw new Error('this build has no replayHistory hook');
  } catch (err) {
    return failed(result, err);
  }
  let i = 0;
  const plain: number[] = [];
  const turn = async (replay: boolean): Promise<Turn> => {
    let replayMs = 0;
    let replayed = 0;
    if (replay) {
      replayed = internals.cacheState().ledgerTokens;
      replayMs = internals.replayHistory();
    }
    const t0 = performance.now();
    const res = await chat.send(prompt(i++), { maxNewTokens: MAX_NEW, temperature: 0 });
    const wall = performance.now() - t0;
    const s = res.stats;
    // A turn stopped by maxNewTokens (or a stop string) samples its last token but does not decode it.
    const steps = s.generatedTokens - (s.generatedTokens > 0 && res.stopReason !== 'eos' ? 1 : 0);
    return {
      ms: replayMs + s.latencyMs,
      ttftMs: replayMs + s.latencyMs - s.decodeMs,
      wallMs: replayMs + wall,
      promptTokens: replayed + s.promptTokens,
      generated: s.generatedTokens,
      decodeSteps: steps,
      decodeMs: s.decodeMs,
    };
  };
  return {
    result,
    async warmup() {
      // Plain turns until the budget is full and something was evicted, then a few in this contender's mode.
      let extra = -1;
      while (extra !== 0) {
        if (result.warmupTurns >= MAX_WARMUP) throw new Error(`no eviction after ${MAX_WARMUP} warm-up turns`);
        // Part of the plain-decode runs go before the last warm-up turn, the rest after the measured turns,
        // so they bracket the measured turns in time (a run may evict first; the last warm-up turn absorbs that).
        if (extra === 1 && !reprefill) plain.push(...plainRuns(internals, Math.floor(PLAIN_RUNS / 2)));
        await turn(reprefill && extra > 0);
        result.warmupTurns++;
        if (extra > 0) extra--;
        else if (chat.stats().evictions > 0) extra = WARMUP_AFTER_EVICT;
      }
    },
    turn: () => turn(reprefill),
    async finish() {
      try {
        const st = chat.stats();
        result.note = `${st.evictions} evictions, ${st.tokensEvicted} tokens evicted, ${st.fallbackCount} latency-guard fallbacks`;
        if (!reprefill && result.turns.length > 0) {
          // Decode with memory management (the measured turns) vs bare llama_decode + greedy sampling.
          try {
            plain.push(...plainRuns(internals, PLAIN_RUNS - plain.length));
            const steps = result.turns.reduce((a, t) => a + (t.decodeSteps ?? 0), 0);
            const ms = result.turns.reduce((a, t) => a + (t.decodeMs ?? 0), 0);
            const gen = result.turns.reduce((a, t) => a + t.generated, 0);
            result.decode = {
              oursMsPerStep: ms / steps,
              plainMsPerStep: median(plain) / MAX_NEW,
              oursReportedTps: (gen * 1000) / ms,
              plainSpread: (Math.max(...plain) - Math.min(...plain)) / median(plain),
            };
          } catch (err) {
            result.decodeError = errorText(err);
          }
        }
      } finally {
        chat.dispose();
      }
    },
  };
}

// 3: node-llama-cpp, in a child process (its own llama.cpp shared libraries; a crash there cannot take
// this process down). It answers one JSON line per command read from stdin.

export interface NlcJob {
  modelPath: string;
  maxTokens: number;
}

type NlcCommand = 'init' | 'warmup' | 'turn' | 'finish';
export const RESULT_MARK = '@@turns-result ';

export async function nlcWorker(job: NlcJob): Promise<void> {
  process.env.NODE_LLAMA_CPP_SKIP_DOWNLOAD = 'true';
  const reply = (payload: unknown) => process.stdout.write(RESULT_MARK + JSON.stringify(payload) + '\n');
  let state: Awaited<ReturnType<typeof nlcSetup>> | undefined;
  const rl = createInterface({ input: process.stdin });
  for await (const line of rl) {
    const cmd = JSON.parse(line) as NlcCommand;
    try {
      if (cmd === 'init') {
        state = await nlcSetup(job);
        reply({ ok: true, out: null });
      } else if (!state) {
        throw new Error('not initialised');
      } else if (cmd === 'warmup') {
        reply({ ok: true, out: await state.warmup() });
      } else if (cmd === 'turn') {
        reply({ ok: true, out: await state.turn() });
      } else {
        reply({ ok: true, out: await state.finish() });
        break;
      }
    } catch (err) {
      reply({ ok: false, error: errorText(err) });
    }
  }
  process.exit(0);
}

export async function nlcSetup(job: NlcJob) {
  const { getLlama, LlamaChatSession, LlamaLogLevel } = await import('node-llama-cpp');
  const llama = await getLlama({ gpu: false, build: 'never', skipDownload: true, maxThreads: THREADS, logLevel: LlamaLogLevel.error });
  const model = await llama.loadModel({ modelPath: job.modelPath });
  // Flash attention off, as this library's chats run on the CPU (its default there is on, whose steps
  // are 1.1-3.6x slower here: bench/flash-attention.ts), so both sides decode alike.
  const context = await model.createContext({ contextSize: job.maxTokens, threads: THREADS, flashAttention: false });
  const seq = context.getSequence();
  const session = new LlamaChatSession({ contextSequence: seq, systemPrompt: SYSTEM_PROMPT });
  let i = 0;
  let shifts = 0;
  const turn = async (): Promise<Turn & { shifted: boolean }> => {
    const before = seq.contextTokens.slice();
    const meter = seq.tokenMeter.getState();
    let first = NaN;
    const onToken = () => {
      if (Number.isNaN(first)) first = performance.now();
    };
    const t0 = performance.now();
    const res = await session.promptWithMeta(prompt(i++), { maxTokens: MAX_NEW, temperature: 0, repeatPenalty: false, onToken });
    const ms = performance.now() - t0;
    const after = seq.contextTokens;
    let lcp = 0;
    while (lcp < before.length && lcp < after.length && before[lcp] === after[lcp]) lcp++;
    // Tokens with logits are metered as output: one per generated token fed back plus the prompt's last
    // token; an end-of-generation token is sampled but never fed.
    const out = seq.tokenMeter.diff(meter).usedOutputTokens;
    const generated = Math.max(0, out - (res.stopReason === 'eogToken' ? 1 : 0));
    const evaluated = after.length - lcp;
    // The previous reply is re-tokenized from its text, so the cached tokens may differ from the end of
    // that reply on; a context shift drops the oldest history and re-evaluates far more than that.
    const shifted = before.length - lcp > 2 * MAX_NEW + 16;
    if (shifted) shifts++;
    return { ms, ttftMs: (Number.isNaN(first) ? performance.now() : first) - t0, promptTokens: Math.max(0, evaluated - generated), generated, shifted };
  };
  return {
    async warmup(): Promise<number> {
      let warmupTurns = 0;
      let extra = -1;
      while (extra !== 0) {
        if (warmupTurns >= MAX_WARMUP) throw new Error(`no context shift after ${MAX_WARMUP} warm-up turns`);
        const t = await turn();
        warmupTurns++;
        if (extra > 0) extra--;
        else if (t.shifted) extra = WARMUP_AFTER_EVICT;
      }
      return warmupTurns;
    },
    turn,
    async finish(): Promise<string> {
      const note = `chat wrapper ${session.chatWrapper.wrapperName}, context ${context.contextSize} tokens, ${shifts} context shifts in all turns`;
      await context.dispose();
      await model.dispose();
      await llama.dispose();
      return note;
    },
  };
}

export async function nlcContender(spec: ModelSpec, maxTokens: number): Promise<Contender> {
  const result: Result = { model: spec.name, contender: `node-llama-cpp ${NLC_VERSION}`, kind: 'nlc', maxTokens, warmupTurns: 0, turns: [] };
  const job: NlcJob = { modelPath: spec.path, maxTokens };
  // The worker is this benchmark's entry point (bench/turns.ts) in --nlc-worker mode.
  const child = spawn(process.execPath, [...process.execArgv, join(ROOT, 'bench', 'turns.ts'), '--nlc-worker', JSON.stringify(job), ...args.filter((a) => a === '--quick' || a.startsWith('--threads='))], {
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, NODE_LLAMA_CPP_SKIP_DOWNLOAD: 'true' },
  });
  let stderr = '';
  let exited: string | undefined;
  const waiting: { resolve: (v: unknown) => void; reject: (e: Error) => void }[] = [];
  if (child.pid !== undefined) workerPids.add(child.pid);
  child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
  createInterface({ input: child.stdout }).on('line', (line) => {
    if (!line.startsWith(RESULT_MARK)) return;
    const payload = JSON.parse(line.slice(RESULT_MARK.length)) as { ok: true; out: unknown } | { ok: false; error: string };
    const w = waiting.shift();
    if (payload.ok) w?.resolve(payload.out);
    else w?.reject(new Error(payload.error));
  });
  const onGone = (why: string) => {
    if (child.pid !== undefined) workerPids.delete(child.pid);
    exited = `${why}: ${stderr.trim().split('\n').slice(-3).join(' | ').slice(0, 400)}`;
    for (const w of waiting.splice(0)) w.reject(new Error(`node-llama-cpp worker ${exited}`));
  };
  child.on('error', (err) => onGone(`failed to start (${errorText(err)})`));
  child.on('exit', (code, signal) => onGone(`exited (${signal ?? code})`));
  const request = <T>(cmd: NlcCommand): Promise<T> =>
    new Promise<T>((resolve, reject) => {
      if (exited) return reject(new Error(`node-llama-cpp worker ${exited}`));
      waiting.push({ resolve: resolve as (v: unknown) => void, reject });
      child.stdin.write(JSON.stringify(cmd) + '\n');
    });
  try {
    await request('init');
  } catch (err) {
    child.kill();
    return failed(result, err);
  }
  return {
    result,
    async warmup() {
      result.warmupTurns = await request<number>('warmup');
    },
    turn: () => request<Turn>('turn'),
    async finish() {
      try {
        const shifted = result.turns.filter((t) => t.shifted).length;
        result.note = `${await request<string>('finish')}; history re-evaluated after a context shift in ${shifted}/${result.turns.length} measured turns`;
      } finally {
        if (!exited) child.kill();
      }
    },
  };
}

export async function runContenders(contenders: Contender[], label: string): Promise<void> {
  for (const c of contenders) {
    if (c.result.error) continue;
    const t = performance.now();
    try {
      await c.warmup();
      log(`  ${label} ${c.result.contender}: ${c.result.warmupTurns} warm-up turns (${fmt((performance.now() - t) / 1000)} s)`);
    } catch (err) {
      c.result.error = errorText(err);
      log(`  ${label} ${c.result.contender}: ERROR ${c.result.error}`);
    }
  }
  const t = performance.now();
  const redoneBefore = cpuLog.redoneBusy + cpuLog.redoneSlow;
  const redoCount = new Map<Contender, number>();
  for (let round = 0; round < MEASURED; round++) {
    for (let j = 0; j < contenders.length; j++) {
      const c = contenders[(j + round) % contenders.length]!;
      // One measured turn, redone (up to MAX_REDOS_PER_CONTENDER times per budget) while the machine was
      // busy with other processes or in its slow state around it.
      while (!c.result.error) {
        const c0 = calibration.current?.probe() ?? NaN;
        const a = cpuSnapshot();
        let turn: Turn;
        try {
          turn = await c.turn();
        } catch (err) {
          c.result.error = errorText(err);
          log(`  ${label} ${c.result.contender}: ERROR ${c.result.error}`);
          break;
        }
        const other = otherCpu(a, cpuSnapshot());
        const c1 = calibration.current?.probe() ?? NaN;
        cpuLog.turns++;
        const busy = other > MAX_OTHER_CPU;
        const slow = calibration.current?.slow(c0, c1) ?? false;
        const redos = redoCount.get(c) ?? 0;
        if ((busy || slow) && redos < MAX_REDOS_PER_CONTENDER) {
          redoCount.set(c, redos + 1);
          if (busy) cpuLog.redoneBusy++;
          else cpuLog.redoneSlow++;
          continue;
        }
        if (busy || slow) cpuLog.acceptedDirty++;
        cpuLog.kept.push(other);
        c.result.turns.push(turn);
        break;
      }
    }
  }
  const redone = cpuLog.redoneBusy + cpuLog.redoneSlow - redoneBefore;
  log(`  ${label}: ${MEASURED} measured turns each, round-robin, ${redone} turns redone (${fmt((performance.now() - t) / 1000)} s)`);
  for (const c of contenders) {
    try {
      await c.finish();
    } catch (err) {
      c.result.note = `${c.result.note ? c.result.note + '; ' : ''}finish failed: ${errorText(err)}`;
    }
    if (!c.result.error) log(`  ${label} ${c.result.contender}: median ${fmt(median(c.result.turns.map((x) => x.ms)))} ms`);
  }
}

// ---------------------------------------------------------------------------------------------------
