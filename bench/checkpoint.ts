// Checkpoints as bytes: how big each kind is and what taking and restoring one costs, on the
// realistic-geometry model (Qwen2.5-0.5B's shape) with a chat past its budget. Full: the KV state
// travels, a restore decodes nothing. Ledger: the retained tokens and their bookkeeping travel, a
// restore prefills them once, in the first steps of the restored chat's next turn. And what a
// restore costs the other chats: the longest gap between a streaming chat's tokens meanwhile.
//   npx tsx bench/checkpoint.ts [--no-write]
import { availableParallelism } from 'node:os';
import { loadModel } from '../src/index.ts';
import { machine, median, realisticModel, writeResultsSection } from './common.ts';

const BUDGETS = [256, 1024];
const REPS = 5;

async function main() {
  const m = realisticModel();
  const threads = availableParallelism();
  const model = await loadModel(m.path, { threads });
  const rows: string[] = [];
  for (const maxTokens of BUDGETS) {
    const chat = model.createChat({ maxTokens, flashAttention: false, policy: 'sliding' });
    for (let t = 0; chat.stats().evictions < 2; t++) {
      await chat.send(`Turn ${t}: tell me something new about the weather in Paris and why it matters to people today.`, { maxNewTokens: 24, temperature: 0 });
    }
    const retained = chat.stats().tokensRetained;
    for (const kind of ['full', 'ledger'] as const) {
      const take: number[] = [];
      const restore: number[] = [];
      let size = 0;
      const gaps: number[] = [];
      const medianGaps: number[] = [];
      for (let r = 0; r < REPS; r++) {
        let t0 = performance.now();
        const bytes = await chat.checkpoint({ kind });
        take.push(performance.now() - t0);
        size = bytes.length;
        // Another chat streams a reply meanwhile: its longest gap between tokens during the restore.
        const streamer = model.createChat({ maxTokens: 256, flashAttention: false, policy: 'sliding' });
        await streamer.send('Hello', { maxNewTokens: 2, temperature: 0 });
        let last = 0;
        let restoring = false;
        const during: number[] = [];
        const all: number[] = [];
        const streaming = streamer.send('Tell me a long story.', {
          maxNewTokens: 200, ignoreEos: true, temperature: 0,
          onToken: () => { const now = performance.now(); if (last > 0) { all.push(now - last); if (restoring) during.push(now - last); } last = now; },
        });
        await new Promise((res) => setTimeout(res, 300));
        restoring = true;
        t0 = performance.now();
        const back = await model.loadChat(bytes);
        await back.send('And then?', { maxNewTokens: 1, temperature: 0 });
        restore.push(performance.now() - t0);
        restoring = false;
        await streaming;
        gaps.push(Math.max(0, ...during));
        medianGaps.push(median(all));
        back.dispose();
        streamer.dispose();
      }
      rows.push(`| ${maxTokens} | ${retained} | ${kind} | ${(size / 1024).toFixed(1)} KiB | ${(size / retained).toFixed(0)} | ${median(take).toFixed(1)} | ${median(restore).toFixed(1)} | ${median(gaps).toFixed(0)} (${median(medianGaps).toFixed(1)}) |`);
    }
    chat.dispose();
  }
  model.dispose();
  const out = [
    '## Checkpoints as bytes (`npx tsx bench/checkpoint.ts`)',
    '',
    `- machine: ${machine()}`,
    `- model: ${m.name}: ${m.about}; ${threads} threads, F16 KV, flash attention off; a chat past its budget (two evictions), medians of ${REPS}`,
    '- take: `chat.checkpoint({ kind })` until the bytes are in JS; restore: `model.loadChat(bytes)` and the restored chat\'s first turn (one token), which prefills a ledger\'s retained tokens in its first steps',
    '- meanwhile another chat streams a 200-token reply: the longest gap between its tokens during the restore (median over the reps), and in brackets its median gap',
    '',
    '| maxTokens | retained tokens | kind | size | bytes a retained token | take ms | restore + first turn ms | streaming chat: longest gap ms (median) |',
    '|---|---|---|---|---|---|---|---|',
    ...rows,
  ].join('\n');
  console.log(out);
  if (!process.argv.includes('--no-write')) writeResultsSection('checkpoint-bytes', out);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
