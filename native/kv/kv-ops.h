// The only module that mutates llama.cpp's KV cache layout (llama_memory_*). Policies decide what
// to evict; this applies the plan to one sequence of a shared context.
//
// Positions: an eviction is seq_rm alone. The retained tokens keep their positions, so the distances
// between them stay the true ones and the next tokens are numbered on from the last position + 1.
// Compaction (positions 0..n-1 again) is separate and rare: one seq_add per moved run, whose RoPE
// re-rotation of the keys (K-shift) runs lazily inside the next llama_decode for every cell of the
// context (llama.cpp has no per-sequence shift). Keys llama.cpp will not shift or would shift wrong
// (M-RoPE, YaRN, layers without positions, some quantized caches: kv_llama_shift_unsound) are rotated
// at once by kv-internals (kv_rotate_positions); where even that is unavailable, the caller
// re-prefills the retained tokens. For a hybrid model every removal touches the attention KV
// only: the recurrent state keeps everything it has seen (kv-internals.h).
//
// Cells vs positions: llama.cpp never compacts KV cells physically. seq_rm frees the cells and moves
// the allocation head to the first freed one, so the next tokens refill those holes; a sequence never
// grows past its stream (sized from its budget) whatever its positions. The ledger tracks positions.
#pragma once

#include "kv/token-ledger.h"

#include <cstdint>
#include <vector>

struct llama_context;

namespace fml {

struct kv_eviction_result {
    size_t evicted = 0;
    size_t shifted_runs = 0;   // runs of positions moved (seq_add calls: a K-shift in the next decode where kv_shift_deferred)
};

// Evicts the ranges (ledger indices) from sequence `seq` and its ledger; the retained tokens keep
// their positions. Throws fml_error(KV) if llama.cpp refuses.
kv_eviction_result kv_evict_ranges(llama_context * ctx, int32_t seq, token_ledger & ledger, const std::vector<index_range> & ranges);

// Numbers the retained tokens 0..n-1 again by moving their cells (a K-shift in the next decode).
// Only for caches that can shift (kv_can_shift). Returns the runs moved (0 when already contiguous).
size_t kv_compact_by_shift(llama_context * ctx, int32_t seq, token_ledger & ledger);

// Removes every attention cell of the sequence and numbers the ledger 0..n-1: the caller re-prefills
// the retained tokens there (compaction where keys cannot shift). A hybrid's recurrent state stays.
void kv_clear_for_reprefill(llama_context * ctx, int32_t seq, token_ledger & ledger);

// Where a finished summary goes. Summaries are written in the chat's own sequence after its history:
// its prompt (the instruction) at positions [prompt_pos0, summary_pos0) and the summary tokens from summary_pos0
// (scratch cells: not in the ledger).
enum class summary_placement {
    in_gap,          // in an evicted range's index and positions (its cells move there: a K-shift)
    pushed,          // at the first evicted range's index and first position, the tokens after it pushed
                     // forward as far as it needs, until a gap takes the push (one K-shift)
    after_history,   // where the model wrote it, after the retained history (no move; keys that cannot move)
    compacted,       // at the first evicted token's index, with every position renumbered 0..n-1 (a K-shift)
};
// Removes the prompt, evicts `ranges` and places the summary's `items` as `placement` says.
// in_gap: in the `gap`-th of the (sorted, merged) ranges, which must span at least items.size()
// positions (summary_gap).
kv_eviction_result kv_evict_and_insert(llama_context * ctx, int32_t seq, token_ledger & ledger, const std::vector<index_range> & ranges,
                                       summary_placement placement, int32_t prompt_pos0, int32_t summary_pos0,
                                       const std::vector<ledger_entry> & items, size_t gap = 0);
// The first of `ranges` (sorted, merged) whose freed positions (up to the next kept token) hold `n`
// summary tokens; -1 when none does.
int64_t summary_gap(const token_ledger & ledger, const std::vector<index_range> & ranges, size_t n);

// The sequence's KV state as bytes (llama_state_seq_get_data, in a one-stream form that loads into a
// context with any number of streams) and back into (another) sequence of a context with `streams`
// KV streams. Saving while a K-shift is pending would store unrotated keys under their new positions,
// so callers apply pending shifts first. Loading replaces only that sequence.
std::vector<uint8_t> kv_state_save(llama_context * ctx, int32_t seq);
void kv_state_load(llama_context * ctx, int32_t seq, uint32_t streams, const std::vector<uint8_t> & blob);

// The recurrent half of a hybrid chat's state (llama.cpp's partial sequence state), or empty for a
// model without one. Restoring it undoes every token the recurrent layers saw since it was saved
// (an aborted prefill, a summary's scratch, a probe) and sets its position to `last_pos`, the
// ledger's last position at the time of the restore.
std::vector<uint8_t> kv_recurrent_save(llama_context * ctx, int32_t seq);
void kv_recurrent_restore(llama_context * ctx, int32_t seq, const std::vector<uint8_t> & blob, int32_t last_pos);
// True when the context's memory has a recurrent half (snapshots then matter).
bool kv_has_recurrent(llama_context * ctx);

// The sliding layers' window of a chat on a model with sliding-window layers (llama.cpp's partial
// sequence state of that cache), or empty for other models. Tokens decoded and then removed (a
// summary's scratch, an aborted prefill) can have taken the cells of the window's own tokens:
// llama.cpp reuses a cell once it is outside the window of the sequence's newest token, so after as
// many tokens as the window the history's newest ones are gone from the sliding layers, and the
// next decode is refused (the window cache no longer ends just before it). Restoring puts the window
// back as it was, less the positions the ledger no longer holds (evicted since the save). Saving while
// a K-shift is pending would keep unrotated keys that no later shift rotates: callers apply it first.
std::vector<uint8_t> kv_window_save(llama_context * ctx, int32_t seq);
// False when llama.cpp refuses the save (one made before the context grew to more streams; the
// window cache may then have lost the sequence's cells): callers then repair the window
// (chat::repair_window).
bool kv_window_restore(llama_context * ctx, int32_t seq, const std::vector<uint8_t> & blob, const token_ledger & ledger);
// `before` with its cells at positions [pos0, pos1) replaced by those of `after` (a later window
// save): the window as it was plus what a summary wrote (in the scratch, or where it now stands).
// `before` alone when the two saves do not have the same layout.
std::vector<uint8_t> kv_window_with(llama_context * ctx, const std::vector<uint8_t> & before, const std::vector<uint8_t> & after, int32_t pos0,
                                    int32_t pos1);
// True when the cache that holds every retained token has exactly one cell per ledger entry, at its
// position (a loaded state must not bring cells the ledger does not know: duplicates, gaps, cells
// past the end on a model whose reported maximum is another cache's). True without the internals.
bool kv_cells_match_ledger(llama_context * ctx, int32_t seq, const token_ledger & ledger);
// True when the sliding layers hold exactly the ledger's positions that the next token sees (always
// true without sliding layers, or without the internals to look).
bool kv_window_matches(llama_context * ctx, int32_t seq, const token_ledger & ledger);

// Removes ledger entries from index `keep` on, from the attention KV too (positions unchanged). A
// hybrid's recurrent state is restored by the caller from its snapshot.
void kv_truncate(llama_context * ctx, int32_t seq, token_ledger & ledger, size_t keep);

// Empties a slot entirely (a parked or released chat's, or one restarting from nothing): both halves.
void kv_clear_slot(llama_context * ctx, int32_t seq);

// Removes cached positions the ledger does not hold (>= ledger.next_pos()) from the attention KV:
// what a failed or aborted batch left behind, summary scratch cells, or the tokens of a probe decode.
// The ledger is unchanged.
void kv_drop_unledgered(llama_context * ctx, int32_t seq, const token_ledger & ledger);

// Removes the sequence's attention positions >= pos (a probe token, a shift-applying decode).
void kv_remove_from(llama_context * ctx, int32_t seq, int32_t pos);

// llama.cpp's own view of the sequence, for invariant checks against the ledger (-1 when empty): the
// smallest position of the cache holding every retained token, and the last position of the sequence.
int32_t kv_pos_min(llama_context * ctx, int32_t seq);
int32_t kv_pos_max(llama_context * ctx, int32_t seq);

// Keys can move to new positions: by llama.cpp's K-shift where it is sound, else by kv_rotate_positions.
bool kv_can_shift(llama_context * ctx);
// A move of positions is applied by llama.cpp inside the next decode (its K-shift of every cell of
// the context), not at once: where llama.cpp can shift and its shift only rotates (otherwise the
// rotation of kv-internals is done when the positions move).
bool kv_shift_deferred(llama_context * ctx);
// Moves every retained position of `seq` by `delta` (tests: RoPE is relative, logits must not change).
// Below 0: llama.cpp's seq_add drops those cells (a test crafts a corrupt checkpoint so); the
// rotation refuses (kv_rotate_positions).
size_t kv_shift_all(llama_context * ctx, int32_t seq, token_ledger & ledger, int32_t delta);

} // namespace fml
