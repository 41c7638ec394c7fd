#include "engine/runtime.h"

#include "ggml-cpu.h"

#include "util/error.h"

#include <algorithm>
#include <set>

namespace fml {

namespace {
std::mutex g_runtimes_mutex;
std::set<runtime *> g_runtimes;
}

runtime::runtime(std::shared_ptr<fml_model> model, const runtime_options & opts) : model_(std::move(model)), opts_(opts) {
    {
        std::lock_guard<std::mutex> lock(g_runtimes_mutex);
        g_runtimes.insert(this);
    }
    thread_ = std::thread([this] { loop(); });
}

runtime::~runtime() {
    stop();
    {
        std::lock_guard<std::mutex> lock(g_runtimes_mutex);
        g_runtimes.erase(this);
    }
    // Engines go before the tasks and turns that might still reference chats.
    engines_.clear();
}

void runtime::stop() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_.load() && !thread_.joinable()) {
            return;
        }
        stopping_.store(true);
    }
    cv_.notify_all();
    if (thread_.joinable()) {
        thread_.join();
    }
}

void runtime::stop_owned(const void * owner) {
    // Stopped under the registry lock: a runtime cannot be destroyed (it erases itself under the same
    // lock) while it is being stopped here.
    std::lock_guard<std::mutex> lock(g_runtimes_mutex);
    for (runtime * r : g_runtimes) {
        if (r->opts_.owner == owner) {
            r->stop();
        }
    }
}

size_t runtime::live_count() {
    std::lock_guard<std::mutex> lock(g_runtimes_mutex);
    return g_runtimes.size();
}

void runtime::submit(const std::shared_ptr<chat> & s, turn_request && req) {
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (!stopping_.load()) {
            incoming_.emplace_back(s, std::move(req));
            cv_.notify_one();
            return;
        }
    }
    // The scheduler is gone or going (its last pass over incoming_ ran under mu_ too): nothing else
    // touches the chat.
    s->begin_turn(std::move(req));
    s->fail_unstarted(fml_error(FML_ERR_ABORTED, "aborted"));
}

void runtime::wake() {
    // Taking the lock orders this wake-up after the flag its caller set: the scheduler reads abort
    // flags under this lock before it waits, so without it a wake-up landing between that read and the
    // wait was lost, and an abort waited for the next unrelated wake-up (for ever when none came).
    { std::lock_guard<std::mutex> lock(mu_); }
    cv_.notify_one();
}

void runtime::post(std::function<void()> fn) {
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_.load()) {
            throw fml_error(FML_ERR_DISPOSED, "the model is shutting down");
        }
        tasks_.push_back(std::move(fn));
    }
    cv_.notify_one();
}

void runtime::release(const std::shared_ptr<chat> & s) {
    try {
        post([this, s] {
            if (engine * e = s->owner()) {
                e->release(*s);
                retire_if_unused(e);
            }
        });
    } catch (const fml_error &) {
        // Shutting down: the engines and their slots go with the runtime.
    }
}

void runtime::pool_deleter::operator()(ggml_threadpool * p) const {
    ggml_threadpool_free(p);
}

engine * runtime::engine_of(const chat & s) const {
    if (s.owner() != nullptr) {
        return s.owner();
    }
    for (const auto & e : engines_) {
        if (e->key() == s.key()) {
            return e.get();
        }
    }
    return nullptr;
}

engine & runtime::engine_for(chat & s) {
    if (engine * e = engine_of(s)) {
        if (s.owner() == nullptr) {
            e->bind(s);
        }
        return *e;
    }
    auto & pool = pools_[s.key().threads];
    if (pool == nullptr) {
        ggml_threadpool_params tpp = ggml_threadpool_params_default(s.key().threads);
        pool.reset(ggml_threadpool_new(&tpp));   // null: llama.cpp then starts threads per graph
    }
    engines_.push_back(std::make_unique<engine>(model_, s.key(), opts_.engine, &stopping_, pool.get(), [this] { wake(); }));
    engines_.back()->bind(s);
    return *engines_.back();
}

// The cumulative counters of `s` added to `into` (not its current slots).
static void add_counters(engine_stats & into, const engine_stats & s) {
    into.steps += s.steps;
    into.decodes += s.decodes;
    into.shared_decodes += s.shared_decodes;
    into.tokens += s.tokens;
    into.parked += s.parked;
    into.restored += s.restored;
    into.grown += s.grown;
    into.shift_steps += s.shift_steps;
    into.deferred_moves += s.deferred_moves;
    into.rotated_moves += s.rotated_moves;
    into.side_tokens += s.side_tokens;
}

void runtime::retire_if_unused(engine * e) {
    // A geometry no chat uses any more (its chats disposed: a server's sessions that chose another
    // budget, say) gives its context and KV buffers back now; its counters stay in the totals.
    if (!e->unused()) {
        return;
    }
    const auto it = std::find_if(engines_.begin(), engines_.end(), [&](const auto & p) { return p.get() == e; });
    if (it == engines_.end()) {
        return;
    }
    add_counters(retired_, e->stats());
    engines_.erase(it);
}

engine_stats runtime::stats() {
    return run_sync([this] {
        engine_stats total = retired_;
        for (const auto & e : engines_) {
            add_counters(total, e->stats());
            total.slots += e->stats().slots;
            total.occupied += e->stats().occupied;
        }
        total.engines = (uint32_t) engines_.size();
        total.thread_pools = (uint32_t) std::count_if(pools_.begin(), pools_.end(), [](const auto & p) { return p.second != nullptr; });
        return total;
    });
}

bool runtime::should_gather() const {
    // Only for turns bound for an idle engine with other chats, and never while another engine has
    // turns to step: a lone chat of another engine (another budget, say) waited 2-8 ms per turn, and
    // a generating engine's steps paused for as long.
    bool wanted = false;
    for (const auto & [s, req] : incoming_) {
        const engine * target = engine_of(*s);
        wanted = wanted || (target != nullptr && target->idle_with_peers());
    }
    return wanted && std::all_of(engines_.begin(), engines_.end(), [](const auto & e) { return e->idle(); });
}

engine_stats runtime::stats_of(chat & c) {
    return run_sync([&] { return c.owner() != nullptr ? c.owner()->stats() : engine_stats{}; });
}

void runtime::gather(std::unique_lock<std::mutex> & lock) {
    // Turns sent together (Promise.all over chats, a server answering several clients, chats whose
    // turns ended in the same step) reach this thread one by one, tens to hundreds of microseconds
    // apart. Starting the first alone puts the others' prefill into its generation steps and keeps
    // the chats out of step for their following turns too (bench/concurrency.ts at K = 2: a p99
    // turn 0.91x llama-server's). So an idle engine with other chats waits until no turn has
    // arrived for GATHER_QUIET, at most GATHER_MAX, and starts them in one step. A lone chat
    // (K = 1) never waits.
    using clock = std::chrono::steady_clock;
    constexpr auto GATHER_QUIET = std::chrono::microseconds(2000);
    constexpr auto GATHER_MAX = std::chrono::microseconds(8000);
    const auto start = clock::now();
    size_t seen = incoming_.size();
    auto deadline = start + GATHER_QUIET;
    while (!stopping_.load() && tasks_.empty()) {
        if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && incoming_.size() == seen) {
            break;
        }
        if (incoming_.size() != seen) {
            seen = incoming_.size();
            deadline = std::min(clock::now() + GATHER_QUIET, start + GATHER_MAX);
        }
    }
}

void runtime::loop() {
    using clock = std::chrono::steady_clock;
    while (true) {
        std::deque<std::function<void()>> tasks;
        std::vector<std::pair<std::shared_ptr<chat>, turn_request>> incoming;
        {
            std::unique_lock<std::mutex> lock(mu_);
            while (true) {
                if (stopping_.load() || !tasks_.empty() || !incoming_.empty()) {
                    break;
                }
                clock::time_point wake{};
                bool ready = false;
                const auto now = clock::now();
                for (const auto & e : engines_) {
                    ready = e->has_work(now, &wake) || ready;
                }
                if (ready) {
                    break;
                }
                if (wake != clock::time_point{}) {
                    cv_.wait_until(lock, wake);
                } else {
                    cv_.wait(lock);
                }
            }
            if (should_gather()) {
                gather(lock);
            }
            if (stopping_.load()) {
                break;
            }
            tasks.swap(tasks_);
            incoming.swap(incoming_);
        }
        for (auto & task : tasks) {
            task();   // run_sync's packaged_task keeps its own exceptions
        }
        for (auto & [s, req] : incoming) {
            try {
                s->begin_turn(std::move(req));
                engine_for(*s).enqueue(s);
            } catch (const fml_error & err) {
                s->fail_unstarted(err);
            }
        }
        const auto now = clock::now();
        for (const auto & e : engines_) {
            try {
                e->admit();
                const bool elsewhere = std::any_of(engines_.begin(), engines_.end(), [&](const auto & o) { return o.get() != e.get() && o->generating(now); });
                e->step(elsewhere);
            } catch (const std::exception & ex) {
                // A bug, not a failed decode (those end their turn inside the step): on this thread it
                // would end the process. The engine's turns end with it instead; the other engines go on.
                e->fail_all(ex);
            }
        }
    }
    // Stopping: turns still running or waiting end as aborted, so their promises settle.
    for (const auto & e : engines_) {
        e->admit();
        e->step();
    }
    std::lock_guard<std::mutex> lock(mu_);
    for (auto & [s, req] : incoming_) {
        s->begin_turn(std::move(req));
        s->fail_unstarted(fml_error(FML_ERR_ABORTED, "aborted"));
    }
    incoming_.clear();
    tasks_.clear();
}

chat_state runtime::export_chat(chat & c, bool with_kv) {
    if (!with_kv) {
        return c.export_state(nullptr, false);   // everything it reads is guarded by the chat's lock
    }
    return run_sync([&] {
        engine * e = c.owner();
        if (e != nullptr) {
            e->apply_pending_shift(c);
        }
        return c.export_state(e != nullptr ? e->ctx() : nullptr);
    });
}

int64_t runtime::forget_turn(chat & c, uint32_t turn) {
    return run_sync([&]() -> int64_t {
        engine * e = c.owner();
        if (e == nullptr) {
            return 0;   // never had a turn: nothing in memory
        }
        if (!e->ensure_slot(c)) {
            return -1;
        }
        e->apply_pending_shift(c);
        return (int64_t) c.forget_turn(turn, *e);
    });
}

void runtime::place_restored(chat & c) {
    run_sync([&] {
        engine & e = engine_for(c);
        try {
            e.ensure_slot(c);
        } catch (...) {
            e.release(c);
            retire_if_unused(&e);
            throw;
        }
    });
}

runtime::cache_report runtime::cache_state(chat & c) {
    return run_sync([&] {
        cache_report out;
        engine * e = c.owner();
        out.view = c.view(e != nullptr ? e->ctx() : nullptr);
        if (e != nullptr) {
            out.attention_rows_checked = e->capture().attention_rows_checked;
            out.causal_violations = e->capture().causal_violations;
            out.layout_mismatches = e->capture().layout_mismatches;
        }
        return out;
    });
}

} // namespace fml
