// The only module that mutates llama.cpp's KV cache layout (llama_memory_*). Policies decide what
// to evict; this applies the plan: seq_rm for each evicted range, then one seq_add per kept run to
// close the gaps, so retained tokens hold positions 0..n-1 again. The RoPE re-rotation of the
// shifted keys (K-shift) runs lazily inside the next llama_decode.
//
// Cells vs positions: llama.cpp never compacts KV cells physically. seq_rm frees the cells and moves
// the allocation head to the first freed one, so the next tokens refill those holes; the cache never
// grows past the context size (sized from the budget), and no freed cell stays dead once new tokens
// arrive. The ledger tracks positions only; nothing here reads per-cell data.
#pragma once

#include "token-ledger.h"

#include <cstdint>
#include <vector>

struct llama_context;

namespace fml {

constexpr int32_t KV_SEQ = 0;   // every chat has its own context, so one sequence is enough

struct kv_eviction_result {
    size_t evicted = 0;
    size_t shifted_runs = 0;   // number of seq_add calls
};

// Applies the eviction to the cache and the ledger. Throws fml_error(KV) if llama.cpp refuses.
kv_eviction_result kv_evict_ranges(llama_context * ctx, token_ledger & ledger, const std::vector<index_range> & ranges);

constexpr int32_t KV_SCRATCH_SEQ = 1;   // the summarizer's scratch sequence (summarizing policies only)

// Starts a scratch sequence that shares the cells of positions [0, end) of the chat's sequence
// (no copy: cells gain a second sequence id), so the summarizer sees the history without re-prefill.
void kv_scratch_begin(llama_context * ctx, size_t end);
// Drops the scratch sequence's membership of positions [0, end) (shared cells stay with the chat).
void kv_scratch_trim(llama_context * ctx, size_t end);
void kv_scratch_clear(llama_context * ctx);

// Evicts `ranges` from the chat's sequence and puts the `n_insert` scratch-sequence tokens that sit at
// positions [scratch_pos0, scratch_pos0 + n_insert) at index `insert_at` of the compacted sequence
// (K-shifted there), then drops the scratch sequence. The ledger gets `items` at `insert_at`.
kv_eviction_result kv_evict_and_insert(llama_context * ctx, token_ledger & ledger, const std::vector<index_range> & ranges,
                                       size_t insert_at, int32_t scratch_pos0, const std::vector<ledger_entry> & items);

// The chat sequence's KV state as bytes (llama_state_seq_get_data) and back. Saving while a K-shift is
// pending would store unrotated keys under their new positions, so callers apply pending shifts first.
std::vector<uint8_t> kv_state_save(llama_context * ctx);
void kv_state_load(llama_context * ctx, const std::vector<uint8_t> & blob);

// Shifts every cached position by `delta` (test hook: RoPE is relative, so logits must not change).
void kv_shift_all(llama_context * ctx, token_ledger & ledger, int32_t delta);

// Removes positions >= pos from the cache and the ledger (rolls back a probe decode).
void kv_truncate(llama_context * ctx, token_ledger & ledger, size_t keep);

void kv_clear(llama_context * ctx, token_ledger & ledger);

// Removes cached positions the ledger does not hold (>= ledger.next_pos()): what a failed or aborted
// batch left behind, or the tokens of a probe decode. The ledger is unchanged.
void kv_drop_unledgered(llama_context * ctx, const token_ledger & ledger);

// Highest position of the summarizer's scratch sequence (-1 when empty).
int32_t kv_scratch_pos_max(llama_context * ctx);

// llama.cpp's own view of the sequence, for invariant checks against the ledger.
int32_t kv_pos_min(llama_context * ctx);
int32_t kv_pos_max(llama_context * ctx);

bool kv_can_shift(llama_context * ctx);

} // namespace fml
