#include "engine/signals.h"

#include "kv/kv-internals.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cmath>
#include <cstring>

namespace fml {

void eval_capture::bind(llama_context * ctx, int32_t embd, bool unified, const std::vector<bool> & sliding_layers, ggml_threadpool * pool, int32_t n_threads) {
    ctx_ = ctx;
    flash_.bind(pool, n_threads);
    n_embd_ = embd;
    unified_ = unified;
    sliding_layers_ = sliding_layers;
}

void eval_capture::begin_group(const std::vector<group_member> & layout) {
    if (members_.size() < layout.size()) {
        members_.resize(layout.size());
    }
    n_members_ = layout.size();
    n_rows_ = 0;
    any_wanted_ = false;
    for (size_t m = 0; m < layout.size(); ++m) {
        capture_member & mem = members_[m];
        static_cast<group_member &>(mem) = layout[m];
        n_rows_ += mem.n_tokens;
        any_wanted_ = any_wanted_ || mem.wanted;
        mem.attention_layers_seen = 0;
        mem.key_norm_layers_seen = 0;
        mem.hidden_seen = false;
        if (want_key_norm) mem.key_norm_by_token.assign((size_t) mem.n_tokens, 0.0f);
        if (want_hidden) mem.hidden_by_token.assign((size_t) mem.n_tokens * (size_t) n_embd_, 0.0f);
    }
    maps_ready_ = false;
    layout_ok_ = true;
}

bool eval_capture::finish_group() {
    // Every decode of a chat that reads attention passes attention layers: reading none (a flash
    // node whose keys this did not recognise, say) would leave the scores silently stale.
    if (layout_ok_ && want_attention && any_wanted_ && n_members_ > 0 && members_[0].attention_layers_seen == 0) {
        layout_ok_ = false;
        layout_mismatches++;
    }
    return layout_ok_;
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

bool eval_capture::row_owner(int64_t r, size_t & member, int32_t & token) const {
    for (size_t m = 0; m < n_members_; ++m) {
        if (r < members_[m].n_tokens) {
            member = m;
            token = (int32_t) r;
            return true;
        }
        r -= members_[m].n_tokens;
    }
    return false;
}

bool eval_capture::begin_attention(int64_t n_tok, int64_t n_stream) {
    // streams: [n_kv, tokens per member, n_head, members]; unified: [n_kv, rows, n_head, 1].
    if (n_tok * n_stream != n_rows_ || (!unified_ && n_stream != (int64_t) n_members_)) {
        layout_ok_ = false;
        layout_mismatches++;
        return false;
    }
    if (!maps_ready_) {
        // Cells are placed before the graph runs, so the map read at layer 0 holds for all layers.
        for (size_t m = 0; m < n_members_; ++m) {
            capture_member & mem = members_[m];
            kv_cell_positions(ctx_, mem.seq_id, mem.cell_pos);
            mem.attention_by_cell.assign(mem.cell_pos.size(), 0.0f);
            mem.peak_by_cell.assign(mem.cell_pos.size(), 0.0f);
        }
        maps_ready_ = true;
    }
    return true;
}

void eval_capture::absorb_query(int64_t s, int64_t r, int64_t n_tok, const float * const * heads, int64_t n_head, int64_t n_kv) {
    size_t m = 0;
    int32_t token = 0;
    if (!row_owner(unified_ ? r : s * n_tok + r, m, token)) {
        return;
    }
    capture_member & mem = members_[m];
    if (!mem.wanted) {
        return;
    }
    // The heads are summed and maxed first, in loops the compiler vectorizes; the per-cell work below
    // (position map, distance, peak, causal check) then runs once per query instead of once per head
    // (perf: it was 3% of a decode step's wall time on the Qwen2.5-0.5B shape, 14 heads).
    // Each test reads the same through the max: a cell's peak is its largest weight from a head, and
    // a weight of a future cell shows in the max if in any head.
    const int64_t n_cells = std::min<int64_t>(n_kv, (int64_t) mem.cell_pos.size());
    head_sum_.assign((size_t) n_cells, 0.0f);
    head_max_.assign((size_t) n_cells, 0.0f);
    float * sum = head_sum_.data();
    float * max = head_max_.data();
    for (int64_t h = 0; h < n_head; ++h) {
        const float * w = heads[h];
        for (int64_t c = 0; c < n_cells; ++c) {
            sum[c] += w[c];
            max[c] = max[c] < w[c] ? w[c] : max[c];
        }
    }
    const int32_t query_pos = mem.pos0 + token;
    for (int64_t c = 0; c < n_cells; ++c) {
        const int32_t pos = mem.cell_pos[(size_t) c];
        if (pos >= 0) {
            mem.attention_by_cell[(size_t) c] += sum[c];
            const bool distant = query_pos - pos >= PEAK_MIN_DISTANCE || (pos < mem.peak_horizon && max[c] >= PEAK_NEAR_LOOKUP_WEIGHT);
            if (distant && max[c] > mem.peak_by_cell[(size_t) c]) {
                mem.peak_by_cell[(size_t) c] = max[c];
            }
            if (pos > query_pos && max[c] > 1e-6f) {
                causal_violations++;
            }
        }
    }
    attention_rows_checked += (uint64_t) n_head;
}

void eval_capture::end_attention() {
    for (size_t m = 0; m < n_members_; ++m) {
        members_[m].attention_layers_seen++;
    }
}

void eval_capture::observe_attention(ggml_tensor * t) {
    const int64_t n_kv = t->ne[0], n_tok = t->ne[1], n_head = t->ne[2], n_stream = t->ne[3];
    if (!begin_attention(n_tok, n_stream)) {
        return;
    }
    const float * w = tensor_f32(t);
    if (w == nullptr) {
        return;
    }
    heads_.resize((size_t) n_head);
    for (int64_t s = 0; s < n_stream; ++s) {
        for (int64_t r = 0; r < n_tok; ++r) {
            for (int64_t h = 0; h < n_head; ++h) {
                heads_[(size_t) h] = w + ((s * n_head + h) * n_tok + r) * n_kv;
            }
            absorb_query(s, r, n_tok, heads_.data(), n_head, n_kv);
        }
    }
    end_attention();
}

void eval_capture::observe_flash(ggml_tensor * t) {
    int64_t ne[4];
    flash_weights::shape_of(t, ne);
    if (!begin_attention(ne[1], ne[3])) {
        return;
    }
    const int64_t n_kv = ne[0], n_tok = ne[1], n_head = ne[2];
    if (flash_.compute(t, [&](int64_t s, int64_t r, const float * const * heads) { absorb_query(s, r, n_tok, heads, n_head, n_kv); })) {
        end_attention();
    } else {
        // Inputs of a layout flash_weights does not read: this decode's signals are not trusted.
        layout_ok_ = false;
        layout_mismatches++;
    }
}

bool eval_capture::observe(ggml_tensor * t, bool ask) {
    int32_t il = -1;
    // A sliding layer's weights are indexed by the window cache's cells: only the full layers' are read.
    const auto full_layer = [&](int32_t layer) { return !(layer >= 0 && (size_t) layer < sliding_layers_.size() && sliding_layers_[(size_t) layer]); };
    // Nothing is read for a group of summary scratch alone, or once its layout went wrong: asking
    // costs a scheduler split per node, and a flash node's weights a matrix product.
    const bool attention = want_attention && any_wanted_ && layout_ok_;
    const bool is_attn   = attention && name_is(t, "kq_soft_max", &il) && full_layer(il);
    const bool is_flash  = attention && t->op == GGML_OP_FLASH_ATTN_EXT && (il = flash_weights::layer_of(t)) >= 0 && full_layer(il);
    const bool is_key    = want_key_norm && name_is(t, "Kcur", &il) && t->op == GGML_OP_ROPE;
    const bool is_hidden = want_hidden && name_is(t, "l_out", &il) && il == hidden_layer;
    if (ask) {
        return is_attn || is_flash || is_key || is_hidden;
    }
    if (is_attn) {
        observe_attention(t);
    } else if (is_flash) {
        observe_flash(t);
    } else if (is_key) {
        // [head_dim, n_head_kv, rows]
        const float * k = tensor_f32(t);
        if (k == nullptr || t->ne[2] != n_rows_) {
            layout_ok_ = layout_ok_ && k == nullptr;
            return true;
        }
        const int64_t head_dim = t->ne[0];
        const int64_t n_head = t->ne[1];
        for (int64_t r = 0; r < n_rows_; ++r) {
            size_t m = 0;
            int32_t token = 0;
            if (!row_owner(r, m, token) || !members_[m].wanted) {
                continue;
            }
            float sum = 0.0f;
            for (int64_t h = 0; h < n_head; ++h) {
                const float * v = k + (r * n_head + h) * head_dim;
                float sq = 0.0f;
                for (int64_t d = 0; d < head_dim; ++d) {
                    sq += v[d] * v[d];
                }
                sum += std::sqrt(sq);
            }
            members_[m].key_norm_by_token[(size_t) token] += sum / (float) n_head;
        }
        for (size_t m = 0; m < n_members_; ++m) {
            members_[m].key_norm_layers_seen++;
        }
    } else if (is_hidden) {
        // [n_embd, rows]
        const float * h = tensor_f32(t);
        if (h == nullptr || t->ne[0] != n_embd_ || t->ne[1] != n_rows_) {
            layout_ok_ = layout_ok_ && h == nullptr;
            return true;
        }
        int64_t row = 0;
        for (size_t m = 0; m < n_members_; ++m) {
            capture_member & mem = members_[m];
            memcpy(mem.hidden_by_token.data(), h + row * n_embd_, sizeof(float) * (size_t) mem.n_tokens * (size_t) n_embd_);
            mem.hidden_seen = true;
            row += mem.n_tokens;
        }
    }
    return true;
}

} // namespace fml
