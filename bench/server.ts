// The HTTP server under load: autocannon on loopback against `finite-memory-llm serve` (a child
// process running src/cli.ts), for a fixed duration, each connection continuing its own session
// (`user` field, one new message per request), then SIGTERM and a graceful shutdown.
//   npx tsx bench/server.ts [--duration 10] [--connections 4] [--max-tokens 16] [--budget 256] [--no-write]
import { spawn } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import autocannon from 'autocannon';
import { writeLlamaModel } from '../src/gguf/index.ts';
import { machine, ROOT, writeResultsSection } from './common.ts';

const arg = (name: string, def: string) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
};
const DURATION = Number(arg('duration', '10'));
const CONNECTIONS = Number(arg('connections', '4'));
const MAX_NEW = Number(arg('max-tokens', '16'));
const BUDGET = Number(arg('budget', '256'));

interface SessionFigures { turns: number; maxRetained: number; evictions: number; tokensSeen: number }

async function main() {
  const dir = mkdtempSync(join(tmpdir(), 'fml-server-bench-'));
  const path = join(dir, 'server.gguf');
  writeLlamaModel(path, { layers: 4, embd: 128, heads: 4, kvHeads: 4, headDim: 32, ffn: 256, type: 'f16', seed: 5 });

  const child = spawn(
    process.execPath,
    ['--import', 'tsx', join(ROOT, 'src', 'cli.ts'), 'serve', '--model', path, '--port', '0', '--threads', '1', '--max-tokens', String(BUDGET),
      '--window', String(BUDGET / 4), '--max-sessions', String(CONNECTIONS), '--quiet'],
    { stdio: ['ignore', 'inherit', 'pipe'], cwd: ROOT },
  );
  let stderr = '';
  const base = await new Promise<string>((resolve, reject) => {
    child.stderr!.on('data', (d: Buffer) => {
      stderr += d.toString();
      const m = /at (http:\/\/\S+)\/v1/.exec(stderr);
      if (m) resolve(m[1]!);
    });
    child.once('exit', (code) => reject(new Error(`server exited with ${code}: ${stderr}`)));
  });
  const modelId = 'server';

  // Each connection has at most one request in flight, so a pool of CONNECTIONS sessions always has a free one.
  const free = Array.from({ length: CONNECTIONS }, (_, i) => `bench-${i}`);
  const turns = new Map<string, number>();
  const figures = new Map<string, SessionFigures>();
  let badBodies = 0;

  // One warm-up request (model pages, first context).
  await fetch(`${base}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ messages: [{ role: 'user', content: 'warm up' }], max_tokens: 4 }) });

  const result = await autocannon({
    url: base,
    connections: CONNECTIONS,
    duration: DURATION,
    requests: [
      {
        method: 'POST',
        path: '/v1/chat/completions',
        headers: { 'content-type': 'application/json' },
        setupRequest: (req: autocannon.Request, context: { user?: string }) => {
          const user = free.shift() ?? `bench-${Math.floor(Math.random() * CONNECTIONS)}`;
          context.user = user;
          const t = (turns.get(user) ?? 0) + 1;
          turns.set(user, t);
          req.body = JSON.stringify({
            model: modelId, user, max_tokens: MAX_NEW, temperature: 0.8, seed: t,
            messages: [{ role: 'user', content: `turn ${t}: tell me one short thing about the river, number ${t % 97}` }],
          });
          return req;
        },
        onResponse: (status: number, body: string, context: { user?: string }) => {
          const user = context.user!;
          if (!free.includes(user)) free.push(user);
          if (status !== 200) return;
          try {
            const fm = JSON.parse(body).finite_memory;
            const prev = figures.get(user);
            figures.set(user, {
              turns: fm.chat.turns, evictions: fm.chat.evictions, tokensSeen: fm.chat.tokensSeen,
              maxRetained: Math.max(prev?.maxRetained ?? 0, fm.chat.tokensRetained),
            });
          } catch {
            badBodies++;
          }
        },
      },
    ],
  });

  const metrics = await (await fetch(`${base}/metrics`)).text();
  const metric = (name: string) =>
    metrics.split('\n').filter((l) => l.startsWith(name + '{') || l.startsWith(name + ' ')).reduce((s, l) => s + Number(l.split(' ').at(-1)), 0);

  const t0 = performance.now();
  child.kill('SIGTERM');
  const exitCode = await new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const shutdownMs = performance.now() - t0;

  const sessions = [...figures.values()];
  const maxRetained = Math.max(0, ...sessions.map((s) => s.maxRetained));
  const errors = result.errors + result.timeouts + result.non2xx + badBodies;
  const row = `| ${CONNECTIONS} | ${DURATION} s | ${MAX_NEW} | ${result.requests.total} | ${result.requests.average.toFixed(1)} | ` +
    `${result.latency.p50.toFixed(1)} | ${result.latency.p99.toFixed(1)} | ${errors} | ${sessions.reduce((s, f) => s + f.turns, 0)} | ` +
    `${maxRetained} / ${BUDGET} | ${metric('finite_memory_evictions_total')} | ${shutdownMs.toFixed(0)} ms (exit ${exitCode}) |`;
  const out = [
    `## HTTP server under load (\`npx tsx bench/server.ts\`${DURATION !== 10 ? ` --duration ${DURATION}` : ''})`,
    '',
    `- machine: ${machine()}`,
    `- \`finite-memory-llm serve\` in a child process (defaults: maxConcurrent = UV_THREADPOOL_SIZE - 1 = 3), autocannon in the bench process, loopback`,
    `- generated model 4 layers x 4 KV heads x 32 head dim (F16), policy sliding, maxTokens ${BUDGET}, 1 thread per chat; ` +
      `each connection continues its own session (\`user\`), one new message per request, non-streaming, max_tokens ${MAX_NEW}`,
    '',
    '| connections | duration | max_tokens | requests | req/s | p50 ms | p99 ms | errors | session turns | max retained / budget | evictions | SIGTERM to exit |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|',
    row,
    '',
    `errors = connection errors (${result.errors}) + timeouts (${result.timeouts}) + non-2xx (${result.non2xx}) + unparsable bodies (${badBodies}).`,
    'Every request prefills only its new message: the session turn count grows, the retained tokens never pass the budget.',
  ].join('\n');
  console.log(out);
  if (!process.argv.includes('--no-write')) writeResultsSection('server', out);
  if (errors > 0 || maxRetained > BUDGET || exitCode !== 0) process.exitCode = 1;
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
