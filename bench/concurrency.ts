// Many chats at once: this project (every chat a sequence of one shared context, one batch per
// step) side by side with llama-server built from the same pinned llama.cpp (scripts/build-llama-server.sh),
// on the realistic-geometry generated model (Qwen2.5-0.5B's shape, bench/common.ts).
//
// Short-chat mode: K chats (distinct prompts) each take TURNS turns of 32 greedy tokens, all K at
// once; llama-server gets -np K -c K x maxTokens and each client sends its whole (short) history,
// which llama-server's prompt cache reuses. Long-chat mode: every chat runs well past its budget;
// llama-server gets what a stateless OpenAI client sends: the history truncated (oldest messages
// first) to fit the slot, so the cached prefix changes and it prefills again.
// Long chats compare positions kept (the default: an eviction is a seq_rm) and compacted at every
// eviction (a K-shift of the whole context in the next decode). --hybrid runs the long mode on a
// Qwen3.5-2B-shaped hybrid (Gated DeltaNet + attention, IMROPE: llama-server cannot shift its
// context, and re-processes the truncated history).
// Figures: aggregate generated tokens/s over the run, p50/p99 turn latency and p50 time to first token.
//
//   npx tsx bench/concurrency.ts                 all K in {1, 2, 4, 8, 16} and the long mode; writes RESULTS
//   npx tsx bench/concurrency.ts --k=8 --no-write   one K (the GPU check runs this)
//   npx tsx bench/concurrency.ts --quick         small model, K in {1, 4}; prints only
//   options: --threads=N (default: the cores) --turns=N --model=path.gguf --no-server --long-only --short-only
//            --gpu (llama-server offloads every layer too; scripts/gpu-check.sh)
//   npx tsx bench/concurrency.ts --hybrid        long chats on the Qwen3.5-2B-shaped hybrid; writes its own RESULTS section
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { loadModel, type Chat, type ChatOptions, type Model } from '../src/index.ts';
import type { NativeEngineStats } from '../src/local/binding.ts';
import { machine, median, qwen35Model, realisticModel, ROOT, smallModels, writeResultsSection } from './common.ts';

const args = process.argv.slice(2);
const arg = (name: string) => args.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
const QUICK = args.includes('--quick');
const HYBRID = args.includes('--hybrid');
const WRITE = !args.includes('--no-write') && !QUICK && arg('k') === undefined;
const THREADS = Number(arg('threads') ?? availableParallelism());
const KS = arg('k') ? [Number(arg('k'))] : QUICK ? [1, 4] : [1, 2, 4, 8, 16];
const TURNS = Number(arg('turns') ?? (QUICK ? 2 : 3));
// The hybrid is ~4x the realistic model's weights: a smaller budget and fewer turns keep its run in minutes.
const LONG_TURNS = Number(arg('long-turns') ?? (QUICK ? 6 : HYBRID ? 15 : 27));
const LONG_K = Number(arg('long-k') ?? (QUICK ? 2 : HYBRID ? 2 : 4));
const MAX_TOKENS = 1024;
const LONG_MAX_TOKENS = QUICK ? 256 : HYBRID ? 512 : 1024;
/** Long mode: the turns from here on are measured (with ~75 tokens a turn, past a 1024 budget). */
const LONG_WARM = Math.ceil((LONG_TURNS * 2) / 3);
const REPLY = 32;
const SERVER_BIN = join(ROOT, 'build-tools', 'llama-server', 'bin', 'llama-server');
const WITH_SERVER = !args.includes('--no-server');
/** Short mode: each K runs REPS times per contender, in alternating order (ours, server, server, ours...): this machine's speed drifts by tens of percent over minutes. */
const REPS = Number(arg('reps') ?? (QUICK ? 1 : 2));
/** llama-server's --cache-reuse in the long chats (its smallest reusable chunk, tokens). */
const CACHE_REUSE = 64;
/** --gpu: llama-server offloads every layer too (ours: gpuLayers 'auto', the default). */
const SERVER_GPU_LAYERS = args.includes('--gpu') ? '999' : '0';

const TOPICS = ['the weather in Paris', 'books about the history of science', 'tomato plants with yellow leaves', 'lists and sets in Python',
  'training for a five kilometre run', 'a robot who paints the sea', 'monorepos and small repositories', 'baking bread at home',
  'packing for a hiking trip', 'how a heat pump works', 'learning the guitar', 'the old lighthouse', 'a small cat on a boat',
  'growing herbs indoors', 'the first trains', 'a map of the stars'];
const prompt = (chat: number, turn: number) => `Chat ${chat}, turn ${turn}: tell me something new about ${TOPICS[(chat + turn) % TOPICS.length]} and why it matters to people today.`;

interface TurnTiming { ms: number; ttftMs: number; tokens: number }
/** How ours formed its steps: llama_decode calls (one ubatch each) and tokens, over the measured turns. */
interface StepStats { steps: number; ubatches: number; tokens: number }
interface Run { label: string; k: number; wallMs: number; turns: TurnTiming[]; note?: string; steps?: StepStats }

function stepStats(before: NativeEngineStats, after: NativeEngineStats): StepStats {
  return { steps: after.steps - before.steps, ubatches: after.decodes - before.decodes, tokens: after.tokens - before.tokens };
}
const stepNote = (s: StepStats) => `${s.steps} steps, ${(s.ubatches / s.steps).toFixed(2)} ubatches a step, ${(s.tokens / s.ubatches).toFixed(1)} tokens a ubatch`;

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor(p * (s.length - 1) + 0.5))]! : NaN;
};
const summary = (r: Run) => ({
  tokens: r.turns.reduce((n, t) => n + t.tokens, 0),
  tokPerS: (r.turns.reduce((n, t) => n + t.tokens, 0) * 1000) / r.wallMs,
  p50: median(r.turns.map((t) => t.ms)),
  p99: pct(r.turns.map((t) => t.ms), 0.99),
  ttft: median(r.turns.map((t) => t.ttftMs)),
  ttft99: pct(r.turns.map((t) => t.ttftMs), 0.99),
});

// ---- ours ----

async function oursShort(model: Model, k: number): Promise<Run> {
  // sliding: like llama-server, no eviction signals captured (what the default importance's capture
  // costs a step is bench/decode-overhead.ts's to measure); the short chats never evict anyway.
  const chats = Array.from({ length: k }, () => model.createChat({ maxTokens: MAX_TOKENS, flashAttention: false, policy: 'sliding' }));
  // Warm-up: one short turn each (contexts grow to k slots here, not while measuring).
  await Promise.all(chats.map((c, i) => c.send(`hello from chat ${i}`, { maxNewTokens: 2, temperature: 0 })));
  const turns: TurnTiming[] = [];
  const before = chats[0]!._internals().engineStats();
  const t0 = performance.now();
  await Promise.all(chats.map(async (c, i) => {
    for (let t = 0; t < TURNS; t++) turns.push(await timedTurn(c, prompt(i, t), REPLY));
  }));
  const wallMs = performance.now() - t0;
  const after = chats[0]!._internals().engineStats();
  chats.forEach((c) => c.dispose());
  return { label: 'ours', k, wallMs, turns, steps: stepStats(before, after) };
}

/** Measured from the caller's side, as for llama-server: send() to the first piece and to the result. */
async function timedTurn(chat: Chat, message: string, maxNewTokens: number): Promise<TurnTiming> {
  const t0 = performance.now();
  let ttft = NaN;
  const r = await chat.send(message, { maxNewTokens, temperature: 0, ignoreEos: true, onToken: () => { if (Number.isNaN(ttft)) ttft = performance.now() - t0; } });
  return { ms: performance.now() - t0, ttftMs: ttft, tokens: r.stats.generatedTokens };
}

async function oursLong(model: Model, k: number, label = 'ours', options: ChatOptions = {}): Promise<Run> {
  const chats = Array.from({ length: k }, () => model.createChat({ maxTokens: LONG_MAX_TOKENS, flashAttention: false, policy: 'sliding', ...options }));
  const turns: TurnTiming[] = [];
  const warm = LONG_WARM;
  let t0 = 0;
  let before = { steps: 0, shiftSteps: 0 };
  await Promise.all(chats.map(async (c, i) => {
    for (let t = 0; t < LONG_TURNS; t++) {
      const x = await timedTurn(c, prompt(i, t), REPLY);
      if (t >= warm) turns.push(x);
      if (t === warm - 1 && !t0) {
        t0 = performance.now();
        before = c._internals().engineStats();
      }
    }
  }));
  const wallMs = performance.now() - t0;
  const after = chats[0]!._internals().engineStats();
  const evicted = chats.every((c) => c.stats().evictions > 0);
  const compactions = chats.reduce((n, c) => n + c.stats().compactions, 0);
  chats.forEach((c) => c.dispose());
  const shifts = `${after.shiftSteps - before.shiftSteps} of ${after.steps - before.steps} steps paid a K-shift, ${compactions} compactions in all`;
  return { label, k, wallMs, turns, note: `${evicted ? 'every chat past its budget' : 'NOT every chat evicted'}; ${shifts}` };
}

// ---- llama-server ----

interface Server { proc: ChildProcess; url: string; log: () => string }

/** A failed request says whether llama-server is still alive and what it last printed. */
async function withServerLog<T>(server: Server, work: () => Promise<T>): Promise<T> {
  try {
    return await work();
  } catch (err) {
    const state = server.proc.exitCode !== null || server.proc.signalCode ? `exited (${server.proc.exitCode ?? server.proc.signalCode})` : 'still running';
    throw new Error(`${(err as Error).message}; llama-server ${state}, its last output:\n${server.log()}`, { cause: err });
  }
}

async function startServer(modelPath: string, k: number, ctxPerSlot: number, extra: string[] = []): Promise<Server> {
  const port = 20000 + Math.floor(Math.random() * 20000);
  const proc = spawn(SERVER_BIN, ['-m', modelPath, '-np', String(k), '-c', String(k * ctxPerSlot), '-t', String(THREADS), '-tb', String(THREADS),
    '-fa', 'off', '-ngl', SERVER_GPU_LAYERS, '--host', '127.0.0.1', '--port', String(port), '--no-webui', '--threads-http', String(k + 2), ...extra], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  proc.stderr!.on('data', (d: Buffer) => (log = (log + d.toString()).slice(-4000)));
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 600; i++) {
    if (proc.exitCode !== null) throw new Error(`llama-server exited: ${log}`);
    try {
      if ((await fetch(`${url}/health`)).ok) return { proc, url, log: () => log };
    } catch {}
    await new Promise((r) => setTimeout(r, 100));
  }
  proc.kill();
  throw new Error(`llama-server did not start: ${log}`);
}

async function stopServer(s: Server) {
  s.proc.kill('SIGTERM');
  await new Promise((r) => s.proc.once('exit', r));
}

type Msg = { role: 'user' | 'assistant'; content: string };

/** Requests that met a closed keep-alive connection and were sent again (printed with the results). */
let resent = 0;

/**
 * fetch, sent again when the pooled connection it went out on had been closed by llama-server
 * (cpp-httplib) before any response: the request never reached it, so sending it again is safe and
 * costs a reconnect on localhost. Any other failure is the server's and is thrown.
 */
async function serverFetch(url: string, init: RequestInit): Promise<Response> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await fetch(url, init);
    } catch (err) {
      const code = ((err as { cause?: { code?: string } }).cause)?.code;
      if (attempt >= 2 || (code !== 'UND_ERR_SOCKET' && code !== 'ECONNRESET')) throw err;
      resent++;
    }
  }
}

/** One streamed completion; the reply text and timings. */
async function serverTurn(url: string, messages: Msg[]): Promise<{ text: string } & TurnTiming> {
  const t0 = performance.now();
  const res = await serverFetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    // ignore_eos: every reply REPLY tokens long, as ours (ignoreEos): equal work on both sides.
    body: JSON.stringify({ messages, max_tokens: REPLY, temperature: 0, ignore_eos: true, stream: true, stream_options: { include_usage: true }, cache_prompt: true }),
  });
  if (!res.ok || !res.body) throw new Error(`llama-server answered ${res.status}: ${await res.text()}`);
  let ttft = NaN;
  let text = '';
  let tokens = 0;
  let buf = '';
  const decoder = new TextDecoder();
  for await (const chunk of res.body) {
    buf += decoder.decode(chunk as Uint8Array, { stream: true });
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
      const ev = JSON.parse(line.slice(6)) as { choices?: { delta?: { content?: string } }[]; usage?: { completion_tokens: number } };
      const piece = ev.choices?.[0]?.delta?.content;
      if (piece) {
        if (Number.isNaN(ttft)) ttft = performance.now() - t0;
        text += piece;
      }
      if (ev.usage) tokens = ev.usage.completion_tokens;
    }
  }
  return { text, ms: performance.now() - t0, ttftMs: ttft, tokens };
}

async function serverShort(modelPath: string, k: number): Promise<Run> {
  const server = await startServer(modelPath, k, MAX_TOKENS);
  try {
    await Promise.all(Array.from({ length: k }, (_, i) => serverTurn(server.url, [{ role: 'user', content: `hello from chat ${i}` }])));
    const turns: TurnTiming[] = [];
    const t0 = performance.now();
    await withServerLog(server, () => Promise.all(Array.from({ length: k }, async (_, i) => {
      const history: Msg[] = [];
      for (let t = 0; t < TURNS; t++) {
        history.push({ role: 'user', content: prompt(i, t) });
        const r = await serverTurn(server.url, history);
        history.push({ role: 'assistant', content: r.text });
        turns.push(r);
      }
    })));
    return { label: 'llama-server', k, wallMs: performance.now() - t0, turns };
  } finally {
    await stopServer(server);
  }
}

/** Prompt tokens llama-server itself counts for these messages (its template and tokenizer, not an estimate). */
async function serverPromptTokens(url: string, messages: Msg[]): Promise<number> {
  const post = async (path: string, body: unknown) => {
    const res = await serverFetch(`${url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    if (!res.ok) throw new Error(`llama-server ${path} answered ${res.status}: ${await res.text()}`);
    return res.json() as Promise<Record<string, unknown>>;
  };
  const { prompt } = (await post('/apply-template', { messages })) as { prompt: string };
  const { tokens } = (await post('/tokenize', { content: prompt, add_special: true, parse_special: true })) as { tokens: number[] };
  return tokens.length;
}

/**
 * What a stateless client sends when the conversation outgrows the slot: the newest messages that fit
 * with room for the reply. Counted by the server, because a reply re-tokenized from its text can take
 * more tokens than it was generated as, and a prompt over the slot fails the request.
 */
async function truncated(url: string, history: Msg[], budget: number, start: number): Promise<number> {
  // From where the last request of this chat started (a history only grows): one or two /tokenize
  // calls a turn, not a walk from the first message inside the timed window.
  let from = start;
  while (from < history.length - 1 && (await serverPromptTokens(url, history.slice(from))) + REPLY > budget) {
    from++;
    while (from < history.length - 1 && history[from]!.role !== 'user') from++;
  }
  return from;
}

async function serverLong(modelPath: string, k: number): Promise<Run> {
  // --cache-reuse: a truncated history reuses the cached chunks it still shares with the last request,
  // shifted into place (off by default): llama-server at its best for long chats.
  const server = await startServer(modelPath, k, LONG_MAX_TOKENS, ['--cache-reuse', String(CACHE_REUSE)]);
  try {
    const turns: TurnTiming[] = [];
    const warm = LONG_WARM;
    let t0 = 0;
    let truncatedTurns = 0;
    await withServerLog(server, () => Promise.all(Array.from({ length: k }, async (_, i) => {
      const history: Msg[] = [];
      let from = 0;
      for (let t = 0; t < LONG_TURNS; t++) {
        history.push({ role: 'user', content: prompt(i, t) });
        from = await truncated(server.url, history, LONG_MAX_TOKENS, from);
        const sent = history.slice(from);
        if (sent.length < history.length && t >= warm) truncatedTurns++;
        const r = await serverTurn(server.url, sent);
        history.push({ role: 'assistant', content: r.text });
        if (t >= warm) turns.push(r);
        if (t === warm - 1 && !t0) t0 = performance.now();
      }
    })));
    return { label: 'llama-server', k, wallMs: performance.now() - t0, turns, note: `${truncatedTurns} of ${turns.length} measured requests truncated` };
  } finally {
    await stopServer(server);
  }
}

// ---- main ----

const fmt = (x: number, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : 'n/a');

async function main() {
  const m = QUICK ? smallModels('fml-concurrency-small.gguf')[0]! : arg('model') ? { name: arg('model')!, path: arg('model')!, about: 'given with --model' } : HYBRID ? qwen35Model() : realisticModel();
  const server = WITH_SERVER && existsSync(SERVER_BIN);
  if (WITH_SERVER && !server) console.log(`llama-server not built (${SERVER_BIN}): run bash scripts/build-llama-server.sh; comparing nothing`);
  const model = await loadModel(m.path, { threads: THREADS, slots: Math.max(...KS, LONG_K), ...(args.includes('--unified') ? { kvUnified: true } : {}) });
  const setup = [
    `- machine: ${machine()}`,
    `- model: ${m.name}: ${m.about} (${(model.info.nParams / 1e6).toFixed(0)}M parameters, ${model.info.backend})`,
    `- ${THREADS} threads for both (ours: the model's thread budget; llama-server -t/-tb), flash attention off for both, policy sliding (no eviction signals, as llama-server), greedy, ${REPLY}-token replies`,
    `- short chats: maxTokens ${MAX_TOKENS}, ${TURNS} turns per chat, all K chats at once, ${REPS} runs per contender and K in alternating order (figures over all of them); llama-server -np K -c K x ${MAX_TOKENS}, whole history per request (its prompt cache reuses it)`,
    `- long chats: K = ${LONG_K}, maxTokens ${LONG_MAX_TOKENS}, ${LONG_TURNS} turns per chat, turns ${LONG_WARM + 1}.. measured (every chat past its budget); llama-server -c K x ${LONG_MAX_TOKENS} gets the history truncated to fit its slot (oldest messages first), with \`--cache-reuse ${CACHE_REUSE}\` (chunks of the truncated history still cached are shifted into place, not prefilled again)`,
  ];
  console.log(setup.join('\n'));
  const short: Run[] = [];
  if (!args.includes('--long-only') && !HYBRID) {
    for (const k of KS) {
      const runs: Record<string, Run[]> = { ours: [], 'llama-server': [] };
      for (let rep = 0; rep < REPS; rep++) {
        const order = rep % 2 === 0 ? ['ours', 'llama-server'] : ['llama-server', 'ours'];
        for (const who of order) {
          if (who === 'llama-server' && !server) continue;
          const r = who === 'ours' ? await oursShort(model, k) : await serverShort(m.path, k);
          runs[who]!.push(r);
          const x = summary(r);
          console.log(`K=${k} ${who} (rep ${rep + 1}): ${x.tokens} tokens, ${fmt(x.tokPerS)} tok/s, p50 ${fmt(x.p50, 0)} ms, p99 ${fmt(x.p99, 0)} ms, ttft ${fmt(x.ttft, 0)}/${fmt(x.ttft99, 0)} ms${r.steps ? `; ${stepNote(r.steps)}` : ''}`);
        }
      }
      // Every rep's turns together: tok/s over the summed wall time, percentiles over all turns.
      for (const [who, rs] of Object.entries(runs)) {
        const steps = rs.every((r) => r.steps) ? rs.reduce((a, r) => ({ steps: a.steps + r.steps!.steps, ubatches: a.ubatches + r.steps!.ubatches, tokens: a.tokens + r.steps!.tokens }), { steps: 0, ubatches: 0, tokens: 0 }) : undefined;
        if (rs.length) short.push({ label: who, k, wallMs: rs.reduce((n, r) => n + r.wallMs, 0), turns: rs.flatMap((r) => r.turns), note: steps ? stepNote(steps) : undefined });
      }
    }
  }
  const long: Run[] = [];
  if (!args.includes('--short-only')) {
    long.push(await oursLong(model, LONG_K));
    if (model.info.canShift) {
      // Positions compacted at every eviction: what every eviction cost before positions were kept.
      long.push(await oursLong(model, LONG_K, "ours, positions 'compact'", { positions: 'compact' }));
    }
    if (!HYBRID) {
      // The KV layout choice: one buffer for every chat instead of a stream each (same chats).
      const unified = await loadModel(m.path, { threads: THREADS, slots: Math.max(...KS, LONG_K), kvUnified: true });
      long.push(await oursLong(unified, LONG_K, 'ours, unified KV'));
      unified.dispose();
    }
    if (server) long.push(await serverLong(m.path, LONG_K));
    for (const r of long) {
      const s = summary(r);
      console.log(`long K=${LONG_K} ${r.label}: ${fmt(s.tokPerS)} tok/s, p50 ${fmt(s.p50, 0)} ms, p99 ${fmt(s.p99, 0)} ms, ttft ${fmt(s.ttft, 0)} ms (${r.note})`);
    }
  }
  model.dispose();

  const rows = (runs: Run[]) => {
    const out = ['| K | contender | tokens | tok/s (all chats) | p50 turn ms | p99 turn ms | p50 / p99 TTFT ms | tok/s: ours / llama-server | p99: llama-server / ours | p50: llama-server / ours |', '|---|---|---|---|---|---|---|---|---|---|'];
    for (const r of runs) {
      const s = summary(r);
      const other = runs.find((x) => x.k === r.k && x.label === 'llama-server');
      const o = other ? summary(other) : undefined;
      const ratio = r.label.startsWith('ours') && o ? `${fmt(s.tokPerS / o.tokPerS, 2)}x` : '';
      const p99 = r.label.startsWith('ours') && o ? `${fmt(o.p99 / s.p99, 2)}x` : '';
      const p50 = r.label.startsWith('ours') && o ? `${fmt(o.p50 / s.p50, 2)}x` : '';
      out.push(`| ${r.k} | ${r.label}${r.note ? ` (${r.note})` : ''} | ${s.tokens} | ${fmt(s.tokPerS)} | ${fmt(s.p50, 0)} | ${fmt(s.p99, 0)} | ${fmt(s.ttft, 0)} / ${fmt(s.ttft99, 0)} | ${ratio} | ${p99} | ${p50} |`);
    }
    return out.join('\n');
  };
  const resentNote = `- llama-server requests sent again after meeting a connection it had closed: ${resent}`;
  if (HYBRID) {
    const body = [`Command: \`npx tsx bench/concurrency.ts --hybrid\``, '', ...setup.filter((l) => !l.startsWith('- short')), resentNote, '', rows(long)].join('\n');
    console.log(`\n${body}`);
    if (WRITE) writeResultsSection('hybrid-long-chats', `## Long chats on a Qwen3.5-2B-shaped hybrid\n\n${body}`);
    return;
  }
  const body = [`Command: \`npx tsx bench/concurrency.ts${REPS !== 2 ? ` --reps=${REPS}` : ''}\``, '', ...setup, resentNote, '', '### Short chats', '', rows(short), '', '### Long chats (past the budget)', '', rows(long)].join('\n');
  console.log(`\n${body}`);
  if (WRITE) writeResultsSection('concurrency', `## Concurrency: many chats at once\n\n${body}`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
