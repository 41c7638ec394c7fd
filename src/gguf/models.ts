/**
 * Model generators: seeded random-weight GGUF files in the shapes of the families people load
 * (Llama 3, Mistral, Qwen 2/3, Gemma 3/4, Phi-3, a Qwen3 MoE, gpt-oss, DeepSeek-V2's latent attention), the M-RoPE ones (Qwen2-VL and
 * Qwen3-VL text models), the hybrids of attention and a recurrent state (Qwen3.5 and its MoE with
 * Gated DeltaNet layers, Qwen3-Next, LFM2 with short convolutions, Granite 4.0-H and Nemotron 3 with
 * Mamba-2 layers), and Mamba, whose recurrent state alone
 * finite memory cannot evict from, so that answer can be tested too.
 * Tensor names, shapes and metadata keys are the ones the pinned llama.cpp loads for each
 * architecture (src/models/<arch>.cpp there); every tensor it expects is written, nothing else.
 */
import { GGMLType, GGUF_DEFAULT_ALIGNMENT, GGUFValueType, GGUFWriter, QK8_0, ggmlTypeSize, type TensorProducer, type TensorSummary } from './format.js';
import { encodeValues } from './encode.js';
import { SeededRandom, hashSeed } from './random.js';
import { TEMPLATES, type TemplateName } from './templates.js';
import { CHATML_TEMPLATE, SPECIAL_TOKEN_IDS, buildVocab } from './vocab.js';

export type WeightType = 'f32' | 'f16' | 'q8_0';
export const WEIGHT_TYPES: readonly WeightType[] = ['f32', 'f16', 'q8_0'];

const WEIGHT_GGML_TYPE: Record<WeightType, GGMLType> = { f32: GGMLType.F32, f16: GGMLType.F16, q8_0: GGMLType.Q8_0 };
/** llama_ftype values for general.file_type. */
const LLAMA_FTYPE: Record<WeightType, number> = { f32: 0, f16: 1, q8_0: 7 };

/** What each family is: its llama.cpp architecture, its chat template and how it tokenizes. */
interface FamilySpec {
  arch: string;
  template: TemplateName;
  /** SentencePiece's leading space (Llama 2 / Mistral / Phi-3 tokenizers add one; Gemma's does not). */
  addSpacePrefix: boolean;
  about: string;
  /** transformer blocks when the options give none (the generator's default, 2, is too few for its layer pattern) */
  layers?: number;
}

export const MODEL_FAMILIES = {
  llama: { arch: 'llama', template: 'llama3', addSpacePrefix: true, about: 'Llama 3: llama architecture, Llama-3 template' },
  mistral: { arch: 'llama', template: 'mistral', addSpacePrefix: true, about: 'Mistral 7B: llama architecture, [INST] template' },
  qwen2: { arch: 'qwen2', template: 'chatml', addSpacePrefix: false, about: 'Qwen 2/2.5: QKV biases, NEOX RoPE, ChatML' },
  qwen3: { arch: 'qwen3', template: 'qwen3', addSpacePrefix: false, about: 'Qwen 3: per-head q/k RMS norms, NEOX RoPE, ChatML' },
  gemma3: { arch: 'gemma3', template: 'gemma', addSpacePrefix: false, about: 'Gemma 3: interleaved sliding-window layers, q/k and post norms, scaled embeddings, tied output, Gemma template' },
  gemma4: { arch: 'gemma4', template: 'gemma4', addSpacePrefix: false, about: 'Gemma 4: sliding-window layers of headDim and full-attention layers of 2 x headDim, q/k/v norms, scaled embeddings, tied output, Gemma 4 template (framed as ChatML: llama.cpp has no formatter for it)' },
  phi3: { arch: 'phi3', template: 'phi3', addSpacePrefix: true, about: 'Phi-3: fused QKV and gate/up, NEOX RoPE, Phi-3 template' },
  deepseek2: { arch: 'deepseek2', template: 'deepseek2', addSpacePrefix: false, about: 'DeepSeek-V2-Lite: multi-head latent attention (one compressed key/value latent and one shared rotary key per token), a dense first layer then routed and shared experts, DeepSeek-V2 template' },
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
  /** qwen3moe, qwen35moe, qwen3next, gptoss, deepseek2: experts per layer, and how many each token uses */
  experts: number;
  expertsUsed: number;
  /** qwen35, qwen35moe, qwen3next, lfm2, granite4: layer i attends when (i + 1) is a multiple of this; the others are recurrent */
  attentionInterval: number;
  /** qwen35, qwen35moe, qwen3next: rotary dimensions per head (partial rotary; 0 = headDim); deepseek2: the shared rotary key's (0 = headDim / 2) */
  ropeDims: number;
  /** qwen35, qwen35moe, qwen3next: Gated DeltaNet head size (granite4: Mamba-2 state size) (16, 32, 64 or 128: CUDA has kernels for those), key heads and value heads */
  ssmStateSize: number;
  ssmGroups: number;
  ssmHeads: number;
  /** qwen35, qwen35moe, qwen3next, granite4: the DeltaNet / Mamba-2 convolution's kernel; lfm2: the short convolution's length (0 = the family's: 4, 3) */
  convKernel: number;
  /** YaRN context extension: the trained context is this many times the original (0 = the family's: 32 for gptoss, none for the others) */
  yarnFactor: number;
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
});


export interface WriteModelResult {
  path: string;
  /** total file size in bytes */
  fileSize: number;
  options: ModelOptions;
  arch: string;
  nVocab: number;
  nParams: number;
  tensors: TensorSummary[];
  specialTokens: typeof SPECIAL_TOKEN_IDS;
}

/** Weight scales: chosen so the residual stream mixes context and logits are peaked but not one-hot. */
const EMBED_STD = 1.0;
const LAYER_GAIN = 1.5; // std = LAYER_GAIN / sqrt(fan_in) for attention / FFN matrices
const LOGIT_STD = 4.0; // output.weight std = LOGIT_STD / sqrt(embd) -> logits of std ~LOGIT_STD
const BYTE_LOGIT_SCALE = 0.5; // output rows of the 256 byte tokens are scaled down by this
const NORM_NOISE = 0.05; // norm weights ~ 1 + NORM_NOISE * N(0, 1)
const BIAS_STD = 0.1;
/** RoPE bases of the real models (the others use 10000). */
const ROPE_BASE: Record<string, number> = { 'gpt-oss': 150000, gemma3: 1e6, qwen35: 1e7, qwen35moe: 1e7, qwen3next: 1e7, qwen3vl: 5e6, lfm2: 1e6 };
/** YaRN by family: gpt-oss's trained context is 32 x the original (131072 = 32 x 4096). */
const YARN_FACTOR: Record<string, number> = { 'gpt-oss': 32 };
/** DeepSeek-V2's latent attention in V2-Lite's proportions (heads of 128 values from the latent and 64
 * rotary ones, a latent of 512): the latent is 4 x headDim and the shared rotary key headDim / 2. */
const MLA_LATENT_PER_HEAD_DIM = 4;
/** Mamba: d_inner = 2 x embd (llama.cpp accepts only that), the usual state size and kernel. */
const SSM = { stateSize: 16, convKernel: 4, dtRank: 4 } as const;

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
  for (const key of ['layers', 'embd', 'heads', 'kvHeads', 'headDim', 'ffn', 'ctx', 'slidingWindow', 'swaPattern', 'experts', 'expertsUsed', 'attentionInterval', 'ssmStateSize', 'ssmGroups', 'ssmHeads'] as const) {
    checkPositiveInt(key, o[key]);
  }
  for (const key of ['ropeDims', 'convKernel', 'yarnFactor'] as const) {
    if (!Number.isInteger(o[key]) || o[key] < 0) throw new Error(`${key} must be a non-negative integer, got ${o[key]}`);
  }
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
  if (o.family === 'deepseek2' && (o.ropeDims || o.headDim / 2) % 2 !== 0) {
    throw new Error(`deepseek2 needs an even ropeDims (0: headDim / 2), got ${o.ropeDims || o.headDim / 2}`);
  } else if (deltaNet) {
    const rot = o.ropeDims || o.headDim;
    if (rot % 2 !== 0 || rot > o.headDim || rot < 6) throw new Error(`ropeDims must be even, at least 6 and at most headDim (${o.headDim}), got ${rot}`);
    if (![16, 32, 64, 128].includes(o.ssmStateSize)) throw new Error(`ssmStateSize must be 16, 32, 64 or 128 (CUDA's Gated DeltaNet kernels), got ${o.ssmStateSize}`);
    if (o.ssmHeads % o.ssmGroups !== 0) throw new Error(`ssmHeads (${o.ssmHeads}) must be a multiple of ssmGroups (${o.ssmGroups})`);
  } else if ((o.family === 'granite4' || o.family === 'nemotron3') && (o.ssmHeads % o.ssmGroups !== 0 || (2 * o.embd) % o.ssmHeads !== 0)) {
    throw new Error(`${o.family} needs ssmHeads (${o.ssmHeads}) a multiple of ssmGroups (${o.ssmGroups}) and dividing 2 x embd (${2 * o.embd}): Mamba-2's heads split its inner size`);
  } else if (o.ropeDims !== 0 && o.ropeDims !== o.headDim && o.family !== 'deepseek2') {
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

/** Producer for a tensor of random normals (std around mean) stored as `type`, generated row-chunk by row-chunk. */
function randomTensor(
  dims: readonly number[],
  type: GGMLType,
  rng: SeededRandom,
  std: number,
  mean = 0,
  rowScale?: (row: number) => number,
  map?: (v: number, i: number) => number,
): TensorProducer {
  const ne0 = dims[0]!;
  const nrows = dims.slice(1).reduce((a, b) => a * b, 1);
  return (emit) => {
    const rowsPerChunk = Math.max(1, Math.floor((1 << 16) / ne0));
    const vals = new Float32Array(rowsPerChunk * ne0);
    const out = Buffer.alloc(ggmlTypeSize(type, ne0) * rowsPerChunk);
    for (let r = 0; r < nrows; r += rowsPerChunk) {
      const n = Math.min(rowsPerChunk, nrows - r);
      const v = n === rowsPerChunk ? vals : vals.subarray(0, n * ne0);
      for (let j = 0; j < n; j++) {
        const s = rowScale ? std * rowScale(r + j) : std;
        for (let i = j * ne0; i < (j + 1) * ne0; i++) v[i] = mean + s * rng.normal();
      }
      if (map) for (let i = 0; i < v.length; i++) v[i] = map(v[i]!, i % ne0);
      const len = encodeValues(v, type, out, 0);
      emit(out.subarray(0, len));
    }
  };
}

/** What a trained model adds to a generated one: its own words in the vocabulary, and its weights. */
export interface ModelContent {
  /** pieces added to the vocabulary, with their prefixes (see buildVocab) */
  vocabPieces?: readonly string[];
  /** false: no common English words in the vocabulary, only characters, bytes and vocabPieces */
  vocabCommon?: boolean;
  /**
   * The values of a tensor (ggml order: dims[0] varies fastest, i.e. a PyTorch [out, in] weight as
   * stored), or undefined to keep the seeded random values. Called once per tensor with its name.
   */
  weights?: (name: string, dims: readonly number[]) => Float32Array | undefined;
}

/** Producer for given values stored as `type`. */
function valuesTensor(dims: readonly number[], type: GGMLType, values: Float32Array): TensorProducer {
  const n = dims.reduce((a, b) => a * b, 1);
  if (values.length !== n) throw new Error(`tensor of ${dims.join('x')} needs ${n} values, got ${values.length}`);
  return (emit) => {
    const out = Buffer.alloc(ggmlTypeSize(type, n));
    emit(out.subarray(0, encodeValues(values, type, out, 0)));
  };
}

/**
 * Writes a model of `options.family` with seeded random weights to `path` (or the weights `content`
 * gives). Synchronous; memory use is bounded by the vocabulary metadata plus ~1 MiB of buffers.
 */
export function writeModel(path: string, options: ModelInput = {}, content: ModelContent = {}): WriteModelResult {
  const o = resolveModelOptions(options);
  const family: FamilySpec = MODEL_FAMILIES[o.family];
  const template = TEMPLATES[o.template ?? family.template];
  const vocab = buildVocab(o.vocabExtra, template.control, content.vocabPieces, content.vocabCommon ?? true);
  const nVocab = vocab.tokens.length;
  const wtype = WEIGHT_GGML_TYPE[o.type];
  const { arch } = family;
  const E = o.embd;
  const qDim = o.heads * o.headDim;
  const kvDim = o.kvHeads * o.headDim;
  const qwen35 = arch === 'qwen35' || arch === 'qwen35moe';
  /** Gated DeltaNet hybrids: Qwen3.5 and Qwen3-Next (whose attention has plain RoPE, not M-RoPE). */
  const deltaNet = qwen35 || arch === 'qwen3next';
  const moeShared = arch === 'qwen35moe' || arch === 'qwen3next';
  const rot = o.ropeDims || o.headDim;
  const convKernel = o.convKernel || (arch === 'lfm2' ? 3 : 4);
  /** gemma4: which layers slide (every swaPattern-th is full attention), and the full layers' head size. */
  const slides = (i: number): boolean => (i + 1) % o.swaPattern !== 0; // also llama.cpp's set_swa_pattern for gemma3 and gpt-oss
  const fullHeadDim = arch === 'gemma4' ? 2 * o.headDim : o.headDim;
  let ropeFreqsWritten = false;
  /** deepseek2: the latent's size and the shared rotary key's. */
  const mlaLatent = MLA_LATENT_PER_HEAD_DIM * o.headDim;
  const mlaRope = o.ropeDims || o.headDim / 2;
  /** Hybrids: which layers attend (the others are recurrent: DeltaNet or a short convolution). */
  const hybrid = deltaNet || arch === 'lfm2' || arch === 'granitehybrid';
  const nemotron = arch === 'nemotron_h_moe';
  /** Nemotron 3: even layers mix (every attentionInterval-th mixer attends, the others are Mamba-2), odd ones are experts. */
  const nemotronKind = (i: number): 'mamba' | 'attention' | 'experts' =>
    i % 2 === 1 ? 'experts' : (i / 2 + 1) % o.attentionInterval === 0 ? 'attention' : 'mamba';
  const attends = (i: number): boolean => (nemotron ? nemotronKind(i) === 'attention' : !hybrid || (i + 1) % o.attentionInterval === 0);

  const w = new GGUFWriter(GGUF_DEFAULT_ALIGNMENT);
  const key = (k: string) => `${arch}.${k}`;
  w.addString('general.architecture', arch);
  w.addString('general.name', o.name);
  w.addUint32('general.file_type', LLAMA_FTYPE[o.type]);
  w.addUint32(key('vocab_size'), nVocab);
  w.addUint32(key('context_length'), o.ctx);
  w.addUint32(key('embedding_length'), E);
  w.addUint32(key('block_count'), o.layers);
  w.addFloat32(key('attention.layer_norm_rms_epsilon'), 1e-5);
  if (arch === 'mamba') {
    w.addUint32(key('ssm.conv_kernel'), SSM.convKernel);
    w.addUint32(key('ssm.inner_size'), 2 * E);
    w.addUint32(key('ssm.state_size'), SSM.stateSize);
    w.addUint32(key('ssm.time_step_rank'), SSM.dtRank);
  } else {
    if (!nemotron) w.addUint32(key('feed_forward_length'), o.ffn);
    w.addUint32(key('attention.head_count'), o.heads);
    if (arch === 'deepseek2') {
      mlaKeys();
    } else if (arch === 'lfm2' || arch === 'granitehybrid' || nemotron) {
      // LFM2, Granite and Nemotron mark their convolution / Mamba-2 (and expert) layers by 0 KV heads.
      w.addInt32Array(key('attention.head_count_kv'), Array.from({ length: o.layers }, (_, i) => (attends(i) ? o.kvHeads : 0)));
    } else {
      w.addUint32(key('attention.head_count_kv'), o.kvHeads);
    }
    if (arch !== 'deepseek2') {
      w.addUint32(key('attention.key_length'), fullHeadDim);
      w.addUint32(key('attention.value_length'), fullHeadDim);
      w.addUint32(key('rope.dimension_count'), arch === 'gemma4' ? fullHeadDim : rot);
    }
    w.addFloat32(key('rope.freq_base'), ROPE_BASE[arch] ?? 10000);
  }
  if (arch === 'gemma3') {
    w.addUint32(key('attention.sliding_window'), o.slidingWindow);
    w.addUint32(key('attention.sliding_window_pattern'), o.swaPattern);
    w.addFloat32(key('rope.freq_base_swa'), 10000);
  }
  if (arch === 'gemma4') {
    // Gemma 4 lists which layers slide (a scalar would make every layer slide), and its full layers
    // have heads twice as wide as the sliding ones (as in the real models: 512 and 256).
    w.addUint32(key('attention.sliding_window'), o.slidingWindow);
    w.addArray(key('attention.sliding_window_pattern'), GGUFValueType.BOOL, Array.from({ length: o.layers }, (_, i) => slides(i)));
    w.addUint32(key('attention.key_length_swa'), o.headDim);
    w.addUint32(key('attention.value_length_swa'), o.headDim);
    w.addUint32(key('rope.dimension_count_swa'), o.headDim);
    w.addFloat32(key('rope.freq_base_swa'), 10000);
    w.addUint32(key('embedding_length_per_layer_input'), 0);
    w.addUint32(key('attention.shared_kv_layers'), 0);
    w.addFloat32(key('final_logit_softcapping'), 30);
  }
  if (arch === 'gpt-oss') {
    w.addUint32(key('attention.sliding_window'), o.slidingWindow);
    w.addUint32(key('attention.sliding_window_pattern'), o.swaPattern);
  }
  const yarnFactor = o.yarnFactor || (YARN_FACTOR[arch] ?? 0);
  if (yarnFactor > 0 && arch !== 'mamba') {
    // The rope applies YaRN's magnitude (attention temperature) besides the rotation: what a K-shift must not repeat.
    w.addString(key('rope.scaling.type'), 'yarn');
    w.addFloat32(key('rope.scaling.factor'), yarnFactor);
    w.addUint32(key('rope.scaling.original_context_length'), Math.max(1, Math.floor(o.ctx / yarnFactor)));
  }
  if (arch === 'qwen3moe' || arch === 'gpt-oss' || arch === 'deepseek2') {
    w.addUint32(key('expert_count'), o.experts);
    w.addUint32(key('expert_used_count'), o.expertsUsed);
    w.addUint32(key('expert_feed_forward_length'), o.ffn);
  }
  if (arch === 'qwen2vl' || arch === 'qwen3vl' || qwen35) {
    // Four sections of the rotary half (temporal, height, width, unused): text tokens use the same
    // position in each, so only the split matters; it covers the rotated pairs (rot / 2), in the
    // proportions of the real models (Qwen2-VL 16/24/24, Qwen3-VL 24/20/20, Qwen3.5 11/11/10).
    const half = rot / 2;
    const sections =
      arch === 'qwen2vl' ? [half / 4, (3 * half) / 8, (3 * half) / 8]
      : arch === 'qwen3vl' ? [Math.floor((3 * half) / 8), Math.floor((5 * half) / 16)]
      : [Math.round((11 * half) / 32), Math.round((11 * half) / 32)];
    if (sections.length === 2) sections.push(half - sections[0]! - sections[1]!);
    w.addArray(key('rope.dimension_sections'), GGUFValueType.INT32, [...sections, 0]);
  }
  if (deltaNet) {
    w.addUint32(key('ssm.conv_kernel'), convKernel);
    w.addUint32(key('ssm.state_size'), o.ssmStateSize);
    w.addUint32(key('ssm.group_count'), o.ssmGroups);
    w.addUint32(key('ssm.time_step_rank'), o.ssmHeads);
    w.addUint32(key('ssm.inner_size'), o.ssmStateSize * o.ssmHeads);
    w.addUint32(key('full_attention_interval'), o.attentionInterval);
  }
  if (moeShared) {
    w.addUint32(key('expert_count'), o.experts);
    w.addUint32(key('expert_used_count'), o.expertsUsed);
    w.addUint32(key('expert_feed_forward_length'), o.ffn);
    w.addUint32(key('expert_shared_feed_forward_length'), o.ffn);
  }
  if (arch === 'lfm2') w.addUint32(key('shortconv.l_cache'), convKernel);
  if (nemotron) {
    // A layer with a feed-forward length is an expert layer; the others mix (Mamba-2, or attention with KV heads).
    w.addInt32Array(key('feed_forward_length'), Array.from({ length: o.layers }, (_, i) => (nemotronKind(i) === 'experts' ? o.ffn : 0)));
    w.addUint32(key('expert_count'), o.experts);
    w.addUint32(key('expert_used_count'), o.expertsUsed);
    w.addUint32(key('expert_feed_forward_length'), o.ffn);
    w.addUint32(key('expert_shared_feed_forward_length'), o.ffn);
    w.addBool(key('expert_weights_norm'), true);
    w.addFloat32(key('attention.layer_norm_epsilon'), 1e-5);
  }
  if (arch === 'granitehybrid' || nemotron) {
    // Mamba-2: d_inner = 2 x embd (Granite accepts only that), heads of d_inner / ssmHeads values.
    w.addUint32(key('ssm.conv_kernel'), convKernel);
    w.addUint32(key('ssm.inner_size'), 2 * E);
    w.addUint32(key('ssm.state_size'), o.ssmStateSize);
    w.addUint32(key('ssm.time_step_rank'), o.ssmHeads);
    w.addUint32(key('ssm.group_count'), o.ssmGroups);
  }
  // Granite 4.0-H's attention has no positions (its converter writes this false: NoPE); Nemotron's has none by architecture.
  if (arch === 'granitehybrid') w.addBool(key('rope.scaling.finetuned'), false);

  w.addString('tokenizer.ggml.model', 'llama');
  w.addStringArray('tokenizer.ggml.tokens', vocab.tokens);
  w.addFloat32Array('tokenizer.ggml.scores', vocab.scores);
  w.addInt32Array('tokenizer.ggml.token_type', vocab.types);
  w.addUint32('tokenizer.ggml.bos_token_id', SPECIAL_TOKEN_IDS.bos);
  w.addUint32('tokenizer.ggml.eos_token_id', SPECIAL_TOKEN_IDS.eos);
  w.addUint32('tokenizer.ggml.unknown_token_id', SPECIAL_TOKEN_IDS.unk);
  w.addUint32('tokenizer.ggml.eot_token_id', vocab.tokens.indexOf(template.endOfTurn));
  w.addBool('tokenizer.ggml.add_bos_token', true);
  w.addBool('tokenizer.ggml.add_eos_token', false);
  w.addBool('tokenizer.ggml.add_space_prefix', family.addSpacePrefix);
  const chatTemplate = o.chatTemplate === undefined ? template.text : o.chatTemplate;
  if (chatTemplate !== null) w.addString('tokenizer.chat_template', chatTemplate);

  const tensor = (name: string, dims: number[], type: GGMLType, std: number, mean = 0, rowScale?: (row: number) => number, map?: (v: number, i: number) => number) => {
    const given = content.weights?.(name, dims);
    if (given !== undefined) {
      w.addTensor({ name, dims, type, produce: valuesTensor(dims, type, given) });
      return;
    }
    const rng = new SeededRandom(hashSeed(o.seed, name));
    w.addTensor({ name, dims, type, produce: randomTensor(dims, type, rng, std, mean, rowScale, map) });
  };
  const matrix = (name: string, dims: number[], std = LAYER_GAIN / Math.sqrt(dims[0]!)) => tensor(name, dims, wtype, std);
  const norm = (name: string, n = E) => tensor(name, [n], GGMLType.F32, NORM_NOISE, 1);
  const bias = (name: string, n: number) => tensor(name, [n], GGMLType.F32, BIAS_STD);

  // Gemma multiplies embeddings by sqrt(embd) and ties the output to them: smaller embeddings keep
  // both the residual stream and the logits in the same range as the other families'.
  const tied = arch === 'gemma3' || arch === 'gemma4';
  matrix('token_embd.weight', [E, nVocab], tied ? EMBED_STD / Math.sqrt(E) : EMBED_STD);
  norm(arch === 'lfm2' ? 'token_embd_norm.weight' : 'output_norm.weight'); // LFM2's final norm has that name
  if (!tied) {
    // Byte-fallback tokens get smaller output rows so greedy text is mostly whole pieces (bytes still occur).
    const firstByte = SPECIAL_TOKEN_IDS.firstByte;
    const rowScale = (tok: number): number => (tok >= firstByte && tok < firstByte + 256 ? BYTE_LOGIT_SCALE : 1);
    tensor('output.weight', [E, nVocab], wtype, LOGIT_STD / Math.sqrt(E), 0, rowScale);
  }
  for (let i = 0; i < o.layers; i++) {
    const p = `blk.${i}.`;
    if (nemotron) {
      nemotronLayer(i);
      continue;
    }
    if (hybrid) {
      hybridLayer(i);
      continue;
    }
    if (arch === 'gemma4') {
      gemma4Layer(i);
      continue;
    }
    if (arch === 'gpt-oss') {
      gptOssLayer(i);
      continue;
    }
    if (arch === 'deepseek2') {
      deepseek2Layer(i);
      continue;
    }
    norm(`${p}attn_norm.weight`);
    if (arch === 'mamba') {
      const inner = 2 * E;
      matrix(`${p}ssm_in.weight`, [E, 2 * inner]);
      tensor(`${p}ssm_conv1d.weight`, [SSM.convKernel, inner], GGMLType.F32, 1 / Math.sqrt(SSM.convKernel));
      bias(`${p}ssm_conv1d.bias`, inner);
      tensor(`${p}ssm_x.weight`, [inner, SSM.dtRank + 2 * SSM.stateSize], GGMLType.F32, 1 / Math.sqrt(inner));
      tensor(`${p}ssm_dt.weight`, [SSM.dtRank, inner], GGMLType.F32, 1 / Math.sqrt(SSM.dtRank));
      // dt = softplus(bias + ...) around 0.02: softplus^-1(0.02) ~ log(0.02)
      tensor(`${p}ssm_dt.bias`, [inner], GGMLType.F32, 0.5, Math.log(0.02));
      // A = -exp(A_log) with A_log = log(1..state): the usual S4D-real initialisation.
      tensor(`${p}ssm_a`, [SSM.stateSize, inner], GGMLType.F32, 0, 0, undefined, (_v, col) => -(col + 1));
      tensor(`${p}ssm_d`, [inner], GGMLType.F32, 0, 1);
      matrix(`${p}ssm_out.weight`, [inner, E]);
      continue;
    }
    if (arch === 'phi3') {
      matrix(`${p}attn_qkv.weight`, [E, qDim + 2 * kvDim]);
    } else {
      matrix(`${p}attn_q.weight`, [E, qDim]);
      matrix(`${p}attn_k.weight`, [E, kvDim]);
      matrix(`${p}attn_v.weight`, [E, kvDim]);
    }
    if (arch === 'qwen2' || arch === 'qwen2vl') {
      bias(`${p}attn_q.bias`, qDim);
      bias(`${p}attn_k.bias`, kvDim);
      bias(`${p}attn_v.bias`, kvDim);
    }
    if (arch === 'qwen3' || arch === 'qwen3moe' || arch === 'gemma3' || arch === 'qwen3vl') {
      norm(`${p}attn_q_norm.weight`, o.headDim);
      norm(`${p}attn_k_norm.weight`, o.headDim);
    }
    matrix(`${p}attn_output.weight`, [qDim, E]);
    if (arch === 'gemma3') norm(`${p}post_attention_norm.weight`);
    norm(`${p}ffn_norm.weight`);
    if (arch === 'qwen3moe') {
      tensor(`${p}ffn_gate_inp.weight`, [E, o.experts], GGMLType.F32, 1 / Math.sqrt(E));
      matrix(`${p}ffn_gate_exps.weight`, [E, o.ffn, o.experts]);
      matrix(`${p}ffn_up_exps.weight`, [E, o.ffn, o.experts]);
      matrix(`${p}ffn_down_exps.weight`, [o.ffn, E, o.experts]);
    } else if (arch === 'phi3') {
      matrix(`${p}ffn_up.weight`, [E, 2 * o.ffn]);
      matrix(`${p}ffn_down.weight`, [o.ffn, E]);
    } else {
      matrix(`${p}ffn_gate.weight`, [E, o.ffn]);
      matrix(`${p}ffn_up.weight`, [E, o.ffn]);
      matrix(`${p}ffn_down.weight`, [o.ffn, E]);
    }
    if (arch === 'gemma3') norm(`${p}post_ffw_norm.weight`);
  }

  /** One Gemma 4 layer: the sliding ones with heads of headDim, the full ones of 2 x headDim (sharing one rope_freqs). */
  function gemma4Layer(i: number): void {
    const p = `blk.${i}.`;
    const hd = slides(i) ? o.headDim : fullHeadDim;
    norm(`${p}attn_norm.weight`);
    matrix(`${p}attn_q.weight`, [E, hd * o.heads]);
    matrix(`${p}attn_k.weight`, [E, hd * o.kvHeads]);
    matrix(`${p}attn_v.weight`, [E, hd * o.kvHeads]);
    matrix(`${p}attn_output.weight`, [hd * o.heads, E]);
    norm(`${p}attn_q_norm.weight`, hd);
    norm(`${p}attn_k_norm.weight`, hd);
    norm(`${p}post_attention_norm.weight`);
    if (!slides(i) && !ropeFreqsWritten) {
      // Frequency divisors of the full layers' rotation: all 1 (every pair rotates).
      tensor('rope_freqs.weight', [fullHeadDim / 2], GGMLType.F32, 0, 1);
      ropeFreqsWritten = true;
    }
    norm(`${p}ffn_norm.weight`);
    matrix(`${p}ffn_gate.weight`, [E, o.ffn]);
    matrix(`${p}ffn_up.weight`, [E, o.ffn]);
    matrix(`${p}ffn_down.weight`, [o.ffn, E]);
    norm(`${p}post_ffw_norm.weight`);
  }

  /**
   * DeepSeek-V2's latent attention: one cache row per token holds the compressed latent (what keys and
   * values are decompressed from, per head) and the one rotary key all heads share; no value cache.
   */
  function mlaKeys(): void {
    w.addUint32(key('attention.head_count_kv'), 1);
    w.addUint32(key('attention.key_length'), mlaLatent + mlaRope); // the cache row
    w.addUint32(key('attention.value_length'), mlaLatent);
    w.addUint32(key('attention.key_length_mla'), o.headDim + mlaRope); // a head's key: from the latent + rotary
    w.addUint32(key('attention.value_length_mla'), o.headDim);
    w.addUint32(key('rope.dimension_count'), mlaRope);
    w.addUint32(key('attention.q_lora_rank'), 0); // queries straight from the hidden state (V2-Lite)
    w.addUint32(key('attention.kv_lora_rank'), mlaLatent);
    w.addUint32(key('leading_dense_block_count'), 1);
    w.addUint32(key('expert_shared_count'), 1);
  }

  /** One DeepSeek-V2 layer: latent attention, then a dense feed-forward (layer 0) or routed and shared experts. */
  function deepseek2Layer(i: number): void {
    const p = `blk.${i}.`;
    norm(`${p}attn_norm.weight`);
    matrix(`${p}attn_q.weight`, [E, o.heads * (o.headDim + mlaRope)]);
    matrix(`${p}attn_kv_a_mqa.weight`, [E, mlaLatent + mlaRope]);
    norm(`${p}attn_kv_a_norm.weight`, mlaLatent);
    // Per-head decompressions of the latent (small: kept F32 whatever the weight type, as q8_0 needs rows of 32).
    tensor(`${p}attn_k_b.weight`, [o.headDim, mlaLatent, o.heads], GGMLType.F32, LAYER_GAIN / Math.sqrt(o.headDim));
    tensor(`${p}attn_v_b.weight`, [mlaLatent, o.headDim, o.heads], GGMLType.F32, LAYER_GAIN / Math.sqrt(mlaLatent));
    matrix(`${p}attn_output.weight`, [o.heads * o.headDim, E]);
    norm(`${p}ffn_norm.weight`);
    if (i === 0) {
      matrix(`${p}ffn_gate.weight`, [E, o.ffn]);
      matrix(`${p}ffn_up.weight`, [E, o.ffn]);
      matrix(`${p}ffn_down.weight`, [o.ffn, E]);
      return;
    }
    tensor(`${p}ffn_gate_inp.weight`, [E, o.experts], GGMLType.F32, 1 / Math.sqrt(E));
    matrix(`${p}ffn_gate_exps.weight`, [E, o.ffn, o.experts]);
    matrix(`${p}ffn_up_exps.weight`, [E, o.ffn, o.experts]);
    matrix(`${p}ffn_down_exps.weight`, [o.ffn, E, o.experts]);
    matrix(`${p}ffn_gate_shexp.weight`, [E, o.ffn]);
    matrix(`${p}ffn_up_shexp.weight`, [E, o.ffn]);
    matrix(`${p}ffn_down_shexp.weight`, [o.ffn, E]);
  }

  /** One gpt-oss layer: biased attention with a sink logit per head, then routed experts with biases. */
  function gptOssLayer(i: number): void {
    const p = `blk.${i}.`;
    norm(`${p}attn_norm.weight`);
    matrix(`${p}attn_q.weight`, [E, qDim]);
    matrix(`${p}attn_k.weight`, [E, kvDim]);
    matrix(`${p}attn_v.weight`, [E, kvDim]);
    bias(`${p}attn_q.bias`, qDim);
    bias(`${p}attn_k.bias`, kvDim);
    bias(`${p}attn_v.bias`, kvDim);
    matrix(`${p}attn_output.weight`, [qDim, E]);
    bias(`${p}attn_output.bias`, E);
    // A sink is a logit every query's softmax has besides its keys' (no value): about as large as a key's.
    tensor(`${p}attn_sinks.weight`, [o.heads], GGMLType.F32, 1);
    norm(`${p}post_attention_norm.weight`);
    tensor(`${p}ffn_gate_inp.weight`, [E, o.experts], GGMLType.F32, 1 / Math.sqrt(E));
    bias(`${p}ffn_gate_inp.bias`, o.experts);
    matrix(`${p}ffn_gate_exps.weight`, [E, o.ffn, o.experts]);
    matrix(`${p}ffn_up_exps.weight`, [E, o.ffn, o.experts]);
    matrix(`${p}ffn_down_exps.weight`, [o.ffn, E, o.experts]);
    tensor(`${p}ffn_gate_exps.bias`, [o.ffn, o.experts], GGMLType.F32, BIAS_STD);
    tensor(`${p}ffn_up_exps.bias`, [o.ffn, o.experts], GGMLType.F32, BIAS_STD);
    tensor(`${p}ffn_down_exps.bias`, [E, o.experts], GGMLType.F32, BIAS_STD);
  }

  /** A Mamba-2 mixer (Granite 4.0-H, Nemotron): d_inner = 2 x embd in heads of d_inner / ssmHeads values. */
  function mamba2Mixer(p: string): void {
    const inner = 2 * E;
    const convDim = inner + 2 * o.ssmGroups * o.ssmStateSize;
    matrix(`${p}ssm_in.weight`, [E, inner + convDim + o.ssmHeads]); // z, x B C, dt
    tensor(`${p}ssm_conv1d.weight`, [convKernel, convDim], GGMLType.F32, 1 / Math.sqrt(convKernel));
    bias(`${p}ssm_conv1d.bias`, convDim);
    tensor(`${p}ssm_dt.bias`, [o.ssmHeads], GGMLType.F32, 0.5, Math.log(Math.expm1(0.01)));
    // A = -exp(A_log) per head (one row each), in (-16, -1] as for Qwen3.5's DeltaNet; D = 1.
    const a = Float32Array.from({ length: o.ssmHeads }, (_, h) => -(1 + ((h * 7) % 15)));
    w.addTensor({ name: `${p}ssm_a`, dims: [1, o.ssmHeads], type: GGMLType.F32, produce: valuesTensor([1, o.ssmHeads], GGMLType.F32, a) });
    tensor(`${p}ssm_d`, [1, o.ssmHeads], GGMLType.F32, 0, 1);
    tensor(`${p}ssm_norm.weight`, [inner / o.ssmGroups, o.ssmGroups], GGMLType.F32, NORM_NOISE, 1); // grouped RMS norm
    matrix(`${p}ssm_out.weight`, [inner, E]);
  }

  /** One Nemotron 3 layer: one norm, then a Mamba-2 mixer, attention without positions, or experts (relu^2, no gate). */
  function nemotronLayer(i: number): void {
    const p = `blk.${i}.`;
    norm(`${p}attn_norm.weight`);
    const kind = nemotronKind(i);
    if (kind === 'mamba') {
      mamba2Mixer(p);
    } else if (kind === 'attention') {
      matrix(`${p}attn_q.weight`, [E, qDim]);
      matrix(`${p}attn_k.weight`, [E, kvDim]);
      matrix(`${p}attn_v.weight`, [E, kvDim]);
      matrix(`${p}attn_output.weight`, [qDim, E]);
    } else {
      tensor(`${p}ffn_gate_inp.weight`, [E, o.experts], GGMLType.F32, 1 / Math.sqrt(E));
      bias(`${p}exp_probs_b.bias`, o.experts);
      matrix(`${p}ffn_up_exps.weight`, [E, o.ffn, o.experts]);
      matrix(`${p}ffn_down_exps.weight`, [o.ffn, E, o.experts]);
      matrix(`${p}ffn_up_shexp.weight`, [E, o.ffn]);
      matrix(`${p}ffn_down_shexp.weight`, [o.ffn, E]);
    }
  }

  /** One layer of a hybrid: its mixer (attention, or DeltaNet / short convolution) and its feed-forward. */
  function hybridLayer(i: number): void {
    const p = `blk.${i}.`;
    const ffn = () => {
      if (moeShared) {
        tensor(`${p}ffn_gate_inp.weight`, [E, o.experts], GGMLType.F32, 1 / Math.sqrt(E));
        matrix(`${p}ffn_gate_exps.weight`, [E, o.ffn, o.experts]);
        matrix(`${p}ffn_up_exps.weight`, [E, o.ffn, o.experts]);
        matrix(`${p}ffn_down_exps.weight`, [o.ffn, E, o.experts]);
        tensor(`${p}ffn_gate_inp_shexp.weight`, [E], GGMLType.F32, 1 / Math.sqrt(E));
        matrix(`${p}ffn_gate_shexp.weight`, [E, o.ffn]);
        matrix(`${p}ffn_up_shexp.weight`, [E, o.ffn]);
        matrix(`${p}ffn_down_shexp.weight`, [o.ffn, E]);
      } else {
        matrix(`${p}ffn_gate.weight`, [E, o.ffn]);
        matrix(`${p}ffn_up.weight`, [E, o.ffn]);
        matrix(`${p}ffn_down.weight`, [o.ffn, E]);
      }
    };
    if (arch === 'granitehybrid') {
      norm(`${p}attn_norm.weight`);
      if (attends(i)) {
        matrix(`${p}attn_q.weight`, [E, qDim]);
        matrix(`${p}attn_k.weight`, [E, kvDim]);
        matrix(`${p}attn_v.weight`, [E, kvDim]);
        matrix(`${p}attn_output.weight`, [qDim, E]);
      } else {
        mamba2Mixer(p);
      }
      norm(`${p}ffn_norm.weight`);
      ffn();
      return;
    }
    if (arch === 'lfm2') {
      norm(`${p}ffn_norm.weight`);
      ffn();
      norm(`${p}attn_norm.weight`);
      if (attends(i)) {
        norm(`${p}attn_q_norm.weight`, o.headDim);
        norm(`${p}attn_k_norm.weight`, o.headDim);
        matrix(`${p}attn_q.weight`, [E, E]);
        matrix(`${p}attn_k.weight`, [E, kvDim]);
        matrix(`${p}attn_v.weight`, [E, kvDim]);
        matrix(`${p}attn_output.weight`, [E, E]);
      } else {
        tensor(`${p}shortconv.conv.weight`, [convKernel, E], GGMLType.F32, 1 / Math.sqrt(convKernel));
        matrix(`${p}shortconv.in_proj.weight`, [E, 3 * E]);
        matrix(`${p}shortconv.out_proj.weight`, [E, E]);
      }
      return;
    }
    // Qwen3.5 and Qwen3-Next: no ffn_norm; post_attention_norm is the norm before the feed-forward.
    norm(`${p}attn_norm.weight`);
    norm(`${p}post_attention_norm.weight`);
    if (attends(i)) {
      // Gated attention: each head's query rows are followed by its gate's.
      matrix(`${p}attn_q.weight`, [E, 2 * qDim]);
      matrix(`${p}attn_k.weight`, [E, kvDim]);
      matrix(`${p}attn_v.weight`, [E, kvDim]);
      matrix(`${p}attn_output.weight`, [qDim, E]);
      norm(`${p}attn_q_norm.weight`, o.headDim);
      norm(`${p}attn_k_norm.weight`, o.headDim);
    } else {
      const keyDim = o.ssmStateSize * o.ssmGroups;
      const valueDim = o.ssmStateSize * o.ssmHeads;
      const convDim = 2 * keyDim + valueDim;
      matrix(`${p}attn_qkv.weight`, [E, convDim]);
      matrix(`${p}attn_gate.weight`, [E, valueDim]);
      tensor(`${p}ssm_conv1d.weight`, [convKernel, convDim], GGMLType.F32, 1 / Math.sqrt(convKernel));
      // dt = softplus(bias + ...) around 0.01, and A in [1, 16) (its log-decay must be negative: ssm_a = -A).
      tensor(`${p}ssm_dt.bias`, [o.ssmHeads], GGMLType.F32, 0.5, Math.log(Math.expm1(0.01)));
      tensor(`${p}ssm_a`, [o.ssmHeads], GGMLType.F32, 0, 0, undefined, (_v, col) => -(1 + ((col * 7) % 15)));
      if (arch === 'qwen3next') {
        matrix(`${p}ssm_ba.weight`, [E, 2 * o.ssmHeads]); // beta and alpha in one matrix
      } else {
        matrix(`${p}ssm_beta.weight`, [E, o.ssmHeads]);
        matrix(`${p}ssm_alpha.weight`, [E, o.ssmHeads]);
      }
      norm(`${p}ssm_norm.weight`, o.ssmStateSize);
      matrix(`${p}ssm_out.weight`, [valueDim, E]);
    }
    ffn();
  }

  const fileSize = w.write(path);
  const tensors = w.tensorInfos();
  const nParams = tensors.reduce((sum, t) => sum + t.dims.reduce((a, b) => a * b, 1), 0);
  return { path, fileSize, options: o, arch, nVocab, nParams, tensors, specialTokens: SPECIAL_TOKEN_IDS };
}

// ---- the llama generator most tests use (ChatML by default, as before there were families) ----

/** Options only some families read (the llama generator has none of them). */
const FAMILY_ONLY_OPTIONS = ['slidingWindow', 'swaPattern', 'experts', 'expertsUsed', 'attentionInterval', 'ropeDims', 'ssmStateSize', 'ssmGroups', 'ssmHeads', 'convKernel', 'yarnFactor'] as const;
type FamilyOnlyOption = (typeof FAMILY_ONLY_OPTIONS)[number];

export type LlamaModelOptions = Omit<ModelOptions, 'family' | FamilyOnlyOption | 'template' | 'chatTemplate'> & {
  /** tokenizer.chat_template: ChatML by default; null writes none (a base model: plain framing). */
  chatTemplate: string | null;
};
export type LlamaModelInput = { [K in keyof LlamaModelOptions]?: LlamaModelOptions[K] | undefined };
export type WriteLlamaModelResult = WriteModelResult;

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

/** A llama-architecture model with the ChatML template (the shape most tests use). */
export function writeLlamaModel(path: string, options: LlamaModelInput = {}, content: ModelContent = {}): WriteLlamaModelResult {
  return writeModel(path, { ...resolveLlamaModelOptions(options), family: 'llama', template: 'chatml' }, content);
}
