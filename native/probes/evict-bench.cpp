#include "probes/evict-bench.h"

#include "util/error.h"
#include "kv/kv-ops.h"
#include "kv/token-ledger.h"

#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>

namespace fml {

using bench_clock = std::chrono::steady_clock;
constexpr int32_t BENCH_SEQ = 0;   // the benchmark context has one sequence

static double ms_between(bench_clock::time_point a, bench_clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
}

static double median_of(std::vector<double> v) {
    if (v.empty()) {
        return 0;
    }
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void decode_or_throw(llama_context * ctx, llama_batch & batch) {
    if (llama_decode(ctx, batch) != 0) {
        throw fml_error(FML_ERR_DECODE, "llama_decode failed in the eviction benchmark");
    }
}

static void fill_batch(llama_batch & batch, const std::vector<int32_t> & tokens, size_t start, size_t n, bool logits_last) {
    batch.n_tokens = (int32_t) n;
    for (size_t i = 0; i < n; ++i) {
        batch.token[i] = tokens[start + i];
        batch.pos[i] = (int32_t) (start + i);
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = BENCH_SEQ;
        batch.logits[i] = logits_last && i + 1 == n;
    }
}

llama_context_params probe_context_params(int32_t context, int32_t threads) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) context;
    cp.n_batch = (uint32_t) std::min(512, context);
    cp.n_ubatch = cp.n_batch;
    cp.n_seq_max = 1;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.no_perf = true;
    return cp;
}

evict_bench_result run_evict_bench(const fml_model & model, int32_t context, const std::vector<int32_t> & evict_counts,
                                   int32_t reps, int32_t threads) {
    evict_bench_result res;
    res.context = context;
    llama_context_params cp = probe_context_params(context, threads);
    cp.type_k = GGML_TYPE_F16;
    cp.type_v = GGML_TYPE_F16;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model.raw(), cp);
    if (ctx == nullptr) {
        throw fml_error(FML_ERR_CONTEXT_CREATE, "could not create the benchmark context");
    }
    const int32_t n_ctx = (int32_t) llama_n_ctx(ctx);
    const model_info & mi = model.info();
    res.k_bytes = (double) n_ctx * mi.n_layer * mi.n_head_kv * mi.n_embd_head_k * 2.0;
    res.kv_bytes = res.k_bytes + (double) n_ctx * mi.n_layer * mi.n_head_kv * mi.n_embd_head_v * 2.0;

    // Fill context - 1 cells (room for the 1-token decodes) with random tokens.
    const int32_t filled = n_ctx - 1;
    std::mt19937 rng(1234);
    std::vector<int32_t> tokens((size_t) filled + 1);
    for (auto & t : tokens) {
        t = (int32_t) (rng() % (uint32_t) mi.n_vocab);
    }
    llama_batch batch = llama_batch_init((int32_t) cp.n_batch, 0, 1);
    llama_memory_t mem = llama_get_memory(ctx);
    const auto t_fill = bench_clock::now();
    for (size_t start = 0; start < (size_t) filled; start += cp.n_batch) {
        fill_batch(batch, tokens, start, std::min<size_t>(cp.n_batch, (size_t) filled - start), true);
        decode_or_throw(ctx, batch);
    }
    res.fill_ms = ms_between(t_fill, bench_clock::now());
    std::vector<uint8_t> state(llama_state_seq_get_size(ctx, BENCH_SEQ));
    llama_state_seq_get_data(ctx, state.data(), state.size(), BENCH_SEQ);

    token_ledger ledger;
    auto restore = [&]() {
        llama_memory_clear(mem, false);
        if (llama_state_seq_set_data(ctx, state.data(), state.size(), BENCH_SEQ) == 0) {
            throw fml_error(FML_ERR_KV, "could not restore the benchmark state");
        }
        ledger.clear();
        for (int32_t i = 0; i < filled; ++i) {
            ledger.append(tokens[(size_t) i], 0, TOKEN_ROLE_USER, i < 4);
        }
    };
    auto decode_one = [&](int32_t pos) {
        std::vector<int32_t> one = { tokens.back() };
        batch.n_tokens = 1;
        batch.token[0] = one[0];
        batch.pos[0] = pos;
        batch.n_seq_id[0] = 1;
        batch.seq_id[0][0] = BENCH_SEQ;
        batch.logits[0] = true;
        const auto t0 = bench_clock::now();
        decode_or_throw(ctx, batch);
        return ms_between(t0, bench_clock::now());
    };

    for (const char * pattern : { "contiguous", "scattered" }) {
        for (int32_t k : evict_counts) {
        for (const bool keep : { true, false }) {
            if (k < 1 || (strcmp(pattern, "scattered") == 0 ? 2 * k + 4 : k + 4) > filled) {
                continue;
            }
            evict_bench_case c;
            c.pattern = pattern;
            c.positions = keep ? "keep" : "compact";
            c.evicted = k;
            std::vector<double> rm_add, next, plain;
            for (int32_t r = 0; r < reps; ++r) {
                restore();
                // Baseline: a plain decode on this exact cache, then drop that token again.
                plain.push_back(decode_one(filled));
                llama_memory_seq_rm(mem, BENCH_SEQ, filled, -1);

                std::vector<index_range> ranges;
                if (strcmp(pattern, "contiguous") == 0) {
                    ranges.push_back({ 4, (size_t) (4 + k) });          // right after the sinks: the oldest
                } else {
                    for (int32_t i = 0; i < k; ++i) {
                        ranges.push_back({ (size_t) (4 + 2 * i), (size_t) (5 + 2 * i) });   // every other token
                    }
                }
                const auto t0 = bench_clock::now();
                kv_evict_ranges(ctx, BENCH_SEQ, ledger, ranges);
                const size_t runs = keep ? 0 : kv_compact_by_shift(ctx, BENCH_SEQ, ledger);
                rm_add.push_back(ms_between(t0, bench_clock::now()));
                c.seq_rm_calls = (int32_t) ranges.size();
                c.seq_add_calls = (int32_t) runs;
                next.push_back(decode_one(ledger.next_pos()));
            }
            c.rm_add_ms = median_of(rm_add);
            c.next_decode_ms = median_of(next);
            c.plain_decode_ms = median_of(plain);
            res.cases.push_back(c);
        }
        }
    }
    llama_batch_free(batch);
    llama_free(ctx);
    return res;
}

double run_policy_plan_bench(const policy_options & opts, int32_t n, int32_t want, int32_t embd_dim, int32_t reps) {
    std::mt19937 rng(42);
    std::uniform_real_distribution<float> uni(0.0f, 1.0f);
    token_ledger ledger;
    ledger.set_embedding_dim((size_t) embd_dim);
    for (int32_t i = 0; i < n; ++i) {
        ledger.append(i, (uint32_t) (i / 64), i % 64 < 40 ? TOKEN_ROLE_USER : TOKEN_ROLE_ASSISTANT, i < 4, rng() % 12 == 0);
        ledger.at((size_t) i).score[SCORE_IMPORTANCE] = uni(rng);
        ledger.at((size_t) i).score[SCORE_PEAK] = uni(rng);
        float * e = ledger.embedding_mut((size_t) i);
        for (int32_t d = 0; d < embd_dim; ++d) {
            e[d] = uni(rng) - 0.5f;
        }
    }
    std::unique_ptr<kv_policy_i> policy = make_policy(opts);
    std::vector<double> times;
    for (int32_t r = 0; r < reps; ++r) {
        const auto t0 = bench_clock::now();
        const eviction_plan plan = policy->plan(ledger, { (size_t) want, (size_t) want });
        times.push_back(ms_between(t0, bench_clock::now()));
        if (plan.total() < (size_t) want) {
            throw fml_error(FML_ERR_INTERNAL, "policy freed too few tokens in the benchmark");
        }
    }
    return median_of(times);
}

double run_memcpy_bench(size_t bytes, int32_t reps) {
    std::vector<uint8_t> a(bytes, 1), b(bytes, 2);
    std::vector<double> rates;
    for (int32_t r = 0; r < reps; ++r) {
        const auto t0 = bench_clock::now();
        memcpy(b.data(), a.data(), bytes);
        const double s = std::chrono::duration<double>(bench_clock::now() - t0).count();
        rates.push_back((double) bytes / s);
        a[(size_t) r % bytes] ^= b[(size_t) (r * 7) % bytes];   // keep the copies observable
    }
    return median_of(rates);
}

} // namespace fml
