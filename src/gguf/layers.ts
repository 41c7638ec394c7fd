/**
 * The transformer blocks of the generated families: the tensors each layer holds, with the names
 * and shapes the pinned llama.cpp loads for its architecture (src/models/<arch>.cpp there). models.ts
 * writes the metadata, the embeddings and the output around them.
 */
import { GGMLType } from './format.js';
import type { ModelOptions } from './model-options.js';

/** Weight scales: chosen so the residual stream mixes context and logits are peaked but not one-hot. */
export const LAYER_GAIN = 1.5; // std = LAYER_GAIN / sqrt(fan_in) for attention / FFN matrices
export const NORM_NOISE = 0.05; // norm weights ~ 1 + NORM_NOISE * N(0, 1)
export const BIAS_STD = 0.1;
/** DeepSeek-V2's latent attention in V2-Lite's proportions (heads of 128 values from the latent and 64
 * rotary ones, a latent of 512): the latent is 4 x headDim and the shared rotary key headDim / 2. */
const MLA_LATENT_PER_HEAD_DIM = 4;
/** Mamba: d_inner = 2 x embd (llama.cpp accepts only that), the usual state size and kernel. */
export const SSM = { stateSize: 16, convKernel: 4, dtRank: 4 } as const;

/** A model's geometry as its metadata and layers need it, derived once from its options. */
export interface ModelShape {
  o: ModelOptions;
  arch: string;
  E: number;
  qDim: number;
  kvDim: number;
  /** Qwen3.5 (M-RoPE), and the Gated DeltaNet hybrids: Qwen3.5 and Qwen3-Next (plain RoPE) */
  qwen35: boolean;
  deltaNet: boolean;
  /** routed and shared experts in every layer (Qwen3.5 MoE, Qwen3-Next) */
  moeShared: boolean;
  /** attention layers among recurrent ones, by attentionInterval */
  hybrid: boolean;
  nemotron: boolean;
  rot: number;
  convKernel: number;
  /** gemma4: the full layers' head size (2 x headDim); the others' headDim */
  fullHeadDim: number;
  /** deepseek2: the latent's size and the shared rotary key's; queries' own low-rank projection (q-LoRA; 0: none, as V2-Lite) */
  mlaLatent: number;
  mlaRope: number;
  qLora: number;
  /** gemma3, gemma4, gpt-oss: layer i slides (every swaPattern-th is full attention; llama.cpp's set_swa_pattern) */
  slides(i: number): boolean;
  /** Nemotron 3: even layers mix (every attentionInterval-th mixer attends, the others are Mamba-2), odd ones are experts */
  nemotronKind(i: number): 'mamba' | 'attention' | 'experts';
  /** layer i has attention (hybrids: the others are recurrent) */
  attends(i: number): boolean;
}

export function modelShape(o: ModelOptions, arch: string): ModelShape {
  const qwen35 = arch === 'qwen35' || arch === 'qwen35moe';
  const deltaNet = qwen35 || arch === 'qwen3next';
  const hybrid = deltaNet || arch === 'lfm2' || arch === 'granitehybrid';
  const nemotron = arch === 'nemotron_h_moe';
  const nemotronKind = (i: number): 'mamba' | 'attention' | 'experts' =>
    i % 2 === 1 ? 'experts' : (i / 2 + 1) % o.attentionInterval === 0 ? 'attention' : 'mamba';
  return {
    o,
    arch,
    E: o.embd,
    qDim: o.heads * o.headDim,
    kvDim: o.kvHeads * o.headDim,
    qwen35,
    deltaNet,
    moeShared: arch === 'qwen35moe' || arch === 'qwen3next',
    hybrid,
    nemotron,
    rot: o.ropeDims || (arch === 'glm4moe' ? o.headDim / 2 : o.headDim),
    convKernel: o.convKernel || (arch === 'lfm2' ? 3 : 4),
    fullHeadDim: arch === 'gemma4' ? 2 * o.headDim : o.headDim,
    mlaLatent: MLA_LATENT_PER_HEAD_DIM * o.headDim,
    mlaRope: o.ropeDims || o.headDim / 2,
    // DeepSeek-V3's q-LoRA rank is 1536 for a hidden size of 7168: about a fifth; a multiple of 32 here (q8_0 rows).
    qLora: o.family === 'deepseek3' ? Math.max(32, Math.round(o.embd / 4 / 32) * 32) : 0,
    slides: (i) => (i + 1) % o.swaPattern !== 0,
    nemotronKind,
    attends: (i) => (nemotron ? nemotronKind(i) === 'attention' : !hybrid || (i + 1) % o.attentionInterval === 0),
  };
}

/** Where a layer's tensors go (writeModel: seeded random values, or a trained model's). */
export interface TensorSink {
  tensor(name: string, dims: number[], type: GGMLType, std: number, mean?: number, rowScale?: (row: number) => number, map?: (v: number, i: number) => number): void;
  /** a weight matrix of the model's weight type (std LAYER_GAIN / sqrt(fan_in) unless given) */
  matrix(name: string, dims: number[], std?: number): void;
  /** F32 norm weights around 1 (embd of them unless given) */
  norm(name: string, n?: number): void;
  bias(name: string, n: number): void;
  /** given values */
  values(name: string, dims: number[], type: GGMLType, values: Float32Array): void;
}

/** Writes every transformer block of the model. */
export function writeLayers(shape: ModelShape, sink: TensorSink): void {
  const { o, arch, E, qDim, kvDim, deltaNet, moeShared, hybrid, nemotron, convKernel, fullHeadDim, mlaLatent, mlaRope, qLora, slides, nemotronKind, attends } = shape;
  const { tensor, matrix, norm, bias, values } = sink;
  let ropeFreqsWritten = false;
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
    if (arch === 'glm4moe') {
      glm4MoeLayer(i);
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

  /** One DeepSeek-V2/V3 layer: latent attention, then a dense feed-forward (layer 0) or routed and shared experts. */
  function deepseek2Layer(i: number): void {
    const p = `blk.${i}.`;
    norm(`${p}attn_norm.weight`);
    if (qLora > 0) {
      // V3: queries through their own compressed projection, normed between its halves.
      matrix(`${p}attn_q_a.weight`, [E, qLora]);
      norm(`${p}attn_q_a_norm.weight`, qLora);
      matrix(`${p}attn_q_b.weight`, [qLora, o.heads * (o.headDim + mlaRope)]);
    } else {
      matrix(`${p}attn_q.weight`, [E, o.heads * (o.headDim + mlaRope)]);
    }
    matrix(`${p}attn_kv_a_mqa.weight`, [E, mlaLatent + mlaRope]);
    norm(`${p}attn_kv_a_norm.weight`, mlaLatent);
    // Per-head decompressions of the latent (small: kept F32 whatever the weight type, as q8_0 needs rows of 32).
    tensor(`${p}attn_k_b.weight`, [o.headDim, mlaLatent, o.heads], GGMLType.F32, LAYER_GAIN / Math.sqrt(o.headDim));
    tensor(`${p}attn_v_b.weight`, [mlaLatent, o.headDim, o.heads], GGMLType.F32, LAYER_GAIN / Math.sqrt(mlaLatent));
    matrix(`${p}attn_output.weight`, [o.heads * o.headDim, E]);
    norm(`${p}ffn_norm.weight`);
    denseThenExperts(i, qLora > 0); // V3's sigmoid routing picks with a selection bias
  }

  /** DeepSeek's and GLM's feed-forward: dense in layer 0, routed experts (with a selection bias: `selectionBias`) and a shared one after. */
  function denseThenExperts(i: number, selectionBias: boolean): void {
    const p = `blk.${i}.`;
    if (i === 0) {
      matrix(`${p}ffn_gate.weight`, [E, o.ffn]);
      matrix(`${p}ffn_up.weight`, [E, o.ffn]);
      matrix(`${p}ffn_down.weight`, [o.ffn, E]);
      return;
    }
    tensor(`${p}ffn_gate_inp.weight`, [E, o.experts], GGMLType.F32, 1 / Math.sqrt(E));
    if (selectionBias) bias(`${p}exp_probs_b.bias`, o.experts);
    matrix(`${p}ffn_gate_exps.weight`, [E, o.ffn, o.experts]);
    matrix(`${p}ffn_up_exps.weight`, [E, o.ffn, o.experts]);
    matrix(`${p}ffn_down_exps.weight`, [o.ffn, E, o.experts]);
    matrix(`${p}ffn_gate_shexp.weight`, [E, o.ffn]);
    matrix(`${p}ffn_up_shexp.weight`, [E, o.ffn]);
    matrix(`${p}ffn_down_shexp.weight`, [o.ffn, E]);
  }

  /** Attention projections with biases (GLM-4.5, gpt-oss). */
  function biasedQkv(p: string): void {
    matrix(`${p}attn_q.weight`, [E, qDim]);
    matrix(`${p}attn_k.weight`, [E, kvDim]);
    matrix(`${p}attn_v.weight`, [E, kvDim]);
    bias(`${p}attn_q.bias`, qDim);
    bias(`${p}attn_k.bias`, kvDim);
    bias(`${p}attn_v.bias`, kvDim);
  }

  /** One GLM-4.5 layer: biased attention, the post-attention norm before the feed-forward, a dense one (layer 0) or routed experts with a selection bias and a shared one. */
  function glm4MoeLayer(i: number): void {
    const p = `blk.${i}.`;
    norm(`${p}attn_norm.weight`);
    biasedQkv(p);
    matrix(`${p}attn_output.weight`, [qDim, E]);
    norm(`${p}post_attention_norm.weight`);
    denseThenExperts(i, true);
  }

  /** One gpt-oss layer: biased attention with a sink logit per head, then routed experts with biases. */
  function gptOssLayer(i: number): void {
    const p = `blk.${i}.`;
    norm(`${p}attn_norm.weight`);
    biasedQkv(p);
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
    values(`${p}ssm_a`, [1, o.ssmHeads], GGMLType.F32, a);
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
}
