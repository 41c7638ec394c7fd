// flash_weights against ggml's own flash-attention kernel: a GGML_OP_FLASH_ATTN_EXT node is computed
// on the CPU, then the weights recomputed from its inputs must reproduce its output (sum over cells
// of weight x value, per head and query) and sum to one (less a sink's share), with nothing on a
// masked cell. Every parameter the node carries is varied: key type, GQA, streams, mask, scale,
// soft-cap, ALiBi and sinks; more rows than one chunk of weights is not (16 MiB).
#include "engine/flash-weights.h"

#include "ggml-cpu.h"
#include "ggml.h"

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
    ggml_init_params ip = { 64u << 20, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    std::mt19937 rng(7);
    const int64_t d = fc.head_dim;
    ggml_tensor * q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, d, fc.n_tok, fc.n_head, fc.n_stream);
    ggml_tensor * k = ggml_new_tensor_4d(ctx, fc.k_type, d, fc.n_kv, fc.n_head_kv, fc.n_stream);
    ggml_tensor * v = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, d, fc.n_kv, fc.n_head_kv, fc.n_stream);
    ggml_tensor * mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, fc.n_kv, fc.n_tok, 1, fc.n_stream);
    fill(q, rng, 1.0f);
    fill(k, rng, 1.0f);
    fill(v, rng, 1.0f);
    for (int64_t s = 0; s < fc.n_stream; ++s) {
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

    // Values as floats, [d, n_kv, Hkv, S].
    std::vector<float> vf((size_t) ggml_nelements(v));
    ggml_fp16_to_fp32_row(static_cast<const ggml_fp16_t *>(v->data), vf.data(), (int64_t) vf.size());
    const float * out = static_cast<const float *>(fa->data);   // [d, H, T, S]
    flash_weights fw;
    int64_t rows = 0;
    float worst_out = 0.0f, worst_sum = 0.0f, masked = 0.0f;
    const bool ok = fw.compute(fa, [&](int64_t s, int64_t h, int64_t r, const float * w) {
        rows++;
        const int64_t kvh = h / (fc.n_head / fc.n_head_kv);
        float sum = 0.0f;
        for (int64_t c = 0; c < fc.n_kv; ++c) {
            sum += w[c];
            if (!visible(c, r, fc)) masked = std::max(masked, std::fabs(w[c]));
        }
        for (int64_t i = 0; i < d; ++i) {
            float acc = 0.0f;
            for (int64_t c = 0; c < fc.n_kv; ++c) {
                acc += w[c] * vf[(size_t) (((s * fc.n_head_kv + kvh) * fc.n_kv + c) * d + i)];
            }
            // The kernel's output: a weighted mean of the values (the sink's share weighs nothing).
            const float expect = out[(size_t) (((s * fc.n_tok + r) * fc.n_head + h) * d + i)];
            worst_out = std::max(worst_out, std::fabs(acc - expect));
        }
        if (!fc.sinks) worst_sum = std::max(worst_sum, std::fabs(sum - 1.0f));
        else if (sum > 1.0f + 1e-4f || sum <= 0.0f) worst_sum = std::max(worst_sum, sum);
    });
    CHECK(ok);
    CHECK(rows == fc.n_head * fc.n_tok * fc.n_stream);
    CHECK(worst_out < 5e-3f);   // f16 values accumulate in f16 in the CPU kernel (correct: ~1.5e-3)
    CHECK(worst_sum < 1e-4f);
    CHECK(masked == 0.0f);
    if (getenv("FML_TEST_VERBOSE")) std::fprintf(stderr, "  output differs by %g, sum by %g\n", worst_out, worst_sum);
    ggml_free(ctx);
}

TEST(flash_weights_reproduce_the_kernel_output_f16_gqa) {
    check_case({ GGML_TYPE_F16, 64, 8, 2, 5, 40, 1, 0.0f, 0.0f, false });
}

TEST(flash_weights_reproduce_the_kernel_output_q8_0_two_streams) {
    check_case({ GGML_TYPE_Q8_0, 64, 4, 4, 3, 64, 2, 0.0f, 0.0f, false });
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
    ggml_set_name(cache, "Kcur-3");
    CHECK(flash_weights::layer_of(fa) == -1);
    ggml_set_name(cache, "cache_k_l7");
    ggml_flash_attn_ext_set_n_kv_max(fa, 8);   // a top-k sparse node: not full attention
    CHECK(flash_weights::layer_of(fa) == -1);
    // No mask: not a layout compute reads (it says so instead of reporting anything).
    flash_weights fw;
    CHECK(!fw.compute(fa, [](int64_t, int64_t, int64_t, const float *) {}));
    ggml_free(ctx);
}

} // namespace
