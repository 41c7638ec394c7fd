/**
 * Generate a tiny GGUF model of one family with seeded random weights.
 *
 *   npm run make-model -- --out model.gguf [--arch FAMILY (see --help)
 *       --layers 2 --embd 64 --heads 4 --kv-heads 2 --head-dim 16 --ffn 128 --ctx 4096
 *       --type f32|f16|q8_0 --seed 42 --vocab-extra N
 *       hybrids: --attention-interval 2 --rope-dims 0 --ssm-state 16 --ssm-groups 2 --ssm-heads 4 --conv-kernel 0
 *       MoE: --experts 4 --experts-used 2; --yarn-factor N]
 *
 * Without --arch it writes the llama model with the ChatML template that most tests use.
 */
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import {
  DEFAULT_LLAMA_MODEL_OPTIONS,
  DEFAULT_MODEL_OPTIONS,
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
Family options (ignored by the others):
  --attention-interval <n>  qwen35, qwen35moe, qwen3next, lfm2, granite4, nemotron3 (of its mixers): layer i attends when i + 1 is a multiple of n [${DEFAULT_MODEL_OPTIONS.attentionInterval}]
  --rope-dims <n>        qwen35, qwen35moe, qwen3next: rotary dimensions per head; glm4moe: too (0: half the head); deepseek2, deepseek3: of the shared rotary key (0: the head dim; deepseek2, deepseek3: half of it) [${DEFAULT_MODEL_OPTIONS.ropeDims}]
  --ssm-state <n>        qwen35, qwen35moe, qwen3next: Gated DeltaNet head size (16, 32, 64 or 128); granite4, nemotron3: Mamba-2 state size [${DEFAULT_MODEL_OPTIONS.ssmStateSize}]
  --ssm-groups <n>       qwen35, qwen35moe, qwen3next: DeltaNet key heads; granite4, nemotron3: Mamba-2 groups [${DEFAULT_MODEL_OPTIONS.ssmGroups}]
  --ssm-heads <n>        qwen35, qwen35moe, qwen3next: DeltaNet value heads; granite4, nemotron3: Mamba-2 heads [${DEFAULT_MODEL_OPTIONS.ssmHeads}]
  --conv-kernel <n>      qwen35, qwen35moe, qwen3next, granite4, nemotron3: DeltaNet / Mamba-2 convolution; lfm2: short convolution (0: 4 / 3) [${DEFAULT_MODEL_OPTIONS.convKernel}]
  --experts <n>          qwen3moe, qwen35moe, qwen3next, gptoss, deepseek2, deepseek3, glm4moe, nemotron3: experts per layer [${DEFAULT_MODEL_OPTIONS.experts}]
  --experts-used <n>     qwen3moe, qwen35moe, qwen3next, gptoss, deepseek2, deepseek3, glm4moe, nemotron3: experts per token [${DEFAULT_MODEL_OPTIONS.expertsUsed}]
  --yarn-factor <n>      YaRN context extension factor (0: the family's, 32 for gptoss, none for the others) [${DEFAULT_MODEL_OPTIONS.yarnFactor}]
  --shared-kv-layers <n> gemma4: the last layers that read earlier layers' KV instead of their own (Gemma 4 E2B/E4B) [${DEFAULT_MODEL_OPTIONS.sharedKvLayers}]
  --nextn-layers <n>     deepseek2, deepseek3, glm4moe: multi-token-prediction blocks declared after the trunk (no tensors, as a main model's GGUF; 0: 1 for deepseek3 and glm4moe) [${DEFAULT_MODEL_OPTIONS.nextnLayers}]
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
      'attention-interval': { type: 'string' },
      'rope-dims': { type: 'string' },
      'ssm-state': { type: 'string' },
      'ssm-groups': { type: 'string' },
      'ssm-heads': { type: 'string' },
      'conv-kernel': { type: 'string' },
      experts: { type: 'string' },
      'experts-used': { type: 'string' },
      'yarn-factor': { type: 'string' },
      'nextn-layers': { type: 'string' },
      'shared-kv-layers': { type: 'string' },
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
  const familyOptions = {
    attentionInterval: parseIntArg('attention-interval', values['attention-interval']),
    ropeDims: parseIntArg('rope-dims', values['rope-dims']),
    ssmStateSize: parseIntArg('ssm-state', values['ssm-state']),
    ssmGroups: parseIntArg('ssm-groups', values['ssm-groups']),
    ssmHeads: parseIntArg('ssm-heads', values['ssm-heads']),
    convKernel: parseIntArg('conv-kernel', values['conv-kernel']),
    experts: parseIntArg('experts', values.experts),
    expertsUsed: parseIntArg('experts-used', values['experts-used']),
    yarnFactor: parseIntArg('yarn-factor', values['yarn-factor']),
    nextnLayers: parseIntArg('nextn-layers', values['nextn-layers']),
    sharedKvLayers: parseIntArg('shared-kv-layers', values['shared-kv-layers']),
  };
  const r = values.arch === undefined ? writeLlamaModel(out, options) : writeModel(out, { ...options, ...familyOptions, family: values.arch as ModelFamily });
  const ms = performance.now() - t0;
  const o = r.options;
  const hybrid = ['qwen35', 'qwen35moe', 'qwen3next', 'lfm2', 'granitehybrid', 'nemotron_h_moe'].includes(r.arch);
  // Nemotron 3's mixers (Mamba-2 or attention) are its even layers; the odd ones hold experts.
  const mixers = r.arch === 'nemotron_h_moe' ? Math.ceil(o.layers / 2) : o.layers;
  const attentionLayers = Math.floor(mixers / o.attentionInterval);

  const lines = [
    `wrote ${out}`,
    `  architecture  ${r.arch}, ${o.layers} layers, embd ${o.embd}, ffn ${o.ffn}, ctx ${o.ctx}`,
    `  attention     ${o.heads} heads x ${o.headDim} (q ${o.heads * o.headDim}), ${o.kvHeads} kv heads (kv ${o.kvHeads * o.headDim})`,
    r.arch === 'deepseek2'
      ? `  kv cache      ${o.layers * (4 * o.headDim + (o.ropeDims || o.headDim / 2))} values per token (latent attention: each layer's latent and shared rotary key; no values)`
      : hybrid
        ? `  kv cache      ${2 * attentionLayers * o.kvHeads * o.headDim} values per token (the ${attentionLayers} attention layers, K+V; ${mixers - attentionLayers} more keep a recurrent state)`
        : `  kv cache      ${2 * o.layers * o.kvHeads * o.headDim} values per token (all layers, K+V)`,
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
