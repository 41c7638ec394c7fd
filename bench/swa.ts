// What in-place eviction costs on sliding-window models: their SWA layers must keep the whole
// budget (llama.cpp's swa_full) so the cache can K-shift, instead of a window-sized cache that
// cannot. Side by side in one run on a model with Gemma 3 1B's geometry (seeded random weights):
// KV buffers allocated and the decode time per token, swa_full on vs off; then what keeping the window
// through tokens removed again costs (kv_window_save at every turn, kv_window_restore when a turn is
// rolled back) against a short message's prefill.
//
//   npx tsx bench/swa.ts [--contexts=1024,2048,4096] [--steps=16] [--no-write]
import { getProbes } from '../src/local/binding.ts';
import { writeModel, type ModelInput } from '../src/gguf/index.ts';
import { loadModel } from '../src/index.ts';
import { cachedModel, machine, writeResultsSection } from './common.ts';

const args = process.argv.slice(2);
const arg = (name: string) => args.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
const CONTEXTS = (arg('contexts') ?? '1024,2048,4096').split(',').map(Number);
const STEPS = Number(arg('steps') ?? 24);
const THREADS = Number(arg('threads') ?? 2);

/** Gemma 3 1B: 26 layers, hidden 1152, 4 query / 1 KV head x 256, FFN 6912, window 512, every 6th layer global. */
const GEMMA3_1B: ModelInput = { family: 'gemma3', layers: 26, embd: 1152, heads: 4, kvHeads: 1, headDim: 256, ffn: 6912, slidingWindow: 512, swaPattern: 6, type: 'q8_0', ctx: 32768, seed: 1 };

const gemmaModel = () => cachedModel('gemma3-1b-shape-q8_0-seed1.gguf', (p) => writeModel(p, GEMMA3_1B));

const mib = (b: number) => (b / 2 ** 20).toFixed(1);

async function main() {
  const model = await loadModel(gemmaModel(), { threads: THREADS });
  const probes = getProbes();
  const setup = [
    `- machine: ${machine()}`,
    `- model: Gemma 3 1B geometry (26 layers: 22 sliding with window 512, 4 global; hidden 1152, 4 query / 1 KV head x 256, FFN 6912, Q8_0), seeded random weights, ${(model.info.nParams / 1e6).toFixed(0)}M parameters`,
    `- one sequence per context, F16 KV, flash attention off, ${THREADS} threads, n_ubatch = min(512, context); both contexts filled alike to context - ${STEPS + 1} tokens, then ${STEPS} one-token decodes in each, interleaved (order alternating); medians`,
    `- swa_full off: llama.cpp's SWA cache of pad256(min(context, window + n_ubatch)) cells, which cannot K-shift once smaller than the context; on: every layer holds the context (what finite memory uses)`,
    `- window snapshot (swa_full on, out-of-window cells pruned as a chat's are): the save every turn pays and the restore an aborted turn pays, against the prefill of a short message (32 tokens) at the fill; medians of 5`,
  ];
  console.log(setup.join('\n'));
  const rows = ['| context | swa_full | can K-shift | KV allocated (MiB) | decode ms/token | KV: on / off | decode: on / off |', '|---:|---|---|---:|---:|---:|---:|'];
  const windowRows = ['| context | snapshot (MiB) | save ms | restore ms | prefill of 32 tokens ms | save / prefill |', '|---:|---:|---:|---:|---:|---:|'];
  for (const context of CONTEXTS) {
    const r = await probes.swaCost(model._native(), context, STEPS, THREADS);
    for (const [name, x] of [['off', r.off], ['on', r.on]] as const) {
      console.log(`context ${r.context} swa_full ${name}: can shift ${x.canShift}, KV ${mib(x.kvBytes)} MiB, decode ${x.decodeMs.toFixed(1)} ms`);
    }
    rows.push(`| ${r.context} | off | ${r.off.canShift ? 'yes' : 'no'} | ${mib(r.off.kvBytes)} | ${r.off.decodeMs.toFixed(1)} |  |  |`);
    rows.push(`| ${r.context} | on | ${r.on.canShift ? 'yes' : 'no'} | ${mib(r.on.kvBytes)} | ${r.on.decodeMs.toFixed(1)} | ${(r.on.kvBytes / r.off.kvBytes).toFixed(2)}x | ${(r.on.decodeMs / r.off.decodeMs).toFixed(2)}x |`);
    console.log(`context ${r.context} window snapshot: ${mib(r.windowBytes)} MiB, save ${r.windowSaveMs.toFixed(2)} ms, restore ${r.windowRestoreMs.toFixed(2)} ms, prefill of ${r.prefillTokens} tokens ${r.prefillMs.toFixed(1)} ms`);
    windowRows.push(`| ${r.context} | ${mib(r.windowBytes)} | ${r.windowSaveMs.toFixed(2)} | ${r.windowRestoreMs.toFixed(2)} | ${r.prefillMs.toFixed(1)} | ${(r.windowSaveMs / r.prefillMs).toFixed(3)} |`);
  }
  model.dispose();
  const body = [`Command: \`npx tsx bench/swa.ts\``, '', ...setup, '', rows.join('\n'), '', windowRows.join('\n')].join('\n');
  console.log(`\n${body}`);
  if (!args.includes('--no-write')) writeResultsSection('swa', `## Sliding-window models: the cost of a shiftable cache\n\n${body}`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
