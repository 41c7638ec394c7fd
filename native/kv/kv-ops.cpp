#include "kv/kv-ops.h"
#include "kv/kv-internals.h"

#include "util/error.h"

#include "llama.h"

#include <algorithm>
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

// Removes each range's positions from the attention KV (the ranges are ledger indices; positions
// may have gaps, so a range covers [first position, last position + 1)).
static void remove_ranges(llama_context * ctx, int32_t seq, const token_ledger & ledger, const std::vector<index_range> & ranges) {
    for (const auto & r : ranges) {
        if (!kv_attention_seq_rm(ctx, seq, ledger[r.begin].pos, ledger[r.end - 1].pos + 1)) {
            throw fml_error(FML_ERR_KV, "llama_memory_seq_rm refused a partial removal");
        }
    }
}

// Moves every ledger entry's cell from its position to targets[i] (unique; the result increasing),
// then sets the ledger's positions. Runs of entries that are consecutive both before and after move
// with one seq_add each. When some run moves right (a summary into a gap), targets may take positions
// other moving entries hold now, so the moving runs are parked above every position first and then
// moved home: no run lands on another's cells. Returns the runs moved.
static size_t move_positions(llama_context * ctx, int32_t seq, token_ledger & ledger, const std::vector<int32_t> & targets) {
    struct run { int32_t from; int32_t to; int32_t len; };
    std::vector<run> runs;
    int32_t top = 0;
    for (size_t i = 0; i < ledger.size(); ++i) {
        const int32_t from = ledger[i].pos;
        top = std::max({ top, from, targets[i] });
        if (from == targets[i]) {
            continue;
        }
        if (!runs.empty() && i > 0 && runs.back().from + runs.back().len == from && runs.back().to + runs.back().len == targets[i] &&
            ledger[i - 1].pos != targets[i - 1]) {
            runs.back().len++;
        } else {
            runs.push_back({ from, targets[i], 1 });
        }
    }
    if (runs.empty()) {
        return 0;
    }
    llama_memory_t mem = llama_get_memory(ctx);
    if (!kv_shift_deferred(ctx)) {
        // M-RoPE or YaRN: every moved cell at once, keys rotated now (kv-internals; kv_can_shift said so).
        std::vector<std::pair<int32_t, int32_t>> moves;
        for (size_t i = 0; i < ledger.size(); ++i) {
            if (ledger[i].pos != targets[i]) {
                moves.emplace_back(ledger[i].pos, targets[i]);
            }
        }
        kv_rotate_positions(ctx, seq, moves);
    } else if (std::all_of(runs.begin(), runs.end(), [](const run & r) { return r.to < r.from; })) {
        // Every run moves left (a compaction): in ascending order each lands on positions already
        // vacated, below every run not moved yet. One seq_add per run (each one visits every cell).
        for (const run & r : runs) {
            llama_memory_seq_add(mem, seq, r.from, r.from + r.len, r.to - r.from);
        }
    } else {
        const llama_pos park = (llama_pos) top + 1 + (1 << 16);
        for (const run & r : runs) {
            llama_memory_seq_add(mem, seq, r.from, r.from + r.len, park);
        }
        for (const run & r : runs) {
            llama_memory_seq_add(mem, seq, r.from + park, r.from + park + r.len, r.to - (r.from + park));
        }
    }
    for (size_t i = 0; i < ledger.size(); ++i) {
        ledger.at(i).pos = targets[i];
    }
    return runs.size();
}

kv_eviction_result kv_evict_ranges(llama_context * ctx, int32_t seq, token_ledger & ledger, const std::vector<index_range> & ranges_in) {
    check_seq(ctx, seq);
    kv_eviction_result res;
    const std::vector<index_range> ranges = normalize_ranges(ranges_in);
    if (ranges.empty()) {
        return res;
    }
    check_plan(ledger, ranges);
    remove_ranges(ctx, seq, ledger, ranges);
    res.evicted = ledger.remove_ranges(ranges);
    return res;
}

size_t kv_compact_by_shift(llama_context * ctx, int32_t seq, token_ledger & ledger) {
    check_seq(ctx, seq);
    if (!kv_can_shift(ctx)) {
        throw fml_error(FML_ERR_INTERNAL, "a compaction by K-shift on a cache that cannot shift");
    }
    // Before positions move: a token that left a sliding layer's window must not come back into it.
    kv_prune_sliding_window(ctx, seq, ledger.next_pos());
    std::vector<int32_t> targets(ledger.size());
    for (size_t i = 0; i < targets.size(); ++i) {
        targets[i] = (int32_t) i;
    }
    return move_positions(ctx, seq, ledger, targets);
}

void kv_clear_for_reprefill(llama_context * ctx, int32_t seq, token_ledger & ledger) {
    check_seq(ctx, seq);
    if (!kv_attention_seq_rm(ctx, seq, -1, -1)) {
        throw fml_error(FML_ERR_KV, "llama_memory_seq_rm refused to clear the attention cache");
    }
    ledger.renumber();
}

// The positions evicting `r` frees (up to the next kept token) hold `n` tokens.
static bool range_holds(const token_ledger & ledger, const index_range & r, size_t n) {
    const int32_t begin = ledger[r.begin].pos;
    const int32_t end = r.end < ledger.size() ? ledger[r.end].pos : ledger.next_pos();
    return (size_t) (end - begin) >= n;
}

int64_t summary_gap(const token_ledger & ledger, const std::vector<index_range> & ranges_in, size_t n) {
    const std::vector<index_range> ranges = normalize_ranges(ranges_in);
    for (size_t k = 0; k < ranges.size(); ++k) {
        if (range_holds(ledger, ranges[k], n)) {
            return (int64_t) k;
        }
    }
    return -1;
}

kv_eviction_result kv_evict_and_insert(llama_context * ctx, int32_t seq, token_ledger & ledger, const std::vector<index_range> & ranges_in,
                                       summary_placement placement, int32_t prompt_pos0, int32_t summary_pos0,
                                       const std::vector<ledger_entry> & items_in, size_t gap) {
    check_seq(ctx, seq);
    kv_eviction_result res;
    const std::vector<index_range> ranges = normalize_ranges(ranges_in);
    const size_t n_insert = items_in.size();
    check_plan(ledger, ranges);
    if (ranges.empty() || prompt_pos0 < ledger.next_pos() || summary_pos0 < prompt_pos0) {
        throw fml_error(FML_ERR_KV, "a summary must replace evicted tokens, from scratch cells after the history");
    }
    if (placement != summary_placement::in_gap) {
        gap = 0;   // pushed and compacted: at the first evicted range
    }
    if (placement == summary_placement::in_gap && (gap >= ranges.size() || !range_holds(ledger, ranges[gap], n_insert))) {
        throw fml_error(FML_ERR_KV, "the summary does not fit in the positions the eviction frees");
    }
    if (placement != summary_placement::after_history && !kv_can_shift(ctx)) {
        throw fml_error(FML_ERR_INTERNAL, "a summary placement that moves positions, on a cache whose keys cannot move");
    }
    if (placement != summary_placement::after_history) {
        kv_prune_sliding_window(ctx, seq, ledger.next_pos());
    }
    // The prompt and anything after the summary go; so do the evicted ranges.
    kv_attention_seq_rm(ctx, seq, prompt_pos0, summary_pos0);
    kv_attention_seq_rm(ctx, seq, summary_pos0 + (int32_t) n_insert, -1);
    const int32_t gap_pos0 = ledger[ranges[gap].begin].pos;
    // Its index once the ranges before it are gone.
    size_t host_at = ranges[gap].begin;
    for (size_t k = 0; k < gap; ++k) {
        host_at -= ranges[k].end - ranges[k].begin;
    }
    remove_ranges(ctx, seq, ledger, ranges);
    res.evicted = ledger.remove_ranges(ranges);
    // The summary's entries carry the positions their cells have now; the ledger then says where
    // they go, and move_positions takes them (and, when compacting, everything else) there.
    std::vector<ledger_entry> items = items_in;
    for (size_t i = 0; i < n_insert; ++i) {
        items[i].pos = summary_pos0 + (int32_t) i;
    }
    const size_t insert_at = placement == summary_placement::after_history ? ledger.size() : host_at;
    ledger.insert(insert_at, items);
    std::vector<int32_t> targets(ledger.size());
    for (size_t i = 0; i < ledger.size(); ++i) {
        const bool summary = i >= insert_at && i < insert_at + n_insert;
        switch (placement) {
            case summary_placement::in_gap:        targets[i] = summary ? gap_pos0 + (int32_t) (i - insert_at) : ledger[i].pos; break;
            case summary_placement::pushed:
                // After the summary, a token moves only as far as the one before it now needs.
                targets[i] = summary ? gap_pos0 + (int32_t) (i - insert_at) : i > insert_at ? std::max(ledger[i].pos, targets[i - 1] + 1) : ledger[i].pos;
                break;
            case summary_placement::after_history: targets[i] = ledger[i].pos; break;
            case summary_placement::compacted:     targets[i] = (int32_t) i; break;
        }
    }
    res.shifted_runs = move_positions(ctx, seq, ledger, targets);
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
    size_t cell_ext = 0;   // extra bytes after each cell's seq id count (kv_cell_ext_bytes)
    bool loading = false;  // a blob to load (a checkpoint's): its cells are checked, not only skipped
    bool values = true;    // the cache keeps values (not latent attention's, whose values are its keys)
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
        const int32_t pos = r.get<int32_t>();
        const uint32_t n_seq = r.get<uint32_t>();
        // A cell below 0 or at INT32_MAX is one seq_rm(seq, -1, -1) can never remove (llama.cpp reads
        // those bounds as 0 and INT32_MAX, exclusive): it would stay in the slot for the next chat.
        if (r.loading && (pos < 0 || pos > MAX_POSITION || n_seq != 1)) {
            throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the KV state holds a cell at an impossible position");
        }
        r.skip(r.cell_ext);                     // M-RoPE's 2D position
        r.skip(4ull * n_seq);                   // seq ids
    }
    const uint32_t v_trans = r.get<uint32_t>();
    const uint32_t n_layer = r.get<uint32_t>();
    for (uint32_t l = 0; l < n_layer; ++l) {    // K rows
        r.get<int32_t>();
        r.skip(r.get<uint64_t>() * cells);
    }
    for (uint32_t l = 0; r.values && l < n_layer; ++l) {    // V rows, or V elements when transposed
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

// Byte ranges [begin, end) of each KV section's one stream ([u32 cell_count][cells]), at most
// `max_sections` of them; `tail` is where what follows them begins (a hybrid's recurrent state,
// which has no streams and travels as it is).
std::vector<std::pair<size_t, size_t>> section_streams(const std::vector<uint8_t> & raw, bool one_stream, size_t max_sections, size_t cell_ext,
                                                       bool values, size_t & tail) {
    std::vector<std::pair<size_t, size_t>> out;
    blob_reader r{ raw, STATE_HEADER, cell_ext, one_stream, values };
    while (r.at < raw.size() && out.size() < max_sections) {
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
    tail = r.at;
    return out;
}

// A hybrid's recurrent state after its attention section, as llama_memory_recurrent::state_write
// writes one sequence: [u32 cell count][cells: i32 pos, u32 seq id count (0)][data]. llama.cpp asserts
// on a loaded one that is not (more cells than the sequence can take: the process aborted), so the
// metadata is checked here; the data's sizes llama.cpp checks itself.
void check_recurrent_tail(const std::vector<uint8_t> & raw, size_t tail) {
    blob_reader r{ raw, tail };
    const uint32_t cells = r.get<uint32_t>();
    if (cells > 1) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the recurrent state holds more than one cell");
    }
    if (cells == 1) {
        const int32_t pos = r.get<int32_t>();
        if (pos < 0 || pos > MAX_POSITION || r.get<uint32_t>() != 0) {
            throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the recurrent state's cell is not one sequence's");
        }
    }
}

// KV sections in a sequence's state: a full cache and a window cache, or one (a hybrid's attention
// half, followed by its recurrent state).
size_t kv_sections(llama_context * ctx) {
    return kv_memory_of(ctx) == kv_memory_kind::kv_iswa ? 2 : 1;
}

} // namespace

static std::vector<uint8_t> to_one_stream(const std::vector<uint8_t> & raw, size_t sections, size_t cell_ext, bool values) {
    if (raw.size() < STATE_HEADER + 4) {
        throw fml_error(FML_ERR_KV, "llama_state_seq_get_data returned too few bytes");
    }
    std::vector<uint8_t> out(raw.begin(), raw.begin() + (long) STATE_HEADER);
    const uint32_t one = 1;
    size_t tail = 0;
    for (const auto & [begin, end] : section_streams(raw, false, sections, cell_ext, values, tail)) {
        out.insert(out.end(), (const uint8_t *) &one, (const uint8_t *) &one + 4);
        out.insert(out.end(), raw.begin() + (long) begin, raw.begin() + (long) end);
    }
    out.insert(out.end(), raw.begin() + (long) tail, raw.end());
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
    return to_one_stream(blob, kv_sections(ctx), kv_cell_ext_bytes(ctx), kv_keeps_values(ctx));
}

void kv_state_load(llama_context * ctx, int32_t seq, uint32_t streams, const std::vector<uint8_t> & blob) {
    check_seq(ctx, seq);
    llama_memory_seq_rm(llama_get_memory(ctx), seq, -1, -1);
    if (blob.size() < STATE_HEADER + 8) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the KV state is not in the one-stream form this library writes");
    }
    std::vector<std::pair<size_t, size_t>> sections;
    size_t tail = 0;
    try {
        sections = section_streams(blob, true, kv_sections(ctx), kv_cell_ext_bytes(ctx), kv_keeps_values(ctx), tail);
        if (kv_has_recurrent(ctx)) {
            check_recurrent_tail(blob, tail);
        } else if (tail != blob.size()) {
            throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "trailing bytes");
        }
    } catch (const fml_error & e) {
        if (e.code() == FML_ERR_CHECKPOINT_CORRUPT) {
            throw;
        }
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the KV state is not in the one-stream form this library writes");
    }
    // Widen every section to the context's stream count: the stream, then an empty entry for every other one.
    std::vector<uint8_t> wide(blob.begin(), blob.begin() + (long) STATE_HEADER);
    for (const auto & [begin, end] : sections) {
        wide.insert(wide.end(), (const uint8_t *) &streams, (const uint8_t *) &streams + 4);
        wide.insert(wide.end(), blob.begin() + (long) begin, blob.begin() + (long) end);
        wide.insert(wide.end(), 4 * (size_t) (streams - 1), 0);
    }
    wide.insert(wide.end(), blob.begin() + (long) tail, blob.end());
    if (llama_state_seq_set_data(ctx, wide.data(), wide.size(), seq) == 0) {
        llama_memory_seq_rm(llama_get_memory(ctx), seq, -1, -1);
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the KV state does not fit this chat's cache (llama_state_seq_set_data refused it)");
    }
}

// llama.cpp's partial sequence state: a hybrid's recurrent half, or an iSWA cache's window cache.
static std::vector<uint8_t> partial_save(llama_context * ctx, int32_t seq, const char * what) {
    std::vector<uint8_t> blob(llama_state_seq_get_size_ext(ctx, seq, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY));
    const size_t n = llama_state_seq_get_data_ext(ctx, blob.data(), blob.size(), seq, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY);
    if (n == 0) {
        throw fml_error(FML_ERR_KV, std::string("llama_state_seq_get_data_ext could not save the ") + what);
    }
    blob.resize(n);
    return blob;
}

// False when llama.cpp refuses it (a save from a context with another stream count, ...).
static bool partial_restore(llama_context * ctx, int32_t seq, const std::vector<uint8_t> & blob) {
    return llama_state_seq_set_data_ext(ctx, blob.data(), blob.size(), seq, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) != 0;
}

std::vector<uint8_t> kv_recurrent_save(llama_context * ctx, int32_t seq) {
    check_seq(ctx, seq);
    return kv_has_recurrent(ctx) ? partial_save(ctx, seq, "recurrent state") : std::vector<uint8_t>();
}

void kv_recurrent_restore(llama_context * ctx, int32_t seq, const std::vector<uint8_t> & blob, int32_t last_pos) {
    check_seq(ctx, seq);
    if (blob.empty()) {
        return;
    }
    if (!partial_restore(ctx, seq, blob)) {
        throw fml_error(FML_ERR_KV, "llama_state_seq_set_data_ext could not restore the recurrent state");
    }
    kv_recurrent_set_pos(ctx, seq, last_pos);
}

bool kv_has_recurrent(llama_context * ctx) {
    return kv_memory_of(ctx) == kv_memory_kind::hybrid;
}

namespace {

// The first position the token at next_pos sees in the sliding layers: positions above next_pos -
// window (llama.cpp's standard mask; chunked windows, Llama 4's, differ).
int32_t window_from(llama_context * ctx, const token_ledger & ledger) {
    return ledger.next_pos() - llama_model_n_swa(llama_get_model(ctx)) + 1;
}

// The window cache's positions in [from, ledger.next_pos()), sorted. Cells beyond the ledger (a
// summary's scratch while it is written) are the cache's end, which kv_pos_max reports.
bool window_cells(llama_context * ctx, int32_t seq, const token_ledger & ledger, std::vector<int32_t> & out) {
    std::vector<int32_t> cached;
    out.clear();
    if (!kv_window_positions(ctx, seq, cached)) {
        return false;
    }
    const int32_t from = window_from(ctx, ledger);
    for (int32_t p : cached) {
        if (p >= 0 && p >= from && p < ledger.next_pos()) out.push_back(p);
    }
    std::sort(out.begin(), out.end());
    return true;
}

} // namespace

bool kv_cells_match_ledger(llama_context * ctx, int32_t seq, const token_ledger & ledger) {
    check_seq(ctx, seq);
    std::vector<int32_t> cells;
    if (!kv_cell_positions(ctx, seq, cells)) {
        return true;
    }
    std::vector<int32_t> seen;
    for (const int32_t p : cells) {
        if (p >= 0) {
            seen.push_back(p);
        }
    }
    std::sort(seen.begin(), seen.end());
    if (seen.size() != ledger.size()) {
        return false;
    }
    for (size_t i = 0; i < seen.size(); ++i) {
        if (seen[i] != ledger[i].pos) {
            return false;
        }
    }
    return true;
}

bool kv_window_matches(llama_context * ctx, int32_t seq, const token_ledger & ledger) {
    check_seq(ctx, seq);
    std::vector<int32_t> seen;
    if (!window_cells(ctx, seq, ledger, seen)) {
        return true;
    }
    const int32_t from = window_from(ctx, ledger);
    std::vector<int32_t> expected;
    for (size_t i = ledger.size(); i-- > 0 && ledger[i].pos >= from;) {
        expected.push_back(ledger[i].pos);
    }
    std::reverse(expected.begin(), expected.end());
    return seen == expected;
}

std::vector<uint8_t> kv_window_save(llama_context * ctx, int32_t seq) {
    check_seq(ctx, seq);
    return kv_memory_of(ctx) == kv_memory_kind::kv_iswa ? partial_save(ctx, seq, "sliding window") : std::vector<uint8_t>();
}

namespace {

// One window save (llama.cpp's partial state of an iSWA cache, kv_window_save) split per cell: the
// stream that holds the sequence's cells, each cell's metadata, and each layer's K rows and V rows
// (or, with V transposed, V elements: [n_embd_v][cells][element]).
struct window_save {
    uint32_t n_stream = 0;
    uint32_t stream = UINT32_MAX;   // none: no cells
    std::vector<int32_t> pos;
    std::vector<std::vector<uint8_t>> meta;
    uint32_t v_trans = 0;
    uint32_t n_layer = 0;
    struct layer { int32_t type = 0; uint64_t row = 0; uint32_t el = 0; uint32_t n_embd = 0; std::vector<uint8_t> data; };
    std::vector<layer> k, v;

    bool same_layout(const window_save & o) const {
        if (n_stream != o.n_stream || v_trans != o.v_trans || n_layer != o.n_layer || k.size() != o.k.size() || v.size() != o.v.size()) return false;
        for (size_t l = 0; l < k.size(); ++l) {
            if (k[l].type != o.k[l].type || k[l].row != o.k[l].row) return false;
        }
        for (size_t l = 0; l < v.size(); ++l) {
            if (v[l].type != o.v[l].type || v[l].row != o.v[l].row || v[l].el != o.v[l].el || v[l].n_embd != o.v[l].n_embd) return false;
        }
        return true;
    }
};

window_save parse_window(const std::vector<uint8_t> & b, size_t cell_ext) {
    window_save w;
    blob_reader r{ b, STATE_HEADER, cell_ext };
    w.n_stream = r.get<uint32_t>();
    for (uint32_t s = 0; s < w.n_stream; ++s) {
        const uint32_t cells = r.get<uint32_t>();
        if (cells == 0) continue;
        if (w.stream != UINT32_MAX) throw fml_error(FML_ERR_KV, "unexpected window state layout (cells in more than one stream)");
        w.stream = s;
        for (uint32_t c = 0; c < cells; ++c) {
            const size_t at = r.at;
            w.pos.push_back(r.get<int32_t>());
            const uint32_t n_seq = r.get<uint32_t>();
            r.skip(r.cell_ext);
            r.skip(4ull * n_seq);
            w.meta.emplace_back(b.begin() + (long) at, b.begin() + (long) r.at);
        }
        w.v_trans = r.get<uint32_t>();
        w.n_layer = r.get<uint32_t>();
        auto bytes = [&](uint64_t n) {
            const size_t at = r.at;
            r.skip(n);
            return std::vector<uint8_t>(b.begin() + (long) at, b.begin() + (long) r.at);
        };
        for (uint32_t l = 0; l < w.n_layer; ++l) {
            window_save::layer x;
            x.type = r.get<int32_t>();
            x.row = r.get<uint64_t>();
            x.data = bytes(x.row * cells);
            w.k.push_back(std::move(x));
        }
        for (uint32_t l = 0; l < w.n_layer; ++l) {
            window_save::layer x;
            x.type = r.get<int32_t>();
            if (w.v_trans == 0) {
                x.row = r.get<uint64_t>();
                x.data = bytes(x.row * cells);
            } else {
                x.el = r.get<uint32_t>();
                x.n_embd = r.get<uint32_t>();
                x.data = bytes((uint64_t) x.el * x.n_embd * cells);
            }
            w.v.push_back(std::move(x));
        }
    }
    if (r.at != b.size()) throw fml_error(FML_ERR_KV, "unexpected window state layout (trailing bytes)");
    return w;
}

} // namespace

std::vector<uint8_t> kv_window_with(llama_context * ctx, const std::vector<uint8_t> & before, const std::vector<uint8_t> & after, int32_t pos0,
                                    int32_t pos1) {
    if (before.empty() || after.empty()) {
        return before;
    }
    window_save a, b;
    try {
        a = parse_window(before, kv_cell_ext_bytes(ctx));
        b = parse_window(after, kv_cell_ext_bytes(ctx));
    } catch (const fml_error &) {
        return before;
    }
    std::vector<size_t> add;
    for (size_t i = 0; i < b.pos.size(); ++i) {
        if (b.pos[i] >= pos0 && b.pos[i] < pos1) add.push_back(i);
    }
    if (!add.empty() && a.stream != UINT32_MAX && (a.stream != b.stream || !a.same_layout(b))) {
        return before;
    }
    if (add.empty() && a.stream == UINT32_MAX) {
        return before;   // nothing to drop, nothing to add
    }
    if (a.stream == UINT32_MAX) {   // the window was empty: the layout is the later save's
        const size_t n = a.n_stream;
        a = b;
        a.n_stream = (uint32_t) n;
        a.pos.clear();
        a.meta.clear();
        for (auto & l : a.k) l.data.clear();
        for (auto & l : a.v) l.data.clear();
    }
    // The earlier save's cells at those positions (tokens evicted since, where the summary now is) go.
    std::vector<size_t> keep;
    for (size_t i = 0; i < a.pos.size(); ++i) {
        if (a.pos[i] < pos0 || a.pos[i] >= pos1) keep.push_back(i);
    }
    const size_t n_a = a.pos.size();
    const size_t n = keep.size() + add.size();
    const uint32_t stream = a.stream != UINT32_MAX ? a.stream : b.stream;
    std::vector<uint8_t> out(before.begin(), before.begin() + (long) STATE_HEADER);
    auto put = [&](const void * p, size_t len) { out.insert(out.end(), (const uint8_t *) p, (const uint8_t *) p + len); };
    put(&a.n_stream, 4);
    for (uint32_t s = 0; s < a.n_stream; ++s) {
        const uint32_t cells = s == stream ? (uint32_t) n : 0;
        put(&cells, 4);
        if (cells == 0) continue;
        for (size_t i : keep) put(a.meta[i].data(), a.meta[i].size());
        for (size_t i : add) put(b.meta[i].data(), b.meta[i].size());
        put(&a.v_trans, 4);
        put(&a.n_layer, 4);
        for (size_t l = 0; l < a.k.size(); ++l) {   // K rows: the window's, then the added cells'
            put(&a.k[l].type, 4);
            put(&a.k[l].row, 8);
            for (size_t i : keep) put(a.k[l].data.data() + i * a.k[l].row, a.k[l].row);
            for (size_t i : add) put(b.k[l].data.data() + i * b.k[l].row, b.k[l].row);
        }
        for (size_t l = 0; l < a.v.size(); ++l) {
            put(&a.v[l].type, 4);
            if (a.v_trans == 0) {
                put(&a.v[l].row, 8);
                for (size_t i : keep) put(a.v[l].data.data() + i * a.v[l].row, a.v[l].row);
                for (size_t i : add) put(b.v[l].data.data() + i * b.v[l].row, b.v[l].row);
            } else {   // per element of the embedding, every cell's value
                put(&a.v[l].el, 4);
                put(&a.v[l].n_embd, 4);
                const size_t el = a.v[l].el;
                const size_t n_b = b.pos.size();
                for (uint32_t j = 0; j < a.v[l].n_embd; ++j) {
                    for (size_t i : keep) put(a.v[l].data.data() + ((size_t) j * n_a + i) * el, el);
                    for (size_t i : add) put(b.v[l].data.data() + ((size_t) j * n_b + i) * el, el);
                }
            }
        }
    }
    return out;
}

bool kv_window_restore(llama_context * ctx, int32_t seq, const std::vector<uint8_t> & blob, const token_ledger & ledger) {
    check_seq(ctx, seq);
    if (blob.empty()) {
        return true;
    }
    if (!partial_restore(ctx, seq, blob)) {
        return false;
    }
    // Positions evicted since the save, within the window: only the window cache still has them (the
    // full cache lost them with the eviction), so removing them from the memory touches only it.
    const int32_t window = llama_model_n_swa(llama_get_model(ctx));
    int32_t above = ledger.next_pos();
    for (size_t i = ledger.size(); i-- > 0 && above > ledger.next_pos() - window;) {
        const int32_t pos = ledger[i].pos;
        if (pos + 1 < above) {
            kv_attention_seq_rm(ctx, seq, pos + 1, above);
        }
        above = pos;
    }
    if (above > 0 && above > ledger.next_pos() - window) {
        kv_attention_seq_rm(ctx, seq, std::max(0, ledger.next_pos() - window), above);
    }
    return true;
}

void kv_truncate(llama_context * ctx, int32_t seq, token_ledger & ledger, size_t keep) {
    check_seq(ctx, seq);
    if (keep >= ledger.size()) {
        return;
    }
    if (!kv_attention_seq_rm(ctx, seq, ledger[keep].pos, -1)) {
        throw fml_error(FML_ERR_KV, "llama_memory_seq_rm refused to truncate");
    }
    ledger.remove_ranges({ { keep, ledger.size() } });
}

void kv_clear_slot(llama_context * ctx, int32_t seq) {
    check_seq(ctx, seq);
    llama_memory_seq_rm(llama_get_memory(ctx), seq, -1, -1);
}

void kv_drop_unledgered(llama_context * ctx, int32_t seq, const token_ledger & ledger) {
    check_seq(ctx, seq);
    kv_attention_seq_rm(ctx, seq, ledger.next_pos(), -1);
}

void kv_remove_from(llama_context * ctx, int32_t seq, int32_t pos) {
    check_seq(ctx, seq);
    kv_attention_seq_rm(ctx, seq, pos, -1);
}

int32_t kv_pos_min(llama_context * ctx, int32_t seq) { check_seq(ctx, seq); return kv_full_cache_pos_min(ctx, seq); }
int32_t kv_pos_max(llama_context * ctx, int32_t seq) { check_seq(ctx, seq); return llama_memory_seq_pos_max(llama_get_memory(ctx), seq); }
bool kv_can_shift(llama_context * ctx) { return kv_shift_deferred(ctx) || kv_rotation_available(ctx); }
bool kv_shift_deferred(llama_context * ctx) { return llama_memory_can_shift(llama_get_memory(ctx)) && !kv_llama_shift_unsound(ctx); }

size_t kv_shift_all(llama_context * ctx, int32_t seq, token_ledger & ledger, int32_t delta) {
    check_seq(ctx, seq);
    if (!kv_can_shift(ctx)) {
        throw fml_error(FML_ERR_INTERNAL, "a position shift on a cache that cannot shift");
    }
    std::vector<int32_t> targets(ledger.size());
    for (size_t i = 0; i < targets.size(); ++i) {
        targets[i] = ledger[i].pos + delta;
    }
    return move_positions(ctx, seq, ledger, targets);
}

} // namespace fml
