#include "signals.h"

#include "kv-cells.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cmath>
#include <cstring>

namespace fml {

void eval_capture::bind(llama_context * ctx, int32_t n_ctx_cells, int32_t embd) {
    ctx_ = ctx;
    attention_by_pos.assign((size_t) n_ctx_cells + 1, 0.0f);
    n_embd = embd;
}

void eval_capture::begin_batch(int32_t n_tokens, int32_t pos0) {
    n_tokens_ = n_tokens;
    pos0_ = pos0;
    attention_layers_seen = 0;
    key_norm_layers_seen = 0;
    hidden_seen = false;
    if (want_key_norm) {
        key_norm_by_token.assign((size_t) n_tokens, 0.0f);
    }
    if (want_hidden) {
        hidden_by_token.assign((size_t) n_tokens * (size_t) n_embd, 0.0f);
    }
}

bool eval_capture::callback(ggml_tensor * t, bool ask, void * user_data) {
    return static_cast<eval_capture *>(user_data)->observe(t, ask);
}

static bool name_is(const ggml_tensor * t, const char * prefix, int32_t * layer) {
    const size_t n = strlen(prefix);
    if (strncmp(t->name, prefix, n) != 0 || t->name[n] != '-') {
        return false;
    }
    char * end = nullptr;
    const long il = strtol(t->name + n + 1, &end, 10);
    if (end == t->name + n + 1 || *end != '\0') {
        return false;
    }
    *layer = (int32_t) il;
    return true;
}

const float * eval_capture::tensor_f32(ggml_tensor * t) {
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) {
        return nullptr;
    }
    if (t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer)) {
        return static_cast<const float *>(t->data);
    }
    scratch_.resize((size_t) ggml_nelements(t));
    ggml_backend_tensor_get(t, scratch_.data(), 0, ggml_nbytes(t));
    return scratch_.data();
}

bool eval_capture::observe(ggml_tensor * t, bool ask) {
    if (!enabled) {
        return ask ? false : true;
    }
    int32_t il = -1;
    const bool is_attn   = want_attention && name_is(t, "kq_soft_max", &il);
    const bool is_key    = want_key_norm && name_is(t, "Kcur", &il) && t->op == GGML_OP_ROPE;
    const bool is_hidden = want_hidden && name_is(t, "l_out", &il) && il == hidden_layer;
    if (ask) {
        return is_attn || is_key || is_hidden;
    }

    if (is_attn) {
        // [n_kv (cells), n_tokens, n_head, n_stream]: column c is attention to KV cell c.
        const float * w = tensor_f32(t);
        if (w == nullptr) {
            return true;
        }
        if (attention_layers_seen == 0 || cell_pos_.empty()) {
            kv_cell_positions(ctx_, 0, cell_pos_);
        }
        const int64_t n_kv = t->ne[0];
        const int64_t rows = t->ne[1] * t->ne[2] * t->ne[3];
        const int64_t n_cells = std::min<int64_t>(n_kv, (int64_t) cell_pos_.size());
        const int64_t n_tok = t->ne[1];
        for (int64_t r = 0; r < rows; ++r) {
            const float * row = w + r * n_kv;
            const int32_t query_pos = pos0_ + (int32_t) (r % n_tok);
            for (int64_t c = 0; c < n_cells; ++c) {
                const int32_t pos = cell_pos_[(size_t) c];
                if (pos >= 0 && (size_t) pos < attention_by_pos.size()) {
                    attention_by_pos[(size_t) pos] += row[c];
                    if (pos > query_pos && row[c] > 1e-6f) {
                        causal_violations++;
                    }
                }
            }
        }
        attention_rows_checked += (uint64_t) rows;
        attention_layers_seen++;
    } else if (is_key) {
        // [head_dim, n_head_kv, n_tokens]
        const float * k = tensor_f32(t);
        if (k == nullptr) {
            return true;
        }
        const int64_t head_dim = t->ne[0];
        const int64_t n_head = t->ne[1];
        const int64_t n_tok = std::min<int64_t>(t->ne[2], (int64_t) key_norm_by_token.size());
        for (int64_t j = 0; j < n_tok; ++j) {
            float sum = 0.0f;
            for (int64_t h = 0; h < n_head; ++h) {
                const float * v = k + (j * n_head + h) * head_dim;
                float sq = 0.0f;
                for (int64_t d = 0; d < head_dim; ++d) {
                    sq += v[d] * v[d];
                }
                sum += std::sqrt(sq);
            }
            key_norm_by_token[(size_t) j] += sum / (float) n_head;
        }
        key_norm_layers_seen++;
    } else if (is_hidden) {
        // [n_embd, n_tokens]
        const float * h = tensor_f32(t);
        if (h == nullptr || t->ne[0] != n_embd) {
            return true;
        }
        const int64_t n_tok = std::min<int64_t>(t->ne[1], (int64_t) n_tokens_);
        memcpy(hidden_by_token.data(), h, (size_t) (n_tok * n_embd) * sizeof(float));
        hidden_seen = true;
    }
    return true;
}

} // namespace fml
