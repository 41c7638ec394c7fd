// Moving the positions of an M-RoPE chat (Qwen3.5/3.6, Qwen2-VL, Qwen3-VL): llama.cpp has no K-shift
// for multi-section positions, so a compaction used to clear the chat's cells and re-prefill its
// retained tokens at 0..n-1. This library now rotates the keys where they are (kv-internals,
// kv_rotate_positions). Side by side on the Qwen3.5-2B-shaped hybrid, for H retained tokens: moving
// every position (the most a compaction moves) by rotation, and the re-prefill of the same H tokens
// that a compaction cost before.
//   npx tsx bench/mrope-shift.ts [--no-write]
import { availableParallelism } from 'node:os';
import { loadModel } from '../src/index.ts';
import { machine, median, qwen35Model, writeResultsSection } from './common.ts';

const HISTORIES = [512, 2048];
const ROTATIONS = 7;
const REPREFILLS = 3;

async function main() {
  const m = qwen35Model();
  const threads = availableParallelism();
  const model = await loadModel(m.path, { threads, slots: 1 });
  const words = model.tokenize(' the cat sat on the mat and looked at the sea while the rain fell'.repeat(200));
  const rows: string[] = [];
  for (const kvType of ['f16', 'q8_0'] as const) for (const h of HISTORIES) {
    // q8_0: keys back to F32 and out of llama.cpp's Hadamard rotation, turned, rotated and quantized again.
    const chat = model.createChat({ maxTokens: 4096, policy: 'sliding', kvType });
    const internals = chat._internals();
    internals.evaluateTokens(words.slice(0, h), 512);
    const rotate: number[] = [];
    for (let i = 0; i < ROTATIONS; i++) {
      // Every retained key moves (away and back: the chat ends where it began).
      const t0 = performance.now();
      internals.shiftPositions(i % 2 ? -1000 : 1000);
      rotate.push(performance.now() - t0);
    }
    internals.shiftPositions(-1000);
    const reprefill: number[] = [];
    for (let i = 0; i < REPREFILLS; i++) reprefill.push(internals.replayHistory());
    chat.dispose();
    const r = median(rotate);
    const p = median(reprefill);
    rows.push(`| ${kvType} | ${h} | ${r.toFixed(2)} | ${p.toFixed(0)} | ${(p / r).toFixed(0)}x |`);
    console.log(rows.at(-1));
  }
  model.dispose();
  const out = [
    '## Moving an M-RoPE chat\'s positions: keys rotated vs re-prefilled (`npx tsx bench/mrope-shift.ts`)',
    '',
    `- machine: ${machine()}`,
    `- model: ${m.name}: ${m.about}; ${threads} threads, one chat with H tokens of history (q8_0 KV: flash attention on, as it needs)`,
    `- rotation: every retained key moved by 1000 positions (kv_rotate_positions, as a compaction or a summary's move now runs it), timed from JS around the probe, median of ${ROTATIONS}; re-prefill: the chat's cells cleared and its H tokens decoded again at 0..H-1 (how M-RoPE chats compacted before), median of ${REPREFILLS}`,
    '- that the rotation is right is what tests check (test/model/families.test.ts: every position shifted by 40 leaves the logits unchanged, F32 KV; test/model/positions.test.ts: within 0.2 for q8_0; both fail with a wrong rotation)',
    '',
    '| KV | H retained tokens | rotation ms | re-prefill ms | re-prefill / rotation |',
    '|---|---|---|---|---|',
    ...rows,
  ].join('\n');
  console.log(out);
  if (!process.argv.includes('--no-write')) writeResultsSection('mrope-shift', out);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
