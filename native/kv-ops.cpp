#include "kv-ops.h"

#include "error.h"

#include "llama.h"

namespace fml {

// A plan must stay inside the ledger and never touch a pinned token (policies are checked, not trusted).
static void check_plan(const token_ledger & ledger, const std::vector<index_range> & ranges) {
    for (const auto & r : ranges) {
        if (r.end > ledger.size()) {
            throw fml_error(FML_ERR_KV, "eviction range out of bounds");
        }
        for (size_t i = r.begin; i < r.end; ++i) {
            if (ledger[i].pinned) {
                throw fml_error(FML_ERR_KV, "eviction plan contains a pinned token");
            }
        }
    }
}

kv_eviction_result kv_evict_ranges(llama_context * ctx, token_ledger & ledger, const std::vector<index_range> & ranges_in) {
    kv_eviction_result res;
    const std::vector<index_range> ranges = normalize_ranges(ranges_in);
    if (ranges.empty()) {
        return res;
    }
    check_plan(ledger, ranges);

    llama_memory_t mem = llama_get_memory(ctx);
    // Ledger index == position (invariant), so ranges translate directly to positions.
    for (const auto & r : ranges) {
        if (!llama_memory_seq_rm(mem, KV_SEQ, (llama_pos) r.begin, (llama_pos) r.end)) {
            throw fml_error(FML_ERR_KV, "llama_memory_seq_rm refused a partial removal");
        }
    }
    // Close each gap: the run after the k-th removed range moves left by the tokens removed so far.
    // One seq_add per kept run; the tail run extends to the end of the sequence.
    size_t removed_so_far = 0;
    for (size_t k = 0; k < ranges.size(); ++k) {
        removed_so_far += ranges[k].size();
        const size_t run_begin = ranges[k].end;
        const size_t run_end   = k + 1 < ranges.size() ? ranges[k + 1].begin : ledger.size();
        if (run_end > run_begin) {
            llama_memory_seq_add(mem, KV_SEQ, (llama_pos) run_begin, (llama_pos) run_end, -(llama_pos) removed_so_far);
            res.shifted_runs++;
        }
    }
    res.evicted = ledger.remove_ranges_and_compact(ranges);
    return res;
}

void kv_scratch_begin(llama_context * ctx, size_t end) {
    llama_memory_t mem = llama_get_memory(ctx);
    llama_memory_seq_rm(mem, KV_SCRATCH_SEQ, -1, -1);
    llama_memory_seq_cp(mem, KV_SEQ, KV_SCRATCH_SEQ, 0, (llama_pos) end);
}

void kv_scratch_trim(llama_context * ctx, size_t end) {
    llama_memory_seq_rm(llama_get_memory(ctx), KV_SCRATCH_SEQ, 0, (llama_pos) end);
}

void kv_scratch_clear(llama_context * ctx) {
    llama_memory_seq_rm(llama_get_memory(ctx), KV_SCRATCH_SEQ, -1, -1);
}

kv_eviction_result kv_evict_and_insert(llama_context * ctx, token_ledger & ledger, const std::vector<index_range> & ranges_in,
                                       size_t insert_at, int32_t scratch_pos0, const std::vector<ledger_entry> & items) {
    kv_eviction_result res;
    const std::vector<index_range> ranges = normalize_ranges(ranges_in);
    const size_t n_insert = items.size();
    check_plan(ledger, ranges);
    if (ranges.empty() || insert_at != ranges.front().begin) {
        throw fml_error(FML_ERR_KV, "a summary must take the place of the first evicted token");
    }
    llama_memory_t mem = llama_get_memory(ctx);
    for (const auto & r : ranges) {
        if (!llama_memory_seq_rm(mem, KV_SEQ, (llama_pos) r.begin, (llama_pos) r.end)) {
            throw fml_error(FML_ERR_KV, "llama_memory_seq_rm refused a partial removal");
        }
    }
    // Kept runs after the insertion point move by (n_insert - removed so far), which can be positive
    // for early runs and negative for later ones; moving them in place could land one run on top of
    // another's old positions. So: park everything after insert_at far away, then move each run home.
    const llama_pos park = (llama_pos) (4 * (ledger.size() + n_insert) + (1 << 16));
    llama_memory_seq_add(mem, KV_SEQ, (llama_pos) insert_at, -1, park);
    size_t removed_so_far = 0;
    for (size_t k = 0; k < ranges.size(); ++k) {
        removed_so_far += ranges[k].size();
        const size_t run_begin = ranges[k].end;
        const size_t run_end   = k + 1 < ranges.size() ? ranges[k + 1].begin : ledger.size();
        if (run_end > run_begin) {
            const llama_pos target = (llama_pos) run_begin + (llama_pos) n_insert - (llama_pos) removed_so_far;
            llama_memory_seq_add(mem, KV_SEQ, (llama_pos) run_begin + park, (llama_pos) run_end + park,
                                 target - ((llama_pos) run_begin + park));
            res.shifted_runs++;
        }
    }
    if (n_insert > 0) {
        llama_memory_seq_add(mem, KV_SCRATCH_SEQ, scratch_pos0, scratch_pos0 + (llama_pos) n_insert,
                             (llama_pos) insert_at - scratch_pos0);
        llama_memory_seq_cp(mem, KV_SCRATCH_SEQ, KV_SEQ, (llama_pos) insert_at, (llama_pos) (insert_at + n_insert));
    }
    llama_memory_seq_rm(mem, KV_SCRATCH_SEQ, -1, -1);

    res.evicted = ledger.remove_ranges_and_compact(ranges);
    ledger.insert(insert_at, items);
    return res;
}

std::vector<uint8_t> kv_state_save(llama_context * ctx) {
    std::vector<uint8_t> blob(llama_state_seq_get_size(ctx, KV_SEQ));
    const size_t n = llama_state_seq_get_data(ctx, blob.data(), blob.size(), KV_SEQ);
    if (n == 0 && !blob.empty()) {
        throw fml_error(FML_ERR_KV, "llama_state_seq_get_data failed");
    }
    blob.resize(n);
    return blob;
}

void kv_state_load(llama_context * ctx, const std::vector<uint8_t> & blob) {
    llama_memory_clear(llama_get_memory(ctx), true);
    if (llama_state_seq_set_data(ctx, blob.data(), blob.size(), KV_SEQ) == 0) {
        llama_memory_clear(llama_get_memory(ctx), true);
        throw fml_error("CHECKPOINT_CORRUPT", "the checkpoint's KV state does not fit this context (llama_state_seq_set_data refused it)");
    }
}

void kv_shift_all(llama_context * ctx, token_ledger & ledger, int32_t delta) {
    if (ledger.empty()) {
        return;
    }
    llama_memory_seq_add(llama_get_memory(ctx), KV_SEQ, 0, -1, delta);
    for (size_t i = 0; i < ledger.size(); ++i) {
        ledger.at(i).pos += delta;
    }
}

void kv_truncate(llama_context * ctx, token_ledger & ledger, size_t keep) {
    if (keep >= ledger.size()) {
        return;
    }
    const llama_pos p0 = ledger[keep].pos;
    if (!llama_memory_seq_rm(llama_get_memory(ctx), KV_SEQ, p0, -1)) {
        throw fml_error(FML_ERR_KV, "llama_memory_seq_rm refused to truncate");
    }
    std::vector<index_range> tail = { { keep, ledger.size() } };
    // Positions of the kept prefix are unchanged (the prefix already starts at 0..keep-1 unless shifted).
    const int32_t first_pos = ledger.empty() ? 0 : ledger[0].pos;
    ledger.remove_ranges_and_compact(tail);
    for (size_t i = 0; i < ledger.size(); ++i) {
        ledger.at(i).pos = first_pos + (int32_t) i;
    }
}

void kv_clear(llama_context * ctx, token_ledger & ledger) {
    llama_memory_clear(llama_get_memory(ctx), true);
    ledger.clear();
}

int32_t kv_pos_min(llama_context * ctx) { return llama_memory_seq_pos_min(llama_get_memory(ctx), KV_SEQ); }
int32_t kv_pos_max(llama_context * ctx) { return llama_memory_seq_pos_max(llama_get_memory(ctx), KV_SEQ); }
int32_t kv_scratch_pos_max(llama_context * ctx) { return llama_memory_seq_pos_max(llama_get_memory(ctx), KV_SCRATCH_SEQ); }

void kv_drop_unledgered(llama_context * ctx, const token_ledger & ledger) {
    llama_memory_seq_rm(llama_get_memory(ctx), KV_SEQ, ledger.next_pos(), -1);
}
bool kv_can_shift(llama_context * ctx) { return llama_memory_can_shift(llama_get_memory(ctx)); }

} // namespace fml
