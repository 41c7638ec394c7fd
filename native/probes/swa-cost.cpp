#include "probes/swa-cost.h"

#include "kv/kv-internals.h"
#include "kv/kv-ops.h"
#include "probes/evict-bench.h"
#include "util/error.h"

#include "llama.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <random>
#include <vector>

namespace fml {

namespace {

struct raw_context {
    llama_context * ctx = nullptr;
    llama_batch batch{};
    ~raw_context() {
        if (ctx != nullptr) {
            llama_batch_free(batch);
            llama_free(ctx);
        }
    }
};

std::unique_ptr<raw_context> make_context(const fml_model & model, int32_t context, bool swa_full, int32_t threads) {
    llama_context_params cp = probe_context_params(context, threads);
    cp.swa_full = swa_full;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    auto r = std::make_unique<raw_context>();
    r->ctx = llama_init_from_model(model.raw(), cp);
    if (r->ctx == nullptr) {
        throw fml_error(FML_ERR_CONTEXT_CREATE, "could not create the SWA cost context");
    }
    r->batch = llama_batch_init((int32_t) cp.n_batch, 0, 1);
    return r;
}

void decode(raw_context & r, const std::vector<int32_t> & tokens, int32_t pos0, int32_t n) {
    r.batch.n_tokens = n;
    for (int32_t i = 0; i < n; ++i) {
        r.batch.token[i] = tokens[(size_t) (pos0 + i)];
        r.batch.pos[i] = pos0 + i;
        r.batch.n_seq_id[i] = 1;
        r.batch.seq_id[i][0] = 0;
        r.batch.logits[i] = i + 1 == n;
    }
    if (llama_decode(r.ctx, r.batch) != 0) {
        throw fml_error(FML_ERR_DECODE, "llama_decode failed in the SWA cost probe");
    }
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0 : v[v.size() / 2];
}

} // namespace

swa_cost_result run_swa_cost(const fml_model & model, int32_t context, int32_t steps, int32_t threads) {
    swa_cost_result res;
    auto off = make_context(model, context, false, threads);
    auto on = make_context(model, context, true, threads);
    res.context = (int32_t) llama_n_ctx(on->ctx);
    res.filled = res.context - steps - 1;
    std::mt19937 rng(99);
    std::vector<int32_t> tokens((size_t) res.context);
    for (auto & t : tokens) {
        t = (int32_t) (rng() % (uint32_t) model.info().n_vocab);
    }
    const int32_t chunk = std::min(512, context);
    for (raw_context * r : { off.get(), on.get() }) {
        for (int32_t p = 0; p < res.filled; p += chunk) {
            decode(*r, tokens, p, std::min(chunk, res.filled - p));
        }
    }
    std::vector<double> ms_off, ms_on;
    for (int32_t s = 0; s < steps; ++s) {
        // Alternate which one goes first, so neither always decodes right after the other.
        for (int k = 0; k < 2; ++k) {
            const bool first_off = s % 2 == 0;
            raw_context & r = (k == 0) == first_off ? *off : *on;
            const auto t0 = std::chrono::steady_clock::now();
            decode(r, tokens, res.filled + s, 1);
            const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            (&r == off.get() ? ms_off : ms_on).push_back(ms);
        }
    }
    res.off = { kv_can_shift(off->ctx), (double) kv_allocated_bytes(off->ctx), median(ms_off) };
    res.on = { kv_can_shift(on->ctx), (double) kv_allocated_bytes(on->ctx), median(ms_on) };

    // The window snapshot, as a chat holds it (out-of-window cells pruned), against a short message's
    // prefill: the last 32 positions removed and decoded again in one batch.
    const int32_t next = res.filled + steps;
    const int32_t prefill = 32;
    res.prefill_tokens = prefill;
    if (llama_model_n_swa(model.raw()) > 0 && prefill <= chunk && prefill < next) {
        kv_prune_sliding_window(on->ctx, 0, next);
        token_ledger ledger;
        for (int32_t p = 0; p < next; ++p) ledger.append(tokens[(size_t) p], 1, TOKEN_ROLE_USER, false, false);
        std::vector<double> save_ms, restore_ms, prefill_ms;
        for (int rep = 0; rep < 5; ++rep) {
            const auto t0 = std::chrono::steady_clock::now();
            const std::vector<uint8_t> blob = kv_window_save(on->ctx, 0);
            const auto t1 = std::chrono::steady_clock::now();
            if (!kv_window_restore(on->ctx, 0, blob, ledger)) {
                throw fml_error(FML_ERR_KV, "llama.cpp refused the window it had just saved");
            }
            const auto t2 = std::chrono::steady_clock::now();
            kv_remove_from(on->ctx, 0, next - prefill);
            const auto t3 = std::chrono::steady_clock::now();
            decode(*on, tokens, next - prefill, prefill);
            const auto t4 = std::chrono::steady_clock::now();
            res.window_bytes = (double) blob.size();
            save_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
            restore_ms.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
            prefill_ms.push_back(std::chrono::duration<double, std::milli>(t4 - t3).count());
        }
        res.window_save_ms = median(save_ms);
        res.window_restore_ms = median(restore_ms);
        res.prefill_ms = median(prefill_ms);
    }
    return res;
}

} // namespace fml
