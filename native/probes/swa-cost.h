// What keeping sliding-window layers at the full budget (swa_full, which in-place eviction needs)
// costs against llama.cpp's window-sized SWA cache: KV memory allocated and decode time per token at
// a given fill. Two raw contexts of one sequence each (swa_full off and on), filled alike, then
// one-token decodes interleaved between them so machine noise hits both equally. Then, on the swa_full
// context, what a chat pays to keep its window through tokens removed again (kv_window_save at every
// turn, kv_window_restore when a turn is rolled back) against a short message's prefill.
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
    double window_bytes = 0;       // the window's snapshot
    double window_save_ms = 0;     // medians
    double window_restore_ms = 0;
    int32_t prefill_tokens = 0;    // a short message: 32 tokens
    double prefill_ms = 0;         // its prefill at the fill
};

swa_cost_result run_swa_cost(const fml_model & model, int32_t context, int32_t steps, int32_t threads);

} // namespace fml
