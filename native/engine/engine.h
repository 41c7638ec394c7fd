// An engine is one llama_context shared by the chats of a model that need the same KV geometry
// (kv_geometry): every chat is a sequence with a KV stream of its own (kv_unified = false, so a
// token's attention costs what its own chat retains, not what all chats do). Its scheduler thread
// (runtime.h) calls step(): one batch per step, built from one token of every generating chat and
// bounded prefill chunks of the prefilling ones, decoded as few ubatches as llama.cpp allows.
//
// Capacity: the context starts with one slot (stream) and doubles up to `max_slots` as chats arrive,
// moving every chat's KV into the bigger context. Beyond that, an idle chat is parked (its KV state
// moved to host memory) when another needs its slot, and restored at its next turn; a turn waits
// when every slot holds a chat mid-turn.
#pragma once

#include "chat/chat.h"
#include "engine/signals.h"
#include "chat/step-context.h"

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "llama.h"

namespace fml {

struct engine_options {
    uint32_t max_slots = 8;
    uint32_t prefill_chunk = 64;   // prefill tokens per prefilling chat and step while other chats generate
    bool unified = false;          // one KV buffer for all sequences (measured slower; see README)
    uint32_t test_context_slot_limit = 0;   // test hook: contexts of more slots fail (0: never)
    bool test_no_key_rotation = false;      // test hook: keys llama.cpp cannot shift are not rotated (compaction re-prefills)
};

struct engine_stats {
    uint64_t steps = 0;
    uint64_t decodes = 0;          // llama_decode calls (one ubatch each)
    uint64_t shared_decodes = 0;   // decodes that held tokens of two chats or more
    uint64_t tokens = 0;
    uint64_t parked = 0;
    uint64_t restored = 0;
    uint64_t grown = 0;            // times the context was rebuilt with more slots
    uint64_t shift_steps = 0;      // steps that paid a K-shift
    uint64_t deferred_moves = 0;   // position moves llama.cpp's K-shift applies in a later decode
    uint64_t rotated_moves = 0;    // position moves this library rotated the keys of at once (kv_rotate_positions)
    uint64_t side_tokens = 0;      // tokens decoded outside steps (re-prefills, window repairs, K-shift flushes)
    uint32_t slots = 0;
    uint32_t occupied = 0;
    uint32_t engines = 0;          // runtime::stats() only: engines of the model
    uint32_t thread_pools = 0;     // runtime::stats() only: ggml thread pools they run on
};

class engine final : public step_context {
public:
    // `pool`: the ggml thread pool its decodes run on (the runtime's, shared with its other engines;
    // may be null).
    // `wake`: wakes the scheduler thread from another (step_context::waker).
    engine(std::shared_ptr<fml_model> model, const kv_geometry & key, const engine_options & opts, const std::atomic<bool> * stopping, ggml_threadpool * pool,
           std::function<void()> wake);
    ~engine();
    engine(const engine &) = delete;
    engine & operator=(const engine &) = delete;

    const kv_geometry & key() const { return key_; }
    llama_context * ctx() const override { return ctx_; }
    std::function<void()> waker() const override { return wake_; }
    const engine_stats & stats() const { return stats_; }

    // A turn to run (scheduler thread): started at once when the chat has or gets a slot, else queued.
    void enqueue(const std::shared_ptr<chat> & s);
    // Gives queued turns slots (parking idle chats, growing the context) and starts them.
    void admit();
    bool has_work(std::chrono::steady_clock::time_point now, std::chrono::steady_clock::time_point * wake) const;
    bool idle() const;   // no turn running or waiting
    // No turn running or waiting, and at least two chats hold slots: a turn arriving now may be the
    // first of several sent together (runtime::loop gathers them into one step).
    bool idle_with_peers() const;
    // One batch: every chat with a turn contributes, one llama_decode per ubatch.
    // `generating_elsewhere`: a chat of another engine of the runtime generates, so this step's prefill
    // is capped as if one of its own did (the engines' steps run one after the other).
    void step(bool generating_elsewhere = false);
    // A chat of this engine is generating (or summarizing) a token at a time.
    bool generating(std::chrono::steady_clock::time_point now) const;
    // An error escaped admit() or step(): every turn of this engine ends with it (which of them the step
    // left half done is unknown), their caches to be rebuilt from their ledgers.
    void fail_all(const std::exception & ex) noexcept;
    // The chat decodes here from now on (its turns, its slot, its parked state).
    void bind(chat & s);
    // Frees the chat's slot and unbinds it (disposed or finalized). Its turn, if any, has ended.
    void release(chat & s);
    // No chat is bound any more: the runtime frees the context (its KV buffers) at once.
    bool unused() const { return bound_ == 0 && queue_.empty() && running_.empty(); }
    // Makes sure the chat holds a slot now (tasks: checkpoints, probes). False when all slots are busy.
    bool ensure_slot(chat & s);
    // llama.cpp applies K-shifts lazily at the next llama_decode; state snapshots must not see them
    // pending. Decodes one token for `s` and removes it again when a shift is pending.
    void apply_pending_shift(chat & s);
    // A chat moved positions: with llama.cpp's K-shift the next decode pays it for every cell of the
    // context; keys kv-internals rotated are already in place.
    void note_shift() override {
        shift_pending_ = shift_pending_ || shift_deferred_;
        (shift_deferred_ ? stats_.deferred_moves : stats_.rotated_moves)++;
    }
    void flush_shift(chat & s, int32_t next_pos) override;
    // Whether this context's keys can move (llama.cpp's K-shift where sound, else kv-internals'
    // rotation where it can): compaction is a K-shift, else a re-prefill.
    bool can_shift() const override { return can_shift_; }
    eval_capture & capture() { return capture_; }
    // One decode of at most n_batch() `tokens` for chat `s` at `pos0` outside a step (probes, pending
    // shifts); true when it succeeded. `signals`: capture them (capture().member(0) afterwards).
    bool decode_one(chat & s, const int32_t * tokens, size_t n, int32_t pos0, bool all_logits, bool signals = false, int32_t peak_horizon = -1) override;
    uint32_t n_batch() const override { return n_batch_; }
    // KV streams of the context: one per slot, or one for all with a unified cache.
    uint32_t streams() const override { return opts_.unified ? 1 : (uint32_t) slots_.size(); }

private:
    struct planned {
        chat * seq;
        contribution c;
        bool failed = false;   // a decode of it failed: the rest of it is not decoded this step
    };
    void step_chats(bool generating_elsewhere);
    void start(const std::shared_ptr<chat> & s);
    void create_context(uint32_t slots);
    bool grow();
    chat * idle_victim() const;
    void place(chat & s, int32_t slot);
    void decode_group(std::vector<planned> & plan, const std::vector<std::pair<size_t, std::pair<size_t, size_t>>> & rows);

    std::shared_ptr<fml_model> model_;
    kv_geometry key_;
    engine_options opts_;
    const std::atomic<bool> * stopping_;
    std::function<void()> wake_;
    llama_context * ctx_ = nullptr;
    ggml_threadpool * threadpool_ = nullptr;   // not owned: the runtime's pool for this thread count
    llama_batch batch_ {};
    uint32_t n_batch_ = 0;
    std::vector<chat *> slots_;           // chat in each slot (stream), or null
    std::deque<std::shared_ptr<chat>> queue_;   // turns waiting for a slot
    std::vector<std::shared_ptr<chat>> running_; // chats with a turn in a slot
    eval_capture capture_;
    bool shift_pending_ = false;
    bool can_shift_ = false;
    bool shift_deferred_ = false;   // llama.cpp applies moves in the next decode (kv_shift_deferred; else rotated at once)
    size_t rr_ = 0;                           // round-robin start among prefilling chats
    uint32_t bound_ = 0;                      // chats bound (in a slot or parked)
    engine_stats stats_;
};

} // namespace fml
