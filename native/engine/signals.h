// Reads the model's own signals during llama_decode through the context's eval callback (cb_eval),
// for every chat of a decode group:
//   - attention received per KV cell (and the cell's position), from `kq_soft_max-<layer>` with flash
//     attention off, or recomputed from a flash-attention node's inputs with it on (flash-weights.h);
//     a hybrid model's attention layers only;
//   - post-RoPE key L2 norms per token, from `Kcur-<layer>` (both modes; the keyNorm proxy);
//   - hidden states per token, from `l_out-<layer>` of a middle layer (semantic embeddings).
// Only the wanted tensors answer the callback's "ask" phase: every observed node forces a scheduler
// split, so asking for everything would slow every decode. Engines whose chats need no signal have no
// callback at all.
//
// Mapping rows and columns to chats: the engine decodes one group per llama_decode, laid out so that
// llama.cpp computes it as exactly one ubatch: the members' tokens member after member. With one KV
// stream per sequence, kq_soft_max is [n_kv, tokens per member, n_head, members] and column c of
// member k is cell c of k's own stream; with a unified cache it is [n_kv, rows, n_head, 1] and every
// member reads the shared cells through its own cell -> position map.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "engine/flash-weights.h"

struct ggml_tensor;
struct ggml_threadpool;

namespace fml {
// A query at least this many positions after a key is "distant": local heads (previous-token,
// same-sentence) give every token a high weight from its neighbours; a high weight from far away
// marks a token the model went back for. 32 measured best on bench:recall's generators (16 and 48
// kept fewer of the facts asked before: docs/models.md).
constexpr int32_t PEAK_MIN_DISTANCE = 32;
// ... or with at least this many whole messages between the key's message and the query's: a reply
// that goes back past the last exchange to a fact stated before the question can be closer than 32
// positions, while the message just before (and the reply before that) is what every query reads.
// 1 / 2 / 3 measured on bench:recall's generators (docs/models.md); the chat computes the horizon.
constexpr size_t PEAK_MESSAGES_BETWEEN = 2;
// Such a nearer query counts only when one head gave the key at least this share of its attention:
// a copy, not a reply reading around the last exchange (any weight: fewer never-asked facts kept,
// docs/models.md).
constexpr float PEAK_NEAR_LOOKUP_WEIGHT = 0.9f;
}
struct llama_context;

namespace fml {

// One chat's part of a decode group.
struct group_member {
    int32_t seq_id = 0;
    int32_t pos0 = 0;          // position of its first token in the group
    int32_t n_tokens = 0;
    bool wanted = true;        // false for summary scratch tokens: no signals
    int32_t peak_horizon = -1; // keys before this position are distant for a peak when a head gives them PEAK_NEAR_LOOKUP_WEIGHT
};

// What was captured for one member.
struct capture_member : group_member {
    std::vector<float> attention_by_cell;  // attention received, by KV cell (cell_pos says whose and where)
    std::vector<float> peak_by_cell;       // the largest single weight a distant query paid it (see PEAK_MIN_DISTANCE)
    int32_t attention_layers_seen = 0;
    std::vector<float> key_norm_by_token;  // mean key L2 norm over heads, summed over layers
    int32_t key_norm_layers_seen = 0;
    std::vector<float> hidden_by_token;    // n_embd floats per token
    bool hidden_seen = false;

    std::vector<int32_t> cell_pos;         // cell -> position in this member's sequence (-1: not its cell)
};

class eval_capture {
public:
    bool want_attention = false;
    bool want_key_norm = false;
    bool want_hidden = false;
    int32_t hidden_layer = 0;

    bool any() const { return want_attention || want_key_norm || want_hidden; }
    // `sliding_layers`: layers whose attention is not read (indexed by the window cache's cells).
    // `pool`/`n_threads`: where flash-attention weights are recomputed.
    void bind(llama_context * ctx, int32_t n_embd, bool unified, const std::vector<bool> & sliding_layers, ggml_threadpool * pool, int32_t n_threads);

    // Before a group's llama_decode: its members in row order.
    void begin_group(const std::vector<group_member> & layout);
    const capture_member & member(size_t i) const { return members_[i]; }
    // After it (the engine, once): whether the tensors seen had the layout the group promised and,
    // where attention was wanted, at least one attention layer was read (else nothing is trusted).
    bool finish_group();
    bool layout_ok() const { return layout_ok_; }

    // Self-check of the cell -> position map: attention weight found on a cell whose mapped position
    // is after the query's own position (the causal mask makes that impossible if the map is right).
    uint64_t causal_violations = 0;
    uint64_t attention_rows_checked = 0;
    uint64_t layout_mismatches = 0;

    static bool callback(ggml_tensor * t, bool ask, void * user_data);

private:
    bool observe(ggml_tensor * t, bool ask);
    const float * tensor_f32(ggml_tensor * t);
    void observe_attention(ggml_tensor * t);
    void observe_flash(ggml_tensor * t);
    bool begin_attention(int64_t n_tok, int64_t n_stream);
    // Query r of stream s (n_tok per stream): heads[h] is head h's weights over n_kv cells.
    void absorb_query(int64_t s, int64_t r, int64_t n_tok, const float * const * heads, int64_t n_head, int64_t n_kv);
    void end_attention();
    // Member and token index of group row r.
    bool row_owner(int64_t r, size_t & member, int32_t & token) const;

    llama_context * ctx_ = nullptr;
    int32_t n_embd_ = 0;
    bool unified_ = false;
    std::vector<bool> sliding_layers_;
    std::vector<capture_member> members_;
    size_t n_members_ = 0;
    int64_t n_rows_ = 0;
    bool maps_ready_ = false;
    bool layout_ok_ = true;
    bool any_wanted_ = false;   // some member of the group wants signals (summary scratch does not)
    std::vector<float> scratch_;
    std::vector<float> head_sum_, head_max_;   // one query's weights summed and maxed over its heads
    std::vector<const float *> heads_;
    flash_weights flash_;
};

} // namespace fml
