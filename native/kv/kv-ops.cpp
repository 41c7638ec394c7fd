#include "kv/kv-ops.h"
#include "kv/kv-cells.h"

#include "util/error.h"

#include "llama.h"

#include <cstring>

namespace fml {

// A negative sequence id means "every sequence" to llama_memory_*, and one past n_seq_max aborts the
// process: neither may come from a chat.
static void check_seq(llama_context * ctx, int32_t seq) {
    if (seq < 0 || (uint32_t) seq >= llama_n_seq_max(ctx)) {
        throw fml_error(FML_ERR_INTERNAL, "KV operation on sequence " + std::to_string(seq) + ", which this context does not have");
    }
}

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

// The kept runs between (and after) sorted evicted ranges: fn(run_begin, run_end, tokens removed before the run).
template <typename F>
static void for_each_kept_run(const token_ledger & ledger, const std::vector<index_range> & ranges, F fn) {
    size_t removed_so_far = 0;
    for (size_t k = 0; k < ranges.size(); ++k) {
        removed_so_far += ranges[k].size();
        const size_t run_begin = ranges[k].end;
        const size_t run_end   = k + 1 < ranges.size() ? ranges[k + 1].begin : ledger.size();
        if (run_end > run_begin) {
            fn(run_begin, run_end, removed_so_far);
        }
    }
}

static void remove_ranges(llama_memory_t mem, int32_t seq, const std::vector<index_range> & ranges) {
    // Ledger index == position (invariant), so ranges translate directly to positions.
    for (const auto & r : ranges) {
        if (!llama_memory_seq_rm(mem, seq, (llama_pos) r.begin, (llama_pos) r.end)) {
            throw fml_error(FML_ERR_KV, "llama_memory_seq_rm refused a partial removal");
        }
    }
}

kv_eviction_result kv_evict_ranges(llama_context * ctx, int32_t seq, token_ledger & ledger, const std::vector<index_range> & ranges_in) {
    check_seq(ctx, seq);
    kv_eviction_result res;
    const std::vector<index_range> ranges = normalize_ranges(ranges_in);
    if (ranges.empty()) {
        return res;
    }
    check_plan(ledger, ranges);
    llama_memory_t mem = llama_get_memory(ctx);
    kv_prune_sliding_window(ctx, seq, ledger.next_pos());
    remove_ranges(mem, seq, ranges);
    // Close each gap: the run after the k-th removed range moves left by the tokens removed so far.
    // One seq_add per kept run; the tail run extends to the end of the sequence.
    for_each_kept_run(ledger, ranges, [&](size_t run_begin, size_t run_end, size_t removed) {
        llama_memory_seq_add(mem, seq, (llama_pos) run_begin, (llama_pos) run_end, -(llama_pos) removed);
        res.shifted_runs++;
    });
    res.evicted = ledger.remove_ranges_and_compact(ranges);
    return res;
}

kv_eviction_result kv_evict_and_insert(llama_context * ctx, int32_t seq, token_ledger & ledger, const std::vector<index_range> & ranges_in,
                                       size_t insert_at, int32_t instruction_pos0, int32_t summary_pos0,
                                       const std::vector<ledger_entry> & items) {
    check_seq(ctx, seq);
    kv_eviction_result res;
    const std::vector<index_range> ranges = normalize_ranges(ranges_in);
    const size_t n_insert = items.size();
    check_plan(ledger, ranges);
    if (ranges.empty() || insert_at != ranges.front().begin || instruction_pos0 < ledger.next_pos() || summary_pos0 < instruction_pos0) {
        throw fml_error(FML_ERR_KV, "a summary must take the place of the first evicted token, from scratch cells after the history");
    }
    kv_prune_sliding_window(ctx, seq, ledger.next_pos());
    llama_memory_t mem = llama_get_memory(ctx);
    // The instruction and anything after the summary go; so do the evicted ranges.
    llama_memory_seq_rm(mem, seq, instruction_pos0, summary_pos0);
    llama_memory_seq_rm(mem, seq, summary_pos0 + (llama_pos) n_insert, -1);
    remove_ranges(mem, seq, ranges);
    // Kept runs after the insertion point move by (n_insert - removed so far), which can be positive
    // for early runs and negative for later ones, and the summary moves far left; moving them in place
    // could land one on top of another's old positions. So: park everything after insert_at far away,
    // then move each run (and the summary) home.
    const llama_pos park = (llama_pos) (4 * ((size_t) summary_pos0 + n_insert) + (1 << 16));
    llama_memory_seq_add(mem, seq, (llama_pos) insert_at, -1, park);
    for_each_kept_run(ledger, ranges, [&](size_t run_begin, size_t run_end, size_t removed) {
        const llama_pos target = (llama_pos) run_begin + (llama_pos) n_insert - (llama_pos) removed;
        llama_memory_seq_add(mem, seq, (llama_pos) run_begin + park, (llama_pos) run_end + park, target - ((llama_pos) run_begin + park));
        res.shifted_runs++;
    });
    if (n_insert > 0) {
        llama_memory_seq_add(mem, seq, summary_pos0 + park, summary_pos0 + park + (llama_pos) n_insert,
                             (llama_pos) insert_at - (summary_pos0 + park));
    }
    res.evicted = ledger.remove_ranges_and_compact(ranges);
    ledger.insert(insert_at, items);
    return res;
}

// A sequence's state as llama.cpp writes it is [u32 magic][i32 seq id] and then one section per KV
// cache (two for models with sliding-window layers: the full cache, then the window's): [u32
// n_stream] and, per stream, [u32 cell_count] and (when it is not 0) that stream's cells; only the
// sequence's own stream has cells. It only loads into a context with the same stream count, so the
// bytes are kept in a canonical one-stream form (n_stream 1 in every section, just that stream) and
// widened again to the target context's count when loaded: llama.cpp restores a section into the
// destination sequence's own stream, whichever position it had, and ignores the stored seq id.
static constexpr size_t STATE_HEADER = 8;   // magic + seq id

namespace {

struct blob_reader {
    const std::vector<uint8_t> & b;
    size_t at;
    template <typename T> T get() {
        if (at + sizeof(T) > b.size()) {
            throw fml_error(FML_ERR_KV, "unexpected KV state layout (truncated)");
        }
        T v;
        memcpy(&v, b.data() + at, sizeof(T));
        at += sizeof(T);
        return v;
    }
    void skip(uint64_t n) {
        if (n > b.size() - at) {
            throw fml_error(FML_ERR_KV, "unexpected KV state layout (truncated)");
        }
        at += (size_t) n;
    }
};

// Skips one stream's `cells` cells (llama_kv_cache::state_write_meta, then state_write_data).
void skip_stream_cells(blob_reader & r, uint32_t cells) {
    for (uint32_t c = 0; c < cells; ++c) {
        r.get<int32_t>();                       // pos
        const uint32_t n_seq = r.get<uint32_t>();
        r.skip(4ull * n_seq);                   // seq ids
    }
    const uint32_t v_trans = r.get<uint32_t>();
    const uint32_t n_layer = r.get<uint32_t>();
    for (uint32_t l = 0; l < n_layer; ++l) {    // K rows
        r.get<int32_t>();
        r.skip(r.get<uint64_t>() * cells);
    }
    for (uint32_t l = 0; l < n_layer; ++l) {    // V rows, or V elements when transposed
        r.get<int32_t>();
        if (v_trans == 0) {
            r.skip(r.get<uint64_t>() * cells);
        } else {
            const uint32_t el = r.get<uint32_t>();
            const uint32_t n_embd_v = r.get<uint32_t>();
            r.skip((uint64_t) el * n_embd_v * cells);
        }
    }
}

// Byte ranges [begin, end) of each section's one stream ([u32 cell_count][cells]).
std::vector<std::pair<size_t, size_t>> section_streams(const std::vector<uint8_t> & raw, bool one_stream) {
    std::vector<std::pair<size_t, size_t>> out;
    blob_reader r{ raw, STATE_HEADER };
    while (r.at < raw.size()) {
        const uint32_t n_stream = r.get<uint32_t>();
        if (n_stream == 0 || (one_stream && n_stream != 1)) {
            throw fml_error(one_stream ? FML_ERR_CHECKPOINT_CORRUPT : FML_ERR_KV, "unexpected KV state layout (stream count)");
        }
        // The non-empty stream, or the first (empty) one when the sequence holds no cells.
        std::pair<size_t, size_t> kept{ 0, 0 };
        bool found = false;
        for (uint32_t s = 0; s < n_stream; ++s) {
            const size_t begin = r.at;
            const uint32_t cells = r.get<uint32_t>();
            if (cells > 0) {
                skip_stream_cells(r, cells);
            }
            if (cells > 0 && found) {
                throw fml_error(FML_ERR_KV, "unexpected KV state layout (cells in more than one stream)");
            }
            if (cells > 0 || s == 0) {
                kept = { begin, r.at };
                found = cells > 0;
            }
        }
        out.push_back(kept);
    }
    return out;
}

} // namespace

static std::vector<uint8_t> to_one_stream(const std::vector<uint8_t> & raw) {
    if (raw.size() < STATE_HEADER + 4) {
        throw fml_error(FML_ERR_KV, "llama_state_seq_get_data returned too few bytes");
    }
    std::vector<uint8_t> out(raw.begin(), raw.begin() + (long) STATE_HEADER);
    const uint32_t one = 1;
    for (const auto & [begin, end] : section_streams(raw, false)) {
        out.insert(out.end(), (const uint8_t *) &one, (const uint8_t *) &one + 4);
        out.insert(out.end(), raw.begin() + (long) begin, raw.begin() + (long) end);
    }
    return out;
}

std::vector<uint8_t> kv_state_save(llama_context * ctx, int32_t seq) {
    check_seq(ctx, seq);
    std::vector<uint8_t> blob(llama_state_seq_get_size(ctx, seq));
    const size_t n = llama_state_seq_get_data(ctx, blob.data(), blob.size(), seq);
    if (n == 0 && !blob.empty()) {
        throw fml_error(FML_ERR_KV, "llama_state_seq_get_data failed");
    }
    blob.resize(n);
    return to_one_stream(blob);
}

void kv_state_load(llama_context * ctx, int32_t seq, uint32_t streams, const std::vector<uint8_t> & blob) {
    check_seq(ctx, seq);
    llama_memory_seq_rm(llama_get_memory(ctx), seq, -1, -1);
    if (blob.size() < STATE_HEADER + 8) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the KV state is not in the one-stream form this library writes");
    }
    std::vector<std::pair<size_t, size_t>> sections;
    try {
        sections = section_streams(blob, true);
    } catch (const fml_error &) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the KV state is not in the one-stream form this library writes");
    }
    // Widen every section to the context's stream count: the stream, then an empty entry for every other one.
    std::vector<uint8_t> wide(blob.begin(), blob.begin() + (long) STATE_HEADER);
    for (const auto & [begin, end] : sections) {
        wide.insert(wide.end(), (const uint8_t *) &streams, (const uint8_t *) &streams + 4);
        wide.insert(wide.end(), blob.begin() + (long) begin, blob.begin() + (long) end);
        wide.insert(wide.end(), 4 * (size_t) (streams - 1), 0);
    }
    if (llama_state_seq_set_data(ctx, wide.data(), wide.size(), seq) == 0) {
        llama_memory_seq_rm(llama_get_memory(ctx), seq, -1, -1);
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the KV state does not fit this chat's cache (llama_state_seq_set_data refused it)");
    }
}

void kv_shift_all(llama_context * ctx, int32_t seq, token_ledger & ledger, int32_t delta) {
    check_seq(ctx, seq);
    if (ledger.empty()) {
        return;
    }
    llama_memory_seq_add(llama_get_memory(ctx), seq, 0, -1, delta);
    for (size_t i = 0; i < ledger.size(); ++i) {
        ledger.at(i).pos += delta;
    }
}

void kv_truncate(llama_context * ctx, int32_t seq, token_ledger & ledger, size_t keep) {
    check_seq(ctx, seq);
    if (keep >= ledger.size()) {
        return;
    }
    const llama_pos p0 = ledger[keep].pos;
    if (!llama_memory_seq_rm(llama_get_memory(ctx), seq, p0, -1)) {
        throw fml_error(FML_ERR_KV, "llama_memory_seq_rm refused to truncate");
    }
    // Positions of the kept prefix are unchanged (the prefix already starts at 0..keep-1 unless shifted).
    const int32_t first_pos = ledger[0].pos;
    ledger.remove_ranges_and_compact({ { keep, ledger.size() } });
    for (size_t i = 0; i < ledger.size(); ++i) {
        ledger.at(i).pos = first_pos + (int32_t) i;
    }
}

void kv_clear(llama_context * ctx, int32_t seq, token_ledger & ledger) {
    kv_clear_slot(ctx, seq);
    ledger.clear();
}

void kv_clear_slot(llama_context * ctx, int32_t seq) {
    check_seq(ctx, seq);
    llama_memory_seq_rm(llama_get_memory(ctx), seq, -1, -1);
}

void kv_drop_unledgered(llama_context * ctx, int32_t seq, const token_ledger & ledger) {
    check_seq(ctx, seq);
    llama_memory_seq_rm(llama_get_memory(ctx), seq, ledger.next_pos(), -1);
}

void kv_remove_from(llama_context * ctx, int32_t seq, int32_t pos) {
    check_seq(ctx, seq);
    llama_memory_seq_rm(llama_get_memory(ctx), seq, pos, -1);
}

int32_t kv_pos_min(llama_context * ctx, int32_t seq) { check_seq(ctx, seq); return kv_full_cache_pos_min(ctx, seq); }
int32_t kv_pos_max(llama_context * ctx, int32_t seq) { check_seq(ctx, seq); return llama_memory_seq_pos_max(llama_get_memory(ctx), seq); }
bool kv_can_shift(llama_context * ctx) { return llama_memory_can_shift(llama_get_memory(ctx)); }

} // namespace fml
