// What keeping sliding-window layers at the full budget (swa_full, which in-place eviction needs)
// costs against llama.cpp's window-sized SWA cache: KV memory allocated and decode time per token at
// a given fill. Two raw contexts of one sequence each (swa_full off and on), filled alike, then
// one-token decodes interleaved between them so machine noise hits both equally.
#pragma once

#include "model/model.h"

namespace fml {

struct swa_cost_side {
    bool can_shift = false;        // llama_memory_can_shift of that context
    double kv_bytes = 0;           // KV buffers allocated (both caches of an iSWA model)
    double decode_ms = 0;          // median 1-token decode at the fill
};

struct swa_cost_result {
    int32_t context = 0;           // cells of the full-attention cache
    int32_t filled = 0;
    swa_cost_side off;             // swa_full = false (llama.cpp's window-sized SWA cache)
    swa_cost_side on;              // swa_full = true (what finite memory uses)
};

swa_cost_result run_swa_cost(const fml_model & model, int32_t context, int32_t steps, int32_t threads);

} // namespace fml
