// Eviction microbenchmark: what one eviction costs in the KV cache, for realistic KV geometries,
// with positions kept (seq_rm alone; the default) and compacted (seq_rm, then a seq_add per kept
// run, whose K-shift runs in the next decode), side by side.
//   npm run bench:evict [-- --quick] [-- --no-write]
// For cache sizes C and evicted counts k (contiguous: the oldest k after the sinks; scattered: every
// other token), natively timed (medians): the removal, the next 1-token decode and a plain 1-token
// decode on the same cache. An eviction costs removal + (next - plain). The K-shift rotates the keys
// of every cell of every layer, so its effective bandwidth is 2 x (K cache bytes) / (next - plain),
// compared with this machine's memcpy bandwidth measured in the same run. Also: policy selection time.
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { getProbes } from '../src/local/binding.ts';
import { writeLlamaModel } from '../src/gguf/index.ts';
import { loadModel, POLICIES } from '../src/index.ts';
import { machine, ROOT, writeResultsSection } from './common.ts';

const quick = process.argv.includes('--quick');
const THREADS = 2;
const GEOMETRIES = [
  { name: 'Llama-3.2-1B-like', layers: 16, kvHeads: 8, headDim: 64 },
  { name: 'Llama-3-8B-like', layers: 32, kvHeads: 8, headDim: 128 },
];
const CONTEXTS = quick ? [512, 2048] : [512, 2048, 8192];
const reps = (c: number) => (c >= 8192 ? 3 : c >= 2048 ? 5 : 9);

const fmt = (x: number, d = 3) => (Number.isFinite(x) ? x.toFixed(d) : 'n/a');
const gb = (bytes: number) => (bytes / 1e9).toFixed(2);

async function main() {
  const b = getProbes();
  const memcpy = b.benchMemcpy(256 * 2 ** 20, 9);
  const setup = [
    `machine: ${machine()}`,
    `threads ${THREADS}, F16 KV cache, flash attention auto, 4 sink tokens; medians of ${reps(512)}/${reps(2048)}/${reps(8192)} repetitions at C = 512/2048/8192`,
    `memcpy bandwidth (256 MiB, median of 9): ${gb(memcpy)} GB/s`,
  ];
  const dir = mkdtempSync(join(tmpdir(), 'fml-evict-'));
  const rows: string[] = [];
  const series: { name: string; points: [number, number][] }[] = [];
  for (const g of GEOMETRIES) {
    const path = join(dir, `${g.name}.gguf`);
    // Realistic KV geometry (layers x KV heads x head dim); small embedding, FFN and vocabulary keep the weights small.
    writeLlamaModel(path, { layers: g.layers, embd: 256, heads: g.kvHeads, kvHeads: g.kvHeads, headDim: g.headDim, ffn: 256, ctx: 8192, type: 'f16', seed: 3 });
    const model = await loadModel(path, { threads: THREADS, ...(process.env.FML_BENCH_GPU_LAYERS === 'auto' ? { gpuLayers: 'auto' as const } : { gpuLayers: 0 }) });
    setup.push(`${g.name}: ${g.layers} layers x ${g.kvHeads} KV heads x ${g.headDim} head dim (n_embd 256, FFN 256, vocab ${model.info.nVocab})`);
    const points: [number, number][] = [];
    const keepPoints: [number, number][] = [];
    for (const C of CONTEXTS) {
      const counts = [...new Set([1, 32, Math.floor(C / 4)])];
      const r = await b.benchEvict(model._native(), C, counts, reps(C), THREADS);
      for (const keep of r.cases.filter((c) => c.positions === 'keep')) {
        const compact = r.cases.find((c) => c.positions === 'compact' && c.pattern === keep.pattern && c.evicted === keep.evicted)!;
        // What a turn pays for the eviction: the removal and the next decode (which runs the K-shift
        // when compacting), against a plain decode of the same cache.
        const keepCost = keep.rmAddMs + keep.nextDecodeMs;
        const compactCost = compact.rmAddMs + compact.nextDecodeMs;
        const kshift = compact.nextDecodeMs - compact.plainDecodeMs;
        const rate = kshift > 0 ? (2 * r.kBytes) / (kshift / 1000) : NaN;
        rows.push(
          `| ${g.name} | ${C} | ${keep.pattern} | ${keep.evicted} | ${keep.seqRmCalls}/${compact.seqAddCalls} | ${fmt(keep.plainDecodeMs)} | ${fmt(keep.rmAddMs)} | ${fmt(keep.nextDecodeMs)} | ` +
            `${fmt(compact.rmAddMs)} | ${fmt(compact.nextDecodeMs)} | ${Number.isFinite(rate) ? gb(rate) : 'n/a'} (${Number.isFinite(rate) ? ((rate / memcpy) * 100).toFixed(0) + '%' : 'n/a'}) | **${fmt(compactCost / keepCost, 1)}x** |`,
        );
        if (keep.pattern === 'contiguous' && keep.evicted === 32) {
          points.push([C, compactCost]);
          keepPoints.push([C, keepCost]);
        }
      }
      console.error(`[evict] ${g.name} C=${C} done (fill ${(r.fillMs / 1000).toFixed(1)} s, KV ${(r.kvBytes / 2 ** 20).toFixed(0)} MiB)`);
    }
    series.push({ name: `${g.name}: compacted (K-shift), removal + next decode ms (k=32)`, points });
    series.push({ name: `${g.name}: kept positions, removal + next decode ms (k=32)`, points: keepPoints });
    model.dispose();
  }

  // Policy selection time (no model: synthetic ledger with 256-dim embeddings), evicting 25% of C.
  // Every policy with its defaults (importance and hybrid: importanceScore 'blend', two more ranks over
  // the spans), and those two with 'mean' for comparison.
  const planners = [...POLICIES.map((p) => ({ label: p, options: { policy: p } })),
    ...(['importance', 'hybrid'] as const).map((p) => ({ label: `${p} ('mean')`, options: { policy: p, importanceScore: 'mean' } }))];
  const policyRows: string[] = [];
  for (const C of CONTEXTS) {
    const cells = planners.map(({ options }) =>
      fmt(b.benchPolicyPlan({ ...options, maxTokens: C, windowSize: Math.floor(C / 4), sinkTokens: 4 }, C, Math.floor(C / 4), 256, 9), 3),
    );
    policyRows.push(`| ${C} | ${cells.join(' | ')} |`);
  }

  const out = [
    '## Eviction microbenchmark (`npm run bench:evict`)',
    '',
    ...setup.map((s) => `- ${s}`),
    '',
    'k = tokens evicted; rm/add = seq_rm calls / seq_add calls when compacting; times in ms (medians). A turn pays for an',
    'eviction the removal and the next 1-token decode; plain = a 1-token decode of the same cache with nothing pending.',
    'With positions kept the next decode is a plain one; compacted, it runs the K-shift of every cell of every layer,',
    'whose bandwidth (2 x the K cache bytes: read + write) is shown as a share of memcpy. Ratio = compacted / kept (removal + next decode).',
    '',
    '| geometry | C | pattern | k | rm/add calls | plain decode | kept: seq_rm | kept: next decode | compacted: seq_rm + seq_add | compacted: next decode (K-shift) | K-shift GB/s (of memcpy) | ratio |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|',
    ...rows,
    '',
    `Policy selection (plan) time, ms, median of 9, evicting 25% of C from a synthetic ledger with 256-dim embeddings:`,
    '',
    `| C | ${planners.map((p) => p.label).join(' | ')} |`,
    `|---|${planners.map(() => '---').join('|')}|`,
    ...policyRows,
  ];
  let svg = '';
  try {
    const { lineChart } = await import('./svg.ts');
    svg = lineChart({ title: 'Eviction cost vs cache size (k = 32, contiguous): kept vs compacted positions', xLabel: 'cache cells C', yLabel: 'ms', series });
  } catch {}
  if (svg) out.push('', '![Eviction cost, kept vs compacted positions](evict.svg)');
  const text = out.join('\n');
  console.log(text);
  if (!process.argv.includes('--no-write')) {
    writeResultsSection('evict', text);
    if (svg) writeFileSync(join(ROOT, 'bench', 'evict.svg'), svg);
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
