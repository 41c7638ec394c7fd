// A turn on the scheduler thread: what the chat adds to a step (its prefill chunk or one token),
// what it does with the decoded result (signals, sampling, stop strings), and the ways a turn ends
// (end of generation, max tokens, stop string, abort, failure) with what each keeps.
#include "chat/chat.h"

#include "chat/turn-state.h"
#include "kv/kv-internals.h"
#include "kv/kv-ops.h"

#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace fml {

void chat::begin_turn(turn_request && req) {
    std::lock_guard<std::mutex> lock(mu_);
    auto t = std::make_unique<turn_state>();
    t->t_start = clock_type::now();
    t->t_called = req.called_at == clock_type::time_point{} ? t->t_start : req.called_at;
    t->result.stats.prepare_ms = req.prepare_ms;
    t->turn_no = turn_no_ + 1;
    t->result.stats.policy = policy_->name();
    const size_t budget = opts_.policy.max_tokens;
    // Amortise: when evicting anyway, free room for part of the reply too.
    t->prefill_slack = req.ingest ? 0 : std::min<size_t>((size_t) std::max(req.gen.max_new_tokens, 1), budget / 8);
    t->gen_chunk = std::max<size_t>(1, budget / 16);
    if (!started_ && !system_tokens_.empty()) {
        t->segments.push_back({ system_tokens_, 0, TOKEN_ROLE_SYSTEM, false, true });
    }
    // The carried tokens close the previous assistant turn; they belong to it in the ledger (a reply
    // cut mid-thought: its last token is reasoning).
    if (!carry_.empty()) {
        if (carry_reasoning_) {
            t->segments.push_back({ { carry_[0] }, t->turn_no - 1, TOKEN_ROLE_REASONING, true, false });
        }
        const size_t first = carry_reasoning_ ? 1 : 0;
        if (carry_.size() > first) {
            t->segments.push_back({ std::vector<int32_t>(carry_.begin() + (long) first, carry_.end()), t->turn_no - 1, TOKEN_ROLE_ASSISTANT,
                                    t->segments.empty() || t->segments.back().system, false });
        }
    }
    t->carry_before = carry_;
    t->carry_reasoning_before = carry_reasoning_;
    t->segments.push_back({ req.framed, t->turn_no, TOKEN_ROLE_USER, t->segments.empty() || t->segments.back().system, false });
    if (!req.reply_prefix.empty()) {
        t->segments.push_back({ req.reply_prefix, t->turn_no, req.reply_prefix_role, false, false });
    }
    if (req.ingest && !req.reply.empty()) {
        t->segments.push_back({ req.reply, t->turn_no, TOKEN_ROLE_ASSISTANT, true, false });
    }
    if (signal_ != IMPORTANCE_NONE) {
        // An aborted turn leaves no trace: what its chunks' attention (and the decay) did to the
        // scores comes back with the rollback.
        t->scored_before = ledger_.entries();
        t->positions_moved_before = positions_moved_;
    }
    // Decay ages attention received. A key-norm score (negated, set once per token) is a property of
    // the key, not of how recently it was read: decayed toward 0, the best score, it ranked old tokens
    // up every turn, the opposite of a decay.
    if (signal_ == IMPORTANCE_ATTENTION && opts_.policy.importance_decay < 1.0f) {
        for (size_t i = 0; i < ledger_.size(); ++i) {
            ledger_.at(i).score[SCORE_IMPORTANCE] *= opts_.policy.importance_decay;
            ledger_.at(i).score[SCORE_PEAK] *= opts_.policy.importance_decay;
        }
    }
    t->req = std::move(req);
    if (!started_ && system_tokens_.empty()) {
        started_ = true;
    }
    turn_ = std::move(t);
    last_used_ = clock_type::now();
}

bool chat::replays_in_chunks() const {
    return turn_ && !turn_->rollback_set && !turn_->generating && !turn_->summary;
}

size_t chat::tokens_wanted(clock_type::time_point now) const {
    if (!turn_ || now < ready_at_) {
        return 0;
    }
    if (replay_pending_ && replays_in_chunks() && replay_done_ < ledger_.size()) {
        return ledger_.size() - replay_done_;
    }
    if (turn_->summary) {
        const summary_job & j = *turn_->summary;
        return j.prompt_done < j.prompt.size() ? j.prompt.size() - j.prompt_done : 1;
    }
    if (turn_->pass) {
        return turn_->pass->done.load() ? 1 : 0;   // a grammar's pass runs: nothing until it is done
    }
    if (turn_->generating) {
        return 1;
    }
    size_t n = 0;
    for (size_t i = turn_->seg; i < turn_->segments.size(); ++i) {
        n += turn_->segments[i].tokens.size() - (i == turn_->seg ? turn_->off : 0);
    }
    return n;
}

int32_t chat::peak_horizon(token_role role, uint32_t turn) const {
    // A chunk's queries share its first token's horizon (later ones in it could reach one message
    // further back: only ever fewer peaks, never a peak from a neighbour).
    return key_.attention ? ledger_.message_start(turn, role, PEAK_MESSAGES_BETWEEN) : -1;
}

contribution chat::contribute(size_t budget, step_context & e) {
    std::lock_guard<std::mutex> lock(mu_);
    turn_state & t = *turn_;
    contribution c;
    try {
        if (slot_ < 0) {
            throw fml_error(FML_ERR_INTERNAL, "a chat without a slot was asked for tokens");
        }
        if (replay_pending_ && replays_in_chunks()) {
            return replay_contribution(budget, e);   // a ledger-only restore: the retained tokens first
        }
        settle_cache(e);
        if (!t.unsummarized.empty()) {
            // A summary that could not be written: its eviction, without it (counted as a fallback).
            const std::vector<index_range> ranges = std::move(t.unsummarized);
            t.unsummarized.clear();
            t.result.stats.fallback = true;
            cumulative_.fallback_count++;
            apply_eviction(ranges, std::move(t.unsummarized_rec), e);
        }
        if (t.summary) {
            return summary_contribution(budget);
        }
        if (t.pass) {
            if (!take_grammar_pass(e) || !turn_) {
                return contribution{};   // still running; or the token ended the turn
            }
        }
        if (t.generating) {
            if (opts_.test_fail_after_tokens > 0 && t.result.stats.generated_tokens >= opts_.test_fail_after_tokens) {
                throw fml_error(FML_ERR_DECODE, "llama_decode failed (test hook testFailAfterTokens)");
            }
            if (!make_room(1, t.gen_chunk, e)) {
                return summary_contribution(budget);
            }
            c.tokens.push_back(t.pending);
            c.pos0 = ledger_.next_pos();
            c.logits_last = true;
            t.inflight.assign(1, { t.reply_roles.back(), t.turn_no });
            c.peak_horizon = peak_horizon(TOKEN_ROLE_ASSISTANT, t.turn_no);
            return c;
        }
        // Prefill: room for the whole message first (once), then chunks of at most `chunk_`.
        turn_state::segment & s = t.segments[t.seg];
        if (s.room && t.off == 0 && t.room_made_for != t.seg) {
            if (!t.past_reasoning_done) {
                // Before the turn's room is counted: what the earlier replies' reasoning frees is room.
                t.past_reasoning_done = true;
                if (opts_.past_reasoning == past_reasoning_mode::drop) {
                    evict_past_reasoning(SIZE_MAX, e);
                }
            }
            size_t incoming = 0;
            for (size_t i = t.seg; i < t.segments.size() && (i == t.seg || !t.segments[i].room); ++i) {
                incoming += t.segments[i].tokens.size();
            }
            if (!make_room(incoming, t.prefill_slack, e)) {
                return summary_contribution(budget);
            }
            t.room_made_for = t.seg;
        }
        if (!t.rollback_set && !s.system) {
            t.own = 0;
            t.recurrent = kv_recurrent_save(e.ctx(), slot_);
            // Rolled back, a prefill of L tokens in several decodes (how many depends on the other
            // chats' steps) can have taken the cells of the window's oldest L tokens (llama.cpp reuses
            // a cell once it is outside the window of the newest token), and the newest ones too once
            // L reaches the window. The window is saved at every turn: a copy of the window's cells,
            // far cheaper than the turn (bench/swa.ts).
            if (model_->info().sliding_window > 0) {
                t.window = save_window(e);
                t.window_positions_moved = positions_moved_;
                t.window_end = ledger_.next_pos();
            }
            t.rollback_set = true;
        }
        c.pos0 = ledger_.next_pos();
        t.inflight.clear();
        size_t seg = t.seg;
        size_t off = t.off;
        const size_t limit = std::min(budget, chunk_);
        while (c.tokens.size() < limit && seg < t.segments.size()) {
            const turn_state::segment & cur = t.segments[seg];
            if (seg != t.seg && cur.room) {
                break;   // its room is made when it starts
            }
            const size_t n = std::min(limit - c.tokens.size(), cur.tokens.size() - off);
            c.tokens.insert(c.tokens.end(), cur.tokens.begin() + (long) off, cur.tokens.begin() + (long) (off + n));
            t.inflight.insert(t.inflight.end(), n, { cur.role, cur.turn });
            off += n;
            if (off == cur.tokens.size()) {
                ++seg;
                off = 0;
            }
        }
        c.logits_last = seg == t.segments.size() && !t.req.ingest;
        if (!t.inflight.empty()) {
            c.peak_horizon = peak_horizon(t.inflight.front().first, t.inflight.front().second);
        }
        return c;
    } catch (const fml_error & err) {
        fail_turn(err, e);
        return contribution{};
    }
}

void chat::on_decoded(const contribution & c, size_t from, size_t to, int32_t logits_row, const capture_member * signals, step_context & e) {
    std::lock_guard<std::mutex> lock(mu_);
    turn_state & t = *turn_;
    const auto now = clock_type::now();
    last_used_ = now;
    if (opts_.test_token_delay_ms > 0) {
        ready_at_ = now + ms_duration(opts_.test_token_delay_ms);
    }
    if (c.replay) {
        replay_done_ += to - from;
        if (replay_done_ >= ledger_.size()) {
            replay_pending_ = false;
            replay_done_ = 0;
        }
        return;
    }
    if (c.scratch) {
        if (!t.summary) {
            return;   // the summary was given up (a failed decode) after this contribution was planned
        }
        if (to < c.tokens.size() || !summary_prompt_decoded(c.tokens.size())) {
            return;
        }
        summary_decoded(e, logits_row);
        return;
    }
    const size_t first_new = ledger_.size();
    for (size_t i = from; i < to; ++i) {
        const auto [role, turn] = t.inflight[i];
        append_decoded(&c.tokens[i], 1, turn, role, t.req.pin && role == TOKEN_ROLE_USER && turn == t.turn_no);
    }
    if (t.rollback_set) {
        t.own += to - from;
    }
    if (t.generating) {
        if (positions_moved_ != t.reply_pos_moved) {
            t.reply_pos_moved = positions_moved_;
            t.reply_pos_valid = t.reply_pos.size();   // the ones before moved
        }
        for (size_t i = from; i < to; ++i) {
            t.reply_pos.push_back(ledger_[first_new + (i - from)].pos);
        }
    }
    if (opts_.test_internal_error_after_tokens > 0 && t.generating && t.result.stats.generated_tokens >= opts_.test_internal_error_after_tokens) {
        throw fml_error(FML_ERR_INTERNAL, "an unexpected error (test hook testInternalErrorAfterTokens)");
    }
    if (signals != nullptr) {
        absorb_signals(*signals, first_new, to - from);
        if (signal_ != IMPORTANCE_NONE) {
            t.result.stats.signal_reads++;
        }
    }
    if (to < c.tokens.size()) {
        return;
    }
    if (t.generating) {
        sample_next(e, logits_row);
        return;
    }
    // Advance the prefill cursor past this contribution.
    size_t n = c.tokens.size();
    while (n > 0) {
        turn_state::segment & s = t.segments[t.seg];
        const size_t k = std::min(n, s.tokens.size() - t.off);
        t.off += k;
        n -= k;
        if (t.off == s.tokens.size()) {
            if (s.system) {
                started_ = true;
            }
            ++t.seg;
            t.off = 0;
        }
    }
    if (t.seg < t.segments.size()) {
        return;
    }
    // The whole prompt is in.
    uint32_t prompt = 0;
    for (const auto & s : t.segments) {
        prompt += (uint32_t) s.tokens.size();
    }
    t.result.stats.prompt_tokens = prompt;
    t.result.stats.prefill_ms = ms_since(t.t_start);
    carry_.clear();
    carry_reasoning_ = false;
    turn_no_ = t.turn_no;
    if (t.req.ingest) {
        carry_ = t.req.closing.empty() ? closing_tokens_ : t.req.closing;
        finish_turn(STOP_EOS, e);
        return;
    }
    start_generation();
    if (t.req.gen.max_new_tokens == 0) {
        finish_turn(STOP_MAX_TOKENS, e);
        return;
    }
    sample_next(e, logits_row);
}

void chat::start_generation() {
    turn_state & t = *turn_;
    t.generating = true;
    t.sampler = std::make_unique<sampler_chain>(t.req.gen.sampling, model_->info().n_vocab,
                                                t.req.gen.ignore_eos ? model_->eog_tokens() : std::vector<int32_t>{});
    t.stream = std::make_unique<text_stream>(t.req.gen.stop);
    t.reasoning_stream = std::make_unique<text_stream>(std::vector<std::string>{});
    const reply_start start = t.req.reasoning_skipped ? reply_start::after_reasoning : t.req.reasoning_opened ? reply_start::in_reasoning : reply_start::fresh;
    t.splitter = std::make_unique<reasoning_splitter>(model_->reasoning(), start, t.req.tool_markup);
    // A harmony reply's call may come after any of its messages, its header and recipient held too:
    // the tools' grammar reads every token from the reply's start (waiting, a lazy one holds none).
    t.answer_held = t.req.tool_markup && t.req.grammar_of_tools;
    t.t_generate = clock_type::now();
}

std::string chat::reply_piece(const turn_state & t, int32_t tok) const {
    // A format's preserved marker reads as its special text (what the call parser and a grammar read).
    const bool preserved = t.req.tools && std::binary_search(t.req.tools->preserved.begin(), t.req.tools->preserved.end(), tok);
    return model_->token_piece(tok, preserved);
}

void chat::split_piece(int32_t tok) {
    turn_state & t = *turn_;
    const auto role_of = [](reply_part part) { return part == reply_part::reasoning ? TOKEN_ROLE_REASONING : TOKEN_ROLE_ASSISTANT; };
    const std::string piece = reply_piece(t, tok);
    const split_step s = t.splitter->push(tok, piece);
    const token_role role = role_of(s.part);
    t.reply_roles.push_back(role);
    if (s.relabel_from != SIZE_MAX) {
        const token_role to = role_of(s.relabel_part);
        relabel_reply(s.relabel_from, t.reply_roles.size() - 1, to);
        if (s.relabel_from == 0 && to == TOKEN_ROLE_REASONING) {
            // A think block closed that was never opened: the text so far was reasoning. What went to
            // on_piece as answer already stays sent; what the answer's stream still held back (a
            // possible stop string's start, an unfinished character) goes out as reasoning.
            const std::string held = t.stream->finish();
            t.reasoning_stream->push(t.stream->text());
            if (!held.empty() && t.req.cb.on_piece) {
                t.req.cb.on_piece(held, true);
            }
            t.stream = std::make_unique<text_stream>(t.req.gen.stop);
        }
    }
    if (!s.answer_markup.empty()) {
        const std::string markup = t.stream->push(s.answer_markup);
        if (!markup.empty() && t.req.cb.on_piece) {
            t.req.cb.on_piece(markup, false);
        }
    }
    if (!s.has_text) {
        return;
    }
    const bool reasoning = role == TOKEN_ROLE_REASONING;
    const std::string out = (reasoning ? t.reasoning_stream : t.stream)->push(s.text_from > 0 ? piece.substr(s.text_from) : piece);
    if (!out.empty() && t.req.cb.on_piece) {
        t.req.cb.on_piece(out, reasoning);
    }
}

void chat::relabel_reply(size_t from, size_t to, token_role role) {
    turn_state & t = *turn_;
    for (size_t k = from; k < to; ++k) {
        t.reply_roles[k] = role;
    }
    const size_t in_ledger = t.reply_pos.size();
    if (from >= in_ledger) {
        return;   // none in the ledger yet (`to` is past them: the newest sampled token never is)
    }
    // Those in the ledger are the reply's newest entries, walked back from the end (summaries are no
    // part of it; the turn's user message ends it): down to the position the first had, while no
    // compaction moved them since; else as many as there were (policies keep the newest tokens).
    const bool by_pos = from >= t.reply_pos_valid && positions_moved_ == t.reply_pos_moved;
    const int32_t first_pos = by_pos ? t.reply_pos[from] : 0;
    size_t n = std::min(to, in_ledger) - from;
    for (size_t i = ledger_.size(); i > 0 && n > 0; --i) {
        ledger_entry & x = ledger_.at(i - 1);
        if (x.role == TOKEN_ROLE_SUMMARY) {
            continue;
        }
        if (x.turn != t.turn_no || message_role(x.role) != TOKEN_ROLE_ASSISTANT || (by_pos && x.pos < first_pos)) {
            break;
        }
        x.role = role;
        --n;
    }
}

void chat::sample_next(step_context & e, int32_t logits_row) {
    turn_state & t = *turn_;
    // testReply's tokens, then the end (or, with testReplyThenSample, sampled ones).
    const bool forced = !test_reply_.empty() && (t.forced_next < test_reply_.size() || !opts_.test_reply_then_sample);
    if (forced) {
        const int32_t tok = t.forced_next < test_reply_.size() ? test_reply_[t.forced_next++] : -1;
        if (tok >= 0 && !model_->is_eog(tok) && t.req.grammar && t.req.grammar->lazy() && held_by_grammar(t, tok)) {
            // A lazy grammar waits on the model's words: forced ones are words of the reply to it
            // (a call's marker forced wakes it, and what is sampled after is held).
            t.req.grammar->accept(tok);
            t.answer_held = true;
        }
        take_sampled(tok, e);
        return;
    }
    if (!t.req.grammar) {
        take_sampled(llama_sampler_sample(t.sampler->raw(), e.ctx(), logits_row), e);
        return;
    }
    sample_held_reply(e, logits_row);
}

void chat::take_sampled(int32_t tok, step_context & e) {
    turn_state & t = *turn_;
    turn_stats & st = t.result.stats;
    if (!t.first_token) {
        t.first_token = true;
        st.first_token_ms = ms_since(t.t_called);
    }
    t.pending = -1;
    if (tok < 0 || model_->is_eog(tok)) {
        finish_turn(STOP_EOS, e);
        return;
    }
    st.generated_tokens++;
    split_piece(tok);
    t.pending = tok;
    if (t.stream->stopped()) {
        finish_turn(STOP_STRING, e);
    } else if ((int32_t) st.generated_tokens >= t.req.gen.max_new_tokens) {
        finish_turn(STOP_MAX_TOKENS, e);
    } else if (abort_.load()) {
        finish_turn(STOP_ABORT, e);
    }
}

void chat::finish_turn(stop_reason reason, step_context & e) {
    (void) e;
    std::unique_ptr<turn_state> t = std::move(turn_);
    turn_result & r = t->result;
    turn_stats & st = r.stats;
    r.reason = reason;
    // The turn's number in the ledger (what pin/unpin/forget take); 0 when it never got in.
    st.turn = turn_no_ == t->turn_no ? t->turn_no : 0;
    if (t->stream) {
        const std::string thought = t->reasoning_stream->finish();
        if (!thought.empty() && t->req.cb.on_piece) {
            t->req.cb.on_piece(thought, true);
        }
        if (reason != STOP_STRING) {
            const std::string rest = t->stream->finish();
            if (!rest.empty() && t->req.cb.on_piece) {
                t->req.cb.on_piece(rest, false);
            }
        }
        r.response = t->stream->text();
        // Without the blank line before </think> (chat templates strip it too).
        r.reasoning = t->reasoning_stream->text();
        r.reasoning.erase(r.reasoning.find_last_not_of(" \t\r\n") + 1);
        if (t->req.tools) {
            // The calls, read in the template's format (what a turn of results follows); the answer
            // without them. Nothing may escape here: the turn is out of turn_ and its promise would
            // never settle, so a reply that cannot be read is text.
            try {
                tool_reply read = t->req.tools->parse(r.reasoning, r.response, false);
                for (auto & c : read.calls) {
                    if (c.id.empty()) c.id = tool_call_id();
                }
                // parallelToolCalls false: one call at most, as OpenAI's (a required call's grammar
                // holds it; with 'auto' the model may write more, and the first is the one).
                if (!t->req.gen.parallel_tool_calls && read.calls.size() > 1) {
                    read.calls.resize(1);
                }
                r.response = std::move(read.content);
                r.tool_calls = std::move(read.calls);
            } catch (const std::exception &) {
                r.tool_calls.clear();
            }
            last_calls_ = r.tool_calls;
        }
        st.decode_ms = ms_since(t->t_generate);
        st.tokens_per_second = st.decode_ms > 0 ? st.generated_tokens * 1000.0 / st.decode_ms : 0;
        // Close the assistant turn next time: the undecoded last token plus the template's end-of-turn.
        carry_.clear();
        carry_reasoning_ = false;
        // A reply cut mid-thought ends in a reasoning token, which pastReasoning 'drop' would evict as
        // soon as it was in: it is not carried then.
        const bool reasoning = t->pending >= 0 && t->reply_roles.back() == TOKEN_ROLE_REASONING;
        if (t->pending >= 0 && !(reasoning && opts_.past_reasoning == past_reasoning_mode::drop)) {
            carry_.push_back(t->pending);
            carry_reasoning_ = reasoning;
        }
        // A reply with calls closes as the format closes one (gpt-oss's <|call|>).
        const bool called = t->req.tools && !r.tool_calls.empty() && !t->req.tools->call_closing.empty();
        const std::vector<int32_t> & closing = called ? t->req.tools->call_closing : closing_tokens_;
        carry_.insert(carry_.end(), closing.begin(), closing.end());
    }
    st.retained_tokens = (uint32_t) ledger_.size();
    st.latency_ms = ms_since(t->t_called);
    cumulative_.turns++;
    abort_.store(false);
    if (t->req.cb.on_done) {
        t->req.cb.on_done(std::move(r));
    }
}

void chat::abort_turn(step_context & e) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!turn_) {
        return;
    }
    if (turn_->generating && !turn_->summary) {
        finish_turn(STOP_ABORT, e);
        return;
    }
    if (turn_->generating) {
        cancel_summary(e);
        finish_turn(STOP_ABORT, e);
        return;
    }
    fail_turn(fml_error(FML_ERR_ABORTED, "aborted"), e);
}

void chat::decode_failed(const fml_error & err, step_context & e) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!turn_) {
        return;
    }
    if (turn_->summary && err.code() == FML_ERR_DECODE && slot_ >= 0) {
        // The summary could not be written: the turn goes on, and the eviction it was for goes ahead
        // without it at the chat's next contribution (outside this step's decodes, where an eviction
        // that fails fails the turn). Its scratch cells go now, the window and a recurrent state back
        // to before it.
        turn_state & t = *turn_;
        t.unsummarized = std::move(t.summary->ranges);
        t.unsummarized_rec = std::move(t.summary->rec);
        t.unsummarized_rec.fallback = true;
        cancel_summary(e);
        return;
    }
    // Drop whatever ubatches of the failed decode reached the cache, so cache == ledger again. A
    // recurrent state cannot drop them: the turn goes back to its snapshot.
    if (slot_ >= 0) {
        kv_drop_unledgered(e.ctx(), slot_, ledger_);
    }
    fail_turn(err, e, slot_ >= 0 && kv_has_recurrent(e.ctx()));
}

void chat::fail_unexpected(const std::exception & ex, step_context & e) noexcept {
    std::unique_ptr<turn_state> done;
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (!turn_) {
            return;
        }
        // Nothing about the cache can be trusted (the step stopped anywhere): it is emptied and
        // prefilled from the ledger, less this turn's own tokens, before the next turn (a replay).
        try {
            if (slot_ >= 0) {
                kv_clear_slot(e.ctx(), slot_);
            }
        } catch (...) {
            // The slot's cells stay; the replay clears them first.
        }
        turn_state & t = *turn_;
        if (t.rollback_set) {
            const size_t own = std::min(t.own, ledger_.size());
            ledger_.remove_ranges({ { ledger_.size() - own, ledger_.size() } });
            cumulative_.tokens_seen -= std::min<uint64_t>(cumulative_.tokens_seen, own);   // as a rollback counts them
            forget_turn_number(t);
            if (positions_moved_ == t.positions_moved_before) {
                restore_scores(t.scored_before);   // what the turn's queries added to the older tokens' scores
            }
        }
        if (!started_) {
            // Stopped inside the system prompt: it goes in again with the next turn (uncounted till then).
            cumulative_.tokens_seen -= std::min<uint64_t>(cumulative_.tokens_seen, ledger_.size());
            ledger_.clear();
        }
        replay_pending_ = !ledger_.empty();
        replay_done_ = 0;
        done = std::move(turn_);
        abort_.store(false);
    }
    if (done->req.cb.on_error) {
        try {
            done->req.cb.on_error(fml_error(FML_ERR_INTERNAL, std::string("the turn stopped on an internal error: ") + ex.what()));
        } catch (...) {
            // Its promise is the binding's to settle; nothing more can be done here.
        }
    }
}

void chat::fail_unstarted(const fml_error & err) {
    std::unique_ptr<turn_state> done;
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (!turn_) {
            return;
        }
        done = std::move(turn_);
        abort_.store(false);
    }
    if (err.code() == FML_ERR_ABORTED && !done->req.ingest) {
        turn_result r;
        r.reason = STOP_ABORT;
        r.stats = done->result.stats;
        r.stats.retained_tokens = (uint32_t) retained_tokens();
        r.stats.latency_ms = ms_since(done->t_called);
        if (done->req.cb.on_done) {
            done->req.cb.on_done(std::move(r));
        }
    } else if (done->req.cb.on_error) {
        done->req.cb.on_error(err.code() == FML_ERR_ABORTED ? fml_error(FML_ERR_ABORTED, "the transcript import was aborted") : err);
    }
}

void chat::forget_turn_number(const turn_state & t) {
    if (turn_no_ == t.turn_no) {
        // Its prompt was in (an error or a lost state mid-reply): the turn never happened.
        turn_no_ = t.turn_no - 1;
        carry_ = t.carry_before;
        carry_reasoning_ = t.carry_reasoning_before;
    }
}

void chat::fail_turn(const fml_error & err, step_context & e, bool state_lost) {
    std::unique_ptr<turn_state> & t = turn_;
    if (replay_pending_ && replay_done_ > 0 && slot_ >= 0) {
        // Stopped inside a ledger restore's prefill: it starts over at the next turn (no turn runs
        // with part of it in the cache).
        kv_clear_slot(e.ctx(), slot_);
        replay_done_ = 0;
    }
    if (t->summary) {
        cancel_summary(e);
    }
    const bool aborted = err.code() == FML_ERR_ABORTED;
    if (t->generating && !state_lost && aborted) {
        // An abort mid-reply is an answer: what was generated stays.
        finish_turn(STOP_ABORT, e);
        return;
    }
    // Any other failure is an error: its caller gets no result, so the turn goes whole (mid-reply
    // too: its message and reply so far stayed in the ledger with nothing to close them).
    if (t->rollback_set) {
        rollback_to(ledger_.size() - std::min(t->own, ledger_.size()), e);   // the turn's own tokens go; evictions already done stay done
        forget_turn_number(*t);
    } else if (!started_) {
        rollback_to(0, e);                    // stopped inside the system prompt: start over next time
    }
    std::unique_ptr<turn_state> done = std::move(t);
    abort_.store(false);
    if (aborted && !done->req.ingest) {
        // An aborted prefill is an answer, not an error: the turn ends with nothing generated.
        turn_result r;
        r.reason = STOP_ABORT;
        r.stats = done->result.stats;
        r.stats.prompt_tokens = 0;
        r.stats.retained_tokens = (uint32_t) ledger_.size();
        r.stats.latency_ms = ms_since(done->t_called);
        if (done->req.cb.on_done) {
            done->req.cb.on_done(std::move(r));
        }
        return;
    }
    if (done->req.cb.on_error) {
        done->req.cb.on_error(aborted ? fml_error(FML_ERR_ABORTED, "the transcript import was aborted") : err);
    }
}

void chat::rollback_to(size_t keep, step_context & e) {
    // Tokens decoded and then rolled back (an aborted prefill, a probe) were never part of the
    // conversation: the counters must say what the cache holds and what it saw.
    if (slot_ < 0) {
        return;   // nothing of this turn reached a cache
    }
    const size_t removed = ledger_.size() > keep ? ledger_.size() - keep : 0;
    if (turn_ && !turn_->window_summaries.empty() && !turn_->window.empty()) {
        // Summaries written since stay: their cells join the window saved at the rollback point
        // (saved now, before the turn's own tokens go: the cache still ends where the ledger does).
        try {
            const std::vector<uint8_t> now = save_window(e);
            for (const auto & [pos0, pos1] : turn_->window_summaries) {
                turn_->window = kv_window_with(e.ctx(), turn_->window, now, pos0, pos1);
            }
        } catch (const fml_error &) {
            // Runs where nothing may throw (an abort): the window is then the one saved at the rollback
            // point, which still holds the evicted tokens where the summaries stand (not expected: the
            // save only fails if llama.cpp cannot write the state).
        }
    }
    kv_truncate(e.ctx(), slot_, ledger_, keep);
    cumulative_.tokens_seen -= std::min<uint64_t>(cumulative_.tokens_seen, removed);
    if (keep == 0) {
        kv_clear_slot(e.ctx(), slot_);
    } else if (turn_ && turn_->rollback_set) {
        // The snapshot held, the window is exact unless the end moved back since (the newest history
        // evicted mid-turn): its window then reaches tokens the snapshot did not have.
        bool exact = false;
        if (!turn_->window.empty() && positions_moved_ == turn_->window_positions_moved) {
            // Less what was evicted since: below the ledger's end by the restore, above it here (the
            // newest tokens before the turn can have gone too).
            if (kv_window_restore(e.ctx(), slot_, turn_->window, ledger_)) {
                kv_drop_unledgered(e.ctx(), slot_, ledger_);
                exact = ledger_.next_pos() >= turn_->window_end;
            }
        }
        restore_recurrent(turn_->recurrent, e);
        repair_window(e, !exact);
        if (positions_moved_ == turn_->positions_moved_before) {
            restore_scores(turn_->scored_before);
        }
    }
}

void chat::restore_scores(const std::vector<ledger_entry> & before) {
    // Entries are matched by position and content (both in position order; no compaction since): one
    // evicted since keeps what it has, and so does a summary (one written this turn can start like
    // the one it replaced, in its place).
    size_t j = 0;
    for (size_t i = 0; i < ledger_.size(); ++i) {
        ledger_entry & e = ledger_.at(i);
        while (j < before.size() && before[j].pos < e.pos) ++j;
        if (e.role != TOKEN_ROLE_SUMMARY && j < before.size() && before[j].pos == e.pos && before[j].token == e.token && before[j].turn == e.turn && before[j].role == e.role) {
            std::copy(std::begin(before[j].score), std::end(before[j].score), std::begin(e.score));
        }
    }
}

std::vector<uint8_t> chat::save_window(step_context & e) {
    if (model_->info().sliding_window <= 0) {
        return {};
    }
    e.flush_shift(*this, ledger_.next_pos());
    return kv_window_save(e.ctx(), slot_);
}

size_t chat::first_own() const {
    return turn_ && turn_->rollback_set ? ledger_.size() - std::min(turn_->own, ledger_.size()) : ledger_.size();
}

size_t chat::own_among(const std::vector<index_range> & ranges) const {
    const size_t first = first_own();
    size_t n = 0;
    for (const index_range & r : normalize_ranges(ranges)) {
        n += r.end > first ? r.end - std::max(r.begin, first) : 0;
    }
    return n;
}

void chat::restore_recurrent(const std::vector<uint8_t> & snapshot, step_context & e) {
    kv_recurrent_restore(e.ctx(), slot_, snapshot, ledger_.empty() ? -1 : ledger_[ledger_.size() - 1].pos);
}

std::vector<index_range> chat::position_ranges(const std::vector<index_range> & ranges) const {
    // An index range may span gaps an earlier eviction left: one position range per run without one.
    std::vector<index_range> out;
    for (const index_range & r : normalize_ranges(ranges)) {
        for (size_t i = r.begin; i < r.end; ++i) {
            const size_t pos = (size_t) ledger_[i].pos;
            if (i > r.begin && out.back().end == pos) {
                out.back().end = pos + 1;
            } else {
                out.push_back({ pos, pos + 1 });
            }
        }
    }
    return out;
}

void chat::append_decoded(const int32_t * tokens, size_t n, uint32_t turn, token_role role, bool pin) {
    for (size_t i = 0; i < n; ++i) {
        const bool sink = ledger_.size() < opts_.policy.sink_tokens;
        const std::string piece = model_->token_piece(tokens[i], false);
        const bool sentence_end = !piece.empty() && strchr(".!?\n", piece.back()) != nullptr;
        ledger_.append(tokens[i], turn, role, pin || role == TOKEN_ROLE_SYSTEM || sink, sentence_end);
    }
    cumulative_.tokens_seen += n;
}

void chat::absorb_signals(const capture_member & m, size_t first_new, size_t n_new) {
    if (key_.attention && m.attention_layers_seen > 0) {
        // Attention received, summed over heads and layers, then divided by the number of queries
        // that could attend to the token: a plain sum (H2O) favours old tokens just for having been
        // seen by more queries, which evicts the recent context a small model depends on.
        // score[ATTENTION_QUERIES] keeps the running count of queries so the average can be updated
        // incrementally. Cells map to ledger entries through their positions (cells of no entry:
        // summary scratch).
        std::vector<float> acc(ledger_.size(), 0.0f);
        std::vector<float> peak(ledger_.size(), 0.0f);
        size_t next = 0;
        for (size_t c = 0; c < m.cell_pos.size() && c < m.attention_by_cell.size(); ++c) {
            const size_t i = m.cell_pos[c] >= 0 ? ledger_.index_of_pos(m.cell_pos[c], next) : ledger_.size();
            if (i < ledger_.size()) {
                // A weight that is not finite (an overflow in a reduced-precision kernel) counts as
                // none: a NaN score breaks the policies' strict ordering and spreads through means.
                const float a = m.attention_by_cell[c], p = m.peak_by_cell[c];
                acc[i] += std::isfinite(a) ? a : 0.0f;
                peak[i] = std::max(peak[i], std::isfinite(p) ? p : 0.0f);
                next = i + 1;
            }
        }
        for (size_t i = 0; i < ledger_.size(); ++i) {
            ledger_entry & e = ledger_.at(i);
            if (opts_.policy.importance_peak) {
                // Peaks decay with importanceDecay (begin_turn) and are raised by new ones.
                e.score[SCORE_IMPORTANCE] = std::max(e.score[SCORE_IMPORTANCE], peak[i]);
                continue;
            }
            e.score[SCORE_PEAK] = std::max(e.score[SCORE_PEAK], peak[i]);   // kept for 'blend'
            const float queries = i < first_new ? (float) n_new : (float) (n_new - (i - first_new));
            const float seen = e.score[SCORE_ATTENTION_QUERIES];
            const float total = e.score[SCORE_IMPORTANCE] * seen + acc[i];
            e.score[SCORE_ATTENTION_QUERIES] = seen + queries;
            e.score[SCORE_IMPORTANCE] = total / e.score[SCORE_ATTENTION_QUERIES];
        }
    }
    if (key_.key_norm && m.key_norm_layers_seen > 0) {
        for (size_t j = 0; j < n_new && j < m.key_norm_by_token.size(); ++j) {
            const float norm = m.key_norm_by_token[j] / (float) m.key_norm_layers_seen;
            // Not finite: the lowest score (0 would be the best one, negated norms being at most 0).
            ledger_.at(first_new + j).score[SCORE_IMPORTANCE] = std::isfinite(norm) ? -norm : -std::numeric_limits<float>::max();
        }
    }
    const size_t dim = ledger_.embedding_dim();
    if (key_.hidden_layer >= 0 && m.hidden_seen && dim > 0 && m.hidden_by_token.size() >= n_new * dim) {
        for (size_t j = 0; j < n_new; ++j) {
            float * e = ledger_.embedding_mut(first_new + j);
            std::memcpy(e, m.hidden_by_token.data() + j * dim, sizeof(float) * dim);
            for (size_t d = 0; d < dim; ++d) {
                e[d] = std::isfinite(e[d]) ? e[d] : 0.0f;   // a NaN would break the clustering's orderings
            }
        }
    }
}

} // namespace fml
