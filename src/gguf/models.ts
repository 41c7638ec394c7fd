/**
 * Model generators: seeded random-weight GGUF files in the shapes of the families people load
 * (Llama 3, Mistral, Qwen 2/3, Gemma 3/4, Phi-3, a Qwen3 MoE, gpt-oss, DeepSeek-V2's latent attention), the M-RoPE ones (Qwen2-VL and
 * Qwen3-VL text models), the hybrids of attention and a recurrent state (Qwen3.5 and its MoE with
 * Gated DeltaNet layers, Qwen3-Next, LFM2 with short convolutions, Granite 4.0-H and Nemotron 3 with
 * Mamba-2 layers), and Mamba, whose recurrent state alone
 * finite memory cannot evict from, so that answer can be tested too.
 * This file writes a model's metadata, embeddings and output; layers.ts its transformer blocks;
 * model-options.ts says what the families and options are.
 */
import { GGMLType, GGUF_DEFAULT_ALIGNMENT, GGUFValueType, GGUFWriter, ggmlTypeSize, type TensorProducer, type TensorSummary } from './format.js';
import { encodeValues } from './encode.js';
import { BIAS_STD, LAYER_GAIN, NORM_NOISE, SSM, modelShape, writeLayers, type TensorSink } from './layers.js';
import {
  MODEL_FAMILIES,
  resolveLlamaModelOptions,
  resolveModelOptions,
  type FamilySpec,
  type LlamaModelInput,
  type ModelInput,
  type ModelOptions,
  type WeightType,
} from './model-options.js';
import { SeededRandom, hashSeed } from './random.js';
import { TEMPLATES } from './templates.js';
import { SPECIAL_TOKEN_IDS, buildVocab } from './vocab.js';

export * from './model-options.js';

const WEIGHT_GGML_TYPE: Record<WeightType, GGMLType> = { f32: GGMLType.F32, f16: GGMLType.F16, q8_0: GGMLType.Q8_0 };
/** llama_ftype values for general.file_type. */
const LLAMA_FTYPE: Record<WeightType, number> = { f32: 0, f16: 1, q8_0: 7 };

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

/** Embedding and output scales (the layers' are in layers.ts). */
const EMBED_STD = 1.0;
const LOGIT_STD = 4.0; // output.weight std = LOGIT_STD / sqrt(embd) -> logits of std ~LOGIT_STD
const BYTE_LOGIT_SCALE = 0.5; // output rows of the 256 byte tokens are scaled down by this
/** RoPE bases of the real models (the others use 10000). */
const ROPE_BASE: Record<string, number> = { glm4moe: 1e6, 'gpt-oss': 150000, gemma3: 1e6, qwen35: 1e7, qwen35moe: 1e7, qwen3next: 1e7, qwen3vl: 5e6, lfm2: 1e6 };
/** YaRN by family: gpt-oss's trained context is 32 x the original (131072 = 32 x 4096). */
const YARN_FACTOR: Record<string, number> = { 'gpt-oss': 32 };

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
  const vocab = buildVocab(o.vocabExtra, template.control, content.vocabPieces, content.vocabCommon ?? true, 'userDefined' in template ? template.userDefined : []);
  const nVocab = vocab.tokens.length;
  const wtype = WEIGHT_GGML_TYPE[o.type];
  const { arch } = family;
  const shape = modelShape(o, arch);
  const { E, qwen35, deltaNet, moeShared, nemotron, rot, convKernel, fullHeadDim, mlaLatent, mlaRope, qLora, slides, nemotronKind, attends } = shape;

  const w = new GGUFWriter(GGUF_DEFAULT_ALIGNMENT);
  const key = (k: string) => `${arch}.${k}`;
  w.addString('general.architecture', arch);
  w.addString('general.name', o.name);
  w.addUint32('general.file_type', LLAMA_FTYPE[o.type]);
  w.addUint32(key('vocab_size'), nVocab);
  w.addUint32(key('context_length'), o.ctx);
  w.addUint32(key('embedding_length'), E);
  w.addUint32(key('block_count'), o.layers + o.nextnLayers);
  if (o.nextnLayers > 0) w.addUint32(key('nextn_predict_layers'), o.nextnLayers);
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
    w.addUint32(key('attention.shared_kv_layers'), o.sharedKvLayers);
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
  // Routed experts, and for some families a shared one beside them.
  const sharedExpert = moeShared || nemotron;
  if (arch === 'qwen3moe' || arch === 'gpt-oss' || arch === 'deepseek2' || arch === 'glm4moe' || sharedExpert) {
    w.addUint32(key('expert_count'), o.experts);
    w.addUint32(key('expert_used_count'), o.expertsUsed);
    w.addUint32(key('expert_feed_forward_length'), o.ffn);
    if (sharedExpert) w.addUint32(key('expert_shared_feed_forward_length'), o.ffn);
  }
  if (arch === 'glm4moe') {
    // A dense first layer, then routed experts picked by sigmoid scores plus a selection bias, and one shared.
    w.addUint32(key('leading_dense_block_count'), 1);
    w.addUint32(key('expert_shared_count'), 1);
  }
  if (arch === 'glm4moe' || o.family === 'deepseek3') {
    w.addUint32(key('expert_gating_func'), 2);
    w.addBool(key('expert_weights_norm'), true);
    w.addFloat32(key('expert_weights_scale'), o.family === 'deepseek3' ? 2.5 : 1);
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
  if (arch === 'lfm2') w.addUint32(key('shortconv.l_cache'), convKernel);
  if (nemotron) {
    // A layer with a feed-forward length is an expert layer; the others mix (Mamba-2, or attention with KV heads).
    w.addInt32Array(key('feed_forward_length'), Array.from({ length: o.layers }, (_, i) => (nemotronKind(i) === 'experts' ? o.ffn : 0)));
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

  const tensor: TensorSink['tensor'] = (name, dims, type, std, mean = 0, rowScale, map) => {
    const given = content.weights?.(name, dims);
    if (given !== undefined) {
      w.addTensor({ name, dims, type, produce: valuesTensor(dims, type, given) });
      return;
    }
    const rng = new SeededRandom(hashSeed(o.seed, name));
    w.addTensor({ name, dims, type, produce: randomTensor(dims, type, rng, std, mean, rowScale, map) });
  };
  const matrix: TensorSink['matrix'] = (name, dims, std = LAYER_GAIN / Math.sqrt(dims[0]!)) => tensor(name, dims, wtype, std);
  const norm: TensorSink['norm'] = (name, n = E) => tensor(name, [n], GGMLType.F32, NORM_NOISE, 1);
  const bias: TensorSink['bias'] = (name, n) => tensor(name, [n], GGMLType.F32, BIAS_STD);
  const values: TensorSink['values'] = (name, dims, type, v) => w.addTensor({ name, dims, type, produce: valuesTensor(dims, type, v) });

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
  writeLayers(shape, { tensor, matrix, norm, bias, values });

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
    w.addUint32(key('attention.q_lora_rank'), qLora); // 0: queries straight from the hidden state (V2-Lite)
    w.addUint32(key('attention.kv_lora_rank'), mlaLatent);
    w.addUint32(key('leading_dense_block_count'), 1);
    w.addUint32(key('expert_shared_count'), 1);
  }

  const fileSize = w.write(path);
  const tensors = w.tensorInfos();
  const nParams = tensors.reduce((sum, t) => sum + t.dims.reduce((a, b) => a * b, 1), 0);
  return { path, fileSize, options: o, arch, nVocab, nParams, tensors, specialTokens: SPECIAL_TOKEN_IDS };
}

// ---- the llama generator most tests use (ChatML by default, as before there were families) ----

export type WriteLlamaModelResult = WriteModelResult;

/** A llama-architecture model with the ChatML template (the shape most tests use). */
export function writeLlamaModel(path: string, options: LlamaModelInput = {}, content: ModelContent = {}): WriteLlamaModelResult {
  return writeModel(path, { ...resolveLlamaModelOptions(options), family: 'llama', template: 'chatml' }, content);
}
