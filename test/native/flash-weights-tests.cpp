// flash_weights against ggml's own flash-attention kernel: a GGML_OP_FLASH_ATTN_EXT node is computed
// on the CPU, then the weights recomputed from its inputs must reproduce its output (sum over cells
// of weight x value, per head and query) and sum to one (less a sink's share), with nothing on a
// masked cell. Every parameter the node carries is varied: key type, GQA, streams, mask, scale,
// soft-cap, ALiBi and sinks; more rows than one chunk of weights is not (16 MiB).
#include "engine/flash-weights.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "unit-check.h"

using namespace fml;

namespace {

struct fa_case {
    ggml_type k_type;
    int64_t head_dim, n_head, n_head_kv, n_tok, n_kv, n_stream;
    float softcap, max_bias;
    bool sinks;
    // llama.cpp's layout: keys and values as permuted views of a [d x Hkv, kv_size, S] cache, queries
    // as a permuted view of [d, H, T x S] (the no-copy paths), one mask for every stream, a thread pool.
    bool llama_layout = false;
    bool cast_f32_keys = false;   // an f32 cache: the kernel reads an f16 copy of the view (ggml_cast)
};

void fill(ggml_tensor * t, std::mt19937 & rng, float scale) {
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v((size_t) ggml_nelements(t));
    for (float & x : v) x = dist(rng);
    if (t->type == GGML_TYPE_F32) {
        memcpy(t->data, v.data(), v.size() * sizeof(float));
    } else if (t->type == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(v.data(), static_cast<ggml_fp16_t *>(t->data), (int64_t) v.size());
    } else {
        ggml_quantize_chunk(t->type, v.data(), t->data, 0, ggml_nrows(t), t->ne[0], nullptr);
    }
}

// Cell c of query row r: visible when c <= r + n_kv - n_tok (a causal cache), and cell 3 is a hole.
bool visible(int64_t c, int64_t r, const fa_case & fc) {
    return c <= r + fc.n_kv - fc.n_tok && c != 3;
}

void check_case(const fa_case & fc) {
    ggml_init_params ip = { 256u << 20, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    std::mt19937 rng(7);
    const int64_t d = fc.head_dim;
    const int64_t mask_streams = fc.llama_layout ? 1 : fc.n_stream;
    ggml_tensor * q = nullptr;
    ggml_tensor * k = nullptr;
    ggml_tensor * v = nullptr;
    if (fc.llama_layout) {
        const int64_t kv_size = fc.n_kv + 16;   // the views cover the first n_kv cells of each stream
        ggml_tensor * qcur = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, fc.n_head, fc.n_tok * fc.n_stream);
        ggml_tensor * kc = ggml_new_tensor_3d(ctx, fc.cast_f32_keys ? GGML_TYPE_F32 : fc.k_type, d * fc.n_head_kv, kv_size, fc.n_stream);
        ggml_tensor * vc = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, d * fc.n_head_kv, kv_size, fc.n_stream);
        ggml_set_name(kc, "cache_k_l5");
        fill(qcur, rng, 1.0f);
        fill(kc, rng, 1.0f);
        fill(vc, rng, 1.0f);
        q = ggml_view_4d(ctx, qcur, d, fc.n_head, fc.n_tok, fc.n_stream, qcur->nb[1], qcur->nb[2], qcur->nb[2] * fc.n_tok, 0);
        q = ggml_permute(ctx, q, 0, 2, 1, 3);
        const auto cache_view = [&](ggml_tensor * c) {
            ggml_tensor * view = ggml_view_4d(ctx, c, d, fc.n_head_kv, fc.n_kv, fc.n_stream, ggml_row_size(c->type, d), c->nb[1], c->nb[2], 0);
            return ggml_permute(ctx, view, 0, 2, 1, 3);
        };
        k = cache_view(kc);
        if (fc.cast_f32_keys) k = ggml_cast(ctx, k, GGML_TYPE_F16);
        v = cache_view(vc);
    } else {
        q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, d, fc.n_tok, fc.n_head, fc.n_stream);
        k = ggml_new_tensor_4d(ctx, fc.k_type, d, fc.n_kv, fc.n_head_kv, fc.n_stream);
        v = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, d, fc.n_kv, fc.n_head_kv, fc.n_stream);
        fill(q, rng, 1.0f);
        fill(k, rng, 1.0f);
        fill(v, rng, 1.0f);
    }
    ggml_tensor * mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, fc.n_kv, fc.n_tok, 1, mask_streams);
    for (int64_t s = 0; s < mask_streams; ++s) {
        for (int64_t r = 0; r < fc.n_tok; ++r) {
            for (int64_t c = 0; c < fc.n_kv; ++c) {
                // A bias by distance where visible (as llama.cpp's ALiBi masks hold): slopes scale it.
                const float m = visible(c, r, fc) ? -0.25f * (float) (r + fc.n_kv - fc.n_tok - c) : -INFINITY;
                static_cast<ggml_fp16_t *>(mask->data)[(s * fc.n_tok + r) * fc.n_kv + c] = ggml_fp32_to_fp16(m);
            }
        }
    }
    const float scale = 1.0f / std::sqrt((float) d);
    ggml_tensor * fa = ggml_flash_attn_ext(ctx, q, k, v, mask, scale, fc.max_bias, fc.softcap);
    if (fc.sinks) {
        ggml_tensor * sinks = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, fc.n_head);
        fill(sinks, rng, 2.0f);
        ggml_flash_attn_ext_add_sinks(fa, sinks);
    }
    ggml_flash_attn_ext_set_prec(fa, GGML_PREC_F32);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, fa);
    CHECK(ggml_graph_compute_with_ctx(ctx, gf, 2) == GGML_STATUS_SUCCESS);
    if (fc.llama_layout) CHECK(flash_weights::layer_of(fa) == 5);

    // Values as floats by (stream, key head, cell): through the view's strides.
    const auto value = [&](int64_t s, int64_t kvh, int64_t c, int64_t i) {
        const char * p = static_cast<const char *>(v->data) + s * v->nb[3] + kvh * v->nb[2] + c * v->nb[1] + i * v->nb[0];
        return ggml_fp16_to_fp32(*reinterpret_cast<const ggml_fp16_t *>(p));
    };
    const float * out = static_cast<const float *>(fa->data);   // [d, H, T, S]
    flash_weights fw;
    ggml_threadpool * pool = nullptr;
    if (fc.llama_layout) {
        ggml_threadpool_params tpp = ggml_threadpool_params_default(2);
        pool = ggml_threadpool_new(&tpp);
        fw.bind(pool, 2);
    }
    int64_t rows = 0;
    // Written as !(x < bound): a NaN fails them.
    bool out_ok = true, sum_ok = true, masked_ok = true;
    float worst_out = 0.0f;
    const auto check_row = [&](int64_t s, int64_t h, int64_t r, const float * w) {
        rows++;
        const int64_t kvh = h / (fc.n_head / fc.n_head_kv);
        float sum = 0.0f;
        for (int64_t c = 0; c < fc.n_kv; ++c) {
            sum += w[c];
            if (!visible(c, r, fc) && !(w[c] == 0.0f)) masked_ok = false;
        }
        for (int64_t i = 0; i < d; ++i) {
            float acc = 0.0f;
            for (int64_t c = 0; c < fc.n_kv; ++c) {
                acc += w[c] * value(s, kvh, c, i);
            }
            // The kernel's output: a weighted mean of the values (the sink's share weighs nothing).
            const float expect = out[(size_t) (((s * fc.n_tok + r) * fc.n_head + h) * d + i)];
            const float diff = std::fabs(acc - expect);
            if (!(diff < 5e-3f)) out_ok = false;   // f16 values accumulate in f16 in the CPU kernel (correct: ~1.5e-3)
            if (diff > worst_out) worst_out = diff;
        }
        // A sink takes a share: then the weights sum to less than one, never more.
        if (fc.sinks ? !(sum > 0.0f && sum < 1.0f + 1e-4f) : !(std::fabs(sum - 1.0f) < 1e-4f)) sum_ok = false;
    };
    const bool ok = fw.compute(fa, [&](int64_t s, int64_t r, const float * const * heads) {
        for (int64_t h = 0; h < fc.n_head; ++h) check_row(s, h, r, heads[h]);
    });
    CHECK(ok);
    CHECK(rows == fc.n_head * fc.n_tok * fc.n_stream);
    CHECK(out_ok);
    CHECK(sum_ok);
    CHECK(masked_ok);
    if (getenv("FML_TEST_VERBOSE")) std::fprintf(stderr, "  output differs by %g\n", worst_out);
    if (pool != nullptr) ggml_threadpool_free(pool);
    ggml_free(ctx);
}

TEST(flash_weights_reproduce_the_kernel_output_f16_gqa) {
    check_case({ GGML_TYPE_F16, 64, 8, 2, 5, 40, 1, 0.0f, 0.0f, false });
}

TEST(flash_weights_reproduce_the_kernel_output_q8_0_two_streams) {
    check_case({ GGML_TYPE_Q8_0, 64, 4, 4, 3, 64, 2, 0.0f, 0.0f, false });
    check_case({ GGML_TYPE_Q8_0, 64, 8, 2, 3, 64, 2, 0.0f, 0.0f, false });
}

TEST(flash_weights_reproduce_the_kernel_output_in_llama_cpps_layout) {
    fa_case c { GGML_TYPE_F16, 64, 8, 2, 5, 48, 2, 0.0f, 0.0f, false };
    c.llama_layout = true;
    check_case(c);
    c.k_type = GGML_TYPE_Q8_0;
    check_case(c);
    c.cast_f32_keys = true;
    check_case(c);
}

TEST(flash_weights_reproduce_the_kernel_output_over_several_chunks) {
    // 16 MiB of weights a chunk: 4096 cells x 32 heads x 4 bytes is 32 rows, so 40 rows take two.
    fa_case c { GGML_TYPE_F16, 32, 32, 8, 40, 4096, 1, 0.0f, 0.0f, false };
    c.llama_layout = true;
    check_case(c);
}

TEST(flash_weights_reproduce_the_kernel_output_softcap_alibi_sinks) {
    check_case({ GGML_TYPE_F16, 32, 6, 2, 4, 24, 1, 2.0f, 0.0f, false });   // a cap the logits reach
    check_case({ GGML_TYPE_F16, 32, 6, 3, 4, 24, 1, 0.0f, 8.0f, false });
    check_case({ GGML_TYPE_F16, 32, 6, 3, 4, 24, 2, 0.0f, 0.0f, true });
}

TEST(flash_weights_layer_of_reads_the_cache_tensor_name) {
    ggml_init_params ip = { 1u << 20, nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * cache = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, 64, 32, 1);
    ggml_set_name(cache, "cache_k_l7");
    ggml_tensor * k = ggml_view_4d(ctx, cache, 32, 2, 16, 1, cache->nb[0] * 32, cache->nb[1], cache->nb[2], 0);
    ggml_tensor * q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 32, 1, 4, 1);
    ggml_tensor * kp = ggml_permute(ctx, k, 0, 2, 1, 3);
    ggml_tensor * v = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, 32, 16, 2, 1);
    ggml_tensor * fa = ggml_flash_attn_ext(ctx, q, kp, v, nullptr, 1.0f, 0.0f, 0.0f);
    CHECK(flash_weights::layer_of(fa) == 7);
    ggml_set_name(cache, "cache_swa_k_l12");
    CHECK(flash_weights::layer_of(fa) == 12);
    ggml_set_name(cache, "cache_k_l12x");
    CHECK(flash_weights::layer_of(fa) == -1);
    ggml_set_name(cache, "Kcur-3");
    CHECK(flash_weights::layer_of(fa) == -1);
    // The scheduler's copy of the view for another backend: a tensor of its own, named after it.
    ggml_tensor * copied = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, 32, 16, 2, 1);
    ggml_set_name(copied, "CUDA0#cache_k_l3 (view) (permuted)#0");
    CHECK(flash_weights::layer_of(ggml_flash_attn_ext(ctx, q, copied, v, nullptr, 1.0f, 0.0f, 0.0f)) == 3);
    ggml_set_name(cache, "cache_k_l7");
    ggml_flash_attn_ext_set_n_kv_max(fa, 8);   // a top-k sparse node: not full attention
    CHECK(flash_weights::layer_of(fa) == -1);
    // No mask: not a layout compute reads (it says so instead of reporting anything).
    flash_weights fw;
    CHECK(!fw.compute(fa, [](int64_t, int64_t, const float * const *) {}));
    ggml_free(ctx);
}

} // namespace
