#!/usr/bin/env node
/**
 * finite-memory-llm CLI.
 *   finite-memory-llm demo [--turns 600] [--max-tokens 256] [--policy importance] [--model X]
 *   finite-memory-llm chat --model X [--policy importance] [--max-tokens 2048] [--system "..."]
 *   finite-memory-llm serve --model X [--port 8080] [--policy hybrid] [--max-tokens 2048] [--api-key K] ...
 */
import { existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline/promises';
import { parseArgs } from 'node:util';
import { writeLlamaModel } from './gguf/index.js';
import { loadModel, type Model } from './local/model.js';
import type { ChatOptions, LoadModelOptions } from './local/options.js';
import { progress } from './progress.js';
import type { PolicyName } from './shared/types.js';

const USAGE = `Usage:
  finite-memory-llm demo [--turns 600] [--max-tokens 256] [--window 64] [--policy importance] [--model file.gguf] [--threads N]
  finite-memory-llm chat --model file.gguf [--policy importance] [--max-tokens 2048] [--window 512] [--system "..."] [--threads N]
        [--past-reasoning drop|first|keep]
  finite-memory-llm serve --model file.gguf [--port 8080] [--host 127.0.0.1] [--policy importance] [--max-tokens 2048] [--window N]
        [--past-reasoning drop|first|keep]
        [--system "..."] [--threads N] [--slots 8] [--prefill-chunk 64] [--api-key K (or FINITE_MEMORY_API_KEY)] [--allowed-hosts a.example,b.example] [--model-id ID] [--max-sessions 32]
        [--session-ttl-ms 1800000] [--checkpoint-dir DIR] [--max-concurrent N] [--max-queue 64] [--max-session-queue 4]
        [--max-request-tokens 1024] [--max-history-tokens N] [--body-limit 1048576] [--headers-timeout-ms 10000]
        [--request-timeout-ms 30000] [--keep-alive-timeout-ms 5000] [--max-stored-sessions 256]
        [--max-stored-bytes 8589934592] [--shutdown-timeout-ms 30000] [--quiet]
        [--store redis://[user:password@]host:6379/0 | rediss://... (or FINITE_MEMORY_STORE)] [--store-ca ca.pem] [--store-namespace NS]
        [--lease-ms 10000] [--lease-wait-ms 2000] [--snapshot-idle-ms 30000] [--no-full-snapshots] [--instance-id NAME] [--no-ui]`;

const TOPICS = ['the weather', 'a red bicycle', 'the old lighthouse', 'breakfast', 'a lost key', 'the river', 'music', 'a small cat'];

function scriptedMessage(turn: number): string {
  const topic = TOPICS[turn % TOPICS.length] as string;
  return `Turn ${turn}: tell me one short thing about ${topic}.`;
}

async function demoModel(path: string | undefined): Promise<Model> {
  if (path) return loadWithProgress(path);
  // A generated llama-architecture model with seeded random weights: no download, same file every time.
  const file = join(tmpdir(), 'finite-memory-llm-demo-v1.gguf');
  if (!existsSync(file)) writeLlamaModel(file, { layers: 2, embd: 64, heads: 4, kvHeads: 2, headDim: 16, ffn: 128, ctx: 4096, type: 'f32', seed: 7 });
  return loadWithProgress(file);
}

/** loadModel with a progress bar on stderr (a line per quarter when stderr is not a terminal). */
async function loadWithProgress(path: string, options: LoadModelOptions = {}): Promise<Model> {
  const bar = progress(`loading ${path.split('/').pop()}`);
  const model = await loadModel(path, { ...options, onProgress: (f) => bar.update(f) });
  bar.done();
  return model;
}

function pad(v: string | number, n: number): string {
  return String(v).padStart(n);
}

async function demo(args: Record<string, string | boolean | undefined>): Promise<number> {
  const turns = intArg(args, 'turns', 1) ?? 600;
  const maxTokens = intArg(args, 'max-tokens', 1) ?? 256;
  const windowSize = intArg(args, 'window') ?? 64;
  const threads = intArg(args, 'threads', 1) ?? 1;
  const model = await demoModel(args.model as string | undefined);
  // No --policy: the library's default (one table, native/engine/options.cpp).
  const chat = model.createChat({ ...(typeof args.policy === 'string' ? { policy: args.policy as PolicyName } : {}), maxTokens, windowSize, sinkTokens: 4, threads, systemPrompt: 'You are a terse assistant. Answer in one sentence.' });
  const info = model.info;
  console.log(`finite-memory-llm demo: ${turns} turns, policy=${chat.options.policy}, maxTokens=${maxTokens}, windowSize=${windowSize}`);
  console.log(`model: ${info.description} (${info.nLayer} layers, ${info.nHeadKv} KV heads, vocab ${info.nVocab}) from ${info.path}`);
  console.log(`${pad('turn', 5)} ${pad('new', 5)} ${pad('prefill', 7)} ${pad('gen', 4)} ${pad('seen', 7)} ${pad('retained', 8)} ${pad('evicted', 8)} ${pad('last pos', 8)} ${pad('turn ms', 8)}  check`);
  let failures = 0;
  let maxRetained = 0;
  const latencies: number[] = [];
  for (let t = 1; t <= turns; t++) {
    const message = scriptedMessage(t);
    const internals = chat._internals();
    // What this turn must prefill: its own tokens plus the end-of-turn tokens of the previous reply.
    const expected = internals.countTurnTokens(message) + internals.cacheState().carriedTokens + internals.cacheState().pendingSystemTokens;
    const r = await chat.send(message, { maxNewTokens: 24, temperature: 0.7, seed: t });
    const s = chat.stats();
    const cache = internals.cacheState();
    // Positions keep their gaps after evictions; they must still increase, below the chat's limit, and
    // llama.cpp's own view of the sequence must span exactly what the ledger holds.
    const ok = r.stats.promptTokens === expected && s.tokensRetained <= maxTokens && cache.positionsIncreasing &&
      cache.cachePosMin === cache.ledgerPosFirst && cache.cachePosMax === cache.ledgerPosLast && cache.ledgerPosLast < cache.positionLimit;
    if (!ok) failures++;
    maxRetained = Math.max(maxRetained, s.tokensRetained);
    latencies.push(r.stats.latencyMs);
    console.log(`${pad(t, 5)} ${pad(expected, 5)} ${pad(r.stats.promptTokens, 7)} ${pad(r.stats.generatedTokens, 4)} ${pad(s.tokensSeen, 7)} ${pad(s.tokensRetained, 8)} ${pad(s.tokensEvicted, 8)} ${pad(cache.ledgerPosLast, 8)} ${pad(r.stats.latencyMs.toFixed(2), 8)}  ${ok ? 'ok' : 'FAIL'}`);
  }
  const s = chat.stats();
  latencies.sort((a, b) => a - b);
  const median = latencies[Math.floor(latencies.length / 2)] ?? 0;
  console.log(`\nseen ${s.tokensSeen} tokens, retained ${s.tokensRetained} (max ${maxRetained} <= budget ${maxTokens}), evicted ${s.tokensEvicted} in ${s.evictions} evictions (positions kept; ${s.compactions} compactions at the position limit ${chat._internals().cacheState().positionLimit}), compression ${s.compressionRatio.toFixed(1)}x, median turn ${median.toFixed(2)} ms`);
  console.log(failures === 0 ? 'every turn prefilled only its new tokens and stayed within the budget' : `${failures} turns FAILED the checks`);
  chat.dispose();
  model.dispose();
  return failures === 0 ? 0 : 1;
}

async function interactive(args: Record<string, string | boolean | undefined>): Promise<number> {
  if (typeof args.model !== 'string') {
    console.error('chat needs --model <file.gguf>\n' + USAGE);
    return 2;
  }
  const maxTokens = intArg(args, 'max-tokens', 1);
  const windowSize = intArg(args, 'window');
  const threads = intArg(args, 'threads', 1);
  const model = await loadWithProgress(args.model);
  // Unset flags leave the option to the library's defaults (one table, native/engine/options.cpp).
  const chat = model.createChat({
    ...(typeof args.policy === 'string' ? { policy: args.policy as PolicyName } : {}),
    ...(maxTokens !== undefined ? { maxTokens } : {}),
    ...(windowSize !== undefined ? { windowSize } : {}),
    ...(threads !== undefined ? { threads } : {}),
    ...(typeof args.system === 'string' ? { systemPrompt: args.system } : {}),
    ...pastReasoningArg(args),
  });
  const rl = createInterface({ input: process.stdin, output: process.stdout });
  const controller = { current: undefined as AbortController | undefined };
  rl.on('SIGINT', () => (controller.current ? controller.current.abort() : rl.close()));
  console.log(`chat with ${model.info.description}; Ctrl+C aborts a reply, Ctrl+D quits`);
  try {
    // Lines are read as they come, queued while a reply runs: piped input is a conversation too
    // (question() dropped every line that arrived during a reply).
    rl.setPrompt('> ');
    rl.prompt();
    for await (const line of rl) {
      if (line.trim()) {
        controller.current = new AbortController();
        try {
          // A reasoning model's reasoning is shown apart (dimmed on a terminal) before its answer.
          const [dim, plain] = process.stdout.isTTY ? ['\x1b[2m', '\x1b[22m'] : ['', ''];
          let thinking = false;
          const onReasoning = (p: string) => {
            process.stdout.write(thinking ? p : `${dim}${p}`);
            thinking = true;
          };
          const onToken = (p: string) => {
            process.stdout.write(thinking ? `${plain}\n${p}` : p);
            thinking = false;
          };
          const r = await chat.send(line, { maxNewTokens: 256, onToken, onReasoning, signal: controller.current.signal });
          if (thinking) process.stdout.write(plain);
          const s = chat.stats();
          console.log(`\n[${r.stopReason}] prefill ${r.stats.promptTokens} tok ${r.stats.prefillMs.toFixed(1)} ms, ${r.stats.generatedTokens} tok at ${r.stats.tokensPerSecond.toFixed(1)} tok/s | memory ${s.tokensRetained}/${chat.options.maxTokens} tokens, seen ${s.tokensSeen}, evicted ${s.tokensEvicted}`);
        } catch (err) {
          // One turn that cannot run (a message too long for the budget) does not end the conversation.
          const e = err as Error & { code?: string };
          console.error(`error${e.code ? ` [${e.code}]` : ''}: ${e.message}`);
        } finally {
          controller.current = undefined;
        }
      }
      rl.prompt();
    }
  } finally {
    rl.close();
    chat.dispose();
    model.dispose();
  }
  return 0;
}

/**
 * An integer flag (undefined when absent). An empty value (`--port "$PORT"` with PORT unset) is an
 * error, not 0: Number('') is 0, which listened on a random port and refused every queued request.
 */
/** `--past-reasoning`: passed as given (the options table names what it takes when it is wrong). */
function pastReasoningArg(args: Record<string, string | boolean | undefined>): { pastReasoning?: ChatOptions['pastReasoning'] } {
  const v = args['past-reasoning'];
  return typeof v === 'string' ? { pastReasoning: v as ChatOptions['pastReasoning'] } : {};
}

function intArg(args: Record<string, string | boolean | undefined>, name: string, min = 0): number | undefined {
  const v = args[name];
  if (v === undefined) return undefined;
  const n = typeof v === 'string' && v.trim() !== '' ? Number(v) : Number.NaN;
  if (!Number.isInteger(n) || n < min) throw new UsageError(`--${name} expects an integer of at least ${min}, got ${JSON.stringify(v)}`);
  return n;
}

/** A command line that cannot run: printed with the usage, exit code 2. */
class UsageError extends Error {}

async function serve(args: Record<string, string | boolean | undefined>): Promise<number> {
  if (typeof args.model !== 'string') {
    console.error('serve needs --model <file.gguf>\n' + USAGE);
    return 2;
  }
  // Every number is read before the model loads: a typo costs no load, and a bad
  // --shutdown-timeout-ms is not found inside the SIGTERM handler (an uncaught exception, no checkpoints).
  const threads = intArg(args, 'threads', 1);
  const slots = intArg(args, 'slots', 1);
  const prefillChunk = intArg(args, 'prefill-chunk', 1);
  const window = intArg(args, 'window');
  const port = intArg(args, 'port') ?? 8080;
  const shutdownMs = intArg(args, 'shutdown-timeout-ms') ?? 30_000;
  const numbers = Object.fromEntries((['max-tokens', 'lease-ms', 'lease-wait-ms', 'snapshot-idle-ms', 'max-sessions', 'session-ttl-ms', 'max-concurrent',
    'max-queue', 'max-session-queue', 'max-request-tokens', 'max-history-tokens', 'body-limit', 'headers-timeout-ms', 'request-timeout-ms',
    'keep-alive-timeout-ms', 'max-stored-sessions', 'max-stored-bytes'] as const).map((name) => [name, intArg(args, name)]));
  // An empty --api-key (an unset variable) is refused by the server's own check, never a server without a key.
  const apiKey = typeof args['api-key'] === 'string' ? args['api-key'] : process.env.FINITE_MEMORY_API_KEY || undefined;
  const model = await loadWithProgress(args.model, { ...(threads !== undefined ? { threads } : {}), ...(slots !== undefined ? { slots } : {}), ...(prefillChunk !== undefined ? { prefillChunk } : {}) });
  const { createServer } = await import('./server/index.js');
  const server = await createServer(model, {
    chat: {
      ...(typeof args.policy === 'string' ? { policy: args.policy as PolicyName } : {}),
      ...(numbers['max-tokens'] !== undefined ? { maxTokens: numbers['max-tokens'] } : {}),
      ...(window !== undefined ? { windowSize: window } : {}),
      ...(typeof args.system === 'string' ? { systemPrompt: args.system } : {}),
      ...pastReasoningArg(args),
    },
    ...(apiKey !== undefined ? { apiKey } : {}),
    ...(typeof args['model-id'] === 'string' ? { modelId: args['model-id'] } : {}),
    ...(typeof args['allowed-hosts'] === 'string' ? { allowedHosts: args['allowed-hosts'].split(',').map((h) => h.trim()).filter((h) => h !== '') } : {}),
    ...(typeof args['checkpoint-dir'] === 'string' ? { checkpointDir: args['checkpoint-dir'] } : {}),
    ...(typeof args.store === 'string' ? { store: args.store } : process.env.FINITE_MEMORY_STORE ? { store: process.env.FINITE_MEMORY_STORE } : {}),
    ...(typeof args['store-namespace'] === 'string' ? { storeNamespace: args['store-namespace'] } : {}),
    ...(typeof args['store-ca'] === 'string' ? { storeCa: readFileSync(args['store-ca'], 'utf8') } : {}),
    ...(typeof args['instance-id'] === 'string' ? { instanceId: args['instance-id'] } : {}),
    leaseMs: numbers['lease-ms'],
    leaseWaitMs: numbers['lease-wait-ms'],
    snapshotIdleMs: numbers['snapshot-idle-ms'],
    ...(args['no-full-snapshots'] ? { fullSnapshots: false } : {}),
    ...(args['no-ui'] ? { ui: false } : {}),
    maxSessions: numbers['max-sessions'],
    sessionTtlMs: numbers['session-ttl-ms'],
    maxConcurrent: numbers['max-concurrent'],
    maxQueue: numbers['max-queue'],
    maxSessionQueue: numbers['max-session-queue'],
    maxTokensPerRequest: numbers['max-request-tokens'],
    maxHistoryTokens: numbers['max-history-tokens'],
    bodyLimit: numbers['body-limit'],
    headersTimeoutMs: numbers['headers-timeout-ms'],
    requestTimeoutMs: numbers['request-timeout-ms'],
    keepAliveTimeoutMs: numbers['keep-alive-timeout-ms'],
    maxStoredSessions: numbers['max-stored-sessions'],
    maxStoredBytes: numbers['max-stored-bytes'],
    logger: args.quiet ? false : { level: 'info' },
  });
  const address = await server.listen({ port, host: typeof args.host === 'string' ? args.host : '127.0.0.1' });
  console.error(`serving ${server.modelId} at ${address}/v1 (POST /v1/chat/completions, GET /v1/models, /health, /metrics)`);
  if (!args['no-ui']) console.error(`memory inspector: ${address}/`);
  // SIGTERM / SIGINT: stop accepting, finish in-flight requests (aborted after --shutdown-timeout-ms),
  // write every live session's full checkpoint to the store (--checkpoint-dir or --store), then exit.
  // A second signal while draining does not kill the process (the default handler would, mid-write).
  let failed = false;
  await new Promise<void>((resolve) => {
    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) return void console.error(`${signal}: already shutting down`);
      stopping = true;
      console.error(`${signal}: shutting down (finishing in-flight requests)`);
      server.close({ abortAfterMs: shutdownMs }).then(resolve, (err: Error) => {
        console.error(`shutdown: ${err.message}`);
        failed = true;
        resolve();
      });
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
  });
  model.dispose();
  return failed ? 1 : 0;
}

async function main(): Promise<number> {
  const { positionals, values } = parseArgs({
    allowPositionals: true,
    options: {
      model: { type: 'string' }, policy: { type: 'string' }, 'max-tokens': { type: 'string' }, window: { type: 'string' }, 'past-reasoning': { type: 'string' },
      turns: { type: 'string' }, threads: { type: 'string' }, system: { type: 'string' }, help: { type: 'boolean', short: 'h' },
      port: { type: 'string' }, host: { type: 'string' }, 'api-key': { type: 'string' }, 'model-id': { type: 'string' }, 'allowed-hosts': { type: 'string' },
      'max-sessions': { type: 'string' }, 'session-ttl-ms': { type: 'string' }, 'checkpoint-dir': { type: 'string' },
      'max-concurrent': { type: 'string' }, 'max-queue': { type: 'string' }, 'max-session-queue': { type: 'string' },
      'max-request-tokens': { type: 'string' }, 'body-limit': { type: 'string' }, 'shutdown-timeout-ms': { type: 'string' },
      'max-history-tokens': { type: 'string' }, 'headers-timeout-ms': { type: 'string' }, 'request-timeout-ms': { type: 'string' },
      'keep-alive-timeout-ms': { type: 'string' }, slots: { type: 'string' }, 'prefill-chunk': { type: 'string' }, 'max-stored-sessions': { type: 'string' }, 'max-stored-bytes': { type: 'string' },
      store: { type: 'string' }, 'store-namespace': { type: 'string' }, 'store-ca': { type: 'string' }, 'lease-ms': { type: 'string' }, 'lease-wait-ms': { type: 'string' },
      'snapshot-idle-ms': { type: 'string' }, 'instance-id': { type: 'string' }, 'no-full-snapshots': { type: 'boolean' }, 'no-ui': { type: 'boolean' }, quiet: { type: 'boolean' },
    },
  });
  const command = positionals[0];
  if (values.help || !command) {
    console.log(USAGE);
    return values.help ? 0 : 2;
  }
  if (command === 'demo') return demo(values);
  if (command === 'chat') return interactive(values);
  if (command === 'serve') return serve(values);
  console.error(`unknown command ${command}\n${USAGE}`);
  return 2;
}

main().then(
  (code) => process.exit(code),
  (err: Error & { code?: string }) => {
    // A flag parseArgs does not know, or a value a flag cannot take: the usage, exit 2.
    const usage = err instanceof UsageError || (typeof err.code === 'string' && err.code.startsWith('ERR_PARSE_ARGS'));
    console.error(`error${err.code ? ` [${err.code}]` : ''}: ${err.message}${usage ? `\n${USAGE}` : ''}`);
    process.exit(usage ? 2 : 1);
  },
);
