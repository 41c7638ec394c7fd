#include "chat-session.h"

#include "error.h"
#include "kv-cells.h"
#include "kv-ops.h"
#include "utf8.h"

#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

namespace fml {

using clock_type = std::chrono::steady_clock;

static double ms_since(clock_type::time_point t0) {
    return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
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

// What the summarizer is asked, as a user message after the history it shares with the chat.
static const char * SUMMARY_INSTRUCTION = "Summarize the conversation so far in one or two short sentences.";

static ggml_type kv_type_from_name(const std::string & name) {
    if (name == "f16")  return GGML_TYPE_F16;
    if (name == "f32")  return GGML_TYPE_F32;
    if (name == "q8_0") return GGML_TYPE_Q8_0;
    throw fml_error(FML_ERR_INVALID_OPTION, "kvType must be one of f16, f32, q8_0 (got '" + name + "')");
}

static std::atomic<size_t> g_live_sessions{0};
size_t chat_session::live_count() { return g_live_sessions.load(); }

static bool abort_callback(void * data) {
    return static_cast<std::atomic<bool> *>(data)->load();
}

// Fills `batch` with n tokens at positions pos0.. of `seq`. Logits: for every token (`all_logits`),
// or only for the last one when `last_logits`.
static void fill_batch(llama_batch & batch, const int32_t * tokens, size_t n, int32_t pos0, int32_t seq, bool all_logits, bool last_logits) {
    batch.n_tokens = (int32_t) n;
    for (size_t i = 0; i < n; ++i) {
        batch.token[i] = tokens[i];
        batch.pos[i] = pos0 + (int32_t) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = seq;
        batch.logits[i] = all_logits || (last_logits && i + 1 == n);
    }
}

chat_session::chat_session(std::shared_ptr<fml_model> model, const chat_options & opts)
    : model_(std::move(model)), opts_(opts) {
    // Option values were validated by resolve_chat_options (options.cpp); what is checked here
    // depends on the model.
    const policy_options & p = opts_.policy;
    const ggml_type kv_type = kv_type_from_name(opts_.kv_type);
    policy_ = make_policy(p);

    // BOS + framed system prompt, all pinned. Checked now so createChat fails, not the first send.
    if (model_->add_bos()) {
        system_tokens_.push_back(model_->bos());
    }
    if (!opts_.system_prompt.empty()) {
        const std::vector<int32_t> framed = frame_tokens("system", opts_.system_prompt);
        system_tokens_.insert(system_tokens_.end(), framed.begin(), framed.end());
    }
    check_budget();

    // Signals the policy needs. Attention weights exist only with flash attention off and need the
    // cell -> position map; otherwise importance uses the key-norm proxy.
    if (policy_->needs_importance()) {
        if (opts_.flash_attention != 1 && kv_cells_available()) {
            signal_ = IMPORTANCE_ATTENTION;
            opts_.flash_attention = 0;
            capture_.want_attention = true;
        } else {
            signal_ = IMPORTANCE_KEY_NORM;
            capture_.want_key_norm = true;
        }
    }
    const model_info & mi = model_->info();
    if (policy_->needs_embeddings()) {
        capture_.want_hidden = true;
        // A middle layer: the last one is pruned to the output rows, and middle layers carry more
        // topical (less next-token-specific) information.
        capture_.hidden_layer = std::max(0, std::min(mi.n_layer - 2, mi.n_layer / 2));
        ledger_.set_embedding_dim((size_t) mi.n_embd);
    }
    uint32_t scratch_cells = 0;
    if (policy_->summarizes()) {
        summary_instruction_ = frame_tokens("user", SUMMARY_INSTRUCTION);
        scratch_cells = (uint32_t) summary_instruction_.size() + p.summary_tokens + 8;
    }

    llama_context_params cp = llama_context_default_params();
    // The chat's sequence never holds more than max_tokens: eviction happens before any decode that
    // would overflow it, so the context is the budget. Summarizing policies add a bounded scratch area
    // for the summarizer's instruction and output (it shares the history's cells, so no re-prefill).
    cp.n_ctx = p.max_tokens + scratch_cells;
    cp.n_seq_max = scratch_cells > 0 ? 2 : 1;
    cp.kv_unified = scratch_cells > 0;
    // Prefill goes in chunks of batchSize; llama.cpp also needs n_batch >= n_seq_max (it reserves an
    // output row per sequence and aborts the process otherwise).
    chunk_ = (size_t) std::max(1, std::min<int32_t>(opts_.batch_size, (int32_t) p.max_tokens));
    cp.n_batch = (uint32_t) std::max<size_t>(chunk_, cp.n_seq_max);
    cp.n_ubatch = cp.n_batch;
    cp.n_threads = opts_.threads;
    cp.n_threads_batch = opts_.threads;
    cp.type_k = kv_type;
    cp.type_v = kv_type;
    cp.flash_attn_type = opts_.flash_attention < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                        : opts_.flash_attention == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_ENABLED;
    if (kv_type == GGML_TYPE_Q8_0 && opts_.flash_attention == 0) {
        throw fml_error(FML_ERR_INVALID_OPTION, "kvType q8_0 needs flash attention (the quantized V cache requires it)");
    }
    cp.no_perf = true;
    cp.abort_callback = abort_callback;
    cp.abort_callback_data = &abort_;
    if (capture_.want_attention || capture_.want_key_norm || capture_.want_hidden) {
        cp.cb_eval = eval_capture::callback;
        cp.cb_eval_user_data = &capture_;
    }
    last_llama_errors();
    ctx_ = llama_init_from_model(model_->raw(), cp);
    if (ctx_ == nullptr) {
        const std::string why = last_llama_errors();
        throw fml_error(FML_ERR_CONTEXT_CREATE, "llama.cpp could not create a context" + (why.empty() ? std::string() : ": " + why));
    }
    capture_.bind(ctx_, (int32_t) cp.n_ctx, mi.n_embd);
    if (!kv_can_shift(ctx_)) {
        llama_free(ctx_);
        ctx_ = nullptr;
        throw fml_error(FML_ERR_CONTEXT_CREATE, "this model's KV cache does not support position shifts (K-shift), so in-place eviction is impossible");
    }
    // Nothing below throws: the destructor owns what follows.
    batch_ = llama_batch_init((int32_t) chunk_, 0, 1);
    g_live_sessions++;
}

chat_session::~chat_session() {
    if (ctx_ != nullptr) {
        llama_batch_free(batch_);
        g_live_sessions--;
        llama_free(ctx_);
    }
}

size_t chat_session::pinned_after_start() const {
    // Sinks are the first tokens of the sequence, so once a turn is in, max(system prompt, sinks) are pinned.
    return std::max(started_ ? ledger_.pinned_count() : system_tokens_.size(), (size_t) opts_.policy.sink_tokens);
}

void chat_session::check_budget() {
    // The smallest turn a chat must always be able to take: the carried end of the previous reply
    // (its last sampled token and the template's end-of-turn), a one-token message in its framing,
    // and one reply token, on top of the pinned prefix (system prompt and attention sinks). Summaries
    // take whatever room an eviction frees beyond that, so they add nothing here.
    closing_tokens_ = model_->tokenize(model_->frame_message("assistant").suffix, false, true);
    const size_t pinned = pinned_after_start();
    const size_t carry = 1 + closing_tokens_.size();
    const size_t framing = frame_tokens("user", "x").size();
    const size_t required = pinned + carry + framing + 1;
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

uint32_t chat_session::context_size() const { return llama_n_ctx(ctx_); }
int32_t chat_session::scratch_pos_max() const {
    // Only contexts of summarizing policies have the scratch sequence; asking llama.cpp about a
    // sequence id beyond n_seq_max would abort.
    return llama_n_seq_max(ctx_) > 1 ? kv_scratch_pos_max(ctx_) : -1;
}

int32_t chat_session::cache_pos_min() const { return kv_pos_min(ctx_); }
int32_t chat_session::cache_pos_max() const { return kv_pos_max(ctx_); }

uint64_t chat_session::kv_bytes() const {
    // Bytes the retained tokens occupy: per layer, K and V rows of n_head_kv * head_dim elements.
    const model_info & mi = model_->info();
    const double elem = opts_.kv_type == "f32" ? 4.0 : opts_.kv_type == "q8_0" ? 34.0 / 32.0 : 2.0;
    return (uint64_t) ((double) ledger_.size() * mi.n_layer * mi.n_head_kv * (mi.n_embd_head_k + mi.n_embd_head_v) * elem);
}

std::vector<int32_t> chat_session::frame_tokens(const std::string & role, const std::string & content) const {
    // Template text is tokenized with special-token parsing; the content without it, so user text
    // cannot smuggle in control tokens.
    const message_frame frame = model_->frame_message(role);
    std::vector<int32_t> out = model_->tokenize(frame.prefix, false, true);
    const std::vector<int32_t> body = model_->tokenize(content, false, false);
    const std::vector<int32_t> tail = model_->tokenize(frame.suffix, false, true);
    out.insert(out.end(), body.begin(), body.end());
    out.insert(out.end(), tail.begin(), tail.end());
    return out;
}

size_t chat_session::count_turn_tokens(const std::string & user_text) const {
    return frame_tokens("user", user_text).size();
}

bool chat_session::ensure_started() {
    if (started_) {
        return true;
    }
    if (!system_tokens_.empty() && !decode_tokens(system_tokens_, 0, TOKEN_ROLE_SYSTEM, false)) {
        kv_clear(ctx_, ledger_);   // aborted: back to the empty state, the next turn starts over
        return false;
    }
    started_ = true;
    return true;
}

bool chat_session::decode_tokens(const std::vector<int32_t> & tokens, uint32_t turn, token_role role, bool want_logits) {
    // batch_ is allocated once per chat: generation decodes one token at a time, and allocating an
    // n_batch-sized llama_batch (one malloc per seq_id slot) for every token would be pure overhead.
    const size_t n_batch = chunk_;
    for (size_t start = 0; start < tokens.size(); start += n_batch) {
        const size_t n = std::min(n_batch, tokens.size() - start);
        const int32_t pos0 = ledger_.next_pos();
        fill_batch(batch_, tokens.data() + start, n, pos0, KV_SEQ, false, want_logits && start + n == tokens.size());
        capture_.begin_batch((int32_t) n, pos0);
        test_token_delay();
        const int32_t rc = llama_decode(ctx_, batch_);
        if (rc != 0) {
            // Drop whatever ubatches of this batch reached the cache, so cache == ledger again.
            kv_drop_unledgered(ctx_, ledger_);
            if (rc == 2) {
                return false;   // aborted through the abort callback
            }
            throw fml_error(FML_ERR_DECODE, "llama_decode failed with code " + std::to_string(rc));
        }
        shift_pending_ = false;
        append_decoded(tokens.data() + start, n, turn, role);
    }
    return true;
}

void chat_session::append_decoded(const int32_t * tokens, size_t n, uint32_t turn, token_role role) {
    const size_t first_new = ledger_.size();
    for (size_t i = 0; i < n; ++i) {
        const bool sink = ledger_.size() < opts_.policy.sink_tokens;
        const std::string piece = model_->token_piece(tokens[i], false);
        const bool sentence_end = !piece.empty() && strchr(".!?\n", piece.back()) != nullptr;
        ledger_.append(tokens[i], turn, role, role == TOKEN_ROLE_SYSTEM || sink, sentence_end);
    }
    absorb_signals(first_new, n);
    cumulative_.tokens_seen += n;
}

void chat_session::absorb_signals(size_t first_new, size_t n_new) {
    if (capture_.want_attention && capture_.attention_layers_seen > 0) {
        // Attention received, summed over heads and layers, then divided by the number of queries
        // that could attend to the token: a plain sum (H2O) favours old tokens just for having been
        // seen by more queries, which evicts the recent context a small model depends on.
        // score[ATTENTION_QUERIES] keeps the running sum of received attention's query count so the
        // average can be updated incrementally; positions == ledger indices.
        std::vector<float> & acc = capture_.attention_by_pos;
        for (size_t i = 0; i < ledger_.size(); ++i) {
            const int32_t pos = ledger_[i].pos;
            if (pos < 0 || (size_t) pos >= acc.size()) {
                continue;
            }
            const float queries = i < first_new ? (float) n_new : (float) (n_new - (i - first_new));
            ledger_entry & e = ledger_.at(i);
            const float seen = e.score[SCORE_ATTENTION_QUERIES];
            const float total = e.score[SCORE_IMPORTANCE] * seen + acc[(size_t) pos];
            e.score[SCORE_ATTENTION_QUERIES] = seen + queries;
            e.score[SCORE_IMPORTANCE] = total / e.score[SCORE_ATTENTION_QUERIES];
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
    }
    if (capture_.want_key_norm && capture_.key_norm_layers_seen > 0) {
        for (size_t j = 0; j < n_new && j < capture_.key_norm_by_token.size(); ++j) {
            ledger_.at(first_new + j).score[SCORE_IMPORTANCE] = -capture_.key_norm_by_token[j] / (float) capture_.key_norm_layers_seen;
        }
    }
    if (capture_.want_hidden && capture_.hidden_seen && ledger_.embedding_dim() == (size_t) capture_.n_embd) {
        for (size_t j = 0; j < n_new; ++j) {
            std::memcpy(ledger_.embedding_mut(first_new + j), capture_.hidden_by_token.data() + j * (size_t) capture_.n_embd,
                        sizeof(float) * (size_t) capture_.n_embd);
        }
    }
}

void chat_session::test_token_delay() const {
    if (opts_.test_token_delay_ms > 0) {
        std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(opts_.test_token_delay_ms));
    }
}

bool chat_session::decode_scratch(const std::vector<int32_t> & tokens, int32_t pos0) {
    // In chunks of n_batch, like every decode: llama.cpp aborts the process on a larger batch.
    const size_t n_batch = chunk_;
    for (size_t start = 0; start < tokens.size(); start += n_batch) {
        const size_t n = std::min(n_batch, tokens.size() - start);
        fill_batch(batch_, tokens.data() + start, n, pos0 + (int32_t) start, KV_SCRATCH_SEQ, false, start + n == tokens.size());
        if (llama_decode(ctx_, batch_) != 0) {
            return false;
        }
    }
    return true;
}

void chat_session::summarize_and_evict(const eviction_plan & plan, size_t hard_need, turn_stats & st) {
    const auto t0 = clock_type::now();
    const std::vector<index_range> ranges = normalize_ranges(plan.ranges);
    const size_t end = ranges.back().end;         // the summarizer sees everything up to the last evicted token
    const size_t insert_at = ranges.front().begin;
    // The summary takes what the eviction frees beyond what the incoming tokens need (a small budget
    // can leave less than summaryTokens).
    const size_t freed = plan.total();
    const uint32_t max_summary = (uint32_t) std::min<size_t>(opts_.policy.summary_tokens, freed > hard_need ? freed - hard_need : 0);

    // The scratch sequence shares the history's cells, so nothing is re-prefilled: only the
    // instruction and the summary itself are decoded. Signals are not collected for it.
    capture_.enabled = false;
    kv_scratch_begin(ctx_, end);
    std::vector<int32_t> summary;
    const int32_t pos_instr = (int32_t) end;
    const int32_t pos_summary = pos_instr + (int32_t) summary_instruction_.size();
    bool ok = decode_scratch(summary_instruction_, pos_instr);
    if (ok) {
        sampling_options so;
        so.temperature = 0.0f;          // summaries are greedy: deterministic, no seed needed
        so.repeat_penalty = 1.1f;
        sampler_chain sampler(so, model_->info().n_vocab);
        while (summary.size() < max_summary) {
            test_token_delay();
            const int32_t tok = llama_sampler_sample(sampler.raw(), ctx_, -1);
            if (model_->is_eog(tok)) {
                break;
            }
            if (!decode_scratch({ tok }, pos_summary + (int32_t) summary.size())) {
                break;
            }
            summary.push_back(tok);
        }
    }
    capture_.enabled = true;
    kv_scratch_trim(ctx_, (size_t) pos_summary);

    std::vector<ledger_entry> items;
    const uint32_t turn = ledger_[insert_at].turn;
    for (int32_t tok : summary) {
        ledger_entry e{};
        e.token = tok;
        e.turn = turn;
        e.role = TOKEN_ROLE_SUMMARY;
        items.push_back(e);
    }
    const kv_eviction_result res = kv_evict_and_insert(ctx_, ledger_, ranges, insert_at, pos_summary, items);
    summary_text_ = model_->detokenize(summary, false);
    st.summary_tokens += (uint32_t) summary.size();
    st.summary_ms += ms_since(t0);
    st.evicted_tokens += (uint32_t) res.evicted;
    cumulative_.tokens_evicted += res.evicted;
    cumulative_.tokens_seen += summary.size();
}

void chat_session::evict(const eviction_request & req, size_t hard_need, turn_stats & st) {
    // Latency guard: a policy that throws or takes longer than max_policy_ms is replaced by sliding
    // for this eviction, and the fallback is counted.
    auto t0 = clock_type::now();
    eviction_plan plan;
    bool fallback = false;
    try {
        if (opts_.test_policy_delay_ms > 0) {
            std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(opts_.test_policy_delay_ms));
        }
        plan = policy_->plan(ledger_, req);
        if (plan.total() < req.need) {
            fallback = true;
        }
    } catch (const std::exception &) {
        fallback = true;
    }
    const double elapsed = ms_since(t0);
    if (opts_.max_policy_ms > 0 && elapsed > opts_.max_policy_ms) {
        fallback = true;
    }
    if (fallback) {
        plan = plan_oldest_first(ledger_, req, opts_.policy.window_size);
        st.fallback = true;
        cumulative_.fallback_count++;
    }
    const double policy_ms = ms_since(t0);
    st.policy_ms += policy_ms;
    eviction_record rec;
    rec.positions = normalize_ranges(plan.ranges);   // ledger index == position before eviction
    rec.policy_ms = policy_ms;
    rec.fallback = fallback;
    rec.during_generation = st.generating;
    const uint32_t evicted_before = st.evicted_tokens;
    const uint32_t summary_before = st.summary_tokens;

    t0 = clock_type::now();
    const double summary_ms_before = st.summary_ms;
    if (plan.summarize) {
        summarize_and_evict(plan, hard_need, st);
    } else {
        const kv_eviction_result res = kv_evict_ranges(ctx_, ledger_, plan.ranges);
        st.evicted_tokens += (uint32_t) res.evicted;
        cumulative_.tokens_evicted += res.evicted;
    }
    shift_pending_ = true;
    rec.evict_ms = ms_since(t0) - (st.summary_ms - summary_ms_before);   // KV work only; summaryMs is separate
    st.evict_ms += rec.evict_ms;
    rec.evicted = st.evicted_tokens - evicted_before;
    rec.summary_tokens = st.summary_tokens - summary_before;
    st.eviction_log.push_back(std::move(rec));
    st.evictions += 1;
    cumulative_.evictions += 1;
}

void chat_session::make_room(size_t incoming, size_t slack, turn_stats & st) {
    const size_t budget = opts_.policy.max_tokens;
    if (ledger_.size() + incoming <= budget) {
        return;
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
    evict({ need, std::min(evictable, need + slack) }, hard_need, st);
    if (ledger_.size() + incoming > budget) {
        throw fml_error(FML_ERR_INTERNAL, "eviction left the budget exceeded");
    }
}

turn_result chat_session::run_turn(const std::string & user_text, const generation_options & gen, const piece_callback & on_piece) {
    const auto t_turn = clock_type::now();
    turn_result result;
    turn_stats & st = result.stats;
    st.policy = policy_->name();
    // abort_ is cleared when the turn is scheduled (clear_abort), not here: an abort requested between
    // scheduling and the worker starting must not be lost. It is cleared again when the turn ends, so
    // checkpoints and other decodes after an aborted turn are not aborted too.
    abort_reset_guard abort_guard{ abort_ };

    // Everything that can fail on input happens before the cache is touched.
    std::vector<int32_t> prompt = carry_;
    const std::vector<int32_t> framed = frame_tokens("user", user_text);
    prompt.insert(prompt.end(), framed.begin(), framed.end());
    const size_t budget = opts_.policy.max_tokens;
    const size_t pinned = pinned_after_start();
    if (pinned + prompt.size() + 1 > budget) {
        throw fml_error(FML_ERR_PROMPT_TOO_LARGE,
                        "the message needs " + std::to_string(framed.size()) + " tokens but maxTokens " + std::to_string(budget) +
                        " leaves room for " + std::to_string(budget - std::min(budget, pinned + carry_.size() + 1)) + " after pinned tokens");
    }
    // The first turn (and the first after reset) also prefills the pinned system prompt.
    const size_t system_prefill = started_ ? 0 : system_tokens_.size();
    const auto t_system = clock_type::now();
    if (!ensure_started()) {
        result.reason = STOP_ABORT;
        st.latency_ms = ms_since(t_turn);
        return result;
    }
    const double system_ms = ms_since(t_system);
    if (signal_ != IMPORTANCE_NONE && opts_.policy.importance_decay < 1.0f) {
        for (size_t i = 0; i < ledger_.size(); ++i) {
            ledger_.at(i).score[SCORE_IMPORTANCE] *= opts_.policy.importance_decay;
        }
    }

    // Amortise: when evicting anyway, free room for part of the reply too.
    const size_t slack = std::min<size_t>((size_t) std::max(gen.max_new_tokens, 1), budget / 8);
    const size_t gen_chunk = std::max<size_t>(1, budget / 16);
    make_room(prompt.size(), slack, st);

    const uint32_t turn = ++turn_;
    const size_t carry_n = carry_.size();
    const size_t ledger_before = ledger_.size();
    auto t0 = clock_type::now();
    // The carried tokens close the previous assistant turn; they belong to it in the ledger.
    bool ok = true;
    if (carry_n > 0) {
        ok = decode_tokens(std::vector<int32_t>(prompt.begin(), prompt.begin() + (long) carry_n), turn - 1, TOKEN_ROLE_ASSISTANT, false);
    }
    if (ok) {
        ok = decode_tokens(framed, turn, TOKEN_ROLE_USER, true);
    }
    st.prefill_ms = ms_since(t0) + system_ms;
    if (!ok) {
        // Aborted during prefill: roll back to the state before this turn's tokens.
        rollback_to(ledger_before);
        --turn_;
        result.reason = STOP_ABORT;
        st.retained_tokens = (uint32_t) ledger_.size();
        st.latency_ms = ms_since(t_turn);
        return result;
    }
    carry_.clear();
    st.prompt_tokens = (uint32_t) (prompt.size() + system_prefill);

    st.generating = true;
    sampler_chain sampler(gen.sampling, model_->info().n_vocab);
    text_stream stream(gen.stop);
    t0 = clock_type::now();
    int32_t pending = -1;   // sampled but not yet decoded
    result.reason = STOP_MAX_TOKENS;
    while (true) {
        if (abort_.load()) {
            result.reason = STOP_ABORT;
            break;
        }
        if ((int32_t) st.generated_tokens >= gen.max_new_tokens) {
            result.reason = STOP_MAX_TOKENS;
            break;
        }
        const int32_t tok = llama_sampler_sample(sampler.raw(), ctx_, -1);
        if (model_->is_eog(tok)) {
            result.reason = STOP_EOS;
            break;
        }
        st.generated_tokens++;
        const std::string out = stream.push(model_->token_piece(tok, false));
        if (!out.empty() && on_piece) {
            on_piece(out);
        }
        if (stream.stopped()) {
            pending = tok;
            result.reason = STOP_STRING;
            break;
        }
        if ((int32_t) st.generated_tokens >= gen.max_new_tokens || abort_.load()) {
            pending = tok;
            continue;   // the loop head reports maxTokens / abort
        }
        make_room(1, gen_chunk, st);
        if (!decode_tokens({ tok }, turn, TOKEN_ROLE_ASSISTANT, true)) {
            pending = tok;
            result.reason = STOP_ABORT;
            break;
        }
    }
    if (result.reason != STOP_STRING) {
        const std::string rest = stream.finish();
        if (!rest.empty() && on_piece) {
            on_piece(rest);
        }
    }
    st.decode_ms = ms_since(t0);
    result.response = stream.text();

    // Close the assistant turn next time: the undecoded last token plus the template's end-of-turn.
    if (pending >= 0) {
        carry_.push_back(pending);
    }
    carry_.insert(carry_.end(), closing_tokens_.begin(), closing_tokens_.end());

    st.tokens_per_second = st.decode_ms > 0 ? st.generated_tokens * 1000.0 / st.decode_ms : 0;
    st.retained_tokens = (uint32_t) ledger_.size();
    st.latency_ms = ms_since(t_turn);
    cumulative_.turns++;
    return result;
}

void chat_session::rollback_to(size_t keep) {
    // Tokens decoded and then rolled back (an aborted prefill, a probe) were never part of the
    // conversation: the counters must say what the cache holds and what it saw.
    const size_t removed = ledger_.size() > keep ? ledger_.size() - keep : 0;
    kv_truncate(ctx_, ledger_, keep);
    cumulative_.tokens_seen -= std::min<uint64_t>(cumulative_.tokens_seen, removed);
}

void chat_session::reset() {
    kv_clear(ctx_, ledger_);
    carry_.clear();
    summary_text_.clear();
    turn_ = 0;
    started_ = false;
    shift_pending_ = false;
    cumulative_ = cumulative_stats{};
}

std::vector<memory_entry> chat_session::memory() const {
    std::vector<memory_entry> out;
    out.reserve(ledger_.size());
    for (const auto & e : ledger_.entries()) {
        out.push_back({ e.token, e.pos, e.turn, e.role, e.pinned, e.score[SCORE_IMPORTANCE], model_->token_piece(e.token, true) });
    }
    return out;
}

std::vector<float> chat_session::probe_logits(int32_t token) {
    if (token < 0 || token >= model_->info().n_vocab) {
        throw fml_error(FML_ERR_INVALID_OPTION, "token id out of range");
    }
    if (!ensure_started()) {
        throw fml_error(FML_ERR_ABORTED, "aborted");
    }
    turn_stats st;
    make_room(1, 0, st);
    const size_t before = ledger_.size();
    if (!decode_tokens({ token }, turn_, TOKEN_ROLE_USER, true)) {
        throw fml_error(FML_ERR_ABORTED, "aborted");
    }
    const float * logits = llama_get_logits_ith(ctx_, -1);
    std::vector<float> out(logits, logits + model_->info().n_vocab);
    rollback_to(before);
    return out;
}

void chat_session::apply_pending_shift() {
    if (!shift_pending_ || ledger_.empty()) {
        shift_pending_ = false;
        return;
    }
    // llama.cpp applies K-shifts lazily at the start of the next llama_decode and has no public call
    // to apply them now: decode one token at the next position, then remove it again.
    if (ledger_.size() >= llama_n_ctx(ctx_)) {
        throw fml_error(FML_ERR_KV, "no free cell to apply the pending K-shift");
    }
    const int32_t last = ledger_[ledger_.size() - 1].token;
    fill_batch(batch_, &last, 1, ledger_.next_pos(), KV_SEQ, false, false);
    capture_.enabled = false;
    const int32_t rc = llama_decode(ctx_, batch_);
    capture_.enabled = true;
    kv_drop_unledgered(ctx_, ledger_);
    if (rc != 0) {
        throw fml_error(FML_ERR_DECODE, "llama_decode failed while applying a pending K-shift");
    }
    shift_pending_ = false;
}

size_t chat_session::ingest_exchange(const std::string & user_text, const std::string & assistant_text) {
    abort_reset_guard abort_guard{ abort_ };
    std::vector<int32_t> user = carry_;
    const size_t carry_n = carry_.size();
    const std::vector<int32_t> framed = frame_tokens("user", user_text);
    user.insert(user.end(), framed.begin(), framed.end());
    const std::vector<int32_t> reply = model_->tokenize(assistant_text, false, false);
    const size_t budget = opts_.policy.max_tokens;
    const size_t pinned = pinned_after_start();
    if (pinned + user.size() + 1 > budget || pinned + reply.size() + 1 > budget) {
        throw fml_error(FML_ERR_PROMPT_TOO_LARGE, "a transcript message does not fit in maxTokens");
    }
    if (!ensure_started()) {
        throw fml_error(FML_ERR_ABORTED, "the transcript import was aborted");
    }
    turn_stats st;
    make_room(user.size(), 0, st);
    const uint32_t turn = ++turn_;
    const size_t before = ledger_.size();
    bool ok = carry_n == 0 || decode_tokens(std::vector<int32_t>(user.begin(), user.begin() + (long) carry_n), turn - 1, TOKEN_ROLE_ASSISTANT, false);
    ok = ok && decode_tokens(framed, turn, TOKEN_ROLE_USER, false);
    if (!ok) {
        rollback_to(before);
        --turn_;
        throw fml_error(FML_ERR_ABORTED, "the transcript import was aborted");
    }
    carry_.clear();
    carry_ = closing_tokens_;
    if (!reply.empty()) {
        make_room(reply.size(), 0, st);
        const size_t after_user = ledger_.size();
        if (!decode_tokens(reply, turn, TOKEN_ROLE_ASSISTANT, false)) {
            rollback_to(after_user);   // the user message stays, as a turn whose reply was cut off
            throw fml_error(FML_ERR_ABORTED, "the transcript import was aborted");
        }
    }
    cumulative_.turns++;
    return user.size() + reply.size();
}

chat_state chat_session::export_state() {
    apply_pending_shift();
    chat_state s;
    s.options = opts_;
    s.turn = turn_;
    s.started = started_;
    s.carry = carry_;
    s.summary_text = summary_text_;
    s.stats = cumulative_;
    s.ledger = ledger_.entries();
    s.embedding_dim = ledger_.embedding_dim();
    for (size_t i = 0; i < ledger_.size() && s.embedding_dim > 0; ++i) {
        s.embeddings.insert(s.embeddings.end(), ledger_.embedding(i), ledger_.embedding(i) + s.embedding_dim);
    }
    s.kv = kv_state_save(ctx_);
    return s;
}

void chat_session::import_state(const chat_state & s) {
    if (s.ledger.size() > opts_.policy.max_tokens) {
        throw fml_error("CHECKPOINT_CORRUPT", "the checkpoint holds more tokens than maxTokens");
    }
    for (const ledger_entry & e : s.ledger) {
        if (e.token < 0 || e.token >= model_->info().n_vocab) {
            throw fml_error("CHECKPOINT_CORRUPT", "the checkpoint holds a token id outside this model's vocabulary");
        }
    }
    for (int32_t t : s.carry) {
        if (t < 0 || t >= model_->info().n_vocab) {
            throw fml_error("CHECKPOINT_CORRUPT", "the checkpoint holds a token id outside this model's vocabulary");
        }
    }
    if (s.embedding_dim != ledger_.embedding_dim() || s.embeddings.size() != s.ledger.size() * s.embedding_dim) {
        throw fml_error("CHECKPOINT_CORRUPT", "the checkpoint's embeddings do not match this chat");
    }
    try {
        kv_state_load(ctx_, s.kv);
        ledger_.clear();
        for (size_t i = 0; i < s.ledger.size(); ++i) {
            const ledger_entry & e = s.ledger[i];
            ledger_.append(e.token, e.turn, e.role, e.pinned, e.sentence_end);
            ledger_.at(i) = e;
            if (s.embedding_dim > 0) {
                std::memcpy(ledger_.embedding_mut(i), s.embeddings.data() + i * s.embedding_dim, sizeof(float) * s.embedding_dim);
            }
        }
        // The cache and the ledger must agree, or the checkpoint is not what it claims.
        const int32_t expect_max = ledger_.empty() ? -1 : ledger_[ledger_.size() - 1].pos;
        const int32_t expect_min = ledger_.empty() ? -1 : ledger_[0].pos;
        if (kv_pos_max(ctx_) != expect_max || kv_pos_min(ctx_) != expect_min) {
            throw fml_error("CHECKPOINT_CORRUPT", "the checkpoint's KV state and token ledger disagree");
        }
    } catch (...) {
        reset();
        throw;
    }
    turn_ = s.turn;
    started_ = s.started;
    carry_ = s.carry;
    summary_text_ = s.summary_text;
    cumulative_ = s.stats;
    shift_pending_ = false;
}

std::vector<float> chat_session::evaluate_tokens(const std::vector<int32_t> & tokens, size_t chunk) {
    const int32_t n_vocab = model_->info().n_vocab;
    for (int32_t t : tokens) {
        if (t < 0 || t >= n_vocab) {
            throw fml_error(FML_ERR_INVALID_OPTION, "token id out of range");
        }
    }
    if (!ensure_started()) {
        throw fml_error(FML_ERR_ABORTED, "aborted");
    }
    chunk = std::max<size_t>(1, std::min<size_t>(chunk, chunk_));
    std::vector<float> out;
    out.reserve(tokens.size() * (size_t) n_vocab);
    llama_batch batch = llama_batch_init((int32_t) chunk, 0, 1);
    for (size_t start = 0; start < tokens.size(); start += chunk) {
        const size_t n = std::min(chunk, tokens.size() - start);
        turn_stats st;
        make_room(n, 0, st);
        const uint32_t turn = ++turn_;
        const int32_t pos0 = ledger_.next_pos();
        fill_batch(batch, tokens.data() + start, n, pos0, KV_SEQ, true, true);
        capture_.begin_batch((int32_t) n, pos0);
        if (llama_decode(ctx_, batch) != 0) {
            llama_batch_free(batch);
            throw fml_error(FML_ERR_DECODE, "llama_decode failed during evaluation");
        }
        shift_pending_ = false;
        for (size_t i = 0; i < n; ++i) {
            const float * logits = llama_get_logits_ith(ctx_, (int32_t) i);
            out.insert(out.end(), logits, logits + n_vocab);
        }
        append_decoded(tokens.data() + start, n, turn, TOKEN_ROLE_USER);
    }
    llama_batch_free(batch);
    return out;
}

double chat_session::replay_history() {
    const auto t0 = clock_type::now();
    std::vector<ledger_entry> entries = ledger_.entries();
    kv_clear(ctx_, ledger_);
    // Re-decode in the ledger's own batches, keeping roles, turns and pins as they were.
    const size_t n_batch = chunk_;
    llama_batch batch = llama_batch_init((int32_t) n_batch, 0, 1);
    for (size_t start = 0; start < entries.size(); start += n_batch) {
        const size_t n = std::min(n_batch, entries.size() - start);
        std::vector<int32_t> toks(n);
        for (size_t i = 0; i < n; ++i) {
            toks[i] = entries[start + i].token;
        }
        fill_batch(batch, toks.data(), n, (int32_t) start, KV_SEQ, false, start + n == entries.size());
        capture_.begin_batch((int32_t) n, (int32_t) start);
        if (llama_decode(ctx_, batch) != 0) {
            llama_batch_free(batch);
            throw fml_error(FML_ERR_DECODE, "llama_decode failed while replaying history");
        }
    }
    llama_batch_free(batch);
    for (auto & e : entries) {
        e.pos = (int32_t) ledger_.size();
        ledger_.append(e.token, e.turn, e.role, e.pinned, e.sentence_end);
        ledger_.at(ledger_.size() - 1) = e;
    }
    return ms_since(t0);
}

double chat_session::plain_decode(int32_t n) {
    if (!ensure_started()) {
        throw fml_error(FML_ERR_ABORTED, "aborted");
    }
    turn_stats st;
    make_room((size_t) n + 1, 0, st);
    sampling_options so;
    so.temperature = 0.0f;
    sampler_chain sampler(so, model_->info().n_vocab);
    int32_t pos = ledger_.next_pos();
    // Start from a fresh logits row: decode the last token again at the next position.
    int32_t tok = ledger_.empty() ? model_->bos() : ledger_[ledger_.size() - 1].token;
    const auto t0 = clock_type::now();
    for (int32_t i = 0; i < n; ++i) {
        fill_batch(batch_, &tok, 1, pos++, KV_SEQ, true, true);
        if (llama_decode(ctx_, batch_) != 0) {
            break;
        }
        tok = llama_sampler_sample(sampler.raw(), ctx_, -1);
    }
    const double ms = ms_since(t0);
    kv_drop_unledgered(ctx_, ledger_);
    return ms;
}

void chat_session::shift_positions(int32_t delta) {
    kv_shift_all(ctx_, ledger_, delta);
    shift_pending_ = true;
}

} // namespace fml
