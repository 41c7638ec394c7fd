#include "probes/swa-cost.h"

#include "util/error.h"

#include "llama.h"

#include <algorithm>
#include <chrono>
#include <random>
#include <vector>

namespace fml {

swa_cost_result run_swa_cost(const fml_model & model, int32_t context, bool swa_full, int32_t steps, int32_t threads) {
    swa_cost_result res;
    res.swa_full = swa_full;
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) context;
    cp.n_batch = (uint32_t) std::min(512, context);
    cp.n_ubatch = cp.n_batch;
    cp.n_seq_max = 1;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.swa_full = swa_full;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model.raw(), cp);
    if (ctx == nullptr) {
        throw fml_error(FML_ERR_CONTEXT_CREATE, "could not create the SWA cost context");
    }
    res.context = (int32_t) llama_n_ctx(ctx);
    res.can_shift = llama_memory_can_shift(llama_get_memory(ctx));
    res.filled = res.context - steps - 1;
    std::mt19937 rng(99);
    llama_batch batch = llama_batch_init((int32_t) cp.n_batch, 0, 1);
    auto decode = [&](int32_t pos0, int32_t n) {
        batch.n_tokens = n;
        for (int32_t i = 0; i < n; ++i) {
            batch.token[i] = (int32_t) (rng() % (uint32_t) model.info().n_vocab);
            batch.pos[i] = pos0 + i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = i + 1 == n;
        }
        if (llama_decode(ctx, batch) != 0) {
            llama_batch_free(batch);
            llama_free(ctx);
            throw fml_error(FML_ERR_DECODE, "llama_decode failed in the SWA cost probe");
        }
    };
    {
        for (int32_t p = 0; p < res.filled; p += (int32_t) cp.n_batch) {
            decode(p, std::min<int32_t>((int32_t) cp.n_batch, res.filled - p));
        }
        res.state_bytes = (double) llama_state_seq_get_size(ctx, 0);
        std::vector<double> ms;
        for (int32_t s = 0; s < steps; ++s) {
            const auto t0 = std::chrono::steady_clock::now();
            decode(res.filled + s, 1);
            ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(ms.begin(), ms.end());
        res.decode_ms = ms.empty() ? 0 : ms[ms.size() / 2];
    }
    llama_batch_free(batch);
    llama_free(ctx);
    return res;
}

} // namespace fml
