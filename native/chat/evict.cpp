// Eviction: making room for a turn's tokens. The policy picks ledger ranges (or the latency guard
// falls back to sliding), kv-ops removes them in place; positions are compacted only when the next
// one would pass the position limit (a K-shift, or a re-prefill where keys cannot move).
#include "chat/chat.h"

#include "chat/turn-state.h"
#include "kv/kv-internals.h"
#include "kv/kv-ops.h"

#include "llama.h"

#include <algorithm>

namespace fml {

bool chat::make_room(size_t incoming, size_t slack, step_context & e) {
    const size_t budget = opts_.policy.max_tokens;
    // Positions take the slack only before a reply: mid-reply, compacting early would stall its stream.
    const size_t position_slack = turn_ && turn_->generating ? 0 : slack;
    if (ledger_.size() + incoming > budget && opts_.past_reasoning == past_reasoning_mode::first) {
        // Earlier replies' reasoning goes before anything the policy would choose.
        evict_past_reasoning(ledger_.size() + incoming - budget + slack, e);
    }
    if (ledger_.size() + incoming <= budget) {
        fit_positions(incoming, position_slack, e);
        return true;
    }
    const size_t hard_need = ledger_.size() + incoming - budget;
    size_t need = hard_need;
    const size_t evictable = evictable_count(ledger_);
    if (need > evictable) {
        throw fml_error(FML_ERR_PROMPT_TOO_LARGE, "not enough evictable tokens to fit the turn in maxTokens");
    }
    // A summary takes room too: free enough for the longest one when there is that much to evict.
    // And, as it costs up to summaryTokens decodes, room for the next turns with it (a summary every
    // few turns, not at every one).
    size_t room = slack;
    if (policy_->summarizes()) {
        need = std::min(evictable, need + opts_.policy.summary_tokens);
        room = std::max<size_t>(slack, opts_.policy.summary_evict_tokens);
    }
    const eviction_request plain{ hard_need, std::min(evictable, hard_need + slack), incoming };
    if (!evict({ need, std::min(evictable, need + room), incoming }, plain, e)) {
        return false;
    }
    if (ledger_.size() + incoming > budget) {
        throw fml_error(FML_ERR_INTERNAL, "eviction left the budget exceeded");
    }
    fit_positions(incoming, position_slack, e);
    return true;
}

void chat::fit_positions(size_t incoming, size_t slack, step_context & e) {
    // Positions that are 0..n-1 already cannot get lower (and compact mode keeps them so).
    if ((int64_t) ledger_.next_pos() + (int64_t) (incoming + slack) <= position_limit_ || ledger_.positions_contiguous()) {
        return;
    }
    compact(e);
    if ((int64_t) ledger_.next_pos() + (int64_t) incoming > position_limit_) {
        throw fml_error(FML_ERR_INTERNAL, "a compaction left the position limit exceeded");
    }
}

void chat::compact(step_context & e) {
    const auto t0 = clock_type::now();
    llama_context * ctx = e.ctx();
    if (e.can_shift()) {
        if (kv_compact_by_shift(ctx, slot_, ledger_) > 0) {
            e.note_shift();
        }
    } else {
        // Keys that cannot move (kv_can_shift: no sound K-shift, no rotation) are recomputed where
        // they go: the retained tokens, re-prefilled once at 0..n-1 (at most maxTokens, once per
        // positionLimit - maxTokens positions). The recurrent state of a hybrid must not see them
        // twice, and a failed decode must leave the chat as it was.
        const std::vector<uint8_t> before = kv_state_save(ctx, slot_);
        const std::vector<uint8_t> recurrent = kv_recurrent_save(ctx, slot_);
        std::vector<int32_t> tokens;
        std::vector<int32_t> positions;
        for (const ledger_entry & x : ledger_.entries()) {
            tokens.push_back(x.token);
            positions.push_back(x.pos);
        }
        kv_clear_for_reprefill(ctx, slot_, ledger_);
        if (!decode_run(e, tokens, 0)) {
            kv_state_load(ctx, slot_, e.streams(), before);
            for (size_t i = 0; i < positions.size(); ++i) {
                ledger_.at(i).pos = positions[i];
            }
            throw fml_error(FML_ERR_DECODE, "llama_decode failed while re-prefilling the retained tokens at the position limit");
        }
        restore_recurrent(recurrent, e);
    }
    cumulative_.compactions++;
    positions_moved_++;
    if (turn_) {
        turn_->result.stats.compactions++;
        turn_->result.stats.compact_ms += ms_since(t0);
    }
}

bool chat::decode_run(step_context & e, const std::vector<int32_t> & tokens, int32_t pos0) {
    for (size_t start = 0; start < tokens.size(); start += e.n_batch()) {
        const size_t n = std::min<size_t>(e.n_batch(), tokens.size() - start);
        if (!e.decode_one(*this, tokens.data() + start, n, pos0 + (int32_t) start, false)) {
            return false;
        }
    }
    return true;
}

bool chat::window_needs_repair(llama_context * ctx, bool thorough) const {
    if (model_->info().sliding_window <= 0 || slot_ < 0 || ledger_.empty()) {
        return false;
    }
    return kv_pos_max(ctx, slot_) != ledger_.next_pos() - 1 || (thorough && !kv_window_matches(ctx, slot_, ledger_));
}

void chat::settle_cache(step_context & e) {
    if (window_suspect_) {
        repair_window(e, window_thorough_);
    }
    replay_if_pending(e);   // a failed repair (or one of a rollback) cleared the cache
}

void chat::replay_if_pending(step_context & e) {
    if (replay_pending_) {
        replay_ledger(e);
        replay_pending_ = false;
    }
}

void chat::restart_replay(llama_context * ctx) {
    kv_clear_slot(ctx, slot_);
    ledger_.renumber();
    replay_done_ = 0;
}

contribution chat::replay_contribution(size_t budget, step_context & e) {
    if (replay_done_ == 0) {
        restart_replay(e.ctx());   // after an error or a failed repair, the ledger can have gaps
    }
    contribution c;
    const size_t n = std::min({ budget, chunk_, ledger_.size() - replay_done_ });
    c.pos0 = (int32_t) replay_done_;
    for (size_t i = replay_done_; i < replay_done_ + n; ++i) {
        c.tokens.push_back(ledger_[i].token);
    }
    c.replay = true;
    return c;
}

void chat::repair_window(step_context & e, bool thorough) {
    window_suspect_ = false;
    window_thorough_ = false;
    if (!window_needs_repair(e.ctx(), thorough)) {
        return;
    }
    window_repairs_++;
    const int32_t window = model_->info().sliding_window;
    // The last `window` tokens are decoded again, numbered on from the first of them: the window of
    // the next token is then theirs alone, whatever the renumbering closed. Below them the window cache
    // is emptied, which is what lets llama.cpp take that first position (with cells there, only the
    // one after its newest).
    llama_context * ctx = e.ctx();
    const auto t0 = clock_type::now();
    const size_t k = ledger_.size() > (size_t) window ? ledger_.size() - (size_t) window : 0;
    const int32_t pos0 = ledger_[k].pos;
    bool moved = false;
    try {
        kv_remove_from(ctx, slot_, pos0);
        kv_prune_sliding_window(ctx, slot_, pos0 + window - 1);
        std::vector<int32_t> tokens;
        for (size_t i = k; i < ledger_.size(); ++i) {
            tokens.push_back(ledger_[i].token);
            moved = moved || ledger_[i].pos != pos0 + (int32_t) (i - k);
            ledger_.at(i).pos = pos0 + (int32_t) (i - k);
        }
        if (!decode_run(e, tokens, pos0)) {
            throw fml_error(FML_ERR_DECODE, "llama_decode failed");
        }
    } catch (const fml_error &) {
        // Runs where nothing may throw (an abort's rollback): the cache is rebuilt from the ledger
        // before the chat's next decode instead (the path of a ledger-only checkpoint).
        kv_clear_slot(ctx, slot_);
        replay_pending_ = true;
        moved = true;
    }
    // Numbered on where the tail had gaps: a compaction of it.
    cumulative_.compactions += moved ? 1 : 0;
    positions_moved_ += moved ? 1 : 0;
    if (turn_) {
        turn_->result.stats.compactions += moved ? 1 : 0;
        turn_->result.stats.compact_ms += ms_since(t0);
    }
}

bool chat::evict(const eviction_request & req, const eviction_request & plain, step_context & e) {
    // Latency guard: a policy that throws or takes longer than max_policy_ms is replaced by sliding
    // for this eviction, and the fallback is counted. The test hook adds its delay to the measured
    // time and holds the chat back that long (without stalling the other chats of the engine).
    turn_stats & st = turn_->result.stats;
    // A policy over the limit GUARD_STRIKES times in a row is not run for the next GUARD_SKIPS
    // evictions (sliding's plan at once), then tried again.
    constexpr uint32_t GUARD_STRIKES = 3;
    constexpr uint32_t GUARD_SKIPS = 16;
    auto t0 = clock_type::now();
    eviction_plan plan;
    bool fallback = false;
    double policy_extra_ms = 0;
    if (plans_to_skip_ > 0) {
        plans_to_skip_--;
        fallback = true;
    } else {
        try {
            plan = policy_->plan(ledger_, req);
            if (plan.total() < req.need) {
                fallback = true;
            }
        } catch (const std::exception &) {
            fallback = true;
        }
        policy_extra_ms = opts_.test_policy_delay_ms;
        const double elapsed = ms_since(t0) + policy_extra_ms;
        if (opts_.test_policy_delay_ms > 0) {
            ready_at_ = clock_type::now() + ms_duration(opts_.test_policy_delay_ms);
        }
        const bool slow = opts_.max_policy_ms > 0 && elapsed > opts_.max_policy_ms;
        fallback = fallback || slow;
        slow_plans_in_a_row_ = slow ? slow_plans_in_a_row_ + 1 : 0;
        if (slow_plans_in_a_row_ >= GUARD_STRIKES) {
            slow_plans_in_a_row_ = 0;
            plans_to_skip_ = GUARD_SKIPS;
        }
    }
    if (fallback) {
        // Sliding writes no summary: the room the policy asked for one stays with the history.
        plan = plan_oldest_first(ledger_, plain, opts_.policy.window_size);
        st.fallback = true;
        cumulative_.fallback_count++;
    }
    const double policy_ms = ms_since(t0) + policy_extra_ms;
    st.policy_ms += policy_ms;
    eviction_record rec;
    rec.policy_ms = policy_ms;
    rec.fallback = fallback;
    rec.during_generation = turn_->generating;

    const size_t freed = plan.total();
    // The summary takes what the eviction frees beyond what the incoming tokens need and the slack
    // asked with them (a small budget can leave less than summaryTokens). Taking the slack too left a
    // chat whose window held all it could evict (a long pinned system prompt) one free token per
    // summary: a summary every token of a reply, 7x its latency.
    const size_t keep_free = plain.want;
    const uint32_t max_summary = (uint32_t) std::min<size_t>(opts_.policy.summary_tokens, freed > keep_free ? freed - keep_free : 0);
    if (plan.summarize && max_summary > 0 && !summary_instruction_.empty()) {
        // It is written first, the eviction happens after.
        // The scratch (prompt + summary) goes after the history: below the position limit.
        auto j = std::make_unique<summary_job>();
        j->prompt = summary_prompt();
        fit_positions(j->prompt.size() + max_summary, 0, e);
        j->ranges = normalize_ranges(plan.ranges);
        j->max_tokens = max_summary;
        j->prompt_pos0 = ledger_.next_pos();
        j->recurrent = kv_recurrent_save(e.ctx(), slot_);
        j->window = save_window(e);
        j->t0 = clock_type::now();
        j->rec = std::move(rec);
        sampling_options so;
        so.temperature = 0.0f;          // summaries are greedy: deterministic, no seed needed
        so.repeat_penalty = 1.1f;
        so.repeat_last_n = 64;
        j->sampler = std::make_unique<sampler_chain>(so, model_->info().n_vocab);
        turn_->summary = std::move(j);
        return false;
    }
    apply_eviction(plan.ranges, std::move(rec), e);
    return true;
}

size_t chat::evict_past_reasoning(size_t want, step_context & e) {
    std::vector<bool> drop(ledger_.size(), false);
    size_t n = 0;
    for (size_t i = 0; i < ledger_.size() && n < want; ++i) {
        const ledger_entry & x = ledger_[i];
        if (x.role == TOKEN_ROLE_REASONING && x.turn < turn_->turn_no && !x.pinned) {
            drop[i] = true;
            ++n;
        }
    }
    if (n > 0) {
        eviction_record rec;
        rec.during_generation = turn_->generating;
        rec.past_reasoning = true;
        apply_eviction(ranges_from_mask(drop), std::move(rec), e);
    }
    return n;
}

void chat::apply_eviction(const std::vector<index_range> & ranges, eviction_record && rec, step_context & e) {
    turn_stats & st = turn_->result.stats;
    const auto t0 = clock_type::now();
    rec.positions = position_ranges(ranges);   // positions before the eviction
    const size_t own_gone = own_among(ranges);
    const int32_t end_before = ledger_.next_pos();
    const kv_eviction_result res = kv_evict_ranges(e.ctx(), slot_, ledger_, ranges);
    turn_->own -= std::min(own_gone, turn_->own);
    if (ledger_.next_pos() < end_before) {
        repair_window(e, true);   // the newest tokens went: the window of the new end can reach reused cells
        replay_if_pending(e);     // the repair failed: the cache is rebuilt before this turn decodes
    }
    rec.evict_ms = ms_since(t0);
    rec.evicted = (uint32_t) res.evicted;
    st.evict_ms += rec.evict_ms;
    st.evicted_tokens += (uint32_t) res.evicted;
    st.evictions += 1;
    st.eviction_log.push_back(std::move(rec));
    cumulative_.tokens_evicted += res.evicted;
    cumulative_.evictions += 1;
    if (!opts_.keep_positions) {
        compact(e);
    }
}

} // namespace fml
