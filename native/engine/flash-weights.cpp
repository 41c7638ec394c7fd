#include "engine/flash-weights.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace fml {

// Rows of weights computed per ggml graph: bounds the host memory a long prefill's weights take
// (n_kv x rows x heads floats), kept by the engine for its next decode.
constexpr size_t WEIGHT_CHUNK_BYTES = 16u << 20;

static float op_param_f32(const ggml_tensor * t, int i) {
    float v = 0.0f;
    memcpy(&v, reinterpret_cast<const char *>(t->op_params) + sizeof(float) * (size_t) i, sizeof(float));
    return v;
}

// The layer in a cache tensor's name: llama_kv_cache names them cache_<tag>k_l<il>
// (llama-kv-cache.cpp); a view, permute or copy of one appends " (view)", " (permuted)" ...; the
// scheduler's copy for another backend is "<backend>#<name>#<n>".
static int32_t layer_in_name(const char * name) {
    const char * cache = strstr(name, "cache_");
    const char * l = cache != nullptr ? strstr(cache, "k_l") : nullptr;
    if (l == nullptr) {
        return -1;
    }
    char * end = nullptr;
    const long il = strtol(l + 3, &end, 10);
    return end != l + 3 && (*end == '\0' || *end == ' ' || *end == '#') ? (int32_t) il : -1;
}

int32_t flash_weights::layer_of(const ggml_tensor * fa) {
    if (fa->op != GGML_OP_FLASH_ATTN_EXT || fa->src[0] == nullptr || fa->src[1] == nullptr) {
        return -1;
    }
    // op param 4 limits the node to its first n_kv_max keys (a top-k sparse indexer's): not the
    // full attention the weights stand for.
    int32_t n_kv_max = 0;
    memcpy(&n_kv_max, reinterpret_cast<const char *>(fa->op_params) + 4 * sizeof(int32_t), sizeof(int32_t));
    if (n_kv_max != 0) {
        return -1;
    }
    const ggml_tensor * k = fa->src[1];
    // An f32 cache's keys reach the kernel as an f16 copy of the cache view (build_attn_mha).
    if (k->op == GGML_OP_CPY && k->src[0] != nullptr) {
        k = k->src[0];
    }
    return layer_in_name((k->view_src != nullptr ? k->view_src : k)->name);
}

void flash_weights::shape_of(const ggml_tensor * fa, int64_t ne[4]) {
    const ggml_tensor * q = fa->src[0];   // [head_dim, tokens per stream, n_head, n_stream]
    ne[0] = fa->src[1]->ne[1];
    ne[1] = q->ne[1];
    ne[2] = q->ne[2];
    ne[3] = q->ne[3];
}

const uint8_t * flash_weights::fetch(const ggml_tensor * t, size_t offset, size_t size, std::vector<uint8_t> & buf) {
    if (t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer)) {
        return static_cast<const uint8_t *>(t->data) + offset;
    }
    const ggml_tensor * root = t->view_src != nullptr ? t->view_src : t;
    buf.resize(size);
    ggml_backend_tensor_get(root, buf.data(), t->view_offs + offset, size);
    return buf.data();
}

// Bytes a view spans from its first element: dimension 0 is a run of (blocks of) elements.
static size_t span_of(const ggml_tensor * t, int dims) {
    size_t span = ggml_row_size(t->type, t->ne[0]);
    for (int i = 1; i < dims; ++i) {
        span += (size_t) (t->ne[i] - 1) * t->nb[i];
    }
    return span;
}

bool flash_weights::compute(ggml_tensor * fa, const query_fn & query) {
    const ggml_tensor * q = fa->src[0];     // [d, T, H, S] f32
    const ggml_tensor * k = fa->src[1];     // [d, n_kv, Hkv, S], the cache's type
    const ggml_tensor * mask = fa->src[3];  // [n_kv, >= T, 1, S or 1]
    const ggml_tensor * sinks = fa->src[4]; // [H] f32 or none
    const int64_t d = q->ne[0], n_tok = q->ne[1], n_head = q->ne[2], n_stream = q->ne[3];
    const int64_t n_kv = k->ne[1], n_head_kv = k->ne[2];
    // Everything ggml would assert on (which aborts the process) is checked here first.
    if (q->type != GGML_TYPE_F32 || q->nb[0] != sizeof(float) || k->ne[0] != d || k->ne[3] != n_stream ||
        k->nb[0] != ggml_type_size(k->type) || d % ggml_blck_size(k->type) != 0 || n_head_kv <= 0 || n_head % n_head_kv != 0 ||
        mask == nullptr || (mask->type != GGML_TYPE_F16 && mask->type != GGML_TYPE_F32) || mask->ne[0] != n_kv ||
        mask->ne[1] < n_tok || mask->ne[2] != 1 || n_stream % mask->ne[3] != 0 || mask->nb[0] != ggml_type_size(mask->type) ||
        (sinks != nullptr && (sinks->type != GGML_TYPE_F32 || sinks->ne[0] != n_head || !ggml_is_contiguous(sinks))) ||
        ggml_get_type_traits_cpu(k->type)->vec_dot == nullptr) {
        return false;
    }
    const float scale = op_param_f32(fa, 0);
    const float max_bias = op_param_f32(fa, 1);
    const float softcap = op_param_f32(fa, 2);

    const int64_t group = max_bias == 0.0f && sinks == nullptr ? n_head / n_head_kv : 1;
    const size_t k_row = ggml_row_size(k->type, d);
    const size_t mask_row = ggml_row_size(mask->type, n_kv);
    const size_t chunk_rows = std::max<size_t>(1, WEIGHT_CHUNK_BYTES / ((size_t) n_kv * (size_t) n_head * sizeof(float)));
    const size_t rows_max = std::min<size_t>(chunk_rows, (size_t) n_tok);
    std::vector<float> sink_values;
    if (sinks != nullptr) {
        const float * sv = reinterpret_cast<const float *>(fetch(sinks, 0, ggml_nbytes(sinks), mask_buf_));
        sink_values.assign(sv, sv + n_head);
    }
    weights_.resize((size_t) n_kv * rows_max * (size_t) n_head);

    for (int64_t s = 0; s < n_stream; ++s) {
        // The stream's keys as [d, Hkv, n_kv] (the cache's own row layout: no copy on the CPU).
        const uint8_t * kb = fetch(k, (size_t) s * k->nb[3], span_of(k, 3), k_buf_);
        if (k->nb[2] != k_row || k->nb[1] != k_row * (size_t) n_head_kv) {
            k_packed_.resize(k_row * (size_t) (n_head_kv * n_kv));
            for (int64_t c = 0; c < n_kv; ++c) {
                for (int64_t h = 0; h < n_head_kv; ++h) {
                    memcpy(k_packed_.data() + ((size_t) c * n_head_kv + h) * k_row, kb + c * k->nb[1] + h * k->nb[2], k_row);
                }
            }
            kb = k_packed_.data();
        }
        const uint8_t * qb = fetch(q, (size_t) s * q->nb[3], span_of(q, 3), q_buf_);
        const uint8_t * mb = fetch(mask, (size_t) (s % mask->ne[3]) * mask->nb[3], mask_row + (size_t) (n_tok - 1) * mask->nb[1], mask_buf_);

        for (int64_t r0 = 0; r0 < n_tok; r0 += (int64_t) rows_max) {
            const int64_t rows = std::min<int64_t>((int64_t) rows_max, n_tok - r0);
            // Queries as [d, G x rows, H / G]: the G query heads that read one key head side by side
            // (column r * G + g), so a decode step's single row still makes a matrix product
            // (perf: one query row per head ran as vector dot products, as slow as the flash kernel).
            // Per-head terms (ALiBi slopes, sinks) index dimension 2: those nodes keep G = 1. The
            // weights come out in the same columns.
            const auto column = [&](int64_t h, int64_t r) { return (h / group) * rows * group + r * group + h % group; };
            q_packed_.resize((size_t) (d * n_head * rows));
            for (int64_t r = 0; r < rows; ++r) {
                for (int64_t h = 0; h < n_head; ++h) {
                    memcpy(q_packed_.data() + (size_t) (column(h, r) * d), qb + (r0 + r) * q->nb[1] + h * q->nb[2], sizeof(float) * (size_t) d);
                }
            }
            // Each query row's mask, once per head of its group.
            mask_packed_.resize(mask_row * (size_t) (rows * group));
            for (int64_t r = 0; r < rows; ++r) {
                for (int64_t g = 0; g < group; ++g) {
                    memcpy(mask_packed_.data() + (size_t) (r * group + g) * mask_row, mb + (r0 + r) * mask->nb[1], mask_row);
                }
            }

            // Tensors with data of our own: the context only holds their headers and the graph.
            ggml_init_params ip = { ggml_tensor_overhead() * 16 + ggml_graph_overhead(), nullptr, true };
            ggml_context * ctx = ggml_init(ip);
            if (ctx == nullptr) {
                return false;
            }
            ggml_tensor * keys = ggml_new_tensor_3d(ctx, k->type, d, n_head_kv, n_kv);
            keys->data = const_cast<uint8_t *>(kb);
            ggml_tensor * queries = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, rows * group, n_head / group);
            queries->data = q_packed_.data();
            ggml_tensor * m = ggml_new_tensor_2d(ctx, mask->type, n_kv, rows * group);
            m->data = mask_packed_.data();
            // [n_kv, G x rows, H / G]; dimension 2 broadcasts over the key heads as the model's does.
            ggml_tensor * kq = ggml_mul_mat(ctx, ggml_permute(ctx, keys, 0, 2, 1, 3), queries);
            kq->data = weights_.data();
            float softmax_scale = scale;
            if (softcap != 0.0f) {
                // As the flash kernel: softcap * tanh(kq * scale / softcap), then the mask.
                kq = ggml_scale_inplace(ctx, kq, scale / softcap);
                kq = ggml_tanh_inplace(ctx, kq);
                kq = ggml_scale_inplace(ctx, kq, softcap);
                softmax_scale = 1.0f;
            }
            // In place: the logits' buffer becomes the weights' (one buffer of WEIGHT_CHUNK_BYTES at most).
            ggml_tensor * w = ggml_soft_max_ext_inplace(ctx, kq, m, softmax_scale, max_bias);
            if (sinks != nullptr) {
                ggml_tensor * sink_t = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_head);
                sink_t->data = sink_values.data();
                ggml_soft_max_add_sinks(w, sink_t);
            }
            ggml_cgraph * gf = ggml_new_graph(ctx);
            ggml_build_forward_expand(gf, w);
            ggml_cplan plan = ggml_graph_plan(gf, n_threads_, pool_);
            work_.resize(plan.work_size);
            plan.work_data = work_.data();
            const ggml_status st = ggml_graph_compute(gf, &plan);
            ggml_free(ctx);
            if (st != GGML_STATUS_SUCCESS) {
                return false;
            }
            heads_.resize((size_t) n_head);
            for (int64_t r = 0; r < rows; ++r) {
                for (int64_t h = 0; h < n_head; ++h) {
                    heads_[(size_t) h] = weights_.data() + (size_t) (column(h, r) * n_kv);
                }
                query(s, r0 + r, heads_.data());
            }
        }
    }
    return true;
}

} // namespace fml
