#include "probes/chat-probes.h"

#include "engine/tool-calls.h"

#include "chat/turn-state.h"

#include "kv/kv-ops.h"
#include "util/error.h"

#include "llama.h"

#include <chrono>

namespace fml {

// The chat holds a slot, its cache is current and its system prompt is in.
void chat_probes::ready(chat & s, engine & e) {
    if (s.has_turn()) {
        throw fml_error(FML_ERR_BUSY, "chat is busy");
    }
    if (!e.ensure_slot(s)) {
        throw fml_error(FML_ERR_KV, "every slot of the chat's engine is in a turn");
    }
    std::lock_guard<std::mutex> lock(s.mu_);
    s.replay_if_pending(e);   // a ledger restore's tokens, prefilled at its next turn otherwise
    if (!s.started_) {
        const std::vector<int32_t> & sys = s.system_tokens_;
        for (size_t start = 0; start < sys.size(); start += e.n_batch()) {
            const size_t n = std::min<size_t>(e.n_batch(), sys.size() - start);
            if (!e.decode_one(s, sys.data() + start, n, s.ledger_.next_pos(), false)) {
                throw fml_error(FML_ERR_DECODE, "llama_decode failed on the system prompt");
            }
            s.append_decoded(sys.data() + start, n, 0, TOKEN_ROLE_SYSTEM);
        }
        s.started_ = true;
    }
}

// Frees room like a turn would, running a summary to its end when the policy writes one.
void chat_probes::make_room(chat & s, engine & e, size_t incoming) {
    s.turn_ = std::make_unique<chat::turn_state>();
    try {
        while (!s.make_room(incoming, 0, e)) {
            while (s.turn_->summary) {
                const contribution c = s.summary_contribution(e.n_batch());
                if (!e.decode_one(s, c.tokens.data(), c.tokens.size(), c.pos0, false)) {
                    throw fml_error(FML_ERR_DECODE, "llama_decode failed while summarizing");
                }
                if (s.summary_prompt_decoded(c.tokens.size())) {
                    s.summary_decoded(e, (int32_t) c.tokens.size() - 1);
                }
            }
        }
        s.settle_cache(e);   // as a turn's next contribution would: a finished summary left the window to check
    } catch (...) {
        if (s.turn_->summary) {
            s.cancel_summary(e);
        }
        s.turn_.reset();
        throw;
    }
    s.turn_.reset();
}

std::vector<int32_t> chat_probes::summary_prompt(chat & s) {
    std::lock_guard<std::mutex> lock(s.mu_);
    return s.summary_instruction_.empty() ? std::vector<int32_t>{} : s.summary_prompt();
}

int chat_probes::tool_frames_fast(chat & s) {
    return s.tools_ ? (s.tools_->frames_fast() ? 1 : 0) : -1;
}

void chat_probes::set_prepare_hook(chat & s, std::function<void()> hook) {
    s.prepare_hook_ = std::move(hook);
}

std::vector<float> chat_probes::probe_logits(chat & s, engine & e, int32_t token) {
    if (token < 0 || token >= s.model_->info().n_vocab) {
        throw fml_error(FML_ERR_INVALID_OPTION, "token id out of range");
    }
    ready(s, e);
    std::lock_guard<std::mutex> lock(s.mu_);
    make_room(s, e, 1);
    // A hybrid's recurrent layers take the probe token in: their state goes back after.
    const std::vector<uint8_t> recurrent = kv_recurrent_save(e.ctx(), s.slot_);
    const bool ok = e.decode_one(s, &token, 1, s.ledger_.next_pos(), false);
    std::vector<float> out;
    if (ok) {
        const float * logits = llama_get_logits_ith(e.ctx(), -1);
        out.assign(logits, logits + s.model_->info().n_vocab);
    }
    kv_drop_unledgered(e.ctx(), s.slot_, s.ledger_);
    s.restore_recurrent(recurrent, e);
    if (!ok) {
        throw fml_error(FML_ERR_DECODE, "llama_decode failed");
    }
    return out;
}

void chat_probes::window_round_trip(chat & s, engine & e) {
    ready(s, e);
    std::lock_guard<std::mutex> lock(s.mu_);
    if (!kv_window_restore(e.ctx(), s.slot_, s.save_window(e), s.ledger_)) {
        throw fml_error(FML_ERR_KV, "llama.cpp refused the window it had just saved");
    }
}

void chat_probes::shift_positions(chat & s, engine & e, int32_t delta) {
    if (s.has_turn()) {
        throw fml_error(FML_ERR_BUSY, "chat is busy");
    }
    if (!e.ensure_slot(s)) {
        throw fml_error(FML_ERR_KV, "every slot of the chat's engine is in a turn");
    }
    if (!e.can_shift()) {
        throw fml_error(FML_ERR_INVALID_OPTION, "this chat's keys cannot move (keys llama.cpp cannot shift, in a build without llama.cpp's internals)");
    }
    // Every cached position moves by `delta` (RoPE is relative: logits must not change).
    std::lock_guard<std::mutex> lock(s.mu_);
    if (kv_shift_all(e.ctx(), s.slot_, s.ledger_, delta) > 0) {
        e.note_shift();
    }
}

std::vector<float> chat_probes::evaluate_tokens(chat & s, engine & e, const std::vector<int32_t> & tokens, size_t chunk) {
    const int32_t n_vocab = s.model_->info().n_vocab;
    for (int32_t t : tokens) {
        if (t < 0 || t >= n_vocab) {
            throw fml_error(FML_ERR_INVALID_OPTION, "token id out of range");
        }
    }
    ready(s, e);
    std::lock_guard<std::mutex> lock(s.mu_);
    chunk = std::max<size_t>(1, std::min<size_t>({ chunk, s.chunk_, (size_t) e.n_batch() }));
    std::vector<float> out;
    out.reserve(tokens.size() * (size_t) n_vocab);
    for (size_t start = 0; start < tokens.size(); start += chunk) {
        const size_t n = std::min(chunk, tokens.size() - start);
        make_room(s, e, n);
        const uint32_t turn = ++s.turn_no_;
        const size_t first_new = s.ledger_.size();
        // Each chunk is a turn's message, as in a chat: the same horizon for peaks.
        if (!e.decode_one(s, tokens.data() + start, n, s.ledger_.next_pos(), true, true, s.peak_horizon(TOKEN_ROLE_USER, turn))) {
            throw fml_error(FML_ERR_DECODE, "llama_decode failed during evaluation");
        }
        for (size_t i = 0; i < n; ++i) {
            const float * logits = llama_get_logits_ith(e.ctx(), (int32_t) i);
            out.insert(out.end(), logits, logits + n_vocab);
        }
        s.append_decoded(tokens.data() + start, n, turn, TOKEN_ROLE_USER);
        if (e.capture().any() && e.capture().layout_ok()) {
            s.absorb_signals(e.capture().member(0), first_new, n);
        }
    }
    return out;
}

double chat_probes::replay_history(chat & s, engine & e) {
    ready(s, e);
    std::lock_guard<std::mutex> lock(s.mu_);
    const auto t0 = clock_type::now();
    std::vector<int32_t> toks;
    for (const ledger_entry & x : s.ledger_.entries()) {
        toks.push_back(x.token);
    }
    kv_clear_slot(e.ctx(), s.slot_);
    s.ledger_.renumber();
    // Re-decode in the engine's batches (the whole state: a hybrid's recurrent layers start over too);
    // the ledger, numbered 0..n-1, describes the result.
    for (size_t start = 0; start < toks.size(); start += e.n_batch()) {
        const size_t n = std::min<size_t>(e.n_batch(), toks.size() - start);
        if (!e.decode_one(s, toks.data() + start, n, (int32_t) start, false)) {
            throw fml_error(FML_ERR_DECODE, "llama_decode failed while replaying history");
        }
    }
    return ms_since(t0);
}

std::vector<uint8_t> chat_probes::recurrent_state(chat & s, engine & e) {
    ready(s, e);
    std::lock_guard<std::mutex> lock(s.mu_);
    return kv_recurrent_save(e.ctx(), s.slot_);
}

double chat_probes::plain_decode(chat & s, engine & e, int32_t n) {
    ready(s, e);
    std::lock_guard<std::mutex> lock(s.mu_);
    make_room(s, e, (size_t) n + 1);
    const std::vector<uint8_t> recurrent = kv_recurrent_save(e.ctx(), s.slot_);
    sampling_options so;
    so.temperature = 0.0f;
    sampler_chain sampler(so, s.model_->info().n_vocab);
    int32_t pos = s.ledger_.next_pos();
    // Start from a fresh logits row: decode the last token again at the next position.
    int32_t tok = s.ledger_.empty() ? s.model_->bos() : s.ledger_[s.ledger_.size() - 1].token;
    const auto t0 = clock_type::now();
    for (int32_t i = 0; i < n; ++i) {
        if (!e.decode_one(s, &tok, 1, pos++, true)) {
            break;
        }
        tok = llama_sampler_sample(sampler.raw(), e.ctx(), -1);
    }
    const double ms = ms_since(t0);
    kv_drop_unledgered(e.ctx(), s.slot_, s.ledger_);
    s.restore_recurrent(recurrent, e);
    return ms;
}

} // namespace fml
