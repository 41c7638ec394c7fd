// The only module that mutates llama.cpp's KV cache layout (llama_memory_*). Policies decide what
// to evict; this applies the plan to one sequence of a shared context: seq_rm for each evicted range,
// then one seq_add per kept run to close the gaps, so the retained tokens hold positions 0..n-1
// again. The RoPE re-rotation of the shifted keys (K-shift) runs lazily inside the next llama_decode
// (for every cell of the context: llama.cpp has no per-sequence shift).
//
// Cells vs positions: llama.cpp never compacts KV cells physically. seq_rm frees the cells and moves
// the allocation head to the first freed one, so the next tokens refill those holes; a sequence never
// grows past its stream (sized from its budget). The ledger tracks positions only.
#pragma once

#include "kv/token-ledger.h"

#include <cstdint>
#include <vector>

struct llama_context;

namespace fml {

struct kv_eviction_result {
    size_t evicted = 0;
    size_t shifted_runs = 0;   // number of seq_add calls
};

// Applies the eviction to sequence `seq` and its ledger. Throws fml_error(KV) if llama.cpp refuses.
kv_eviction_result kv_evict_ranges(llama_context * ctx, int32_t seq, token_ledger & ledger, const std::vector<index_range> & ranges);

// Summaries are written in the chat's own sequence after its history: an instruction at positions
// [instruction_pos0, summary_pos0) and `items.size()` summary tokens from summary_pos0 (scratch cells:
// not in the ledger). This removes the instruction, evicts `ranges`, and moves the summary to index
// `insert_at` of the compacted sequence (K-shifted there); the ledger gets `items` at `insert_at`.
kv_eviction_result kv_evict_and_insert(llama_context * ctx, int32_t seq, token_ledger & ledger, const std::vector<index_range> & ranges,
                                       size_t insert_at, int32_t instruction_pos0, int32_t summary_pos0,
                                       const std::vector<ledger_entry> & items);

// The sequence's KV state as bytes (llama_state_seq_get_data, in a one-stream form that loads into a
// context with any number of streams) and back into (another) sequence of a context with `streams`
// KV streams. Saving while a K-shift is pending would store unrotated keys under their new positions,
// so callers apply pending shifts first. Loading replaces only that sequence.
std::vector<uint8_t> kv_state_save(llama_context * ctx, int32_t seq);
void kv_state_load(llama_context * ctx, int32_t seq, uint32_t streams, const std::vector<uint8_t> & blob);

// Shifts every cached position of `seq` by `delta` (test hook: RoPE is relative, so logits must not change).
void kv_shift_all(llama_context * ctx, int32_t seq, token_ledger & ledger, int32_t delta);

// Removes ledger entries from index `keep` on, from the cache too.
void kv_truncate(llama_context * ctx, int32_t seq, token_ledger & ledger, size_t keep);

// Empties the sequence (its slot stays) and the ledger.
void kv_clear(llama_context * ctx, int32_t seq, token_ledger & ledger);
// Empties a slot that no ledger describes (a parked or released chat's).
void kv_clear_slot(llama_context * ctx, int32_t seq);

// Removes cached positions the ledger does not hold (>= ledger.next_pos()): what a failed or aborted
// batch left behind, summary scratch cells, or the tokens of a probe decode. The ledger is unchanged.
void kv_drop_unledgered(llama_context * ctx, int32_t seq, const token_ledger & ledger);

// Removes the sequence's positions >= pos (a probe token, a shift-applying decode).
void kv_remove_from(llama_context * ctx, int32_t seq, int32_t pos);

// llama.cpp's own view of the sequence, for invariant checks against the ledger (-1 when empty).
int32_t kv_pos_min(llama_context * ctx, int32_t seq);
int32_t kv_pos_max(llama_context * ctx, int32_t seq);

bool kv_can_shift(llama_context * ctx);

} // namespace fml
