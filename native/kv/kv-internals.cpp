#include "kv/kv-internals.h"

#include "util/error.h"

#include "llama.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <typeinfo>
#include <unordered_map>

#ifdef FML_HAVE_KV_INTERNALS
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cells.h"
#include "llama-memory-hybrid.h"
#include "llama-memory-recurrent.h"
#include "llama-model.h"
#endif

namespace fml {

bool kv_internals_available() {
#ifdef FML_HAVE_KV_INTERNALS
    return true;
#else
    return false;
#endif
}

#ifdef FML_HAVE_KV_INTERNALS
namespace {

// The plain hybrid class only: its subclasses (an indexer cache next to the halves) keep more state.
llama_memory_hybrid * hybrid_of(llama_context * ctx) {
    llama_memory_i * mem = llama_get_memory(ctx);
    return mem != nullptr && typeid(*mem) == typeid(llama_memory_hybrid) ? static_cast<llama_memory_hybrid *>(mem) : nullptr;
}

// The attention KV cache that holds every retained token of a sequence (with sliding-window layers,
// the full layers' cache).
llama_kv_cache * full_cache_of(llama_context * ctx) {
    llama_memory_i * mem = llama_get_memory(ctx);
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return kv;
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return iswa->get_base();
    }
    if (auto * hybrid = hybrid_of(ctx)) {
        return hybrid->get_mem_attn();
    }
    return nullptr;
}

// Every attention KV cache of the context: with sliding-window layers the full layers' and the
// window's; a hybrid's attention half.
std::vector<llama_kv_cache *> attention_caches_of(llama_context * ctx) {
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(llama_get_memory(ctx))) {
        return { iswa->get_base(), iswa->get_swa() };
    }
    llama_kv_cache * kv = full_cache_of(ctx);
    return kv != nullptr ? std::vector<llama_kv_cache *>{ kv } : std::vector<llama_kv_cache *>{};
}

// How a layer's graph applies RoPE, where it departs from the hyperparameters llama.cpp's K-shift
// reads (has_rope, get_rope_freq_*, the context's ext_factor): some graphs leave layers without
// positions that has_rope calls rotary (NoPE layers), and some slide without YaRN. Mirrors
// src/models/<arch>.cpp of the pinned llama.cpp.
struct layer_rope {
    bool positions;   // its keys carry RoPE positions
    float freq_base;
    float freq_scale;
    float ext_factor;
};

bool layer_has_positions(const llama_model & model, uint32_t il) {
    const llama_hparams & hp = model.hparams;
    if (hp.rope_type == LLAMA_ROPE_TYPE_NONE || !hp.has_rope(il)) {
        return false;
    }
    switch (model.arch) {
        case LLM_ARCH_SMOLLM3:
        case LLM_ARCH_LLAMA4:
        case LLM_ARCH_AFMOE:
            return hp.n_no_rope_layer_step > 0 && (il + 1) % hp.n_no_rope_layer_step != 0;
        case LLM_ARCH_SMALLTHINKER:
            return hp.n_no_rope_layer_step == hp.n_layer() || il % hp.n_no_rope_layer_step != 0;
        case LLM_ARCH_COHERE2:
        case LLM_ARCH_MUSE_GLIMMER:
            return hp.is_swa(il);
        case LLM_ARCH_COHERE2MOE:
            return hp.is_swa(il) || il < hp.n_layer_dense_lead;
        case LLM_ARCH_EXAONE4:
            return hp.is_swa(il) || hp.swa_type == LLAMA_SWA_TYPE_NONE;
        default:
            return true;
    }
}

// Mellum's and OLMo 2/3's sliding layers rope without YaRN, at the model's own base.
bool slides_without_yarn(const llama_model & model, uint32_t il) {
    return (model.arch == LLM_ARCH_MELLUM || model.arch == LLM_ARCH_OLMO2) && model.hparams.is_swa(il);
}

layer_rope rope_of_layer(const llama_model & model, const llama_cparams & cp, uint32_t il) {
    layer_rope r{ layer_has_positions(model, il), model.get_rope_freq_base(cp, (int) il), model.get_rope_freq_scale(cp, (int) il), cp.yarn_ext_factor };
    if (slides_without_yarn(model, il)) {
        r.freq_base = cp.rope_freq_base;
        r.freq_scale = 1.0f;
        r.ext_factor = 0.0f;
    }
    return r;
}

// The magnitude ggml's rope gives a rotated pair (ggml-cpu ops.cpp rope_yarn: cos and sin times
// attn_factor, and times 1 + 0.1 ln(1 / freq_scale) where ext_factor != 0). A model's own rope
// applies it once on purpose (YaRN's attention temperature); a K-shift graph that passes the same
// factors applies it again to keys already scaled.
float rope_magnitude(float freq_scale, float ext_factor, float attn_factor) {
    return attn_factor * (ext_factor != 0.0f ? 1.0f + 0.1f * logf(1.0f / freq_scale) : 1.0f);
}

// Whether llama.cpp's shift of this cache's keys would be wrong or kill the process.
bool llama_cache_shift_unsound(const llama_model & model, const llama_cparams & cp, llama_kv_cache & kv) {
    const llama_hparams & hp = model.hparams;
    if (hp.rope_type == LLAMA_ROPE_TYPE_NONE) {
        return false;   // llama.cpp builds no shift graph: it moves the cells, which is all there is to do
    }
    bool rotary = false;
    for (uint32_t il : kv.get_layer_ids()) {
        const layer_rope r = rope_of_layer(model, cp, il);
        rotary = rotary || hp.has_rope(il);
        // It turns a layer's keys by has_rope with the context's frequencies and YaRN factors: keys
        // without positions get some, sliding layers without YaRN get it, and YaRN's magnitude is
        // applied again at every shift (1.35x for gpt-oss).
        if (r.positions != hp.has_rope(il)) {
            return true;
        }
        if (r.positions && (r.freq_base != model.get_rope_freq_base(cp, (int) il) || r.freq_scale != model.get_rope_freq_scale(cp, (int) il) ||
                            r.ext_factor != cp.yarn_ext_factor ||
                            std::fabs(rope_magnitude(r.freq_scale, r.ext_factor, cp.yarn_attn_factor) - 1.0f) > 1e-6f)) {
            return true;
        }
    }
    // No rotary layer at all (Granite 4.0-H's NoPE under a norm rope type; the full cache of a model
    // whose every layer slides): its shift graph has no node reading the shift input, which stays
    // unallocated, and setting it aborts (GGML_ASSERT(buffer)).
    if (!rotary) {
        return true;
    }
    if (!ggml_is_quantized(kv.type_k())) {
        return false;
    }
    // A quantized cache's keys are turned through its Hadamard matrix (llama_mul_mat_hadamard, which
    // reads rot->ne[0]): made only for heads that are a multiple of 64 values, so for others (Phi-3's
    // 96) the shift dereferenced a null tensor; applied in blocks of its size to the rotary values
    // alone, which mixes heads where those are not whole blocks (partial rotary dims: Qwen3-Next's 64
    // of 256); and applied to latent attention's keys, which the graph stores without it.
    const ggml_init_params params{ ggml_tensor_overhead(), nullptr, true };
    ggml_context * probe = ggml_init(params);
    ggml_tensor * matrix = probe != nullptr ? kv.build_input_k_rot(probe) : nullptr;
    const int64_t block = matrix != nullptr ? matrix->ne[0] : 0;
    ggml_free(probe);
    if (block == 0 || hp.is_mla()) {
        return true;
    }
    for (uint32_t il : kv.get_layer_ids()) {
        const int64_t n_rot = hp.n_rot(il);
        const int64_t nope = hp.n_lora_kv > 0 ? (int64_t) hp.n_embd_head_k(il) - n_rot : 0;
        if (n_rot % block != 0 || nope % block != 0) {
            return true;
        }
    }
    return false;
}

} // namespace
#endif

bool kv_llama_shift_unsound(llama_context * ctx) {
#ifdef FML_HAVE_KV_INTERNALS
    const llama_model & model = *llama_get_model(ctx);
    for (llama_kv_cache * kv : attention_caches_of(ctx)) {
        if (llama_cache_shift_unsound(model, ctx->get_cparams(), *kv)) {
            return true;
        }
    }
    return false;
#else
    (void) ctx;
    return false;
#endif
}

bool kv_shift_may_be_unsound(const llama_model * model) {
#ifdef FML_HAVE_KV_INTERNALS
    const llama_hparams & hp = model->hparams;
    if (hp.rope_type == LLAMA_ROPE_TYPE_NONE) {
        return false;
    }
    if (hp.rope_scaling_type_train == LLAMA_ROPE_SCALING_TYPE_YARN || hp.rope_attn_factor != 1.0f || hp.yarn_attn_factor != 1.0f) {
        return true;
    }
    bool rotary = false;
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        rotary = rotary || hp.has_rope(il);
        if (layer_has_positions(*model, il) != hp.has_rope(il) ||
            (slides_without_yarn(*model, il) && (hp.rope_freq_scale_train_swa != 1.0f || hp.rope_freq_base_train_swa != hp.rope_freq_base_train))) {
            return true;
        }
    }
    return !rotary;
#else
    (void) model;
    return false;
#endif
}

kv_memory_kind kv_memory_of(llama_context * ctx) {
#ifdef FML_HAVE_KV_INTERNALS
    llama_memory_i * mem = llama_get_memory(ctx);
    if (dynamic_cast<llama_kv_cache_iswa *>(mem) != nullptr) {
        return kv_memory_kind::kv_iswa;
    }
    if (dynamic_cast<llama_kv_cache *>(mem) != nullptr) {
        return kv_memory_kind::kv;
    }
    if (hybrid_of(ctx) != nullptr) {
        return kv_memory_kind::hybrid;
    }
    return kv_memory_kind::other;
#else
    // Without the internals only what the public API can evict is known: a KV cache that shifts or not.
    const llama_model * model = llama_get_model(ctx);
    if (llama_model_is_recurrent(model) || llama_model_is_hybrid(model)) {
        return kv_memory_kind::other;
    }
    return llama_model_n_swa(model) > 0 ? kv_memory_kind::kv_iswa : kv_memory_kind::kv;
#endif
}

kv_model_layout kv_layout_of(const llama_model * model) {
    kv_model_layout out;
#ifdef FML_HAVE_KV_INTERNALS
    const llama_hparams & hp = model->hparams;
    // Which layers each half of llama_memory_hybrid holds, as llama_model::create_memory filters them.
    const bool nemotron = model->arch == LLM_ARCH_NEMOTRON_H || model->arch == LLM_ARCH_NEMOTRON_H_MOE;
    const bool falcon = model->arch == LLM_ARCH_FALCON_H1;
    const bool hybrid = llama_model_is_hybrid(model);
    const bool recurrent = llama_model_is_recurrent(model);
    uint64_t per_layer = (uint64_t) (hp.n_embd_r() + hp.n_embd_s()) * sizeof(float);   // llama.cpp keeps them in F32
    // A KV cache holds the multi-token-prediction (NextN) blocks' layers too, which the main graph
    // never attends with (DeepSeek-V3, Kimi K2, GLM-4.5/4.7 GGUFs carry one): their cells are
    // allocated, moved and saved like the others. create_memory keeps them out of the main context for
    // some architectures (and a recurrent state only ever covers the trunk).
    const llm_arch a = model->arch;
    const bool trunk_only = recurrent || a == LLM_ARCH_STEP35 || a == LLM_ARCH_HY_V3 || a == LLM_ARCH_GLM_DSA || a == LLM_ARCH_MIMO2 ||
                            a == LLM_ARCH_DEEPSEEK32 || a == LLM_ARCH_DOTS3NOTE || a == LLM_ARCH_QWEN3NEXT || a == LLM_ARCH_QWEN35 ||
                            a == LLM_ARCH_QWEN35MOE || a == LLM_ARCH_QWEN4EXP || a == LLM_ARCH_MINIMAX_01;
    const uint32_t cached_layers = trunk_only ? hp.n_layer() : hp.n_layer_all;
    for (uint32_t il = 0; il < cached_layers; ++il) {
        const bool both = falcon || (!nemotron || hp.n_ff(il) == 0);
        const bool attends = hybrid ? (falcon || (!hp.is_recr(il) && both)) : !recurrent;
        const bool recurs = il < hp.n_layer() && (recurrent || (hybrid && (falcon || (hp.is_recr(il) && both))));
        // Gemma 3n / Gemma 4's last layers read earlier layers' KV (shared_kv_layers): they attend, and
        // slide or not, but hold no cells of their own.
        const bool own_kv = attends && hp.has_kv(il);
        out.attention_layers += own_kv ? 1 : 0;
        out.rotary_layers += own_kv && layer_has_positions(*model, il) ? 1 : 0;
        out.sliding_layers.push_back(attends && hp.is_swa(il));
        if (own_kv) {
            out.kv_heads = out.kv_heads > 0 ? out.kv_heads : (int32_t) hp.n_head_kv(il);
            // Latent attention (DeepSeek-V2/V3, GLM-4.7-Flash) keeps no value cache: values are a view of the keys' latent.
            out.kv_values_per_token += (uint64_t) hp.n_embd_k_gqa(il) + (hp.is_mla() ? 0 : hp.n_embd_v_gqa(il));
        }
        if (recurs) {
            out.recurrent_bytes += per_layer + (hp.ple_conv_state() > 0 && hp.is_ple(il) ? (uint64_t) hp.ple_conv_state() * sizeof(float) : 0);
        }
    }
    // create_memory makes a llama_memory_hybrid unless the model slides (hybrid-iswa) or indexes (hybrid-idx).
    out.hybrid_supported = hybrid && hp.swa_type == LLAMA_SWA_TYPE_NONE && model->arch != LLM_ARCH_QWEN4EXP;
#else
    out.attention_layers = llama_model_is_recurrent(model) ? 0 : llama_model_n_layer(model);
    out.rotary_layers = out.attention_layers;   // unknown without the internals: as llama_model_rope_type says
    out.kv_heads = llama_model_n_head_kv(model);
    const int32_t head = llama_model_n_head(model) > 0 ? llama_model_n_embd(model) / llama_model_n_head(model) : 0;
    out.kv_values_per_token = 2ull * (uint64_t) out.attention_layers * (uint64_t) out.kv_heads * (uint64_t) head;
#endif
    return out;
}

#ifdef FML_HAVE_KV_INTERNALS
// out[cell] = position of the cell in `seq`, or -1.
static void cell_positions(const llama_kv_cache & kv, int32_t seq, std::vector<int32_t> & out) {
    const llama_kv_cells & cells = kv.get_cells(seq);
    out.assign(cells.size(), -1);
    for (uint32_t i = 0; i < cells.size(); ++i) {
        if (!cells.is_empty(i) && cells.seq_has(i, seq)) {
            out[i] = cells.pos_get(i);
        }
    }
}
#endif

bool kv_cell_positions(llama_context * ctx, int32_t seq, std::vector<int32_t> & out) {
    out.clear();
#ifdef FML_HAVE_KV_INTERNALS
    if (llama_kv_cache * kv = full_cache_of(ctx)) {
        cell_positions(*kv, seq, out);
        return true;
    }
#else
    (void) ctx;
    (void) seq;
#endif
    return false;
}

bool kv_window_positions(llama_context * ctx, int32_t seq, std::vector<int32_t> & out) {
    out.clear();
#ifdef FML_HAVE_KV_INTERNALS
    // Chunked windows (Llama 4's) see from the chunk's start, not the last `window` positions: what
    // the callers check (kv_window_matches, repair) does not describe them.
    auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(llama_get_memory(ctx));
    if (iswa != nullptr && llama_get_model(ctx)->hparams.swa_type == LLAMA_SWA_TYPE_STANDARD) {
        cell_positions(*iswa->get_swa(), seq, out);
        return true;
    }
#else
    (void) ctx;
    (void) seq;
#endif
    return false;
}

int32_t kv_full_cache_pos_min(llama_context * ctx, int32_t seq) {
#ifdef FML_HAVE_KV_INTERNALS
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(llama_get_memory(ctx))) {
        return iswa->get_base()->seq_pos_min(seq);
    }
    if (auto * hybrid = hybrid_of(ctx)) {
        return hybrid->get_mem_attn()->seq_pos_min(seq);
    }
#endif
    return llama_memory_seq_pos_min(llama_get_memory(ctx), seq);
}

bool kv_attention_seq_rm(llama_context * ctx, int32_t seq, int32_t p0, int32_t p1) {
#ifdef FML_HAVE_KV_INTERNALS
    if (auto * hybrid = hybrid_of(ctx)) {
        return hybrid->get_mem_attn()->seq_rm(seq, p0, p1);
    }
#endif
    return llama_memory_seq_rm(llama_get_memory(ctx), seq, p0, p1);
}

void kv_recurrent_set_pos(llama_context * ctx, int32_t seq, int32_t pos) {
#ifdef FML_HAVE_KV_INTERNALS
    if (auto * hybrid = hybrid_of(ctx)) {
        llama_memory_recurrent * recr = hybrid->get_mem_recr();
        const llama_pos at = recr->seq_pos_max(seq);
        if (at >= 0 && at != pos) {
            recr->seq_add(seq, -1, -1, pos - at);   // moves the state's position only
        }
    }
#else
    (void) ctx;
    (void) seq;
    (void) pos;
#endif
}

void kv_prune_sliding_window(llama_context * ctx, int32_t seq, int32_t next_pos) {
#ifdef FML_HAVE_KV_INTERNALS
    auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(llama_get_memory(ctx));
    const int32_t window = llama_model_n_swa(llama_get_model(ctx));
    if (iswa != nullptr && window > 0 && next_pos - window >= 0) {
        iswa->get_swa()->seq_rm(seq, 0, next_pos - window + 1);
    }
#else
    (void) ctx;
    (void) seq;
    (void) next_pos;
#endif
}

#if defined(FML_HAVE_KV_INTERNALS) && defined(FML_HAVE_KV_ROTATION)
namespace {

struct backend_deleter { void operator()(ggml_backend_t b) const { ggml_backend_free(b); } };
struct context_deleter { void operator()(ggml_context * c) const { ggml_free(c); } };
struct buffer_deleter { void operator()(ggml_backend_buffer_t b) const { ggml_backend_buffer_free(b); } };
struct gallocr_deleter { void operator()(ggml_gallocr_t g) const { ggml_gallocr_free(g); } };

// The Hadamard matrix llama.cpp stores a quantized cache's keys rotated by (attn_rot_k), copied into
// `dst` (on any device): llama.cpp fills it in host memory only.
void fill_key_hadamard(llama_kv_cache & kv, ggml_tensor * dst) {
    const ggml_init_params params{ ggml_tensor_overhead(), nullptr, true };
    std::unique_ptr<ggml_context, context_deleter> hctx(ggml_init(params));
    ggml_tensor * host = ggml_dup_tensor(hctx.get(), dst);
    ggml_backend_buffer_type_t host_type = ggml_backend_dev_buffer_type(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
    std::unique_ptr<ggml_backend_buffer, buffer_deleter> buf(ggml_backend_alloc_ctx_tensors_from_buft(hctx.get(), host_type));
    if (!buf) {
        throw fml_error(FML_ERR_KV, "could not allocate the keys' Hadamard matrix");
    }
    kv.set_input_k_rot(host);
    ggml_backend_tensor_set(dst, host->data, 0, ggml_nbytes(dst));
}

// The keys of `layers` (all on `dev`) in `stream`'s cells, rotated by delta[cell] positions: the
// graph of llama_kv_cache::build_graph_shift, with NEOX ordering as it uses for M-RoPE, on the chat's
// stream only. A quantized key goes back to F32 (and out of its Hadamard rotation, over the whole
// head: llama.cpp's shift rotates only the first n_rot values there, which is wrong for partial
// rotary dims), its first n_rot values turn, and it is rotated and quantized again: the moved cells'
// keys only (gathered and scattered by index), as a summary moves a few cells of a whole stream.
void rotate_keys_on(llama_context * ctx, llama_kv_cache & kv, ggml_backend_dev_t dev, const std::vector<uint32_t> & layers,
                    uint32_t stream, const std::vector<int32_t> & delta) {
    const llama_model & model = *llama_get_model(ctx);
    const llama_hparams & hp = model.hparams;
    const llama_cparams & cp = ctx->get_cparams();
    const uint32_t size = kv.get_size();
    std::unique_ptr<ggml_backend, backend_deleter> backend(ggml_backend_dev_init(dev, nullptr));
    if (!backend) {
        throw fml_error(FML_ERR_KV, "no backend for the device that holds the keys");
    }
    if (auto * set_threads = (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev), "ggml_backend_set_n_threads")) {
        set_threads(backend.get(), llama_n_threads(ctx));
    }
    // At most 16 tensors a layer (the quantized path), with room to spare; a graph sized to them.
    const size_t graph_size = 32 * layers.size() + 16;
    const ggml_init_params params{ ggml_tensor_overhead() * graph_size + ggml_graph_overhead_custom(graph_size, false), nullptr, true };
    std::unique_ptr<ggml_context, context_deleter> gctx(ggml_init(params));
    ggml_context * g = gctx.get();
    const bool quantized = ggml_is_quantized(kv.type_k());
    // Quantized: the moved cells (their indices and deltas) alone; otherwise every cell of the stream.
    std::vector<int32_t> moved;
    std::vector<int32_t> moved_delta;
    for (uint32_t i = 0; quantized && i < size; ++i) {
        if (delta[i] != 0) {
            moved.push_back((int32_t) i);
            moved_delta.push_back(delta[i]);
        }
    }
    if (quantized && moved.empty()) {
        return;
    }
    ggml_tensor * shift = ggml_new_tensor_1d(g, GGML_TYPE_I32, quantized ? (int64_t) moved.size() : size);
    ggml_set_input(shift);
    ggml_tensor * rows_at = nullptr;
    if (quantized) {
        rows_at = ggml_new_tensor_1d(g, GGML_TYPE_I32, (int64_t) moved.size());
        ggml_set_input(rows_at);
    }
    // Latent attention's graph stores its keys without the cache's Hadamard matrix (build_attn_inp_k).
    ggml_tensor * hadamard = quantized && !hp.is_mla() ? kv.build_input_k_rot(g) : nullptr;
    ggml_cgraph * gf = ggml_new_graph_custom(g, graph_size, false);
    // M-RoPE text keys turn as NEOX (llama.cpp's build_rope_shift does the same); and a pure rotation:
    // an attn_factor that cancels the magnitude rope_magnitude says the rope applies.
    const int mode = hp.rope_type == LLAMA_ROPE_TYPE_MROPE || hp.rope_type == LLAMA_ROPE_TYPE_IMROPE ? LLAMA_ROPE_TYPE_NEOX : hp.rope_type;
    auto rope = [&](ggml_tensor * x, uint32_t il, bool inplace) {
        const auto op = inplace ? &ggml_rope_ext_inplace : &ggml_rope_ext;   // same parameters
        const layer_rope r = rope_of_layer(model, cp, il);
        return op(g, x, shift, nullptr, (int) hp.n_rot(il), mode, (int) cp.n_ctx_orig_yarn, r.freq_base, r.freq_scale, r.ext_factor,
                  1.0f / rope_magnitude(r.freq_scale, r.ext_factor, 1.0f), cp.yarn_beta_fast, cp.yarn_beta_slow);
    };
    for (uint32_t il : layers) {
        ggml_tensor * k = kv.get_k_storage((int32_t) il);
        const int64_t n_rot = hp.n_rot(il);
        const int64_t head = hp.n_embd_head_k(il);
        const int64_t n_head = hp.n_head_kv(il);
        const int64_t nope = hp.n_lora_kv > 0 ? head - n_rot : 0;
        const size_t row = ggml_row_size(k->type, hp.n_embd_k_gqa(il));
        const size_t at = (size_t) stream * size * row;
        ggml_tensor * cur;
        if (!quantized) {
            cur = rope(ggml_view_3d(g, k, n_rot, n_head, size, ggml_row_size(k->type, head), row, at + ggml_row_size(k->type, nope)), il, true);
        } else {
            const int64_t n = (int64_t) moved.size();
            ggml_tensor * cells = ggml_view_2d(g, k, hp.n_embd_k_gqa(il), size, row, at);
            ggml_tensor * x = ggml_reshape_3d(g, ggml_get_rows(g, cells, rows_at), head, n_head, n);   // F32
            if (hadamard != nullptr) {
                x = llama_mul_mat_hadamard(g, x, hadamard);   // its own inverse
            }
            // A head is [nope unrotated | n_rot rotary | the rest unrotated]: latent attention's keys
            // rotate after the latent, the others first (partial rotary dims after them).
            const auto part = [&](int64_t from, int64_t len) {
                return ggml_view_3d(g, x, len, n_head, n, x->nb[1], x->nb[2], ggml_row_size(GGML_TYPE_F32, from));
            };
            ggml_tensor * turned = rope(part(nope, n_rot), il, false);
            if (nope > 0) {
                turned = ggml_concat(g, ggml_cont(g, part(0, nope)), turned, 0);
            }
            if (nope + n_rot < head) {
                turned = ggml_concat(g, turned, ggml_cont(g, part(nope + n_rot, head - nope - n_rot)), 0);
            }
            if (hadamard != nullptr) {
                turned = llama_mul_mat_hadamard(g, turned, hadamard);
            }
            cur = ggml_set_rows(g, cells, ggml_reshape_2d(g, turned, hp.n_embd_k_gqa(il), n), rows_at);
        }
        ggml_build_forward_expand(gf, cur);
    }
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        if (!ggml_backend_supports_op(backend.get(), ggml_graph_node(gf, i))) {
            throw fml_error(FML_ERR_KV, std::string("the device that holds the keys cannot rotate them (") + ggml_backend_name(backend.get()) + ": " +
                            ggml_op_desc(ggml_graph_node(gf, i)) + ")");
        }
    }
    std::unique_ptr<ggml_gallocr, gallocr_deleter> galloc(ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend.get())));
    if (!galloc || !ggml_gallocr_alloc_graph(galloc.get(), gf)) {
        throw fml_error(FML_ERR_KV, "could not allocate the key rotation's graph");
    }
    ggml_backend_tensor_set(shift, quantized ? moved_delta.data() : delta.data(), 0, ggml_nbytes(shift));
    if (rows_at != nullptr) {
        ggml_backend_tensor_set(rows_at, moved.data(), 0, ggml_nbytes(rows_at));
    }
    if (hadamard != nullptr) {
        fill_key_hadamard(kv, hadamard);
    }
    if (ggml_backend_graph_compute(backend.get(), gf) != GGML_STATUS_SUCCESS) {
        throw fml_error(FML_ERR_KV, "the key rotation failed to compute");
    }
    ggml_backend_synchronize(backend.get());
}

} // namespace
#endif

bool kv_rotation_supported(const llama_model * model) {
#if defined(FML_HAVE_KV_INTERNALS) && defined(FML_HAVE_KV_ROTATION)
    const llama_hparams & hp = model->hparams;
    const bool rope_supported = hp.rope_type == LLAMA_ROPE_TYPE_NORM || hp.rope_type == LLAMA_ROPE_TYPE_NEOX || hp.rope_type == LLAMA_ROPE_TYPE_MROPE ||
                                hp.rope_type == LLAMA_ROPE_TYPE_IMROPE;
    // Chunked windows (Llama 4) and symmetric ones keep cells a plain window would not: not moved here.
    if (!rope_supported || (hp.swa_type != LLAMA_SWA_TYPE_NONE && hp.swa_type != LLAMA_SWA_TYPE_STANDARD)) {
        return false;
    }
    if (llama_model_is_recurrent(model) || (llama_model_is_hybrid(model) && !kv_layout_of(model).hybrid_supported)) {
        return false;
    }
    for (const auto & layer : model->layers) {
        if (layer.rope_freqs != nullptr || layer.rope_long != nullptr || layer.rope_short != nullptr) {
            return false;
        }
    }
    return true;
#else
    (void) model;
    return false;
#endif
}

bool kv_rotation_available(llama_context * ctx) {
#if defined(FML_HAVE_KV_INTERNALS) && defined(FML_HAVE_KV_ROTATION)
    if (!kv_rotation_supported(llama_get_model(ctx))) {
        return false;
    }
    const kv_memory_kind kind = kv_memory_of(ctx);
    return (kind == kv_memory_kind::kv || kind == kv_memory_kind::kv_iswa || kind == kv_memory_kind::hybrid) && full_cache_of(ctx) != nullptr;
#else
    (void) ctx;
    return false;
#endif
}

void kv_rotate_positions(llama_context * ctx, int32_t seq, const std::vector<std::pair<int32_t, int32_t>> & moves) {
#if defined(FML_HAVE_KV_INTERNALS) && defined(FML_HAVE_KV_ROTATION)
    if (!kv_rotation_available(ctx)) {
        throw fml_error(FML_ERR_INTERNAL, "keys rotated on a context whose keys this build cannot rotate");
    }
    if (moves.empty()) {
        return;
    }
    for (const auto & [from, to] : moves) {
        if (to < 0) {
            throw fml_error(FML_ERR_INTERNAL, "a position moved below 0 (" + std::to_string(from) + " -> " + std::to_string(to) + ")");
        }
    }
    std::unordered_map<int32_t, int32_t> target(moves.begin(), moves.end());
    const llama_hparams & hp = llama_get_model(ctx)->hparams;
    // One job per cache and device that holds keys: its layers, and how far each of its cells moves.
    struct job {
        llama_kv_cache * kv;
        uint32_t stream;
        ggml_backend_dev_t dev;
        std::vector<uint32_t> layers;
        const std::vector<int32_t> * delta;
    };
    const std::vector<llama_kv_cache *> caches = attention_caches_of(ctx);
    std::vector<std::vector<int32_t>> deltas(caches.size());
    std::vector<job> jobs;
    for (size_t c = 0; c < caches.size(); ++c) {
        llama_kv_cache & kv = *caches[c];
        const llama_kv_cells & cells = kv.get_cells(seq);
        deltas[c].assign(kv.get_size(), 0);
        for (uint32_t i = 0; i < cells.size(); ++i) {
            if (!cells.is_empty(i) && cells.seq_has(i, seq)) {
                const auto it = target.find(cells.pos_get(i));
                if (it != target.end()) {
                    deltas[c][i] = it->second - it->first;
                }
            }
        }
        std::map<ggml_backend_dev_t, std::vector<uint32_t>> layers_by_device;
        for (uint32_t il : kv.get_layer_ids()) {
            if (layer_has_positions(*llama_get_model(ctx), il)) {
                ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(kv.get_k_storage((int32_t) il)->buffer);
                ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
                if (dev == nullptr && ggml_backend_buft_is_host(buft)) {
                    dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);   // a plain host buffer names no device
                }
                if (dev == nullptr) {
                    throw fml_error(FML_ERR_KV, "the keys are in a buffer of no known device");
                }
                layers_by_device[dev].push_back(il);
            }
        }
        const uint32_t stream = kv.get_n_stream() == 1 ? 0 : (uint32_t) seq;   // llama.cpp maps sequence s to stream s
        for (auto & [dev, layers] : layers_by_device) {
            jobs.push_back({ &kv, stream, dev, std::move(layers), &deltas[c] });
        }
    }
    llama_synchronize(ctx);   // the context's own work on these keys is done
    for (size_t j = 0; j < jobs.size(); ++j) {
        try {
            rotate_keys_on(ctx, *jobs[j].kv, jobs[j].dev, jobs[j].layers, jobs[j].stream, *jobs[j].delta);
        } catch (...) {
            // Keys split over caches or devices: those already rotated go back (as far as they can),
            // so keys and positions agree; the first failure is what the caller hears.
            for (size_t done = 0; done < j; ++done) {
                std::vector<int32_t> back(jobs[done].delta->size());
                std::transform(jobs[done].delta->begin(), jobs[done].delta->end(), back.begin(), [](int32_t d) { return -d; });
                try {
                    rotate_keys_on(ctx, *jobs[done].kv, jobs[done].dev, jobs[done].layers, jobs[done].stream, back);
                } catch (...) {
                }
            }
            throw;
        }
    }
    for (size_t c = 0; c < caches.size(); ++c) {
        // The cells object is the cache's own (get_cells hands it out read-only): positions are set
        // here without pos_add, whose pending shift llama.cpp would apply again (and GGML_ABORTs on for M-RoPE).
        auto & cells = const_cast<llama_kv_cells &>(caches[c]->get_cells(seq));
        const std::vector<int32_t> & delta = deltas[c];
        for (uint32_t i = 0; i < cells.size(); ++i) {
            if (delta[i] == 0) {
                continue;
            }
            const llama_pos from = cells.pos_get(i);
            const llama_pos to = from + delta[i];
            llama_kv_cell_ext ext = cells.ext_get(i);
            cells.rm(i);
            cells.pos_set(i, to);
            cells.seq_add(i, seq);
            if (ext.x == from && ext.y == from) {
                ext.x = ext.y = to;   // a text token's 2D position is its position (llama_batch_allocr)
            }
            cells.ext_set(i, ext);
        }
    }
    if (auto * hybrid = hybrid_of(ctx)) {
        const auto it = target.find(hybrid->get_mem_recr()->seq_pos_max(seq));
        if (it != target.end()) {
            kv_recurrent_set_pos(ctx, seq, it->second);
        }
    }
#else
    (void) ctx;
    (void) seq;
    (void) moves;
    throw fml_error(FML_ERR_INTERNAL, "this build cannot rotate keys");
#endif
}

bool kv_keeps_values(llama_context * ctx) {
#ifdef FML_HAVE_KV_INTERNALS
    return !llama_get_model(ctx)->hparams.is_mla();
#else
    (void) ctx;
    return true;
#endif
}

size_t kv_cell_ext_bytes(llama_context * ctx) {
#ifdef FML_HAVE_KV_INTERNALS
    llama_kv_cache * kv = full_cache_of(ctx);
    return kv != nullptr && kv->has_cell_ext() ? sizeof(llama_kv_cell_ext) : 0;
#else
    const enum llama_rope_type rope = llama_model_rope_type(llama_get_model(ctx));
    return rope == LLAMA_ROPE_TYPE_MROPE || rope == LLAMA_ROPE_TYPE_IMROPE ? 12 : 0;
#endif
}

size_t kv_allocated_bytes(llama_context * ctx) {
#ifdef FML_HAVE_KV_INTERNALS
    size_t total = 0;
    for (const auto & [type, bytes] : llama_get_memory(ctx)->memory_breakdown()) {
        (void) type;
        total += bytes;
    }
    return total;
#else
    (void) ctx;
    return 0;
#endif
}

} // namespace fml
