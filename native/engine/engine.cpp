#include "engine/engine.h"

#include "kv/kv-internals.h"
#include "kv/kv-ops.h"
#include "model/model.h"
#include "util/error.h"

#include "ggml-cpu.h"

#include <algorithm>

namespace fml {

static ggml_type kv_type_from_name(const std::string & name) {
    if (name == "f32")  return GGML_TYPE_F32;
    if (name == "q8_0") return GGML_TYPE_Q8_0;
    return GGML_TYPE_F16;
}

static bool abort_callback(void * data) {
    return static_cast<const std::atomic<bool> *>(data)->load();
}

engine::engine(std::shared_ptr<fml_model> model, const kv_geometry & key, const engine_options & opts, const std::atomic<bool> * stopping, ggml_threadpool * pool,
               std::function<void()> wake)
    : model_(std::move(model)), key_(key), opts_(opts), stopping_(stopping), wake_(std::move(wake)), threadpool_(pool) {
    capture_.want_attention = key_.attention;
    capture_.want_key_norm = key_.key_norm;
    capture_.want_hidden = key_.hidden_layer >= 0;
    capture_.hidden_layer = std::max(0, key_.hidden_layer);
    // llama.cpp reserves an output row per sequence: n_batch must cover every slot.
    n_batch_ = std::max<uint32_t>(key_.n_batch, opts_.max_slots);
    create_context(1);
}

engine::~engine() {
    if (ctx_ != nullptr) {
        llama_batch_free(batch_);
        llama_free(ctx_);
    }
}

void engine::create_context(uint32_t slots) {
    llama_context_params cp = llama_context_default_params();
    // One stream of `cells` per slot: a chat's sequence never holds more than its budget plus its
    // summary scratch, because eviction happens before any decode that would overflow it.
    cp.n_ctx = key_.cells * slots;
    cp.n_seq_max = slots;
    cp.kv_unified = opts_.unified;
    cp.n_batch = n_batch_;
    cp.n_ubatch = n_batch_;
    cp.n_threads = key_.threads;
    cp.n_threads_batch = key_.threads;
    cp.type_k = kv_type_from_name(key_.kv_type);
    cp.type_v = cp.type_k;
    cp.flash_attn_type = key_.flash_attention < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                        : key_.flash_attention == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_ENABLED;
    // Sliding-window layers (Gemma 2/3, ...) keep every cell of the budget, not only the window:
    // a SWA cache smaller than the full one prunes cells it may need again and cannot K-shift
    // (llama_kv_cache_iswa::get_can_shift). llama.cpp's default, set here so it stays that way.
    cp.swa_full = true;
    cp.no_perf = true;
    cp.abort_callback = abort_callback;
    cp.abort_callback_data = const_cast<std::atomic<bool> *>(stopping_);
    if (capture_.any()) {
        cp.cb_eval = eval_capture::callback;
        cp.cb_eval_user_data = &capture_;
    }
    if (opts_.test_context_slot_limit > 0 && slots > opts_.test_context_slot_limit) {
        throw fml_error(FML_ERR_CONTEXT_CREATE, "llama.cpp could not create a context (test hook testContextSlotLimit)");
    }
    last_llama_errors();
    llama_context * ctx = llama_init_from_model(model_->raw(), cp);
    if (ctx == nullptr) {
        const std::string why = last_llama_errors();
        throw fml_error(FML_ERR_CONTEXT_CREATE, "llama.cpp could not create a context" + (why.empty() ? std::string() : ": " + why));
    }
    if (kv_memory_of(ctx) == kv_memory_kind::other) {
        llama_free(ctx);
        throw fml_error(FML_ERR_CONTEXT_CREATE, "llama.cpp made this model a memory finite memory cannot evict from in place");
    }
    if (ctx_ != nullptr) {
        llama_batch_free(batch_);
        llama_free(ctx_);
    }
    ctx_ = ctx;
    shift_deferred_ = kv_shift_deferred(ctx_);
    can_shift_ = shift_deferred_ || (kv_can_shift(ctx_) && !opts_.test_no_key_rotation);
    // A persistent ggml threadpool (what llama-server attaches too): without one, every graph
    // compute starts and joins its worker threads, several times per step here.
    if (threadpool_ != nullptr) {
        llama_attach_threadpool(ctx_, threadpool_, threadpool_);
    }
    batch_ = llama_batch_init((int32_t) n_batch_, 0, 1);
    capture_.bind(ctx_, model_->info().n_embd, opts_.unified, model_->info().sliding_layers, threadpool_, (int32_t) key_.threads);
    slots_.resize(slots, nullptr);
    stats_.slots = slots;
    shift_pending_ = false;
}

bool engine::grow() {
    const uint32_t cur = (uint32_t) slots_.size();
    if (cur >= opts_.max_slots) {
        return false;
    }
    const uint32_t next = std::min(opts_.max_slots, cur * 2);
    // Every chat's KV moves to a context with more streams (same slot numbers). Pending K-shifts are
    // applied first: a snapshot taken with one pending stores unrotated keys.
    std::vector<std::vector<uint8_t>> states(cur);
    for (uint32_t i = 0; i < cur; ++i) {
        if (slots_[i] != nullptr && !slots_[i]->replay_pending()) {
            apply_pending_shift(*slots_[i]);
        }
    }
    for (uint32_t i = 0; i < cur; ++i) {
        if (slots_[i] != nullptr && !slots_[i]->parked() && !slots_[i]->replay_pending()) {
            states[i] = kv_state_save(ctx_, (int32_t) i);
        }
    }
    std::vector<chat *> holders = slots_;
    try {
        create_context(next);   // throws before anything is lost: the old context stays until it succeeds
    } catch (const fml_error &) {
        // No memory for the bigger context (a GPU, a host): this engine keeps the slots it has, and
        // idle chats are parked to make room as at max_slots. Without this every turn that needed a
        // slot retried the allocation and failed, while idle chats held the slots.
        opts_.max_slots = cur;
        return false;
    }
    for (uint32_t i = 0; i < cur; ++i) {
        slots_[i] = holders[i];
        if (holders[i] != nullptr && !states[i].empty()) {
            kv_state_load(ctx_, (int32_t) i, streams(), states[i]);
        } else if (holders[i] != nullptr && holders[i]->replay_pending()) {
            holders[i]->context_lost();   // what its replay had put in is gone with the old context
        }
    }
    stats_.grown++;
    return true;
}

chat * engine::idle_victim() const {
    chat * victim = nullptr;
    for (chat * s : slots_) {
        if (s != nullptr && !s->has_turn() && (victim == nullptr || s->last_used() < victim->last_used())) {
            victim = s;
        }
    }
    return victim;
}

void engine::place(chat & s, int32_t slot) {
    slots_[(size_t) slot] = &s;
    s.set_slot(slot);
    s.sync_after_reset(ctx_);
    if (s.parked()) {
        s.unpark(*this);
        stats_.restored++;
    }
}

bool engine::ensure_slot(chat & s) {
    if (s.slot() >= 0) {
        s.sync_after_reset(ctx_);
        return true;
    }
    for (size_t i = 0; i < slots_.size(); ++i) {
        if (slots_[i] == nullptr) {
            place(s, (int32_t) i);
            return true;
        }
    }
    if (grow()) {
        return ensure_slot(s);
    }
    chat * victim = idle_victim();
    if (victim == nullptr) {
        return false;
    }
    const int32_t slot = victim->slot();
    apply_pending_shift(*victim);
    victim->park(ctx_);
    slots_[(size_t) slot] = nullptr;
    stats_.parked++;
    place(s, slot);
    return true;
}

void engine::bind(chat & s) {
    s.bind_engine(this);
    bound_++;
}

void engine::release(chat & s) {
    if (s.owner() != this) {
        return;
    }
    if (s.slot() >= 0) {
        kv_clear_slot(ctx_, s.slot());
        slots_[(size_t) s.slot()] = nullptr;
        s.set_slot(-1);
    }
    queue_.erase(std::remove_if(queue_.begin(), queue_.end(), [&](const std::shared_ptr<chat> & q) { return q.get() == &s; }), queue_.end());
    running_.erase(std::remove_if(running_.begin(), running_.end(), [&](const std::shared_ptr<chat> & q) { return q.get() == &s; }), running_.end());
    s.bind_engine(nullptr);
    bound_--;
}

void engine::enqueue(const std::shared_ptr<chat> & s) {
    queue_.push_back(s);
    admit();
}

void engine::admit() {
    // A turn aborted while it waited ends without ever running.
    for (auto it = queue_.begin(); it != queue_.end();) {
        if ((*it)->abort_pending() || stopping_->load()) {
            (*it)->fail_unstarted(fml_error(FML_ERR_ABORTED, "aborted"));
            it = queue_.erase(it);
        } else {
            ++it;
        }
    }
    // Chats that still hold a slot start at once (waiting for one they already have could deadlock
    // every slot); the others get slots first come, first served.
    for (auto it = queue_.begin(); it != queue_.end();) {
        if ((*it)->slot() >= 0) {
            start(*it);
            it = queue_.erase(it);
        } else {
            ++it;
        }
    }
    while (!queue_.empty()) {
        std::shared_ptr<chat> s = queue_.front();
        try {
            if (!ensure_slot(*s)) {
                return;   // every slot is mid-turn: the first in line waits
            }
        } catch (const fml_error & err) {
            queue_.pop_front();
            s->fail_unstarted(err);
            continue;
        } catch (const std::exception & ex) {
            queue_.pop_front();   // not left holding a slot it would be started with at the next admit
            s->fail_unstarted(fml_error(FML_ERR_INTERNAL, std::string("the turn could not start: ") + ex.what()));
            continue;
        }
        queue_.pop_front();
        start(s);
    }
}

void engine::start(const std::shared_ptr<chat> & s) {
    s->sync_after_reset(ctx_);
    // A chat whose previous turn ended in the last step may still be listed.
    if (std::find(running_.begin(), running_.end(), s) == running_.end()) {
        running_.push_back(s);
    }
}

bool engine::has_work(std::chrono::steady_clock::time_point now, std::chrono::steady_clock::time_point * wake) const {
    bool ready = false;
    for (const auto & s : queue_) {
        ready = ready || s->abort_pending();
    }
    // A waiting turn can start: a free slot, room to grow, or an idle chat to park.
    if (!queue_.empty() && (slots_.size() < opts_.max_slots || idle_victim() != nullptr ||
                            std::find(slots_.begin(), slots_.end(), nullptr) != slots_.end())) {
        ready = true;
    }
    for (const auto & s : running_) {
        if (!s->has_turn()) {
            continue;
        }
        if (s->abort_pending() || s->tokens_wanted(now) > 0) {
            ready = true;
        } else if (s->ready_at() > now && (*wake == std::chrono::steady_clock::time_point{} || s->ready_at() < *wake)) {
            *wake = s->ready_at();
        }
    }
    return ready;
}

bool engine::idle() const {
    return queue_.empty() && std::none_of(running_.begin(), running_.end(), [](const auto & s) { return s->has_turn(); });
}

bool engine::idle_with_peers() const {
    return idle() && std::count_if(slots_.begin(), slots_.end(), [](const chat * c) { return c != nullptr; }) >= 2;
}

void engine::apply_pending_shift(chat & s) {
    // A chat whose cache is to be prefilled from its ledger holds nothing it could have shifted (and
    // its cache does not end where its ledger does).
    if (!shift_pending_ || s.slot() < 0 || s.replay_pending()) {
        return;
    }
    const cache_view v = s.view(ctx_);
    if (v.ledger_tokens > 0) {
        flush_shift(s, v.cache_pos_max + 1);
    }
}

void engine::flush_shift(chat & s, int32_t next_pos) {
    if (!shift_pending_ || s.slot() < 0 || next_pos <= 0) {
        return;
    }
    // llama.cpp has no public call to apply a K-shift now: decode one token at the chat's next
    // position (it must be consecutive) and remove it again. A hybrid's recurrent layers would take
    // the token in for good: their state is put back after.
    const std::vector<uint8_t> recurrent = kv_recurrent_save(ctx_, s.slot());
    const int32_t token = model_->bos() >= 0 ? model_->bos() : 0;
    decode_one(s, &token, 1, next_pos, false);
    kv_remove_from(ctx_, s.slot(), next_pos);
    kv_recurrent_restore(ctx_, s.slot(), recurrent, next_pos - 1);
}

bool engine::decode_one(chat & s, const int32_t * tokens, size_t n, int32_t pos0, bool all_logits, bool signals, int32_t peak_horizon) {
    batch_.n_tokens = (int32_t) n;
    for (size_t i = 0; i < n; ++i) {
        batch_.token[i] = tokens[i];
        batch_.pos[i] = pos0 + (int32_t) i;
        batch_.n_seq_id[i] = 1;
        batch_.seq_id[i][0] = s.slot();
        batch_.logits[i] = all_logits || i + 1 == n;
    }
    if (capture_.any()) {
        capture_.begin_group({ group_member{ s.slot(), pos0, (int32_t) n, signals, peak_horizon } });
    }
    const int32_t rc = llama_decode(ctx_, batch_);
    stats_.side_tokens += n;
    if (rc == 0) {
        shift_pending_ = false;
        if (capture_.any()) {
            capture_.finish_group();
        }
    }
    return rc == 0;
}

void engine::fail_all(const std::exception & ex) noexcept {
    for (const auto & s : running_) {
        s->fail_unexpected(ex, *this);
    }
    running_.clear();
}

bool engine::generating(std::chrono::steady_clock::time_point now) const {
    return std::any_of(running_.begin(), running_.end(), [&](const auto & s) { return s->has_turn() && !s->replaying() && s->tokens_wanted(now) == 1; });
}

void engine::step(bool generating_elsewhere) {
    step_chats(generating_elsewhere);
    // Chats whose turn ended leave the running list now: before their next turn is admitted (they
    // may be parked meanwhile), not at the next step.
    running_.erase(std::remove_if(running_.begin(), running_.end(), [](const std::shared_ptr<chat> & s) { return !s->has_turn(); }), running_.end());
}

void engine::step_chats(bool generating_elsewhere) {
    const auto now = std::chrono::steady_clock::now();
    // Turns that want to stop do so between steps.
    for (const auto & s : running_) {
        if (s->has_turn() && (s->abort_pending() || stopping_->load())) {
            s->abort_turn(*this);
        }
    }
    running_.erase(std::remove_if(running_.begin(), running_.end(), [](const std::shared_ptr<chat> & s) { return !s->has_turn(); }), running_.end());

    // What each ready chat wants, in slot order (consecutive slots share ubatches).
    struct want { chat * seq; size_t n; };
    std::vector<want> wants;
    for (const auto & s : running_) {
        const size_t n = s->tokens_wanted(now);
        if (n > 0) {
            wants.push_back({ s.get(), n });
        }
    }
    if (wants.empty()) {
        return;
    }
    std::sort(wants.begin(), wants.end(), [](const want & a, const want & b) { return a.seq->slot() < b.seq->slot(); });

    // Budget: one token for every chat that generates (or writes a summary); prefill chunks share
    // the rest (equal shares, round-robin start, for fairness), capped while anyone is generating.
    size_t singles = 0;
    std::vector<size_t> prefilling;
    for (size_t i = 0; i < wants.size(); ++i) {
        if (wants[i].n == 1) {
            singles++;
        } else {
            prefilling.push_back(i);
        }
    }
    size_t prefill_budget = n_batch_ - std::min<size_t>(n_batch_, singles);
    if (singles > 0 || generating_elsewhere) {
        // `prefill_chunk` per prefilling chat: one long prompt holds the generating chats back by a
        // bounded step, and turns that start together (a batch of requests) still get in together.
        // Chats of other engines wait for this step too (a 511-token chunk held them 2 s on a 0.5B model).
        prefill_budget = std::min<size_t>(prefill_budget, (size_t) opts_.prefill_chunk * prefilling.size());
    }
    std::vector<size_t> budget(wants.size(), 1);
    if (!prefilling.empty()) {
        for (size_t i : prefilling) {
            budget[i] = 0;
        }
        // Max-min fair shares (round-robin start): each chat gets an equal share, and what a chat
        // needs less than its share goes to the others in further rounds. With equal shares cut
        // once, eight 66-token prompts that arrive together at a 512-token step left 2 tokens each
        // for a second step, one step later than the others for their whole turn (and, as they
        // finish later, out of step for the next turns too).
        size_t left = prefill_budget;
        const size_t start = rr_++ % prefilling.size();
        size_t open = prefilling.size();
        while (left > 0 && open > 0) {
            const size_t share = std::max<size_t>(1, left / open);
            open = 0;
            for (size_t k = 0; k < prefilling.size() && left > 0; ++k) {
                const size_t i = prefilling[(start + k) % prefilling.size()];
                const size_t give = std::min({ wants[i].n - budget[i], share, left });
                budget[i] += give;
                left -= give;
                open += budget[i] < wants[i].n ? 1 : 0;
            }
        }
    }

    std::vector<planned> plan;
    for (size_t i = 0; i < wants.size(); ++i) {
        if (budget[i] == 0) {
            continue;
        }
        contribution c = wants[i].seq->contribute(budget[i], *this);
        if (!c.tokens.empty()) {
            plan.push_back({ wants[i].seq, std::move(c) });
        }
    }
    if (plan.empty()) {
        return;
    }
    stats_.steps++;
    if (shift_pending_) {
        stats_.shift_steps++;
    }

    // Decode groups, each one llama_decode that llama.cpp computes as exactly one ubatch (so signals
    // map to chats, and no weight pass is wasted). One KV stream per chat: a ubatch holds consecutive
    // sequence ids with equal token counts, so each group takes, from the first chat with tokens
    // left, the run of consecutive slots after it that also have tokens left, and the same number of
    // tokens from each (the fewest any of them has left) — the split llama.cpp itself makes. Eight
    // generating chats are one group of eight tokens; eight prefill chunks of a step are one group
    // too when their slots are consecutive. A unified cache takes everything in one ubatch, except a
    // hybrid model's: llama_memory_hybrid splits every batch equally (split_equal), as streams do.
    using rows_t = std::vector<std::pair<size_t, std::pair<size_t, size_t>>>;   // plan index, [from, to)
    if (opts_.unified && model_->info().memory != "hybrid") {
        rows_t rows;
        for (size_t p = 0; p < plan.size(); ++p) {
            rows.push_back({ p, { 0, plan[p].c.tokens.size() } });
        }
        decode_group(plan, rows);
        return;
    }
    std::vector<size_t> done(plan.size(), 0);
    const auto left = [&](size_t p) { return plan[p].seq->has_turn() && !plan[p].failed ? plan[p].c.tokens.size() - done[p] : 0; };
    while (true) {
        size_t p = 0;
        while (p < plan.size() && left(p) == 0) {
            ++p;
        }
        if (p == plan.size()) {
            break;
        }
        size_t q = p + 1;
        while (q < plan.size() && left(q) > 0 && plan[q].seq->slot() == plan[q - 1].seq->slot() + 1) {
            ++q;
        }
        size_t m = SIZE_MAX;
        for (size_t k = p; k < q; ++k) {
            m = std::min(m, left(k));
        }
        m = std::max<size_t>(1, std::min(m, n_batch_ / (q - p)));
        rows_t rows;
        for (size_t k = p; k < q; ++k) {
            rows.push_back({ k, { done[k], done[k] + m } });
            done[k] += m;
        }
        decode_group(plan, rows);
    }
}

void engine::decode_group(std::vector<planned> & plan, const std::vector<std::pair<size_t, std::pair<size_t, size_t>>> & rows) {
    int32_t n = 0;
    std::vector<group_member> layout;
    std::vector<int32_t> logits_row(rows.size(), -1);
    for (size_t r = 0; r < rows.size(); ++r) {
        planned & pl = plan[rows[r].first];
        const auto [from, to] = rows[r].second;
        for (size_t i = from; i < to; ++i) {
            batch_.token[n] = pl.c.tokens[i];
            batch_.pos[n] = pl.c.pos0 + (int32_t) i;
            batch_.n_seq_id[n] = 1;
            batch_.seq_id[n][0] = pl.seq->slot();
            const bool last = i + 1 == pl.c.tokens.size();
            batch_.logits[n] = last && pl.c.logits_last;
            if (batch_.logits[n]) {
                logits_row[r] = n;
            }
            ++n;
        }
        layout.push_back({ pl.seq->slot(), pl.c.pos0 + (int32_t) from, (int32_t) (to - from), !pl.c.scratch && !pl.c.replay, pl.c.peak_horizon });
    }
    batch_.n_tokens = n;
    if (capture_.any()) {
        capture_.begin_group(layout);
    }
    // Test hook testFailSummaryDecode: a decode holding such a chat's summary fails as llama_decode can.
    const bool fail_summary = std::any_of(rows.begin(), rows.end(), [&](const auto & row) {
        return plan[row.first].c.scratch && plan[row.first].seq->options().test_fail_summary_decode;
    });
    const int32_t rc = fail_summary ? -1 : llama_decode(ctx_, batch_);
    stats_.decodes++;
    stats_.shared_decodes += rows.size() > 1 ? 1 : 0;
    stats_.tokens += (uint64_t) n;
    if (rc != 0) {
        const fml_error err = rc == 2 ? fml_error(FML_ERR_ABORTED, "aborted")
                                      : fml_error(FML_ERR_DECODE, "llama_decode failed with code " + std::to_string(rc));
        for (const auto & row : rows) {
            planned & pl = plan[row.first];
            pl.failed = true;   // a turn that goes on (a summary given up) must not decode the rest of it
            if (pl.seq->has_turn()) {
                pl.seq->decode_failed(err, *this);
            }
        }
        return;
    }
    shift_pending_ = false;
    const bool signals_ok = capture_.any() && capture_.finish_group();
    for (size_t r = 0; r < rows.size(); ++r) {
        planned & pl = plan[rows[r].first];
        if (pl.seq->has_turn()) {
            pl.seq->on_decoded(pl.c, rows[r].second.first, rows[r].second.second, logits_row[r], signals_ok ? &capture_.member(r) : nullptr, *this);
        }
    }
}

} // namespace fml
