// Memory over a long chat: RSS, KV bytes in use and retained tokens sampled every 100 turns.
//   npm run bench:soak [-- --turns 10000] [-- --no-write]
// They must stay flat: the KV cache is sized by maxTokens, and nothing else grows per turn.
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeLlamaModel } from '../src/gguf/index.ts';
import { loadModel, POLICIES, type PolicyName } from '../src/index.ts';
import { machine, ROOT, writeResultsSection } from './common.ts';

const arg = (name: string, def: string) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
};
const TURNS = Number(arg('turns', '2000'));
const MAX_TOKENS = 512;
const SAMPLE_EVERY = 100;

async function main() {
  const dir = mkdtempSync(join(tmpdir(), 'fml-soak-'));
  const path = join(dir, 'soak.gguf');
  writeLlamaModel(path, { layers: 4, embd: 128, heads: 4, kvHeads: 4, headDim: 32, ffn: 256, type: 'f16', seed: 5 });
  const model = await loadModel(path, { threads: 1 });
  const policies: PolicyName[] = process.argv.includes('--all-policies') ? [...POLICIES] : ['sliding', 'hybrid'];
  const mib = (b: number) => b / 2 ** 20;
  const series: { name: string; points: [number, number][] }[] = [];
  const rows: string[] = [];
  for (const policy of policies) {
    const chat = model.createChat({ policy, maxTokens: MAX_TOKENS, windowSize: 128, systemPrompt: 'You are a terse assistant.', threads: 1 });
    const rss: [number, number][] = [];
    const retained: [number, number][] = [];
    const kv: [number, number][] = [];
    const t0 = performance.now();
    for (let t = 1; t <= TURNS; t++) {
      await chat.send(`turn ${t}: say something about number ${t % 97}`, { maxNewTokens: 16, temperature: 0.8, seed: t });
      if (t % SAMPLE_EVERY === 0) {
        const s = chat.stats();
        rss.push([t, mib(process.memoryUsage().rss)]);
        retained.push([t, s.tokensRetained]);
        kv.push([t, mib(s.kvBytes)]);
      }
    }
    const s = chat.stats();
    const rssValues = rss.map(([, v]) => v);
    const late = rss.filter(([t]) => t > TURNS / 10).map(([, v]) => v);
    rows.push(
      `| ${policy} | ${TURNS} | ${s.tokensSeen} | ${Math.min(...retained.map(([, v]) => v))}-${Math.max(...retained.map(([, v]) => v))} | ` +
        `${Math.max(...kv.map(([, v]) => v)).toFixed(2)} | ${rssValues[0]!.toFixed(1)} | ${rssValues.at(-1)!.toFixed(1)} | ` +
        `${(Math.max(...late) - Math.min(...late)).toFixed(1)} | ${((performance.now() - t0) / 1000).toFixed(1)} |`,
    );
    series.push({ name: `${policy}: RSS MiB`, points: rss }, { name: `${policy}: retained tokens / 10`, points: retained.map(([t, v]) => [t, v / 10]) });
    console.error(`[soak] ${policy}: ${TURNS} turns done`);
    chat.dispose();
  }
  model.dispose();
  const out = [
    `## Memory over long chats (\`npm run bench:soak\`${TURNS !== 2000 ? ` -- --turns ${TURNS}` : ''})`,
    '',
    `- machine: ${machine()}`,
    `- generated model 4 layers x 4 KV heads x 32 head dim (F16 weights and KV), maxTokens ${MAX_TOKENS}, windowSize 128, 16 new tokens per turn, sampled every ${SAMPLE_EVERY} turns`,
    '',
    '| policy | turns | tokens seen | retained (min-max of samples) | KV MiB in use (max) | RSS MiB at turn 100 | RSS MiB at the end | RSS spread after the first 10% (MiB) | wall s |',
    '|---|---|---|---|---|---|---|---|---|',
    ...rows,
  ];
  let svg = '';
  try {
    const { lineChart } = await import('./svg.ts');
    svg = lineChart({ title: `RSS and retained tokens over ${TURNS} turns`, xLabel: 'turn', yLabel: 'MiB / tokens÷10', series });
  } catch {}
  if (svg) out.push('', '![memory over turns](soak.svg)');
  const text = out.join('\n');
  console.log(text);
  if (!process.argv.includes('--no-write')) {
    writeResultsSection('soak', text);
    if (svg) writeFileSync(join(ROOT, 'bench', 'soak.svg'), svg);
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
