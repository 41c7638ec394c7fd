#include "kv/kv-cells.h"

#include "llama.h"

#ifdef FML_HAVE_KV_CELLS
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cells.h"
#endif

namespace fml {

bool kv_cells_available() {
#ifdef FML_HAVE_KV_CELLS
    return true;
#else
    return false;
#endif
}

bool kv_cell_positions(llama_context * ctx, int32_t seq, std::vector<int32_t> & out) {
    out.clear();
#ifdef FML_HAVE_KV_CELLS
    auto * kv = dynamic_cast<llama_kv_cache *>(llama_get_memory(ctx));
    if (kv == nullptr) {
        return false;
    }
    const llama_kv_cells & cells = kv->get_cells(seq);
    out.resize(cells.size(), -1);
    for (uint32_t i = 0; i < cells.size(); ++i) {
        if (!cells.is_empty(i) && cells.seq_has(i, seq)) {
            out[i] = cells.pos_get(i);
        }
    }
    return true;
#else
    (void) ctx;
    (void) seq;
    return false;
#endif
}

int32_t kv_full_cache_pos_min(llama_context * ctx, int32_t seq) {
#ifdef FML_HAVE_KV_CELLS
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(llama_get_memory(ctx))) {
        return iswa->get_base()->seq_pos_min(seq);
    }
#endif
    return llama_memory_seq_pos_min(llama_get_memory(ctx), seq);
}

void kv_prune_sliding_window(llama_context * ctx, int32_t seq, int32_t next_pos) {
#ifdef FML_HAVE_KV_CELLS
    auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(llama_get_memory(ctx));
    const int32_t window = llama_model_n_swa(llama_get_model(ctx));
    if (iswa != nullptr && window > 0 && next_pos - window >= 0) {
        iswa->get_swa()->seq_rm(seq, 0, next_pos - window + 1);
    }
#else
    (void) ctx;
    (void) seq;
    (void) next_pos;
#endif
}

size_t kv_allocated_bytes(llama_context * ctx) {
#ifdef FML_HAVE_KV_CELLS
    size_t total = 0;
    for (const auto & [type, bytes] : llama_get_memory(ctx)->memory_breakdown()) {
        (void) type;
        total += bytes;
    }
    return total;
#else
    (void) ctx;
    return 0;
#endif
}

} // namespace fml
