// Rolling summaries (rolling_summary, hybrid): what an eviction leaves behind is summarized in a
// scratch range of the chat's sequence, and the summary takes the evicted tokens' place.
#include "chat/chat.h"

#include "chat/turn-state.h"
#include "kv/kv-internals.h"
#include "kv/kv-ops.h"

#include "llama.h"

#include <algorithm>

namespace fml {

contribution chat::summary_contribution(size_t budget) {
    summary_job & j = *turn_->summary;
    contribution c;
    c.scratch = true;
    c.logits_last = true;
    if (j.prompt_done < j.prompt.size()) {
        const size_t n = std::min({ budget, chunk_, j.prompt.size() - j.prompt_done });
        c.tokens.assign(j.prompt.begin() + (long) j.prompt_done, j.prompt.begin() + (long) (j.prompt_done + n));
        c.pos0 = j.prompt_pos0 + (int32_t) j.prompt_done;
        c.logits_last = j.prompt_done + n == j.prompt.size();
    } else {
        c.tokens.push_back(j.tokens.back());
        c.pos0 = j.prompt_pos0 + (int32_t) j.prompt.size() + (int32_t) j.tokens.size() - 1;
    }
    return c;
}

bool chat::summary_prompt_decoded(size_t n) {
    summary_job & j = *turn_->summary;
    if (j.prompt_done < j.prompt.size()) {
        j.prompt_done += n;
        return j.prompt_done >= j.prompt.size();
    }
    return true;
}

std::vector<int32_t> chat::summary_prompt() const {
    // The reply still open at this point is closed first, as the next turn will close it (its last
    // sampled token and the template's end of turn): without them the instruction read as more of
    // the assistant's reply. Scratch like the rest: the reply's own end is decoded where it belongs.
    std::vector<int32_t> p;
    if (turn_ && turn_->generating) {
        if (turn_->pending >= 0) {
            p.push_back(turn_->pending);
        }
        p.insert(p.end(), closing_tokens_.begin(), closing_tokens_.end());
    } else if (turn_ && turn_->seg < turn_->segments.size() && turn_->segments[turn_->seg].role == TOKEN_ROLE_ASSISTANT &&
               turn_->segments[turn_->seg].turn == turn_->turn_no) {
        p = closing_tokens_;   // an ingested reply makes its room as it starts: its header is open, it is empty
    } else {
        p = carry_;   // a turn makes room before the previous reply's end goes in (carry_ until the prompt is in)
    }
    p.insert(p.end(), summary_instruction_.begin(), summary_instruction_.end());
    return p;
}

void chat::summary_decoded(step_context & e, int32_t logits_row) {
    summary_job & j = *turn_->summary;
    if (j.tokens.size() >= j.max_tokens) {
        finish_summary(e);
        return;
    }
    const int32_t tok = llama_sampler_sample(j.sampler->raw(), e.ctx(), logits_row);
    if (model_->is_eog(tok)) {
        finish_summary(e);
        return;
    }
    j.tokens.push_back(tok);   // decoded with the next step; the summary is done once it is in
}

void chat::finish_summary(step_context & e) {
    std::unique_ptr<summary_job> j = std::move(turn_->summary);
    turn_stats & st = turn_->result.stats;
    std::vector<ledger_entry> items;
    const std::vector<index_range> ranges = normalize_ranges(j->ranges);
    // Kept positions: the summary moves into the first evicted range whose positions hold it (one
    // K-shift), else into the first evicted range with the tokens after it pushed forward as far as
    // it needs (one K-shift; renumbering every position instead lost the true distances at most
    // summaries). Left after the history, where keys cannot move, it is the newest text the next
    // tokens read: on stories260K hybrid's mean KL at 75% went from 0.0012 to 0.15 that way.
    // Compact mode renumbers every position with it.
    const int64_t gap = opts_.keep_positions && e.can_shift() ? summary_gap(ledger_, ranges, j->tokens.size()) : -1;
    const summary_placement placement = !opts_.keep_positions ? summary_placement::compacted
                                        : gap >= 0            ? summary_placement::in_gap
                                        : e.can_shift()       ? summary_placement::pushed
                                                              : summary_placement::after_history;
    const size_t host_index = placement == summary_placement::in_gap ? (size_t) gap : 0;
    const index_range & host = ranges[host_index];
    const uint32_t turn = ledger_[host.begin].turn;
    for (int32_t tok : j->tokens) {
        ledger_entry it{};
        it.token = tok;
        it.turn = turn;
        it.role = TOKEN_ROLE_SUMMARY;
        items.push_back(it);
    }
    const auto t0 = clock_type::now();
    // The window is checked at the next contribution (this runs inside a step, where nothing may
    // decode): thoroughly when its snapshot was refused or the end moved back (see repair_window).
    bool thorough = false;
    if ((placement == summary_placement::in_gap || placement == summary_placement::compacted) && !j->window.empty()) {
        // The window goes back to what it was before the scratch, plus the summary's cells (it moves
        // with them: into the window when its place is that recent). A summary left after the
        // history is the newest itself: the window already ends with it.
        const int32_t summary_pos0 = j->prompt_pos0 + (int32_t) j->prompt.size();
        try {
            const std::vector<uint8_t> now = kv_window_save(e.ctx(), slot_);
            const std::vector<uint8_t> merged = kv_window_with(e.ctx(), j->window, now, summary_pos0, summary_pos0 + (int32_t) items.size());
            thorough = !kv_window_restore(e.ctx(), slot_, merged, ledger_);
        } catch (const fml_error &) {
            thorough = true;
        }
    }
    const int32_t end_before = ledger_.next_pos();
    eviction_record & rec = j->rec;
    rec.positions = position_ranges(j->ranges);
    // The summary lands where its evicted range was (or after the history): among the turn's own
    // tokens it is one of them, and a rollback takes it with them.
    const size_t own_gone = own_among(j->ranges);
    const size_t insert_at = placement == summary_placement::after_history ? ledger_.size() : host.begin;
    const bool summary_own = turn_->rollback_set && insert_at >= first_own();
    const int32_t summary_to = ledger_[host.begin].pos;
    // Pushed: the positions of the entries that stay, before, to move the turn's score snapshot with them.
    std::vector<int32_t> kept_pos_before;
    if (placement == summary_placement::pushed && signal_ != IMPORTANCE_NONE) {
        std::vector<bool> gone(ledger_.size(), false);
        for (const index_range & r : ranges) {
            std::fill(gone.begin() + (long) r.begin, gone.begin() + (long) r.end, true);
        }
        for (size_t i = 0; i < ledger_.size(); ++i) {
            if (!gone[i]) {
                kept_pos_before.push_back(ledger_[i].pos);
            }
        }
    }
    const kv_eviction_result res = kv_evict_and_insert(e.ctx(), slot_, ledger_, j->ranges, placement, j->prompt_pos0,
                                                       j->prompt_pos0 + (int32_t) j->prompt.size(), items, host_index);
    turn_->own -= std::min(own_gone, turn_->own);
    if (summary_own) {
        turn_->own += items.size();
    } else if (placement == summary_placement::in_gap && !turn_->window.empty()) {
        // A rollback keeps it (evictions done stay done): its cells join the rollback point's window
        // then (turn_state::window_summaries), from a save after its K-shift.
        turn_->window_summaries.emplace_back(summary_to, summary_to + (int32_t) items.size());
    }
    if (res.shifted_runs > 0) {
        e.note_shift();
    }
    if (model_->info().sliding_window > 0) {
        window_suspect_ = true;
        // Pushed: the newest tokens' positions moved, which the window's saved cells do not know.
        window_thorough_ = thorough || placement == summary_placement::pushed || (placement == summary_placement::in_gap && ledger_.next_pos() < end_before);
    }
    if (placement == summary_placement::compacted) {
        cumulative_.compactions++;
        st.compactions++;
    }
    if (placement == summary_placement::compacted || (placement == summary_placement::pushed && res.shifted_runs > 0)) {
        positions_moved_++;   // the window saved at the turn's rollback point no longer matches
    }
    if (placement == summary_placement::pushed && res.shifted_runs > 0 && !kept_pos_before.empty()) {
        // Pushing keeps the order: the score snapshot moves with the tokens and still matches.
        remap_positions(turn_->scored_before, kept_pos_before, insert_at, items.size());
        turn_->positions_moved_before++;
    }
    restore_recurrent(j->recurrent, e);
    summary_text_ = model_->detokenize(j->tokens, false);
    rec.evict_ms = ms_since(t0);
    rec.evicted = (uint32_t) res.evicted;
    rec.summary_tokens = (uint32_t) items.size();
    rec.summary_prompt_tokens = (uint32_t) j->prompt.size();
    st.evict_ms += rec.evict_ms;
    st.summary_ms += ms_since(j->t0) - rec.evict_ms;
    st.summary_tokens += (uint32_t) items.size();
    st.evicted_tokens += (uint32_t) res.evicted;
    st.evictions += 1;
    st.eviction_log.push_back(std::move(rec));
    cumulative_.tokens_evicted += res.evicted;
    cumulative_.tokens_seen += items.size();
    cumulative_.evictions += 1;
}

void chat::remap_positions(std::vector<ledger_entry> & snapshot, const std::vector<int32_t> & kept_before, size_t insert_at, size_t n_summary) const {
    // The ledger less the summary is the kept entries in their old order: their new positions.
    std::vector<int32_t> kept_after;
    for (size_t i = 0; i < ledger_.size(); ++i) {
        if (i < insert_at || i >= insert_at + n_summary) {
            kept_after.push_back(ledger_[i].pos);
        }
    }
    // Entries of the snapshot that are gone (evicted by now) leave it: an old position of theirs could
    // be a kept entry's new one. The rest take their new positions (both lists in position order).
    std::vector<ledger_entry> out;
    size_t k = 0;
    for (const ledger_entry & x : snapshot) {
        while (k < kept_before.size() && kept_before[k] < x.pos) ++k;
        if (k < kept_before.size() && kept_before[k] == x.pos && k < kept_after.size()) {
            out.push_back(x);
            out.back().pos = kept_after[k];
        }
    }
    snapshot = std::move(out);
}

void chat::cancel_summary(step_context & e) {
    // The scratch cells (instruction, summary so far) go; the planned eviction does not happen.
    kv_drop_unledgered(e.ctx(), slot_, ledger_);
    const bool restored = kv_window_restore(e.ctx(), slot_, turn_->summary->window, ledger_);   // refused: repaired below
    restore_recurrent(turn_->summary->recurrent, e);
    turn_->summary.reset();
    repair_window(e, !restored);
}

} // namespace fml
