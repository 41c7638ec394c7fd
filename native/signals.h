// Reads the model's own signals during llama_decode through the context's eval callback (cb_eval):
//   - attention received per position, from `kq_soft_max-<layer>` (exists only with flash attention off);
//   - post-RoPE key L2 norms per batch token, from `Kcur-<layer>` (both modes; the keyNorm proxy);
//   - hidden states per batch token, from `l_out-<layer>` of a middle layer (semantic embeddings).
// Only the wanted tensors answer the callback's "ask" phase: every observed node forces a scheduler
// split, so asking for everything would slow every decode.
#pragma once

#include <cstdint>
#include <vector>

struct ggml_tensor;
struct llama_context;

namespace fml {

class eval_capture {
public:
    bool want_attention = false;
    bool want_key_norm = false;
    bool want_hidden = false;
    int32_t hidden_layer = 0;
    bool enabled = true;          // off while the summarizer decodes its scratch sequence

    void bind(llama_context * ctx, int32_t n_ctx_cells, int32_t n_embd);
    void begin_batch(int32_t n_tokens, int32_t pos0);

    // Self-check of the cell -> position map: attention weight found on a cell whose mapped position
    // is after the query's own position (the causal mask makes that impossible if the map is right).
    uint64_t causal_violations = 0;
    uint64_t attention_rows_checked = 0;

    // Accumulated attention received, indexed by position (valid for positions < size()).
    std::vector<float> attention_by_pos;
    int32_t attention_layers_seen = 0;
    // Per batch token: mean L2 norm of the post-RoPE keys over heads and layers.
    std::vector<float> key_norm_by_token;
    int32_t key_norm_layers_seen = 0;
    // Per batch token: hidden state (n_embd floats each).
    std::vector<float> hidden_by_token;
    bool hidden_seen = false;
    int32_t n_embd = 0;

    static bool callback(ggml_tensor * t, bool ask, void * user_data);

private:
    bool observe(ggml_tensor * t, bool ask);
    const float * tensor_f32(ggml_tensor * t);

    llama_context * ctx_ = nullptr;
    int32_t n_tokens_ = 0;
    int32_t pos0_ = 0;
    std::vector<int32_t> cell_pos_;
    std::vector<float> scratch_;
};

} // namespace fml
