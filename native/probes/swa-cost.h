// What keeping sliding-window layers at the full budget (swa_full, which in-place eviction needs)
// costs against llama.cpp's window-sized SWA cache: KV bytes a sequence holds and decode time per
// token at a given fill. Measured on raw contexts of one sequence, outside the engine.
#pragma once

#include "model/model.h"

namespace fml {

struct swa_cost_result {
    bool swa_full = false;
    bool can_shift = false;        // llama_memory_can_shift of that context
    int32_t context = 0;           // cells of the full-attention cache
    int32_t filled = 0;
    double state_bytes = 0;        // llama_state_seq_get_size after the fill: the KV the sequence holds
    double decode_ms = 0;          // median 1-token decode at that fill
};

swa_cost_result run_swa_cost(const fml_model & model, int32_t context, bool swa_full, int32_t steps, int32_t threads);

} // namespace fml
