// Which KV cell holds which position. llama.cpp's public API does not expose it, but attention
// tensors (kq_soft_max) are indexed by cell, and cells drift from position order once seq_rm frees
// holes that new tokens refill. This is the one place that reads llama.cpp's internal KV-cache
// headers (from the pinned source, checked at configure time: FML_HAVE_KV_CELLS).
#pragma once

#include <cstdint>
#include <vector>

struct llama_context;

namespace fml {

// True when this build can map cells to positions.
bool kv_cells_available();

// out[cell] = position of the cell in `seq`, or -1 when the cell is empty or not in `seq`.
// Returns false (and leaves `out` empty) when the mapping is unavailable.
bool kv_cell_positions(llama_context * ctx, int32_t seq, std::vector<int32_t> & out);

// The sequence's smallest position in the cache that holds every retained token. With sliding-window
// layers llama.cpp reports the window cache's, whose out-of-window cells it reuses for new tokens
// (so an old token can be gone from the sliding layers only, as in a conversation never compacted).
int32_t kv_full_cache_pos_min(llama_context * ctx, int32_t seq);

} // namespace fml
