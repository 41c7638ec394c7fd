// What a chat may ask of the engine that runs it, and nothing more: the shared context, one decode of
// its own tokens outside a step, and facts about the context. The engine hands this to a chat's turn
// and eviction code, so calls run one way (engine -> chat), never back into the scheduler.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "llama.h"

namespace fml {

class chat;

class step_context {
public:
    virtual llama_context * ctx() const = 0;
    // Tokens one llama_decode takes.
    virtual uint32_t n_batch() const = 0;
    // KV streams of the context (one per slot, or one with a unified cache).
    virtual uint32_t streams() const = 0;
    // Whether keys can move (llama.cpp's K-shift, or kv-internals' rotation at once): compaction is a
    // K-shift, else a re-prefill.
    virtual bool can_shift() const = 0;
    // The chat moved positions: the next decode pays llama.cpp's K-shift, unless the keys were rotated at once.
    virtual void note_shift() = 0;
    // Applies a pending K-shift now, for the chat whose next position is `next_pos`: a state saved
    // before it would hold unrotated keys under their new positions, which no later shift rotates.
    virtual void flush_shift(chat & s, int32_t next_pos) = 0;
    // One decode of at most n_batch() of the chat's `tokens` at `pos0`; true when it succeeded.
    // `signals`: capture them for the chat.
    virtual bool decode_one(chat & s, const int32_t * tokens, size_t n, int32_t pos0, bool all_logits, bool signals = false, int32_t peak_horizon = -1) = 0;

    // What wakes the scheduler from another thread (a chat's grammar pass, done off it): the next
    // step takes the chat's token.
    virtual std::function<void()> waker() const = 0;

protected:
    ~step_context() = default;
};

} // namespace fml
