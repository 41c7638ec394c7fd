// Microbenchmarks of cache eviction, run natively so JS overhead does not blur sub-millisecond
// timings. They use the real eviction path (kv-ops) on a context sized like a chat's.
#pragma once

#include "model/model.h"
#include "policies/policy.h"

#include "llama.h"

#include <string>
#include <vector>

namespace fml {

struct evict_bench_case {
    std::string pattern;      // "contiguous" | "scattered"
    std::string positions;    // "keep" (seq_rm alone) | "compact" (then seq_add per kept run)
    int32_t evicted = 0;
    double rm_add_ms = 0;      // seq_rm (+ seq_add when compacting) (median)
    double next_decode_ms = 0; // 1-token decode right after eviction: applies a K-shift when compacted (median)
    double plain_decode_ms = 0;// 1-token decode with no shift pending, same cache (median)
    int32_t seq_rm_calls = 0;
    int32_t seq_add_calls = 0;
};

struct evict_bench_result {
    int32_t context = 0;
    double fill_ms = 0;
    double kv_bytes = 0;        // K + V bytes of the whole cache
    double k_bytes = 0;         // K bytes the K-shift graph rotates (every cell of every layer)
    std::vector<evict_bench_case> cases;
};

// Parameters of a probe's own context: one sequence of `context` cells, batches of up to 512.
llama_context_params probe_context_params(int32_t context, int32_t threads);

// Fills a fresh context of `context` cells (F16 KV) with random tokens, then for each evicted count,
// pattern and positions mode restores that state and times eviction and the next decode (at the
// last position + 1 with kept positions, right after the compacted ones otherwise). `reps`
// repetitions, medians.
evict_bench_result run_evict_bench(const fml_model & model, int32_t context, const std::vector<int32_t> & evict_counts,
                                   int32_t reps, int32_t threads);

// Median ms of policy.plan() on a synthetic ledger of `n` tokens (random scores, `embd_dim`-dim
// embeddings, sentence ends every ~12 tokens) asked to evict `want` tokens.
double run_policy_plan_bench(const policy_options & opts, int32_t n, int32_t want, int32_t embd_dim, int32_t reps);

// Median memcpy bandwidth (bytes/s) over a buffer of `bytes`.
double run_memcpy_bench(size_t bytes, int32_t reps);

} // namespace fml
