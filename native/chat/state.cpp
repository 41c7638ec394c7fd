// A chat's state outside a turn: parked in host memory and back into a slot, replayed from a
// ledger-only checkpoint, exported for a checkpoint and adopted from one.
#include "chat/chat.h"

#include "chat/turn-state.h"
#include "kv/kv-internals.h"
#include "kv/kv-ops.h"

#include "llama.h"

#include <algorithm>
#include <cstring>

namespace fml {

void chat::adopt_state(chat_state && s) {
    if (s.ledger.size() > opts_.policy.max_tokens) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the checkpoint holds more tokens than maxTokens");
    }
    const int32_t n_vocab = model_->info().n_vocab;
    for (const ledger_entry & e : s.ledger) {
        if (e.token < 0 || e.token >= n_vocab) {
            throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the checkpoint holds a token id outside this model's vocabulary");
        }
    }
    for (int32_t t : s.carry) {
        if (t < 0 || t >= n_vocab) {
            throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the checkpoint holds a token id outside this model's vocabulary");
        }
    }
    if (s.embedding_dim != ledger_.embedding_dim() || s.embeddings.size() != s.ledger.size() * s.embedding_dim) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the checkpoint's embeddings do not match this chat");
    }
    if (!s.ledger_only && s.ledger.empty() != s.kv.empty()) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the checkpoint's KV state and token ledger disagree");
    }
    std::lock_guard<std::mutex> lock(mu_);
    ledger_.clear();
    for (size_t i = 0; i < s.ledger.size(); ++i) {
        const ledger_entry & e = s.ledger[i];
        ledger_.append(e.token, e.turn, e.role, e.pinned, e.sentence_end);
        ledger_.at(i) = e;
        if (s.embedding_dim > 0) {
            std::memcpy(ledger_.embedding_mut(i), s.embeddings.data() + i * s.embedding_dim, sizeof(float) * s.embedding_dim);
        }
    }
    // Increasing and not negative (a negative position would leave a cell seq_rm can never remove),
    // below the chat's limit, and consecutive unless the chat keeps positions.
    // (The last position is compared, not next_pos(): one at INT32_MAX overflowed it past the check.)
    const bool ordered = ledger_.positions_increasing() && (ledger_.empty() || ledger_[ledger_.size() - 1].pos < position_limit_);
    if (!ordered || (!opts_.keep_positions && !ledger_.empty() && ledger_[ledger_.size() - 1].pos != ledger_[0].pos + (int32_t) ledger_.size() - 1)) {
        ledger_.clear();
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the checkpoint's token positions are negative, out of order, past the position limit "
                        "or (positions 'compact') not consecutive");
    }
    turn_no_ = s.turn;
    started_ = s.started;
    carry_ = std::move(s.carry);
    carry_reasoning_ = s.carry_reasoning && !carry_.empty();
    summary_text_ = std::move(s.summary_text);
    cumulative_ = s.stats;
    transcript_ = std::move(s.transcript);
    parked_kv_ = std::move(s.kv);
    // A ledger-only checkpoint's tokens are prefilled when the chat gets a slot (unpark).
    replay_pending_ = s.ledger_only && !ledger_.empty();
    replay_done_ = 0;
    if (replay_pending_) {
        ledger_.renumber();   // where the replay puts them: 0..n-1, from the start (scores are matched by position)
    }
    parked_ = !parked_kv_.empty() || replay_pending_;
}

void chat::park(llama_context * ctx) {
    std::lock_guard<std::mutex> lock(mu_);
    if (reset_pending_) {
        reset_pending_ = false;   // the slot's cells are stale: nothing to keep
        parked_kv_.clear();
        parked_ = false;
    } else if (replay_pending_) {
        parked_kv_.clear();       // nothing of it is in the cache: it is prefilled at its next turn
        replay_done_ = 0;
        parked_ = true;
    } else if (!ledger_.empty()) {
        parked_kv_ = kv_state_save(ctx, slot_);
        parked_ = true;
    }
    kv_clear_slot(ctx, slot_);
    slot_ = -1;
}

void chat::unpark(step_context & e) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!parked_) {
        return;
    }
    llama_context * ctx = e.ctx();
    try {
        if (replay_pending_) {
            // Prefilled in chunks as its next turn's first contributions (replay_contribution), so
            // other chats' steps go on: at once, a 1,000-token restore held them 4 s on a 0.5B model.
            restart_replay(ctx);
            parked_ = false;
            return;
        }
        kv_state_load(ctx, slot_, e.streams(), parked_kv_);
        // The cache and the ledger must agree, or the state is not what it claims.
        const int32_t expect_max = ledger_.empty() ? -1 : ledger_[ledger_.size() - 1].pos;
        const int32_t expect_min = ledger_.empty() ? -1 : ledger_[0].pos;
        if (kv_pos_max(ctx, slot_) != expect_max || kv_pos_min(ctx, slot_) != expect_min || !kv_cells_match_ledger(ctx, slot_, ledger_)) {
            throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the checkpoint's KV state and token ledger disagree");
        }
    } catch (...) {
        kv_clear_slot(ctx, slot_);
        ledger_.clear();
        carry_.clear();
        carry_reasoning_ = false;
        started_ = false;
        parked_ = false;
        replay_pending_ = false;
        parked_kv_.clear();
        throw;
    }
    parked_ = false;
    parked_kv_.clear();
    parked_kv_.shrink_to_fit();
}

void chat::replay_ledger(step_context & e) {
    // The retained tokens, prefilled at 0..n-1 in the engine's batches: the same memory as the chat
    // that was saved (tokens, turns, roles, pins, scores), its positions compacted; a hybrid's
    // recurrent state is rebuilt from these tokens alone. What replay contributions put in stays.
    if (replay_done_ == 0) {
        restart_replay(e.ctx());
    }
    std::vector<int32_t> tokens;
    for (size_t i = replay_done_; i < ledger_.size(); ++i) {
        tokens.push_back(ledger_[i].token);
    }
    const int32_t pos0 = (int32_t) replay_done_;
    replay_done_ = 0;
    if (!decode_run(e, tokens, pos0)) {
        kv_clear_slot(e.ctx(), slot_);
        throw fml_error(FML_ERR_DECODE, "llama_decode failed while prefilling a ledger-only checkpoint's tokens");
    }
}

void chat::context_lost() {
    std::lock_guard<std::mutex> lock(mu_);
    replay_done_ = 0;
}

void chat::sync_after_reset(llama_context * ctx) {
    std::lock_guard<std::mutex> lock(mu_);
    if (reset_pending_ && slot_ >= 0) {
        kv_clear_slot(ctx, slot_);
    }
    reset_pending_ = false;
}

cache_view chat::view(llama_context * ctx) const {
    std::lock_guard<std::mutex> lock(mu_);
    cache_view v;
    v.ledger_tokens = ledger_.size();
    v.pinned_tokens = ledger_.pinned_count();
    v.positions_contiguous = ledger_.positions_contiguous();
    v.positions_increasing = ledger_.positions_increasing();
    v.ledger_pos_first = ledger_.empty() ? -1 : ledger_[0].pos;
    v.ledger_pos_last = ledger_.empty() ? -1 : ledger_[ledger_.size() - 1].pos;
    v.position_limit = position_limit_;
    v.cells = key_.cells;
    v.carried_tokens = carry_.size();
    v.pending_system_tokens = started_ ? 0 : system_tokens_.size();
    v.slot = slot_;
    v.parked = parked_;
    v.window_repairs = window_repairs_;
    if (ctx != nullptr && slot_ >= 0 && !reset_pending_ && !replay_pending_) {
        v.cache_pos_min = kv_pos_min(ctx, slot_);
        v.cache_pos_max = kv_pos_max(ctx, slot_);
        v.scratch_pos_max = v.cache_pos_max >= ledger_.next_pos() ? v.cache_pos_max : -1;
        v.window_intact = kv_window_matches(ctx, slot_, ledger_);
    } else if (!ledger_.empty()) {
        // Parked, or to be prefilled from the ledger: the state is off the cache; report the ledger's view of it.
        v.cache_pos_min = ledger_[0].pos;
        v.cache_pos_max = ledger_[ledger_.size() - 1].pos;
    }
    return v;
}

chat_state chat::export_state(llama_context * ctx, bool with_kv) {
    chat_state s;
    std::lock_guard<std::mutex> lock(mu_);
    s.options = opts_;
    s.turn = turn_no_;
    s.started = started_;
    s.carry = carry_;
    s.carry_reasoning = carry_reasoning_;
    s.summary_text = summary_text_;
    s.stats = cumulative_;
    s.ledger = ledger_.entries();
    s.embedding_dim = ledger_.embedding_dim();
    for (size_t i = 0; i < ledger_.size() && s.embedding_dim > 0; ++i) {
        s.embeddings.insert(s.embeddings.end(), ledger_.embedding(i), ledger_.embedding(i) + s.embedding_dim);
    }
    if (ledger_.empty()) {
        return s;
    }
    // A window the next contribution would repair (a summary finished inside a step) is not saved as
    // it is: the checkpoint's tokens are prefilled again when it is loaded.
    const bool window_broken = window_suspect_ && ctx != nullptr && !parked_ && window_needs_repair(ctx, window_thorough_);
    if (replay_pending_ || !with_kv || window_broken) {
        s.ledger_only = true;   // asked for, restored from a ledger-only checkpoint and not prefilled yet, or a broken window
    } else if (parked_) {
        s.kv = parked_kv_;
    } else if (ctx != nullptr && slot_ >= 0 && !reset_pending_) {
        s.kv = kv_state_save(ctx, slot_);
    }
    return s;
}

} // namespace fml
