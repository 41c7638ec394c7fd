// One runtime per loaded model: a scheduler thread that owns every engine (llama_context) of the
// model and is the only thread that decodes or touches their KV caches. It runs the engines one step
// at a time, each step with the model's thread budget, so however many chats run, at most `threads`
// ggml threads are busy; the JS event loop only hears about finished pieces and turns.
//
// Work reaches it as turns (submit) and tasks (post / run_sync: checkpoints, releases, probes), which
// run between steps, in order.
#pragma once

#include "engine/engine.h"
#include "chat/chat.h"
#include "model/model.h"

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace fml {

struct runtime_options {
    int32_t threads = 1;
    engine_options engine;
    // Who created it (an opaque tag: the binding's environment), so that stop_owned() stops only
    // what one Node environment (the main thread or a Worker) created.
    const void * owner = nullptr;
};

class runtime {
public:
    runtime(std::shared_ptr<fml_model> model, const runtime_options & opts);
    // Stops the scheduler (running decodes abort) and frees every engine. Never call it from the
    // scheduler thread: the owners (the JS model and chats) live on the JS thread.
    ~runtime();
    runtime(const runtime &) = delete;
    runtime & operator=(const runtime &) = delete;

    const runtime_options & options() const { return opts_; }
    const std::shared_ptr<fml_model> & model() const { return model_; }

    // Starts `req` on chat `s` as soon as it has a slot. Its callbacks fire on the scheduler thread;
    // a turn submitted once the runtime is stopping (its model disposed while the turn was prepared)
    // ends at once as aborted, on the calling thread, as the turns still waiting when it stopped do.
    void submit(const std::shared_ptr<chat> & s, turn_request && req);
    // The model is being disposed: no new turn starts.
    bool stopping() const { return stopping_.load(); }
    // Runs `fn` on the scheduler between steps.
    void post(std::function<void()> fn);
    // Runs `fn` on the scheduler and waits for it; rethrows what it throws. Not from the scheduler.
    template <typename F>
    auto run_sync(F fn) -> decltype(fn()) {
        using R = decltype(fn());
        auto task = std::make_shared<std::packaged_task<R()>>(std::move(fn));
        std::future<R> done = task->get_future();
        post([task] { (*task)(); });
        return done.get();
    }
    // A chat's abort flag was set: the scheduler looks at it now rather than at its next wake-up.
    void wake();
    // The chat is gone (disposed or finalized): its slot is freed between steps.
    void release(const std::shared_ptr<chat> & s);
    // Scheduler thread: the chat's engine (created at its first use; throws CONTEXT_CREATE_FAILED).
    engine & engine_for(chat & s);
    // The engine the chat is bound to, or the one of its geometry it would be (nullptr: none yet).
    engine * engine_of(const chat & s) const;
    // Frees an engine no chat is bound to any more.
    void retire_if_unused(engine * e);

    // Operations on an idle chat, each run where it must (the binding only converts values and
    // queues them on a worker thread; these block that thread, never the JS one).
    // Its state for a checkpoint: the ledger kind under the chat's own lock, the full kind on the
    // scheduler between steps (a pending K-shift applied first).
    chat_state export_chat(chat & c, bool with_kv);
    // Evicts every token of `turn` now, in place; returns how many (0: never had a turn), or -1 when
    // the chat is parked and every slot of its engine is in a turn (the caller tries again later: a
    // worker thread must not wait out another chat's turn).
    int64_t forget_turn(chat & c, uint32_t turn);
    // A chat restored from a checkpoint's state gets a slot (or stays parked when all are busy).
    void place_restored(chat & c);
    // The ledger's and llama.cpp's view of the chat's cache, and the signal checks of its engine.
    struct cache_report {
        cache_view view;
        uint64_t attention_rows_checked = 0, causal_violations = 0, layout_mismatches = 0;
    };
    cache_report cache_state(chat & c);

    // Figures of every engine (tests, benchmarks), summed; of the chat's own engine.
    engine_stats stats();
    engine_stats stats_of(chat & c);

    // Stops every live runtime created with this owner (that environment is going away); the
    // runtimes of other environments (the main thread, other Workers) keep running.
    static void stop_owned(const void * owner);
    static size_t live_count();

private:
    void loop();
    // With `lock` held and turns just arrived at an idle engine: waits briefly for more (see the .cpp).
    bool should_gather() const;
    void gather(std::unique_lock<std::mutex> & lock);
    void stop();

    std::shared_ptr<fml_model> model_;
    runtime_options opts_;
    std::atomic<bool> stopping_{false};

    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<std::function<void()>> tasks_;
    std::vector<std::pair<std::shared_ptr<chat>, turn_request>> incoming_;

    // Scheduler thread only.
    // ggml thread pools, one per thread count, shared by the engines (declared first: they outlive
    // them). The scheduler runs one engine at a time; with a pool per engine, the idle one's workers
    // kept polling for their next graph (ggml spins ~100 ms before sleeping) through the other
    // engine's step: chats of two engines taking turns prefilled ~1.5x slower on 2 cores.
    struct pool_deleter { void operator()(ggml_threadpool * p) const; };
    std::map<int32_t, std::unique_ptr<ggml_threadpool, pool_deleter>> pools_;
    std::vector<std::unique_ptr<engine>> engines_;
    engine_stats retired_;   // the cumulative counters of engines freed (retire_if_unused)
    std::thread thread_;
};

} // namespace fml
