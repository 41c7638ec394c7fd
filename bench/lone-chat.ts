// A lone chat, this build against a baseline checkout (before the shared engine, each chat had its
// own context and its turn ran on libuv's pool): same model, options and turns, run interleaved in
// two child processes so that machine load hits both alike.
//   git worktree add ../fml-before fe26cf9 && (cd ../fml-before && npm ci && npm run build)
//   npx tsx bench/lone-chat.ts --baseline=../fml-before [--turns=30] [--threads=N] [--no-write]
// Without --baseline only this build runs. Each turn: a ~30-token message, 32 greedy tokens, the
// chat's budget (1024) full after the first dozen turns, so measured turns evict.
import { spawn, type ChildProcess } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { machine, median, realisticModel, ROOT, writeResultsSection } from './common.ts';

const args = process.argv.slice(2);
const arg = (name: string) => args.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
const BASELINE = arg('baseline');
const TURNS = Number(arg('turns') ?? 40);
const WARM = Math.floor(TURNS / 2);
const THREADS = Number(arg('threads') ?? availableParallelism());
const WRITE = !args.includes('--no-write') && BASELINE !== undefined;
const MAX_TOKENS = 1024;

// The child: loads the given build's dist/index.js and answers one turn per line on stdin.
const CHILD = `
const [dist, model, threads, maxTokens] = process.argv.slice(1);
const { loadModel } = await import(dist);
const m = await loadModel(model, { threads: Number(threads) });
const chat = m.createChat({ maxTokens: Number(maxTokens), flashAttention: false, policy: 'sliding' });
const rl = (await import('node:readline')).createInterface({ input: process.stdin });
console.log('ready');
for await (const line of rl) {
  const t0 = performance.now();
  const r = await chat.send(line, { maxNewTokens: 32, temperature: 0 });
  console.log(JSON.stringify({ ms: performance.now() - t0, gen: r.stats.generatedTokens, prompt: r.stats.promptTokens, evictions: chat.stats().evictions }));
}`;

interface Child { proc: ChildProcess; next: () => Promise<string> }

function start(dist: string, modelPath: string): Promise<Child> {
  const proc = spawn(process.execPath, ['--input-type=module', '-e', CHILD, dist, modelPath, String(THREADS), String(MAX_TOKENS)], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines = createInterface({ input: proc.stdout! })[Symbol.asyncIterator]();
  const next = async () => {
    const { value, done } = await lines.next();
    if (done) throw new Error(`child for ${dist} exited`);
    return value as string;
  };
  return next().then((first) => {
    if (first !== 'ready') throw new Error(`unexpected child output: ${first}`);
    return { proc, next };
  });
}

const message = (t: number) => `Turn ${t}: tell me something new about the old lighthouse, the river and the small red boat, in one paragraph.`;

async function main() {
  const m = realisticModel();
  const contenders: { name: string; dist: string }[] = [{ name: 'this build (shared engine)', dist: join(ROOT, 'dist', 'index.js') }];
  if (BASELINE) contenders.push({ name: `baseline ${BASELINE} (a context per chat)`, dist: join(resolve(BASELINE), 'dist', 'index.js') });
  const children = await Promise.all(contenders.map((c) => start(c.dist, m.path)));
  const times: number[][] = contenders.map(() => []);
  let evicting = true;
  for (let t = 0; t < TURNS; t++) {
    // Alternate which goes first.
    const order = t % 2 === 0 ? children.map((_, i) => i) : children.map((_, i) => children.length - 1 - i);
    for (const i of order) {
      children[i]!.proc.stdin!.write(`${message(t)}\n`);
      const r = JSON.parse(await children[i]!.next()) as { ms: number; evictions: number };
      if (t >= WARM) {
        times[i]!.push(r.ms);
        evicting &&= r.evictions > 0;
      }
    }
  }
  children.forEach((c) => c.proc.kill());
  const med = times.map((x) => median(x));
  const lines = [
    `Command: \`npx tsx bench/lone-chat.ts --baseline=${BASELINE ?? '<checkout>'}\``,
    '',
    `- machine: ${machine()}`,
    `- model: ${m.name}: ${m.about}`,
    `- one chat, maxTokens ${MAX_TOKENS}, flash attention off, ${THREADS} threads, ${TURNS} turns of 32 greedy tokens; the last ${TURNS - WARM} measured (${evicting ? 'every one evicting' : 'NOT all evicting'}), interleaved turn by turn between the two builds, wall time per send()`,
    '',
    '| build | median turn ms | ratio to this build |',
    '|---|---:|---:|',
    ...contenders.map((c, i) => `| ${c.name} | ${med[i]!.toFixed(0)} | ${(med[i]! / med[0]!).toFixed(3)} |`),
  ];
  const body = lines.join('\n');
  console.log(body);
  if (WRITE) writeResultsSection('lone-chat', `## A lone chat: shared engine vs a context per chat\n\n${body}`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
