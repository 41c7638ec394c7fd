#include "engine/sequence.h"

#include "engine/sequence-turn.h"
#include "kv/kv-internals.h"
#include "kv/kv-ops.h"

#include "llama.h"

#include <algorithm>
#include <cstring>

namespace fml {



static double ms_since(clock_type::time_point t0) {
    return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

static clock_type::duration ms_duration(double ms) {
    return std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double, std::milli>(ms));
}

const char * stop_reason_name(stop_reason r) {
    switch (r) {
        case STOP_EOS:        return "eos";
        case STOP_MAX_TOKENS: return "maxTokens";
        case STOP_STRING:     return "stop";
        case STOP_ABORT:      return "abort";
    }
    return "eos";
}

const char * importance_signal_name(importance_signal s) {
    switch (s) {
        case IMPORTANCE_ATTENTION: return "attention";
        case IMPORTANCE_KEY_NORM:  return "keyNorm";
        case IMPORTANCE_NONE:      return "";
    }
    return "";
}

// What the summarizer is asked, as a user message after the history.
static const char * SUMMARY_INSTRUCTION = "Summarize the conversation so far in one or two short sentences.";

static std::atomic<size_t> g_live_sequences{0};
size_t sequence::live_count() { return g_live_sequences.load(); }

sequence::sequence(std::shared_ptr<fml_model> model, const chat_options & opts, int32_t model_threads)
    : model_(std::move(model)), opts_(opts) {
    // Option values were validated by resolve_chat_options (options.cpp); what is checked here
    // depends on the model.
    const policy_options & p = opts_.policy;
    if (!model_->info().in_place_eviction) {
        throw fml_error(FML_ERR_UNSUPPORTED_MODEL, "finite memory cannot run on this model: " + model_->info().unsupported_reason);
    }
    if (opts_.threads > model_threads) {
        throw fml_error(FML_ERR_INVALID_OPTION, "Expected an integer between 1 and " + std::to_string(model_threads) +
                        " (the model's thread budget) for threads but received number " + std::to_string(opts_.threads));
    }
    policy_ = make_policy(p);
    if (model_->add_bos()) {
        system_tokens_.push_back(model_->bos());
    }
    if (!opts_.system_prompt.empty()) {
        const std::vector<int32_t> framed = model_->frame_tokens(frame_kind::system, opts_.system_prompt);
        system_tokens_.insert(system_tokens_.end(), framed.begin(), framed.end());
    }
    check_budget();
    chunk_ = (size_t) std::max(1, std::min<int32_t>(opts_.batch_size, (int32_t) p.max_tokens));

    // Signals the policy needs. Attention weights exist only with flash attention off and need the
    // cell -> position map; otherwise importance uses the key-norm proxy.
    const model_info & mi = model_->info();
    int32_t fa = opts_.flash_attention;
    if (policy_->needs_importance()) {
        // Sliding-window layers index their attention by the window cache's cells, which the cell
        // map does not describe: those models use the key-norm proxy.
        if (fa != 1 && kv_internals_available() && mi.sliding_window == 0) {
            signal_ = IMPORTANCE_ATTENTION;
            fa = 0;
            key_.attention = true;
        } else {
            signal_ = IMPORTANCE_KEY_NORM;
            key_.key_norm = true;
        }
    }
    if (opts_.kv_type == "q8_0") {
        if (fa == 0) {
            throw fml_error(FML_ERR_INVALID_OPTION, "kvType q8_0 needs flash attention (the quantized V cache requires it)");
        }
        fa = 1;
    }
    if (fa < 0 && mi.backend == "cpu") {
        // llama.cpp's automatic choice is "on"; on the CPU that measured slower per decode step for
        // every model here (bench/flash-attention.ts), so CPU chats run with it off unless asked.
        fa = 0;
    }
    if (policy_->needs_embeddings()) {
        // A middle layer: the last one is pruned to the output rows, and middle layers carry more
        // topical (less next-token-specific) information.
        key_.hidden_layer = std::max(0, std::min(mi.n_layer - 2, mi.n_layer / 2));
        ledger_.set_embedding_dim((size_t) mi.n_embd);
    }
    uint32_t scratch = 0;
    if (policy_->summarizes()) {
        summary_instruction_ = model_->frame_tokens(frame_kind::user, SUMMARY_INSTRUCTION);
        scratch = (uint32_t) summary_instruction_.size() + p.summary_tokens + 8;
    }
    // Streams of one engine are equally long: round up so that nearby budgets share an engine.
    key_.cells = (p.max_tokens + scratch + 255) / 256 * 256;
    scratch_ = scratch;
    // Positions: a limit below the budget and its scratch could not hold even a compacted chat; one
    // above the trained context would run the model on positions it never saw.
    if (!opts_.keep_positions && !mi.can_shift) {
        throw fml_error(FML_ERR_INVALID_OPTION, "positions 'compact' needs keys that can shift, and architecture " + mi.architecture +
                        " uses " + mi.rope + " positions (M-RoPE), which llama.cpp cannot shift: use positions 'keep'");
    }
    const uint32_t trained = std::max<uint32_t>((uint32_t) std::max(0, mi.n_ctx_train), p.max_tokens + scratch);
    const uint32_t floor = p.max_tokens + scratch;
    if (opts_.position_limit > 0 && (opts_.position_limit < floor || opts_.position_limit > trained)) {
        throw fml_error(FML_ERR_INVALID_OPTION, "Expected an integer between " + std::to_string(floor) + " (maxTokens plus " +
                        std::to_string(scratch) + " summary scratch) and " + std::to_string(trained) +
                        " (the model's trained context) for positionLimit but received number " + std::to_string(opts_.position_limit));
    }
    position_limit_ = (int32_t) (opts_.position_limit > 0 ? opts_.position_limit : trained);
    // A quantized cache stores each head in blocks of 32 values: llama.cpp would refuse the context
    // at the first turn ("block size 32 does not divide n_embd_head_k"); refuse the chat now.
    if (opts_.kv_type == "q8_0" && (mi.n_embd_head_k % 32 != 0 || mi.n_embd_head_v % 32 != 0)) {
        throw fml_error(FML_ERR_INVALID_OPTION, "kvType 'q8_0' stores each attention head in blocks of 32 values, and this model's heads have " +
                        std::to_string(mi.n_embd_head_k) + " (keys) and " + std::to_string(mi.n_embd_head_v) + " (values): use kvType 'f16' or 'f32'");
    }
    key_.kv_type = opts_.kv_type;
    key_.flash_attention = fa;
    key_.threads = opts_.threads;
    key_.n_batch = std::max<uint32_t>(512, 1u << (32 - __builtin_clz((uint32_t) std::max<size_t>(1, chunk_ - 1))));
    g_live_sequences++;
}

sequence::~sequence() {
    g_live_sequences--;
}

// ---- budget and framing (JS thread, no shared state) ----

frame_kind sequence::next_user_frame() const {
    // Until a first user message is in, a template that merges the system prompt into it frames
    // that message without its usual opening.
    std::lock_guard<std::mutex> lock(mu_);
    if (turn_no_ > 0) {
        return frame_kind::user;
    }
    return opts_.system_prompt.empty() ? frame_kind::first_user : frame_kind::first_user_after_system;
}

size_t sequence::count_turn_tokens(const std::string & user_text) const {
    return model_->frame_tokens(next_user_frame(), user_text).size();
}

size_t sequence::pinned_after_start() const {
    // Sinks are the first tokens of the sequence, so once a turn is in, max(system prompt, sinks) are pinned.
    return std::max(started_ ? ledger_.pinned_count() : system_tokens_.size(), (size_t) opts_.policy.sink_tokens);
}

void sequence::check_budget() {
    // The smallest turn a chat must always be able to take: the carried end of the previous reply
    // (its last sampled token and the template's end-of-turn), a one-token message in its framing,
    // and one reply token, on top of the pinned prefix (system prompt and attention sinks). Summaries
    // take whatever room an eviction frees beyond that, so they add nothing here.
    closing_tokens_ = model_->frame_message(frame_kind::assistant).suffix_tokens;
    const size_t pinned = pinned_after_start();
    const size_t carry = 1 + closing_tokens_.size();
    const size_t framing = std::max(model_->frame_tokens(frame_kind::user, "x").size(),
                                    model_->frame_tokens(opts_.system_prompt.empty() ? frame_kind::first_user : frame_kind::first_user_after_system, "x").size());
    turn_floor_ = carry + framing + 1;
    const size_t required = pinned + turn_floor_;
    if (required <= opts_.policy.max_tokens) {
        return;
    }
    const std::string why = "maxTokens " + std::to_string(opts_.policy.max_tokens) + " cannot hold a turn of this chat: " +
        std::to_string(pinned) + " pinned tokens (system prompt " + std::to_string(system_tokens_.size()) + ", attention sinks " +
        std::to_string(opts_.policy.sink_tokens) + "), " + std::to_string(framing) + " for a one-token message in the chat template, " +
        std::to_string(carry) + " carried from the previous reply and 1 to reply: maxTokens must be at least " + std::to_string(required);
    // The system prompt is what does not fit when the same chat without it would: the prompt is too
    // large. Otherwise the budget is too small for this model's framing.
    const size_t without_system = std::max((size_t) (model_->add_bos() ? 1 : 0), (size_t) opts_.policy.sink_tokens) + carry + framing + 1;
    throw fml_error(!opts_.system_prompt.empty() && without_system <= opts_.policy.max_tokens ? FML_ERR_PROMPT_TOO_LARGE : FML_ERR_INVALID_OPTION, why);
}

turn_request sequence::prepare_turn(const std::string & user_text, generation_options gen, bool pin) {
    turn_request req;
    req.framed = model_->frame_tokens(next_user_frame(), user_text);
    req.gen = std::move(gen);
    req.pin = pin;
    std::lock_guard<std::mutex> lock(mu_);
    const size_t budget = opts_.policy.max_tokens;
    const size_t prompt = carry_.size() + req.framed.size();
    const size_t pinned = pinned_after_start();
    if (pin && pinned + req.framed.size() + turn_floor_ > budget) {
        throw fml_error(FML_ERR_PIN_LIMIT,
                        "pinning this message (" + std::to_string(req.framed.size()) + " tokens) would leave " + std::to_string(pinned) +
                        " pinned tokens plus it in maxTokens " + std::to_string(budget) + ", and the next turn needs " +
                        std::to_string(turn_floor_) + " more: unpin or forget a turn, or raise maxTokens");
    }
    if (pinned + prompt + 1 > budget) {
        throw fml_error(FML_ERR_PROMPT_TOO_LARGE,
                        "the message needs " + std::to_string(req.framed.size()) + " tokens but maxTokens " + std::to_string(budget) +
                        " leaves room for " + std::to_string(budget - std::min(budget, pinned + carry_.size() + 1)) + " after pinned tokens");
    }
    return req;
}

turn_request sequence::prepare_ingest(const std::string & user_text, const std::string & assistant_text) {
    turn_request req;
    req.ingest = true;
    req.framed = model_->frame_tokens(next_user_frame(), user_text);
    // The reply as the template renders it (its opening and content); its closing is carried into
    // the next turn, as after a generated reply.
    req.reply = model_->frame_tokens(frame_kind::assistant, assistant_text, false);
    std::lock_guard<std::mutex> lock(mu_);
    const size_t budget = opts_.policy.max_tokens;
    const size_t pinned = pinned_after_start();
    if (pinned + carry_.size() + req.framed.size() + 1 > budget || pinned + req.reply.size() + 1 > budget) {
        throw fml_error(FML_ERR_PROMPT_TOO_LARGE, "a transcript message does not fit in maxTokens");
    }
    return req;
}

// ---- JS-thread views ----

void sequence::reset() {
    std::lock_guard<std::mutex> lock(mu_);
    ledger_.clear();
    carry_.clear();
    summary_text_.clear();
    turn_no_ = 0;
    started_ = false;
    cumulative_ = cumulative_stats{};
    parked_ = false;
    parked_kv_.clear();
    replay_pending_ = false;
    transcript_.clear();
    reset_pending_ = slot_ >= 0;
}

std::vector<memory_entry> sequence::memory() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<memory_entry> out;
    out.reserve(ledger_.size());
    for (const auto & e : ledger_.entries()) {
        out.push_back({ e.token, e.pos, e.turn, e.role, e.pinned, e.score[SCORE_IMPORTANCE], model_->token_piece(e.token, true) });
    }
    return out;
}

bool sequence::user_owned(size_t index) const {
    return ledger_[index].role != TOKEN_ROLE_SYSTEM && index >= opts_.policy.sink_tokens;
}

bool sequence::unpinnable(size_t index) const {
    return ledger_[index].pinned && user_owned(index);
}

size_t sequence::pin_turn(uint32_t turn, bool with_reply) {
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

size_t sequence::unpin_turn(uint32_t turn) {
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

std::vector<std::pair<uint32_t, size_t>> sequence::pinned_turns() const {
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

size_t sequence::forget_turn(uint32_t turn, step_context & e) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<bool> drop(ledger_.size(), false);
    for (size_t i = 0; i < ledger_.size(); ++i) {
        drop[i] = ledger_[i].turn == turn && user_owned(i);
    }
    const std::vector<index_range> ranges = ranges_from_mask(drop);
    if (ranges.empty()) {
        return 0;
    }
    for (const index_range & r : ranges) {
        for (size_t i = r.begin; i < r.end; ++i) {
            ledger_.at(i).pinned = false;   // forgetting a pinned turn releases its pin first
        }
    }
    const kv_eviction_result res = kv_evict_ranges(e.ctx(), slot_, ledger_, ranges);
    cumulative_.tokens_evicted += res.evicted;
    cumulative_.evictions++;
    if (!opts_.keep_positions) {
        compact(e);
    }
    return res.evicted;
}

cumulative_stats sequence::stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return cumulative_;
}

size_t sequence::retained_tokens() const {
    std::lock_guard<std::mutex> lock(mu_);
    return ledger_.size();
}

uint64_t sequence::kv_bytes() const {
    // Bytes the retained tokens occupy: per attention layer, a K and a V row of n_head_kv * head_dim
    // elements (a hybrid's recurrent state is extra and fixed: model.info.recurrentBytes).
    const double elem = opts_.kv_type == "f32" ? 4.0 : opts_.kv_type == "q8_0" ? 34.0 / 32.0 : 2.0;
    return (uint64_t) ((double) retained_tokens() * (double) model_->info().kv_values_per_token * elem);
}

std::string sequence::summary_text() const {
    std::lock_guard<std::mutex> lock(mu_);
    return summary_text_;
}

void sequence::adopt_state(chat_state && s) {
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
    const bool ordered = ledger_.positions_increasing() && (ledger_.empty() || ledger_.next_pos() <= position_limit_);
    if (!ordered || (!opts_.keep_positions && !ledger_.empty() && ledger_[ledger_.size() - 1].pos != ledger_[0].pos + (int32_t) ledger_.size() - 1)) {
        ledger_.clear();
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the checkpoint's token positions are negative, out of order, past the position limit "
                        "or (positions 'compact') not consecutive");
    }
    turn_no_ = s.turn;
    started_ = s.started;
    carry_ = std::move(s.carry);
    summary_text_ = std::move(s.summary_text);
    cumulative_ = s.stats;
    transcript_ = std::move(s.transcript);
    parked_kv_ = std::move(s.kv);
    // A ledger-only checkpoint's tokens are prefilled when the chat gets a slot (unpark).
    replay_pending_ = s.ledger_only && !ledger_.empty();
    parked_ = !parked_kv_.empty() || replay_pending_;
}

// ---- slots ----

void sequence::park(llama_context * ctx) {
    std::lock_guard<std::mutex> lock(mu_);
    if (reset_pending_) {
        reset_pending_ = false;   // the slot's cells are stale: nothing to keep
        parked_kv_.clear();
        parked_ = false;
    } else if (!ledger_.empty()) {
        parked_kv_ = kv_state_save(ctx, slot_);
        parked_ = true;
    }
    kv_clear_slot(ctx, slot_);
    slot_ = -1;
}

void sequence::unpark(step_context & e) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!parked_) {
        return;
    }
    llama_context * ctx = e.ctx();
    try {
        if (replay_pending_) {
            replay_ledger(e);
            replay_pending_ = false;
            parked_ = false;
            return;
        }
        kv_state_load(ctx, slot_, e.streams(), parked_kv_);
        // The cache and the ledger must agree, or the state is not what it claims.
        const int32_t expect_max = ledger_.empty() ? -1 : ledger_[ledger_.size() - 1].pos;
        const int32_t expect_min = ledger_.empty() ? -1 : ledger_[0].pos;
        if (kv_pos_max(ctx, slot_) != expect_max || kv_pos_min(ctx, slot_) != expect_min) {
            throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "the checkpoint's KV state and token ledger disagree");
        }
    } catch (...) {
        kv_clear_slot(ctx, slot_);
        ledger_.clear();
        carry_.clear();
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

void sequence::replay_ledger(step_context & e) {
    // The retained tokens, prefilled at 0..n-1 in the engine's batches: the same memory as the chat
    // that was saved (tokens, turns, roles, pins, scores), its positions compacted; a hybrid's
    // recurrent state is rebuilt from these tokens alone.
    kv_clear_slot(e.ctx(), slot_);
    std::vector<int32_t> tokens;
    for (const ledger_entry & x : ledger_.entries()) {
        tokens.push_back(x.token);
    }
    ledger_.renumber();
    for (size_t start = 0; start < tokens.size(); start += e.n_batch()) {
        const size_t n = std::min<size_t>(e.n_batch(), tokens.size() - start);
        if (!e.decode_one(*this, tokens.data() + start, n, (int32_t) start, false)) {
            throw fml_error(FML_ERR_DECODE, "llama_decode failed while prefilling a ledger-only checkpoint's tokens");
        }
    }
}

void sequence::sync_after_reset(llama_context * ctx) {
    std::lock_guard<std::mutex> lock(mu_);
    if (reset_pending_ && slot_ >= 0) {
        kv_clear_slot(ctx, slot_);
    }
    reset_pending_ = false;
}

cache_view sequence::view(llama_context * ctx) const {
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
    if (ctx != nullptr && slot_ >= 0 && !reset_pending_) {
        v.cache_pos_min = kv_pos_min(ctx, slot_);
        v.cache_pos_max = kv_pos_max(ctx, slot_);
        v.scratch_pos_max = v.cache_pos_max >= ledger_.next_pos() ? v.cache_pos_max : -1;
    } else if (!ledger_.empty()) {
        // Parked: the state is off the cache; report the ledger's view of it.
        v.cache_pos_min = ledger_[0].pos;
        v.cache_pos_max = ledger_[ledger_.size() - 1].pos;
    }
    return v;
}

// ---- turns (scheduler thread) ----

void sequence::begin_turn(turn_request && req) {
    std::lock_guard<std::mutex> lock(mu_);
    auto t = std::make_unique<turn_state>();
    t->t_start = clock_type::now();
    t->turn_no = turn_no_ + 1;
    t->result.stats.policy = policy_->name();
    const size_t budget = opts_.policy.max_tokens;
    // Amortise: when evicting anyway, free room for part of the reply too.
    t->prefill_slack = req.ingest ? 0 : std::min<size_t>((size_t) std::max(req.gen.max_new_tokens, 1), budget / 8);
    t->gen_chunk = std::max<size_t>(1, budget / 16);
    if (!started_ && !system_tokens_.empty()) {
        t->segments.push_back({ system_tokens_, 0, TOKEN_ROLE_SYSTEM, false, true });
    }
    // The carried tokens close the previous assistant turn; they belong to it in the ledger.
    if (!carry_.empty()) {
        t->segments.push_back({ carry_, t->turn_no - 1, TOKEN_ROLE_ASSISTANT, true, false });
    }
    t->carry_before = carry_;
    t->segments.push_back({ req.framed, t->turn_no, TOKEN_ROLE_USER, carry_.empty(), false });
    if (req.ingest && !req.reply.empty()) {
        t->segments.push_back({ req.reply, t->turn_no, TOKEN_ROLE_ASSISTANT, true, false });
    }
    if (signal_ != IMPORTANCE_NONE && opts_.policy.importance_decay < 1.0f) {
        for (size_t i = 0; i < ledger_.size(); ++i) {
            ledger_.at(i).score[SCORE_IMPORTANCE] *= opts_.policy.importance_decay;
        }
    }
    t->req = std::move(req);
    if (!started_ && system_tokens_.empty()) {
        started_ = true;
    }
    turn_ = std::move(t);
    last_used_ = clock_type::now();
}

size_t sequence::wants(clock_type::time_point now) const {
    if (!turn_ || now < ready_at_) {
        return 0;
    }
    if (turn_->summary) {
        const summary_job & j = *turn_->summary;
        return j.instruction_done < summary_instruction_.size() ? summary_instruction_.size() - j.instruction_done : 1;
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

contribution sequence::take(size_t budget, step_context & e) {
    std::lock_guard<std::mutex> lock(mu_);
    turn_state & t = *turn_;
    contribution c;
    try {
        if (slot_ < 0) {
            throw fml_error(FML_ERR_INTERNAL, "a chat without a slot was asked for tokens");
        }
        if (t.summary) {
            return summary_contribution(budget);
        }
        if (t.generating) {
            if (!make_room(1, t.gen_chunk, e)) {
                return summary_contribution(budget);
            }
            c.tokens.push_back(t.pending);
            c.pos0 = ledger_.next_pos();
            c.logits_last = true;
            t.inflight.assign(1, { TOKEN_ROLE_ASSISTANT, t.turn_no });
            return c;
        }
        // Prefill: room for the whole message first (once), then chunks of at most `chunk_`.
        turn_state::segment & s = t.segments[t.seg];
        if (s.room && t.off == 0 && t.room_made_for != t.seg) {
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
            t.ledger_before = ledger_.size();
            t.recurrent = kv_recurrent_save(e.ctx(), slot_);
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
        return c;
    } catch (const fml_error & err) {
        fail_turn(err, e);
        return contribution{};
    }
}

contribution sequence::summary_contribution(size_t budget) {
    summary_job & j = *turn_->summary;
    contribution c;
    c.scratch = true;
    c.logits_last = true;
    if (j.instruction_done < summary_instruction_.size()) {
        const size_t n = std::min({ budget, chunk_, summary_instruction_.size() - j.instruction_done });
        c.tokens.assign(summary_instruction_.begin() + (long) j.instruction_done, summary_instruction_.begin() + (long) (j.instruction_done + n));
        c.pos0 = j.instruction_pos0 + (int32_t) j.instruction_done;
        c.logits_last = j.instruction_done + n == summary_instruction_.size();
    } else {
        c.tokens.push_back(j.tokens.back());
        c.pos0 = j.instruction_pos0 + (int32_t) summary_instruction_.size() + (int32_t) j.tokens.size() - 1;
    }
    return c;
}

void sequence::decoded(const contribution & c, size_t from, size_t to, int32_t logits_row, const capture_member * signals, step_context & e) {
    std::lock_guard<std::mutex> lock(mu_);
    turn_state & t = *turn_;
    const auto now = clock_type::now();
    last_used_ = now;
    if (opts_.test_token_delay_ms > 0) {
        ready_at_ = now + ms_duration(opts_.test_token_delay_ms);
    }
    if (c.scratch) {
        summary_job & j = *t.summary;
        if (to < c.tokens.size()) {
            return;
        }
        if (j.instruction_done < summary_instruction_.size()) {
            j.instruction_done += c.tokens.size();
            if (j.instruction_done < summary_instruction_.size()) {
                return;
            }
        }
        summary_decoded(e, logits_row);
        return;
    }
    const size_t first_new = ledger_.size();
    for (size_t i = from; i < to; ++i) {
        const auto [role, turn] = t.inflight[i];
        append_decoded(&c.tokens[i], 1, turn, role, t.req.pin && role == TOKEN_ROLE_USER && turn == t.turn_no);
    }
    if (signals != nullptr) {
        absorb_signals(*signals, first_new, to - from);
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
    turn_no_ = t.turn_no;
    if (t.req.ingest) {
        carry_ = closing_tokens_;
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

void sequence::start_generation() {
    turn_state & t = *turn_;
    t.generating = true;
    t.sampler = std::make_unique<sampler_chain>(t.req.gen.sampling, model_->info().n_vocab,
                                                t.req.gen.ignore_eos ? model_->eog_tokens() : std::vector<int32_t>{});
    t.stream = std::make_unique<text_stream>(t.req.gen.stop);
    t.t_generate = clock_type::now();
}

void sequence::sample_next(step_context & e, int32_t logits_row) {
    turn_state & t = *turn_;
    turn_stats & st = t.result.stats;
    const int32_t tok = llama_sampler_sample(t.sampler->raw(), e.ctx(), logits_row);
    if (!t.first_token) {
        t.first_token = true;
        st.first_token_ms = ms_since(t.t_start);
    }
    t.pending = -1;
    if (model_->is_eog(tok)) {
        finish_turn(STOP_EOS, e);
        return;
    }
    st.generated_tokens++;
    const std::string out = t.stream->push(model_->token_piece(tok, false));
    if (!out.empty() && t.req.cb.on_piece) {
        t.req.cb.on_piece(out);
    }
    t.pending = tok;
    if (t.stream->stopped()) {
        finish_turn(STOP_STRING, e);
    } else if ((int32_t) st.generated_tokens >= t.req.gen.max_new_tokens) {
        finish_turn(STOP_MAX_TOKENS, e);
    } else if (abort_.load()) {
        finish_turn(STOP_ABORT, e);
    }
}

void sequence::finish_turn(stop_reason reason, step_context & e) {
    (void) e;
    std::unique_ptr<turn_state> t = std::move(turn_);
    turn_result & r = t->result;
    turn_stats & st = r.stats;
    r.reason = reason;
    // The turn's number in the ledger (what pin/unpin/forget take); 0 when it never got in.
    st.turn = turn_no_ == t->turn_no ? t->turn_no : 0;
    if (t->stream) {
        if (reason != STOP_STRING) {
            const std::string rest = t->stream->finish();
            if (!rest.empty() && t->req.cb.on_piece) {
                t->req.cb.on_piece(rest);
            }
        }
        r.response = t->stream->text();
        st.decode_ms = ms_since(t->t_generate);
        st.tokens_per_second = st.decode_ms > 0 ? st.generated_tokens * 1000.0 / st.decode_ms : 0;
        // Close the assistant turn next time: the undecoded last token plus the template's end-of-turn.
        carry_.clear();
        if (t->pending >= 0) {
            carry_.push_back(t->pending);
        }
        carry_.insert(carry_.end(), closing_tokens_.begin(), closing_tokens_.end());
    }
    st.retained_tokens = (uint32_t) ledger_.size();
    st.latency_ms = ms_since(t->t_start);
    cumulative_.turns++;
    abort_.store(false);
    if (t->req.cb.on_done) {
        t->req.cb.on_done(std::move(r));
    }
}

void sequence::abort_turn(step_context & e) {
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

void sequence::decode_failed(const fml_error & err, step_context & e) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!turn_) {
        return;
    }
    // Drop whatever ubatches of the failed decode reached the cache, so cache == ledger again. A
    // recurrent state cannot drop them: the turn goes back to its snapshot.
    if (slot_ >= 0) {
        kv_drop_unledgered(e.ctx(), slot_, ledger_);
    }
    fail_turn(err, e, slot_ >= 0 && kv_has_recurrent(e.ctx()));
}

void sequence::fail_unstarted(const fml_error & err) {
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
        r.stats.latency_ms = ms_since(done->t_start);
        if (done->req.cb.on_done) {
            done->req.cb.on_done(std::move(r));
        }
    } else if (done->req.cb.on_error) {
        done->req.cb.on_error(err.code() == FML_ERR_ABORTED ? fml_error(FML_ERR_ABORTED, "the transcript import was aborted") : err);
    }
}

void sequence::fail_turn(const fml_error & err, step_context & e, bool state_lost) {
    std::unique_ptr<turn_state> & t = turn_;
    if (t->summary) {
        cancel_summary(e);
    }
    const bool aborted = err.code() == FML_ERR_ABORTED;
    if (t->generating && !state_lost) {
        // Generation already started: what was generated stays (like an abort).
        if (aborted) {
            finish_turn(STOP_ABORT, e);
            return;
        }
    } else if (t->rollback_set) {
        rollback_to(t->ledger_before, e);    // the turn's own tokens go; evictions already done stay done
        if (turn_no_ == t->turn_no) {
            // Its prompt was in (a state lost mid-reply): the turn never happened.
            turn_no_ = t->turn_no - 1;
            carry_ = t->carry_before;
        }
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
        r.stats.latency_ms = ms_since(done->t_start);
        if (done->req.cb.on_done) {
            done->req.cb.on_done(std::move(r));
        }
        return;
    }
    if (done->req.cb.on_error) {
        done->req.cb.on_error(aborted ? fml_error(FML_ERR_ABORTED, "the transcript import was aborted") : err);
    }
}

void sequence::rollback_to(size_t keep, step_context & e) {
    // Tokens decoded and then rolled back (an aborted prefill, a probe) were never part of the
    // conversation: the counters must say what the cache holds and what it saw.
    if (slot_ < 0) {
        return;   // nothing of this turn reached a cache
    }
    const size_t removed = ledger_.size() > keep ? ledger_.size() - keep : 0;
    kv_truncate(e.ctx(), slot_, ledger_, keep);
    cumulative_.tokens_seen -= std::min<uint64_t>(cumulative_.tokens_seen, removed);
    if (keep == 0) {
        kv_clear_slot(e.ctx(), slot_);
    } else if (turn_ && turn_->rollback_set) {
        restore_recurrent(turn_->recurrent, e);
    }
}

void sequence::restore_recurrent(const std::vector<uint8_t> & snapshot, step_context & e) {
    kv_recurrent_restore(e.ctx(), slot_, snapshot, ledger_.empty() ? -1 : ledger_[ledger_.size() - 1].pos);
}

std::vector<index_range> sequence::position_ranges(const std::vector<index_range> & ranges) const {
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

void sequence::append_decoded(const int32_t * tokens, size_t n, uint32_t turn, token_role role, bool pin) {
    for (size_t i = 0; i < n; ++i) {
        const bool sink = ledger_.size() < opts_.policy.sink_tokens;
        const std::string piece = model_->token_piece(tokens[i], false);
        const bool sentence_end = !piece.empty() && strchr(".!?\n", piece.back()) != nullptr;
        ledger_.append(tokens[i], turn, role, pin || role == TOKEN_ROLE_SYSTEM || sink, sentence_end);
    }
    cumulative_.tokens_seen += n;
}

void sequence::absorb_signals(const capture_member & m, size_t first_new, size_t n_new) {
    if (key_.attention && m.attention_layers_seen > 0) {
        // Attention received, summed over heads and layers, then divided by the number of queries
        // that could attend to the token: a plain sum (H2O) favours old tokens just for having been
        // seen by more queries, which evicts the recent context a small model depends on.
        // score[ATTENTION_QUERIES] keeps the running count of queries so the average can be updated
        // incrementally. Cells map to ledger entries through their positions (cells of no entry:
        // summary scratch).
        std::vector<float> acc(ledger_.size(), 0.0f);
        std::vector<float> peak(ledger_.size(), 0.0f);
        for (size_t c = 0; c < m.cell_pos.size() && c < m.attention_by_cell.size(); ++c) {
            const size_t i = m.cell_pos[c] >= 0 ? ledger_.index_of_pos(m.cell_pos[c]) : ledger_.size();
            if (i < ledger_.size()) {
                acc[i] += m.attention_by_cell[c];
                peak[i] = std::max(peak[i], m.peak_by_cell[c]);
            }
        }
        for (size_t i = 0; i < ledger_.size(); ++i) {
            ledger_entry & e = ledger_.at(i);
            if (opts_.policy.importance_peak) {
                // Peaks decay with importanceDecay (begin_turn) and are raised by new ones.
                e.score[SCORE_IMPORTANCE] = std::max(e.score[SCORE_IMPORTANCE], peak[i]);
                continue;
            }
            const float queries = i < first_new ? (float) n_new : (float) (n_new - (i - first_new));
            const float seen = e.score[SCORE_ATTENTION_QUERIES];
            const float total = e.score[SCORE_IMPORTANCE] * seen + acc[i];
            e.score[SCORE_ATTENTION_QUERIES] = seen + queries;
            e.score[SCORE_IMPORTANCE] = total / e.score[SCORE_ATTENTION_QUERIES];
        }
    }
    if (key_.key_norm && m.key_norm_layers_seen > 0) {
        for (size_t j = 0; j < n_new && j < m.key_norm_by_token.size(); ++j) {
            ledger_.at(first_new + j).score[SCORE_IMPORTANCE] = -m.key_norm_by_token[j] / (float) m.key_norm_layers_seen;
        }
    }
    const size_t dim = ledger_.embedding_dim();
    if (key_.hidden_layer >= 0 && m.hidden_seen && dim > 0 && m.hidden_by_token.size() >= n_new * dim) {
        for (size_t j = 0; j < n_new; ++j) {
            std::memcpy(ledger_.embedding_mut(first_new + j), m.hidden_by_token.data() + j * dim, sizeof(float) * dim);
        }
    }
}

// ---- eviction ----

bool sequence::make_room(size_t incoming, size_t slack, step_context & e) {
    const size_t budget = opts_.policy.max_tokens;
    // Positions take the slack only before a reply: mid-reply, compacting early would stall its stream.
    const size_t position_slack = turn_ && turn_->generating ? 0 : slack;
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
    if (policy_->summarizes()) {
        need = std::min(evictable, need + opts_.policy.summary_tokens);
    }
    if (!evict({ need, std::min(evictable, need + slack) }, hard_need, e)) {
        return false;
    }
    if (ledger_.size() + incoming > budget) {
        throw fml_error(FML_ERR_INTERNAL, "eviction left the budget exceeded");
    }
    fit_positions(incoming, position_slack, e);
    return true;
}

void sequence::fit_positions(size_t incoming, size_t slack, step_context & e) {
    // Positions that are 0..n-1 already cannot get lower (and compact mode keeps them so).
    if ((int64_t) ledger_.next_pos() + (int64_t) (incoming + slack) <= position_limit_ || ledger_.positions_contiguous()) {
        return;
    }
    compact(e);
    if ((int64_t) ledger_.next_pos() + (int64_t) incoming > position_limit_) {
        throw fml_error(FML_ERR_INTERNAL, "a compaction left the position limit exceeded");
    }
}

void sequence::compact(step_context & e) {
    const auto t0 = clock_type::now();
    llama_context * ctx = e.ctx();
    if (e.can_shift()) {
        if (kv_compact_by_shift(ctx, slot_, ledger_) > 0) {
            e.note_shift();
        }
    } else {
        // Keys that cannot shift are recomputed where they go: the retained tokens, re-prefilled once at
        // 0..n-1 (at most maxTokens, once per positionLimit - maxTokens positions). The recurrent state
        // of a hybrid must not see them twice, and a failed decode must leave the chat as it was.
        const std::vector<uint8_t> before = kv_state_save(ctx, slot_);
        const std::vector<uint8_t> recurrent = kv_recurrent_save(ctx, slot_);
        std::vector<int32_t> tokens;
        std::vector<int32_t> positions;
        for (const ledger_entry & x : ledger_.entries()) {
            tokens.push_back(x.token);
            positions.push_back(x.pos);
        }
        kv_clear_for_reprefill(ctx, slot_, ledger_);
        for (size_t start = 0; start < tokens.size(); start += e.n_batch()) {
            const size_t n = std::min<size_t>(e.n_batch(), tokens.size() - start);
            if (!e.decode_one(*this, tokens.data() + start, n, (int32_t) start, false)) {
                kv_state_load(ctx, slot_, e.streams(), before);
                for (size_t i = 0; i < positions.size(); ++i) {
                    ledger_.at(i).pos = positions[i];
                }
                throw fml_error(FML_ERR_DECODE, "llama_decode failed while re-prefilling the retained tokens at the position limit");
            }
        }
        restore_recurrent(recurrent, e);
    }
    cumulative_.compactions++;
    if (turn_) {
        turn_->result.stats.compactions++;
        turn_->result.stats.compact_ms += ms_since(t0);
    }
}

bool sequence::evict(const eviction_request & req, size_t hard_need, step_context & e) {
    // Latency guard: a policy that throws or takes longer than max_policy_ms is replaced by sliding
    // for this eviction, and the fallback is counted. The test hook adds its delay to the measured
    // time and holds the chat back that long (without stalling the other chats of the engine).
    turn_stats & st = turn_->result.stats;
    auto t0 = clock_type::now();
    eviction_plan plan;
    bool fallback = false;
    try {
        plan = policy_->plan(ledger_, req);
        if (plan.total() < req.need) {
            fallback = true;
        }
    } catch (const std::exception &) {
        fallback = true;
    }
    const double elapsed = ms_since(t0) + opts_.test_policy_delay_ms;
    if (opts_.test_policy_delay_ms > 0) {
        ready_at_ = clock_type::now() + ms_duration(opts_.test_policy_delay_ms);
    }
    if (opts_.max_policy_ms > 0 && elapsed > opts_.max_policy_ms) {
        fallback = true;
    }
    if (fallback) {
        plan = plan_oldest_first(ledger_, req, opts_.policy.window_size);
        st.fallback = true;
        cumulative_.fallback_count++;
    }
    const double policy_ms = ms_since(t0) + opts_.test_policy_delay_ms;
    st.policy_ms += policy_ms;
    eviction_record rec;
    rec.policy_ms = policy_ms;
    rec.fallback = fallback;
    rec.during_generation = turn_->generating;

    const size_t freed = plan.total();
    const uint32_t max_summary = (uint32_t) std::min<size_t>(opts_.policy.summary_tokens, freed > hard_need ? freed - hard_need : 0);
    if (plan.summarize && max_summary > 0 && !summary_instruction_.empty()) {
        // The summary takes what the eviction frees beyond what the incoming tokens need (a small
        // budget can leave less than summaryTokens); it is written first, the eviction happens after.
        // The scratch (instruction + summary) goes after the history: below the position limit.
        fit_positions(summary_instruction_.size() + max_summary, 0, e);
        auto j = std::make_unique<summary_job>();
        j->ranges = normalize_ranges(plan.ranges);
        j->max_tokens = max_summary;
        j->instruction_pos0 = ledger_.next_pos();
        j->recurrent = kv_recurrent_save(e.ctx(), slot_);
        j->t0 = clock_type::now();
        j->rec = std::move(rec);
        sampling_options so;
        so.temperature = 0.0f;          // summaries are greedy: deterministic, no seed needed
        so.repeat_penalty = 1.1f;
        j->sampler = std::make_unique<sampler_chain>(so, model_->info().n_vocab);
        turn_->summary = std::move(j);
        return false;
    }
    t0 = clock_type::now();
    rec.positions = position_ranges(plan.ranges);   // positions before the eviction
    const kv_eviction_result res = kv_evict_ranges(e.ctx(), slot_, ledger_, plan.ranges);
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
    return true;
}

void sequence::summary_decoded(step_context & e, int32_t logits_row) {
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

void sequence::finish_summary(step_context & e) {
    std::unique_ptr<summary_job> j = std::move(turn_->summary);
    turn_stats & st = turn_->result.stats;
    std::vector<ledger_entry> items;
    const uint32_t turn = ledger_[j->ranges.front().begin].turn;
    for (int32_t tok : j->tokens) {
        ledger_entry it{};
        it.token = tok;
        it.turn = turn;
        it.role = TOKEN_ROLE_SUMMARY;
        items.push_back(it);
    }
    const auto t0 = clock_type::now();
    // Kept positions: the summary moves into the first evicted gap (one K-shift), or stays where the
    // model wrote it when keys cannot shift; otherwise (compact mode, or a gap too small) every
    // position is renumbered with it.
    const summary_placement placement = !opts_.keep_positions ? summary_placement::compacted
                                        : !e.can_shift()      ? summary_placement::after_history
                                        : summary_fits_gap(ledger_, j->ranges, items.size()) ? summary_placement::in_gap
                                                                                            : summary_placement::compacted;
    eviction_record & rec = j->rec;
    rec.positions = position_ranges(j->ranges);
    const kv_eviction_result res = kv_evict_and_insert(e.ctx(), slot_, ledger_, j->ranges, placement, j->instruction_pos0,
                                                       j->instruction_pos0 + (int32_t) summary_instruction_.size(), items);
    if (res.shifted_runs > 0) {
        e.note_shift();
    }
    if (placement == summary_placement::compacted) {
        cumulative_.compactions++;
        st.compactions++;
    }
    restore_recurrent(j->recurrent, e);
    summary_text_ = model_->detokenize(j->tokens, false);
    rec.evict_ms = ms_since(t0);
    rec.evicted = (uint32_t) res.evicted;
    rec.summary_tokens = (uint32_t) items.size();
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

void sequence::cancel_summary(step_context & e) {
    // The scratch cells (instruction, summary so far) go; the planned eviction does not happen.
    kv_drop_unledgered(e.ctx(), slot_, ledger_);
    restore_recurrent(turn_->summary->recurrent, e);
    turn_->summary.reset();
}

// ---- checkpoints ----

chat_state sequence::export_state(llama_context * ctx, bool with_kv) {
    chat_state s;
    std::lock_guard<std::mutex> lock(mu_);
    s.options = opts_;
    s.turn = turn_no_;
    s.started = started_;
    s.carry = carry_;
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
    if (replay_pending_ || !with_kv) {
        s.ledger_only = true;   // asked for, or restored from a ledger-only checkpoint and not prefilled yet
    } else if (parked_) {
        s.kv = parked_kv_;
    } else if (ctx != nullptr && slot_ >= 0 && !reset_pending_) {
        s.kv = kv_state_save(ctx, slot_);
    }
    return s;
}

} // namespace fml
