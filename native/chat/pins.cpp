// Pins and forgetting: which turns must stay (pin, unpin: JS thread, on the ledger) and which must
// go now (forget: a scheduler task that evicts a turn in place).
#include "chat/chat.h"

#include "kv/kv-ops.h"

#include "llama.h"

#include <algorithm>

namespace fml {

bool chat::user_owned(size_t index) const {
    return ledger_[index].role != TOKEN_ROLE_SYSTEM && index >= opts_.policy.sink_tokens;
}

bool chat::unpinnable(size_t index) const {
    return ledger_[index].pinned && user_owned(index);
}

size_t chat::pin_turn(uint32_t turn, bool with_reply) {
    std::lock_guard<std::mutex> lock(mu_);
    auto chosen = [&](size_t i) {
        const ledger_entry & e = ledger_[i];
        return e.turn == turn && user_owned(i) && (e.role == TOKEN_ROLE_USER || (with_reply && e.role == TOKEN_ROLE_ASSISTANT));
    };
    size_t found = 0;
    size_t newly = 0;
    for (size_t i = 0; i < ledger_.size(); ++i) {
        if (chosen(i)) {
            found++;
            newly += ledger_[i].pinned ? 0 : 1;
        }
    }
    if (found == 0) {
        throw fml_error(FML_ERR_INVALID_OPTION, "turn " + std::to_string(turn) + " has no " + (with_reply ? "tokens" : "user message") + " in memory");
    }
    const size_t pinned = pinned_after_start() + newly;
    if (pinned + turn_floor_ > opts_.policy.max_tokens) {
        throw fml_error(FML_ERR_PIN_LIMIT,
                        "pinning turn " + std::to_string(turn) + " would make " + std::to_string(pinned) + " of maxTokens " +
                        std::to_string(opts_.policy.max_tokens) + " tokens pinned, and the next turn needs " + std::to_string(turn_floor_) +
                        " more: unpin or forget a turn, or raise maxTokens");
    }
    for (size_t i = 0; i < ledger_.size(); ++i) {
        if (chosen(i)) {
            ledger_.at(i).pinned = true;
        }
    }
    return newly;
}

size_t chat::unpin_turn(uint32_t turn) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t found = 0;
    size_t released = 0;
    for (size_t i = 0; i < ledger_.size(); ++i) {
        // Sinks stay whatever happens: a turn of which only sinks are left (after forget) is not in
        // memory. The system prompt is, but stays pinned (0 released).
        if (ledger_[i].turn != turn || i < opts_.policy.sink_tokens) {
            continue;
        }
        found++;
        if (unpinnable(i)) {
            ledger_.at(i).pinned = false;
            released++;
        }
    }
    if (found == 0) {
        throw fml_error(FML_ERR_INVALID_OPTION, "turn " + std::to_string(turn) + " is not in memory");
    }
    return released;
}

std::vector<std::pair<uint32_t, size_t>> chat::pinned_turns() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::pair<uint32_t, size_t>> out;
    for (size_t i = 0; i < ledger_.size(); ++i) {
        if (!unpinnable(i)) {
            continue;
        }
        if (out.empty() || out.back().first != ledger_[i].turn) {
            out.push_back({ ledger_[i].turn, 0 });
        }
        out.back().second++;
    }
    return out;
}

size_t chat::forget_turn(uint32_t turn, step_context & e) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<bool> drop(ledger_.size(), false);
    for (size_t i = 0; i < ledger_.size(); ++i) {
        drop[i] = ledger_[i].turn == turn && user_owned(i);
    }
    const std::vector<index_range> ranges = ranges_from_mask(drop);
    if (turn == turn_no_) {
        // The newest turn's reply ends in tokens not decoded yet (its last sampled token, the
        // template's closing): they go with it, or the next turn would decode them as turn `turn`.
        carry_.clear();
        carry_reasoning_ = false;
    }
    if (ranges.empty()) {
        return 0;
    }
    for (const index_range & r : ranges) {
        for (size_t i = r.begin; i < r.end; ++i) {
            ledger_.at(i).pinned = false;   // forgetting a pinned turn releases its pin first
        }
    }
    const int32_t end_before = ledger_.next_pos();
    const kv_eviction_result res = kv_evict_ranges(e.ctx(), slot_, ledger_, ranges);
    cumulative_.tokens_evicted += res.evicted;
    cumulative_.evictions++;
    if (replay_pending_) {
        // None of it is in the cache yet: the ledger alone changes, numbered as the replay will put it
        // (a checkpoint of it then holds consecutive positions, as 'compact' requires).
        ledger_.renumber();
        replay_pending_ = !ledger_.empty();
        return res.evicted;
    }
    if (!opts_.keep_positions) {
        compact(e);
    }
    repair_window(e, ledger_.next_pos() < end_before);   // forgetting the newest turn moves the end back
    return res.evicted;
}

} // namespace fml
