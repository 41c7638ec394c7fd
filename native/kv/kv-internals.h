// What llama.cpp's public API does not expose about a context's memory, read from its internal
// headers. This is the one file that includes them (from the pinned source, checked at configure
// time: FML_HAVE_KV_INTERNALS); without them, attention signals fall back to key norms and hybrid
// models are refused.
//   - Which KV cell holds which position: attention tensors (kq_soft_max) are indexed by cell, and
//     cells drift from position order once seq_rm frees holes that new tokens refill.
//   - The halves of a hybrid memory (attention KV + recurrent state): llama.cpp's hybrid seq_rm
//     refuses a partial range because its recurrent half cannot forget some tokens, so finite memory
//     evicts from the attention half alone and never touches the recurrent state's contents.
//   - Sliding-window layers' own cache, and the per-layer geometry of a model (which layers attend).
//   - The keys themselves, to move positions where llama.cpp will not (M-RoPE: kv_rotate_positions).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

struct llama_context;
struct llama_model;

namespace fml {

// True when this build can read llama.cpp's internals (cell map, hybrid halves).
bool kv_internals_available();

// The memory of a context as finite memory sees it.
enum class kv_memory_kind {
    kv,        // one KV cache
    kv_iswa,   // a full cache and a sliding-window cache
    hybrid,    // llama_memory_hybrid: one attention KV cache + a recurrent state
    other,     // anything else (recurrent only, hybrid with SWA or an indexer, ...): not supported
};
kv_memory_kind kv_memory_of(llama_context * ctx);

// What a model's layers keep per chat: how many layers attend (their KV is what finite memory bounds)
// and the bytes of one sequence's recurrent state (0 without one). Read from llama.cpp's hyperparameters.
struct kv_model_layout {
    int32_t attention_layers = 0;
    int32_t rotary_layers = 0;           // attention layers whose keys carry RoPE positions (0: NoPE, Granite 4.0-H)
    int32_t kv_heads = 0;                // KV heads of the first attention layer (llama_model_n_head_kv reads layer 0's)
    uint64_t kv_values_per_token = 0;    // K and V elements one token adds, over every attention layer
    uint64_t recurrent_bytes = 0;
    bool hybrid_supported = false;   // its hybrid memory is a plain llama_memory_hybrid (see kv_memory_kind)
    // Per layer: it attends within a sliding window, so its attention is indexed by the window
    // cache's cells, not the full cache's (empty without the internals).
    std::vector<bool> sliding_layers;
};
kv_model_layout kv_layout_of(const llama_model * model);

// out[cell] = position of the cell in `seq`, or -1 when the cell is empty or not in `seq`, for the
// attention KV cache that holds every retained token (a hybrid's attention half; with sliding-window
// layers, the full layers' cache). False (and `out` empty) when unavailable.
bool kv_cell_positions(llama_context * ctx, int32_t seq, std::vector<int32_t> & out);

// The same map for the sliding-window cache of a model with sliding layers (standard windows: the
// last `window` positions). False (and `out` empty) without one, for chunked windows, or without the
// internals.
bool kv_window_positions(llama_context * ctx, int32_t seq, std::vector<int32_t> & out);

// The sequence's smallest position in the cache that holds every retained token: with sliding-window
// layers the full cache's (llama.cpp reports the window cache's, whose out-of-window cells it reuses),
// for a hybrid the attention half's (the recurrent state's "position" is its last token's).
int32_t kv_full_cache_pos_min(llama_context * ctx, int32_t seq);

// Removes positions [p0, p1) of `seq` from the attention KV only (p1 < 0: to the end). For a hybrid
// the recurrent state is left as it is; for the other kinds this is llama_memory_seq_rm. False when
// llama.cpp refuses.
bool kv_attention_seq_rm(llama_context * ctx, int32_t seq, int32_t p0, int32_t p1);

// Sets the position a hybrid's recurrent state says it has reached (the state itself is unchanged):
// after it is restored from a snapshot, or after the attention half was compacted without it. No-op
// for other kinds.
void kv_recurrent_set_pos(llama_context * ctx, int32_t seq, int32_t pos);

// Removes from the sliding-window cache of a model with sliding layers the sequence's cells that the
// next token at `next_pos` would not see (positions <= next_pos - window), before an eviction moves
// positions. llama.cpp would otherwise drop some of them later by reusing their cells, depending on
// cell order: after a compaction brought them back within the window, a chat and its restored
// checkpoint (which stores only cells in the window) would see different tokens. Pruned here, a token
// that left a sliding layer's window stays out of it, deterministically. No-op for other caches.
void kv_prune_sliding_window(llama_context * ctx, int32_t seq, int32_t next_pos);

// Keys this library moves itself, where llama.cpp's K-shift cannot or would be wrong: multi-section
// positions (M-RoPE, interleaved or not), which llama.cpp refuses to shift (get_can_shift) because
// an image token's sections hold different coordinates (a text token's sections all hold its one
// position, so moving it by d is a NEOX rotation, what llama.cpp's build_rope_shift runs for them),
// and every case of kv_llama_shift_unsound. True where this build can do that for the context: the
// model is supported (kv_rotation_supported) and the context's memory is KV caches (with or without
// sliding-window layers) or a plain hybrid.
bool kv_rotation_available(llama_context * ctx);
// Whether this build can rotate the model's keys: it has llama.cpp's internals, its rope is norm,
// NEOX or M-RoPE, no layer has rope factors, windows (if any) are plain sliding ones, and the
// model's memory is KV caches or a plain hybrid.
bool kv_rotation_supported(const llama_model * model);

// Whether llama.cpp's K-shift of this context would be wrong or kill the process, cache by cache:
// it turns keys with the context's YaRN factors (scaling them by YaRN's magnitude again at every
// shift: 1.35x for gpt-oss), turns layers by has_rope at the hyperparameters' frequencies where the
// architecture's graph leaves layers without positions or slides without YaRN (SmolLM3, Cohere2,
// EXAONE 4, Llama 4, Mellum, OLMo 2), applies a quantized cache's Hadamard matrix where there is
// none (heads not a multiple of 64 values, e.g. Phi-3's 96: a null pointer) or where it does not fit
// (partial rotary dims, latent attention rows: an abort), and aborts on a cache with no rotary layer
// (Granite 4.0-H's NoPE, the layerless full cache of an all-sliding model). Where it would, positions
// move by kv_rotate_positions, which turns only layers with positions, at their own frequencies.
bool kv_llama_shift_unsound(llama_context * ctx);
// The same before a context exists, from the model's metadata alone (no user option changes its
// rope; a quantized cache's matrix is the chat's kvType's): true where it might be (YaRN or an
// attention factor, layers whose graph differs from has_rope, no rotary layer).
bool kv_shift_may_be_unsound(const llama_model * model);

// Moves the cells of `seq` at each old position to its new one (`moves`: (old, new), old positions
// unique; new ones must not collide with positions that stay) and re-rotates their keys now, in one
// graph per device that holds keys, computed on a backend of that device: no K-shift is left for
// the next decode. A hybrid's recurrent state follows its position's move. Throws fml_error(KV)
// when unavailable or the computation fails (positions then unchanged).
void kv_rotate_positions(llama_context * ctx, int32_t seq, const std::vector<std::pair<int32_t, int32_t>> & moves);

// Whether the context's KV cache stores values: not latent attention's (DeepSeek-V2/V3, GLM-4.7-Flash:
// llama.cpp writes no value rows in a sequence's state; values are a view of the keys' latent).
bool kv_keeps_values(llama_context * ctx);

// Bytes of per-cell extra metadata llama.cpp writes in a sequence's state after each cell's seq ids
// count (M-RoPE's 2D position; 0 for ordinary caches): what a reader of that state must skip.
size_t kv_cell_ext_bytes(llama_context * ctx);

// Bytes of KV buffers the context's memory allocated (every cache of it; 0 when unknown).
size_t kv_allocated_bytes(llama_context * ctx);

} // namespace fml
