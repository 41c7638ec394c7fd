/**
 * The generator's families and options: what each family is (its llama.cpp architecture, chat
 * template and tokenizer quirks), the options a model is written with, their defaults, and the
 * checks that keep a combination llama.cpp would refuse (or abort on) from being written.
 */
import { QK8_0 } from './format.js';
import { TEMPLATES, type TemplateName } from './templates.js';
import { CHATML_TEMPLATE } from './vocab.js';

export type WeightType = 'f32' | 'f16' | 'q8_0';
export const WEIGHT_TYPES: readonly WeightType[] = ['f32', 'f16', 'q8_0'];


/** What each family is: its llama.cpp architecture, its chat template and how it tokenizes. */
export interface FamilySpec {
  arch: string;
  template: TemplateName;
  /** SentencePiece's leading space (Llama 2 / Mistral / Phi-3 tokenizers add one; Gemma's does not). */
  addSpacePrefix: boolean;
  about: string;
  /** transformer blocks when the options give none (the generator's default, 2, is too few for its layer pattern) */
  layers?: number;
  /** multi-token-prediction blocks declared after the trunk when nextnLayers is 0 (the family's GGUFs carry one) */
  nextnLayers?: number;
}

export const MODEL_FAMILIES = {
  llama: { arch: 'llama', template: 'llama3', addSpacePrefix: true, about: 'Llama 3: llama architecture, Llama-3 template' },
  mistral: { arch: 'llama', template: 'mistral', addSpacePrefix: true, about: 'Mistral 7B: llama architecture, [INST] template' },
  qwen2: { arch: 'qwen2', template: 'chatml', addSpacePrefix: false, about: 'Qwen 2/2.5: QKV biases, NEOX RoPE, ChatML' },
  qwen3: { arch: 'qwen3', template: 'qwen3', addSpacePrefix: false, about: 'Qwen 3: per-head q/k RMS norms, NEOX RoPE, ChatML' },
  gemma3: { arch: 'gemma3', template: 'gemma', addSpacePrefix: false, about: 'Gemma 3: interleaved sliding-window layers, q/k and post norms, scaled embeddings, tied output, Gemma template' },
  gemma4: { arch: 'gemma4', template: 'gemma4', addSpacePrefix: false, about: 'Gemma 4: sliding-window layers of headDim and full-attention layers of 2 x headDim, q/k/v norms, scaled embeddings, tied output, Gemma 4 template (framed as ChatML: llama.cpp has no formatter for it)' },
  smollm3: { arch: 'smollm3', template: 'chatml', addSpacePrefix: false, layers: 4, about: 'SmolLM3: the llama layers with every fourth one attending without positions (NoPE), ChatML' },
  phi3: { arch: 'phi3', template: 'phi3', addSpacePrefix: true, about: 'Phi-3: fused QKV and gate/up, NEOX RoPE, Phi-3 template' },
  deepseek2: { arch: 'deepseek2', template: 'deepseek2', addSpacePrefix: false, about: 'DeepSeek-V2-Lite: multi-head latent attention (one compressed key/value latent and one shared rotary key per token), a dense first layer then routed and shared experts, DeepSeek-V2 template' },
  deepseek3: { arch: 'deepseek2', template: 'deepseek3', addSpacePrefix: false, nextnLayers: 1, about: 'DeepSeek-V3/R1 (Kimi K2 and GLM-4.7-Flash share the layout): the latent attention with queries through their own low-rank projection (q-LoRA), sigmoid-routed experts with a selection bias and a shared one after a dense first layer, a multi-token-prediction block after the trunk, DeepSeek-V3 template with think blocks' },
  glm4moe: { arch: 'glm4moe', template: 'glm4', addSpacePrefix: false, nextnLayers: 1, about: 'GLM-4.5/4.6/4.7: QKV biases, NEOX RoPE over half of each head, a dense first layer then routed experts (sigmoid gating with a selection bias) and a shared one, a multi-token-prediction block after the trunk (its KV layer allocated, never attended), ChatGLM-4 template with think blocks' },
  gptoss: { arch: 'gpt-oss', template: 'harmony', addSpacePrefix: false, about: 'gpt-oss: sliding-window layers alternating with full attention, attention sinks, QKV and output biases, routed experts with biases (SwiGLU-OAI), YaRN RoPE, harmony template' },
  qwen3moe: { arch: 'qwen3moe', template: 'qwen3', addSpacePrefix: false, about: 'Qwen3 MoE: routed experts (softmax top-k), q/k norms, ChatML' },
  qwen2vl: { arch: 'qwen2vl', template: 'chatml', addSpacePrefix: false, about: 'Qwen2-VL text model: M-RoPE positions, ChatML' },
  qwen3vl: { arch: 'qwen3vl', template: 'qwen3', addSpacePrefix: false, about: 'Qwen3-VL text model: interleaved M-RoPE, q/k norms, ChatML' },
  qwen35: { arch: 'qwen35', template: 'qwen35', addSpacePrefix: false, about: 'Qwen3.5: Gated DeltaNet layers with every attentionInterval-th layer gated attention (interleaved M-RoPE, partial rotary), Qwen3.5 template' },
  qwen35moe: { arch: 'qwen35moe', template: 'qwen35', addSpacePrefix: false, about: 'Qwen3.5/3.6 MoE: the Qwen3.5 layers with routed and shared experts' },
  qwen3next: { arch: 'qwen3next', template: 'qwen3', addSpacePrefix: false, about: 'Qwen3-Next: the Qwen3.5 MoE layers with plain NEOX RoPE (partial rotary), ChatML' },
  lfm2: { arch: 'lfm2', template: 'lfm2', addSpacePrefix: false, about: 'LFM2: short-convolution layers with every attentionInterval-th layer attention (NEOX RoPE), LFM2.5 template' },
  granite4: { arch: 'granitehybrid', template: 'granite4', addSpacePrefix: false, about: 'Granite 4.0-H: Mamba-2 layers with every attentionInterval-th layer attention without positions (NoPE), Granite 4.0 template' },
  nemotron3: { arch: 'nemotron_h_moe', template: 'chatml', addSpacePrefix: false, layers: 4, about: 'Nemotron 3 Nano: Mamba-2 and attention layers without positions (NoPE), each followed by a layer of routed and shared experts, ChatML' },
  mamba: { arch: 'mamba', template: 'chatml', addSpacePrefix: false, about: 'Mamba: recurrent state (no KV cache), ChatML' },
} as const satisfies Record<string, FamilySpec>;

export type ModelFamily = keyof typeof MODEL_FAMILIES;
export const MODEL_FAMILY_NAMES = Object.keys(MODEL_FAMILIES) as ModelFamily[];

export interface ModelOptions {
  /** model family (architecture, template, tokenizer quirks) */
  family: ModelFamily;
  /** number of transformer blocks */
  layers: number;
  /** embedding (hidden) size */
  embd: number;
  /** attention (query) heads */
  heads: number;
  /** key/value heads (GQA); must divide heads */
  kvHeads: number;
  /** per-head dimension (key_length = value_length = rope dims); qwen2, qwen2vl and phi3 need heads x headDim = embd */
  headDim: number;
  /** feed-forward hidden size (per expert for qwen3moe) */
  ffn: number;
  /** training context length written to <arch>.context_length */
  ctx: number;
  /** storage type of the weight matrices (norms, biases, routers and SSM parameters are always F32) */
  type: WeightType;
  /** PRNG seed; same options + seed produce byte-identical files */
  seed: number;
  /** number of generated extra vocabulary pieces */
  vocabExtra: number;
  /** general.name */
  name: string;
  /** which template's control tokens, end-of-turn token and text the model gets: undefined = the family's */
  template: TemplateName | undefined;
  /** tokenizer.chat_template text: undefined = the template's; null writes none (a base model: plain framing) */
  chatTemplate: string | null | undefined;
  /** gemma3, gemma4, gptoss: sliding-window size of its local layers */
  slidingWindow: number;
  /** gemma3, gemma4, gptoss: every n-th layer is global (full attention), the others slide */
  swaPattern: number;
  /** qwen3moe, qwen35moe, qwen3next, gptoss, deepseek2, deepseek3, glm4moe, nemotron3: experts per layer, and how many each token uses */
  experts: number;
  expertsUsed: number;
  /** qwen35, qwen35moe, qwen3next, lfm2, granite4: layer i attends when (i + 1) is a multiple of this; the others are recurrent */
  attentionInterval: number;
  /** qwen35, qwen35moe, qwen3next: rotary dimensions per head (partial rotary; 0 = headDim); deepseek2: the shared rotary key's (0 = headDim / 2); glm4moe: 0 = headDim / 2 */
  ropeDims: number;
  /** qwen35, qwen35moe, qwen3next: Gated DeltaNet head size (granite4: Mamba-2 state size) (16, 32, 64 or 128: CUDA has kernels for those), key heads and value heads */
  ssmStateSize: number;
  ssmGroups: number;
  ssmHeads: number;
  /** qwen35, qwen35moe, qwen3next, granite4: the DeltaNet / Mamba-2 convolution's kernel; lfm2: the short convolution's length (0 = the family's: 4, 3) */
  convKernel: number;
  /** YaRN context extension: the trained context is this many times the original (0 = the family's: 32 for gptoss, none for the others) */
  yarnFactor: number;
  /**
   * deepseek2, glm4moe: trailing multi-token-prediction (NextN) blocks the file declares
   * (`nextn_predict_layers`) without their tensors, as a GGUF converted with them leaves the main
   * model: llama.cpp still gives them a KV cache, one layer more than the trunk attends with
   * (DeepSeek-V3, Kimi K2, GLM-4.5/4.7). 0 = the family's: 1 for glm4moe and deepseek3, none for deepseek2.
   */
  nextnLayers: number;
  /** gemma4: the last layers that read earlier layers' KV cache instead of keeping their own (Gemma 4 E2B/E4B); at least two keep their own */
  sharedKvLayers: number;
}

/** Options accepted by writeModel: any subset; missing or undefined fields take the defaults. */
export type ModelInput = { [K in keyof ModelOptions]?: ModelOptions[K] | undefined };

export const DEFAULT_MODEL_OPTIONS: Readonly<ModelOptions> = Object.freeze({
  family: 'llama',
  layers: 2,
  embd: 64,
  heads: 4,
  kvHeads: 2,
  headDim: 16,
  ffn: 128,
  ctx: 4096,
  type: 'f32',
  seed: 42,
  vocabExtra: 0,
  name: 'finite-memory-llm tiny random model',
  template: undefined,
  chatTemplate: undefined,
  slidingWindow: 16,
  swaPattern: 2,
  experts: 4,
  expertsUsed: 2,
  attentionInterval: 2,
  ropeDims: 0,
  ssmStateSize: 16,
  ssmGroups: 2,
  ssmHeads: 4,
  convKernel: 0,
  yarnFactor: 0,
  nextnLayers: 0,
  sharedKvLayers: 0,
});

/** llama.cpp refuses more layers (LLAMA_MAX_LAYERS in llama.cpp's llama-hparams.h). */
const MAX_LAYERS = 512;

function checkPositiveInt(name: string, v: number): void {
  if (!Number.isInteger(v) || v <= 0) throw new Error(`${name} must be a positive integer, got ${v}`);
}

export function resolveModelOptions(options: ModelInput = {}): ModelOptions {
  const o: ModelOptions = { ...DEFAULT_MODEL_OPTIONS };
  for (const [k, v] of Object.entries(options)) {
    if (v !== undefined) (o as unknown as Record<string, unknown>)[k] = v;
  }
  if (!Object.hasOwn(MODEL_FAMILIES, o.family)) {
    throw new Error(`family must be one of ${MODEL_FAMILY_NAMES.join(', ')}, got ${String(o.family)}`);
  }
  const spec: FamilySpec = MODEL_FAMILIES[o.family];
  if (options.layers === undefined && spec.layers !== undefined) o.layers = spec.layers;
  if (o.nextnLayers === 0 && spec.nextnLayers !== undefined) o.nextnLayers = spec.nextnLayers;
  for (const key of ['layers', 'embd', 'heads', 'kvHeads', 'headDim', 'ffn', 'ctx', 'slidingWindow', 'swaPattern', 'experts', 'expertsUsed', 'attentionInterval', 'ssmStateSize', 'ssmGroups', 'ssmHeads'] as const) {
    checkPositiveInt(key, o[key]);
  }
  for (const key of ['ropeDims', 'convKernel', 'yarnFactor', 'nextnLayers', 'sharedKvLayers'] as const) {
    if (!Number.isInteger(o[key]) || o[key] < 0) throw new Error(`${key} must be a non-negative integer, got ${o[key]}`);
  }
  const latent = o.family === 'deepseek2' || o.family === 'deepseek3';
  if (o.nextnLayers > 0 && !latent && o.family !== 'glm4moe') throw new Error(`nextnLayers is for deepseek2, deepseek3 and glm4moe (their MTP blocks), got ${o.family}`);
  if (o.sharedKvLayers > 0 && (o.family !== 'gemma4' || o.layers - o.sharedKvLayers < 2)) {
    throw new Error(`sharedKvLayers is for gemma4 and leaves at least two layers their own KV, got ${o.sharedKvLayers} of ${o.layers} (${o.family})`);
  }
  if (o.layers + o.nextnLayers > MAX_LAYERS) throw new Error(`layers plus nextnLayers must be at most ${MAX_LAYERS} (llama.cpp's LLAMA_MAX_LAYERS), got ${o.layers} + ${o.nextnLayers}`);
  // llama.cpp takes a deepseek2 file of 26 or 27 layers for a V2-Lite, which has no q-LoRA.
  if (o.family === 'deepseek3' && (o.layers === 26 || o.layers === 27)) throw new Error('deepseek3 cannot have 26 or 27 layers: llama.cpp reads such a file as DeepSeek-V2-Lite, without q-LoRA');
  if (o.layers > MAX_LAYERS) throw new Error(`layers must be at most ${MAX_LAYERS} (llama.cpp's LLAMA_MAX_LAYERS), got ${o.layers}`);
  if (o.family === 'gemma4' && o.layers < 2) throw new Error('gemma4 needs at least 2 layers (llama.cpp asserts two layers keep their own KV)');
  const deltaNet = o.family === 'qwen35' || o.family === 'qwen35moe' || o.family === 'qwen3next';
  const hybrid = deltaNet || o.family === 'lfm2' || o.family === 'granite4';
  if (o.family === 'nemotron3' && (o.attentionInterval < 2 || o.layers < 2 * o.attentionInterval)) {
    throw new Error(`nemotron3 needs attentionInterval >= 2 and layers >= 2 x attentionInterval (its mixers, Mamba-2 or attention, alternate with expert layers), got ${o.attentionInterval} and ${o.layers}`);
  }
  if (hybrid && (o.attentionInterval < 2 || o.layers < o.attentionInterval)) {
    throw new Error(`${o.family} needs attentionInterval >= 2 and layers >= attentionInterval (at least one recurrent and one attention layer), got ${o.attentionInterval} and ${o.layers}`);
  }
  if (latent && (o.ropeDims || o.headDim / 2) % 2 !== 0) {
    throw new Error(`${o.family} needs an even ropeDims (0: headDim / 2), got ${o.ropeDims || o.headDim / 2}`);
  } else if (deltaNet) {
    const rot = o.ropeDims || o.headDim;
    if (rot % 2 !== 0 || rot > o.headDim || rot < 6) throw new Error(`ropeDims must be even, at least 6 and at most headDim (${o.headDim}), got ${rot}`);
    if (![16, 32, 64, 128].includes(o.ssmStateSize)) throw new Error(`ssmStateSize must be 16, 32, 64 or 128 (CUDA's Gated DeltaNet kernels), got ${o.ssmStateSize}`);
    if (o.ssmHeads % o.ssmGroups !== 0) throw new Error(`ssmHeads (${o.ssmHeads}) must be a multiple of ssmGroups (${o.ssmGroups})`);
  } else if ((o.family === 'granite4' || o.family === 'nemotron3') && (o.ssmHeads % o.ssmGroups !== 0 || (2 * o.embd) % o.ssmHeads !== 0)) {
    throw new Error(`${o.family} needs ssmHeads (${o.ssmHeads}) a multiple of ssmGroups (${o.ssmGroups}) and dividing 2 x embd (${2 * o.embd}): Mamba-2's heads split its inner size`);
  } else if (o.family === 'glm4moe') {
    const rot = o.ropeDims || o.headDim / 2;
    if (rot % 2 !== 0 || rot > o.headDim) throw new Error(`glm4moe needs an even ropeDims of at most headDim (${o.headDim}; 0: headDim / 2), got ${rot}`);
  } else if (o.ropeDims !== 0 && o.ropeDims !== o.headDim && !latent) {
    throw new Error(`${o.family} rotates whole heads: ropeDims must be 0 or headDim (${o.headDim}), got ${o.ropeDims}`);
  }
  if (o.convKernel !== 0 && ![3, 4, 5, 9, 15].includes(o.convKernel)) throw new Error(`convKernel must be 3, 4, 5, 9 or 15 (CUDA's convolution kernels), got ${o.convKernel}`);
  if (!Number.isInteger(o.vocabExtra) || o.vocabExtra < 0) {
    throw new Error(`vocabExtra must be a non-negative integer, got ${o.vocabExtra}`);
  }
  if (o.template !== undefined && !Object.hasOwn(TEMPLATES, o.template)) {
    throw new Error(`template must be one of ${Object.keys(TEMPLATES).join(', ')}, got ${String(o.template)}`);
  }
  if (!Number.isInteger(o.seed)) throw new Error(`seed must be an integer, got ${o.seed}`);
  if (!WEIGHT_TYPES.includes(o.type)) {
    throw new Error(`type must be one of ${WEIGHT_TYPES.join(', ')}, got ${String(o.type)}`);
  }
  if (o.heads % o.kvHeads !== 0) {
    throw new Error(`heads (${o.heads}) must be a multiple of kvHeads (${o.kvHeads})`);
  }
  if (o.headDim % 2 !== 0) throw new Error(`headDim must be even for RoPE, got ${o.headDim}`);
  if ((o.family === 'qwen2' || o.family === 'qwen2vl' || o.family === 'phi3' || o.family === 'lfm2') && o.heads * o.headDim !== o.embd) {
    throw new Error(`${o.family} needs heads x headDim = embd (${o.heads} x ${o.headDim} != ${o.embd})`);
  }
  if (o.family === 'qwen2vl' && o.headDim % 8 !== 0) throw new Error(`qwen2vl needs headDim divisible by 8 for its M-RoPE sections, got ${o.headDim}`);
  if (o.family === 'qwen3vl' && o.headDim < 6) throw new Error(`qwen3vl needs headDim of at least 6 for its M-RoPE sections, got ${o.headDim}`);
  if (o.expertsUsed > o.experts) throw new Error(`expertsUsed (${o.expertsUsed}) must not exceed experts (${o.experts})`);
  if (o.type === 'q8_0') {
    const rows: [string, number][] = [
      ['embd', o.embd],
      ['heads*headDim', o.heads * o.headDim],
      ['ffn', o.ffn],
    ];
    if (o.family === 'mamba') rows.push(['2*embd (ssm inner size)', 2 * o.embd]);
    if (deltaNet) rows.push(['ssmStateSize*ssmHeads (DeltaNet value size)', o.ssmStateSize * o.ssmHeads]);
    for (const [what, n] of rows) {
      if (n % QK8_0 !== 0) {
        throw new Error(
          `q8_0 requires every matrix row length to be a multiple of ${QK8_0}: ${what} = ${n} is not ` +
            `(use --type f32 or f16, or change the shape)`,
        );
      }
    }
  }
  return o;
}

// ---- the llama generator most tests use (ChatML by default, as before there were families) ----

/** Options only some families read (the llama generator has none of them). */
const FAMILY_ONLY_OPTIONS = ['slidingWindow', 'swaPattern', 'experts', 'expertsUsed', 'attentionInterval', 'ropeDims', 'ssmStateSize', 'ssmGroups', 'ssmHeads', 'convKernel', 'yarnFactor', 'nextnLayers', 'sharedKvLayers'] as const;
type FamilyOnlyOption = (typeof FAMILY_ONLY_OPTIONS)[number];

export type LlamaModelOptions = Omit<ModelOptions, 'family' | FamilyOnlyOption | 'template' | 'chatTemplate'> & {
  /** tokenizer.chat_template: ChatML by default; null writes none (a base model: plain framing). */
  chatTemplate: string | null;
};
export type LlamaModelInput = { [K in keyof LlamaModelOptions]?: LlamaModelOptions[K] | undefined };

export const DEFAULT_LLAMA_MODEL_OPTIONS: Readonly<LlamaModelOptions> = Object.freeze({
  layers: DEFAULT_MODEL_OPTIONS.layers,
  embd: DEFAULT_MODEL_OPTIONS.embd,
  heads: DEFAULT_MODEL_OPTIONS.heads,
  kvHeads: DEFAULT_MODEL_OPTIONS.kvHeads,
  headDim: DEFAULT_MODEL_OPTIONS.headDim,
  ffn: DEFAULT_MODEL_OPTIONS.ffn,
  ctx: DEFAULT_MODEL_OPTIONS.ctx,
  type: DEFAULT_MODEL_OPTIONS.type,
  seed: DEFAULT_MODEL_OPTIONS.seed,
  vocabExtra: DEFAULT_MODEL_OPTIONS.vocabExtra,
  name: 'finite-memory-llm tiny random llama',
  chatTemplate: CHATML_TEMPLATE,
});

export function resolveLlamaModelOptions(options: LlamaModelInput = {}): LlamaModelOptions {
  const { family: _f, template: _t, chatTemplate, ...rest } = resolveModelOptions({
    ...DEFAULT_LLAMA_MODEL_OPTIONS,
    ...Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)),
    family: 'llama',
  });
  for (const k of FAMILY_ONLY_OPTIONS) delete (rest as Partial<ModelOptions>)[k];
  return { ...(rest as Omit<ModelOptions, 'family' | FamilyOnlyOption | 'template' | 'chatTemplate'>), chatTemplate: chatTemplate ?? null };
}
