// Which KV cell holds which position. llama.cpp's public API does not expose it, but attention
// tensors (kq_soft_max) are indexed by cell, and cells drift from position order once seq_rm frees
// holes that new tokens refill. This is the one place that reads llama.cpp's internal KV-cache
// headers (from the pinned source, checked at configure time: FML_HAVE_KV_CELLS).
#pragma once

#include <cstddef>
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

// Removes from the sliding-window cache of a model with sliding layers the sequence's cells that the
// next token at `next_pos` would not see (positions <= next_pos - window), before an eviction moves
// positions. llama.cpp would otherwise drop some of them later by reusing their cells, depending on
// cell order: after a compaction brought them back within the window, a chat and its restored
// checkpoint (which stores only cells in the window) would see different tokens. Pruned here, a token
// that left a sliding layer's window stays out of it, deterministically. No-op for other caches.
void kv_prune_sliding_window(llama_context * ctx, int32_t seq, int32_t next_pos);

// Bytes of KV buffers the context's memory allocated (every cache of it; 0 when unknown).
size_t kv_allocated_bytes(llama_context * ctx);

} // namespace fml
