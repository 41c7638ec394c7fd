/**
 * Generate a tiny GGUF model of one family with seeded random weights.
 *
 *   npm run make-model -- --out model.gguf [--arch llama|mistral|qwen2|qwen3|gemma3|phi3|qwen3moe|qwen2vl|mamba
 *       --layers 2 --embd 64 --heads 4 --kv-heads 2 --head-dim 16 --ffn 128 --ctx 4096
 *       --type f32|f16|q8_0 --seed 42 --vocab-extra N]
 *
 * Without --arch it writes the llama model with the ChatML template that most tests use.
 */
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import {
  DEFAULT_LLAMA_MODEL_OPTIONS,
  MODEL_FAMILIES,
  MODEL_FAMILY_NAMES,
  WEIGHT_TYPES,
  writeLlamaModel,
  writeModel,
  type LlamaModelInput,
  type ModelFamily,
  type WeightType,
} from '../src/gguf/index.ts';

const d = DEFAULT_LLAMA_MODEL_OPTIONS;

const USAGE = `Usage: make-model --out <file.gguf> [options]

Options (defaults in brackets):
  --out, -o <path>       output GGUF file (required)
  --arch <family>        ${MODEL_FAMILY_NAMES.join(' | ')} [llama with ChatML]
${MODEL_FAMILY_NAMES.map((f) => `                           ${f}: ${MODEL_FAMILIES[f].about}`).join('\n')}
  --layers <n>           transformer blocks [${d.layers}]
  --embd <n>             embedding size [${d.embd}]
  --heads <n>            attention heads [${d.heads}]
  --kv-heads <n>         key/value heads [${d.kvHeads}]
  --head-dim <n>         per-head dimension [${d.headDim}]
  --ffn <n>              feed-forward size [${d.ffn}]
  --ctx <n>              context length (llama.context_length) [${d.ctx}]
  --type <t>             weight type: ${WEIGHT_TYPES.join(' | ')} [${d.type}]
  --seed <n>             PRNG seed [${d.seed}]
  --vocab-extra <n>      extra generated vocabulary pieces [${d.vocabExtra}]
  --name <s>             general.name
  --help, -h             show this help
`;

function parseIntArg(name: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  if (!/^-?\d+$/.test(value.trim())) throw new Error(`--${name} expects an integer, got "${value}"`);
  return Number.parseInt(value, 10);
}

function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 * 1024 * 1024) return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  return `${(n / 1024 / 1024 / 1024).toFixed(2)} GiB`;
}

function main(argv: string[]): number {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      out: { type: 'string', short: 'o' },
      arch: { type: 'string' },
      layers: { type: 'string' },
      embd: { type: 'string' },
      heads: { type: 'string' },
      'kv-heads': { type: 'string' },
      'head-dim': { type: 'string' },
      ffn: { type: 'string' },
      ctx: { type: 'string' },
      type: { type: 'string' },
      seed: { type: 'string' },
      'vocab-extra': { type: 'string' },
      name: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });

  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (!values.out) {
    process.stderr.write(`error: --out is required\n\n${USAGE}`);
    return 2;
  }
  let type: WeightType | undefined;
  if (values.type !== undefined) {
    const t = values.type.toLowerCase();
    if (!(WEIGHT_TYPES as readonly string[]).includes(t)) {
      throw new Error(`--type must be one of ${WEIGHT_TYPES.join(', ')}, got "${values.type}"`);
    }
    type = t as WeightType;
  }

  const options: LlamaModelInput = {
    layers: parseIntArg('layers', values.layers),
    embd: parseIntArg('embd', values.embd),
    heads: parseIntArg('heads', values.heads),
    kvHeads: parseIntArg('kv-heads', values['kv-heads']),
    headDim: parseIntArg('head-dim', values['head-dim']),
    ffn: parseIntArg('ffn', values.ffn),
    ctx: parseIntArg('ctx', values.ctx),
    seed: parseIntArg('seed', values.seed),
    vocabExtra: parseIntArg('vocab-extra', values['vocab-extra']),
    type,
    name: values.name,
  };

  const out = path.resolve(values.out);
  const t0 = performance.now();
  if (values.arch !== undefined && !(MODEL_FAMILY_NAMES as readonly string[]).includes(values.arch)) {
    throw new Error(`--arch must be one of ${MODEL_FAMILY_NAMES.join(', ')}, got "${values.arch}"`);
  }
  const r = values.arch === undefined ? writeLlamaModel(out, options) : writeModel(out, { ...options, family: values.arch as ModelFamily });
  const ms = performance.now() - t0;
  const o = r.options;

  const lines = [
    `wrote ${out}`,
    `  architecture  ${r.arch}, ${o.layers} layers, embd ${o.embd}, ffn ${o.ffn}, ctx ${o.ctx}`,
    `  attention     ${o.heads} heads x ${o.headDim} (q ${o.heads * o.headDim}), ${o.kvHeads} kv heads (kv ${o.kvHeads * o.headDim})`,
    `  kv cache      ${2 * o.layers * o.kvHeads * o.headDim} values per token (all layers, K+V)`,
    `  vocab         ${r.nVocab} tokens (bos ${r.specialTokens.bos}, eos ${r.specialTokens.eos}, chat template ${values.arch ?? 'chatml'})`,
    `  weights       ${o.type}, seed ${o.seed}, ${r.nParams.toLocaleString('en-US')} params in ${r.tensors.length} tensors`,
    `  file size     ${r.fileSize} bytes (${formatBytes(r.fileSize)}), written in ${ms.toFixed(0)} ms`,
  ];
  process.stdout.write(lines.join('\n') + '\n');
  return 0;
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (err) {
  process.stderr.write(`error: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
}
