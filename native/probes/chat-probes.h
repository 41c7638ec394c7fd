// Test and benchmark probes of a chat (not part of the shipped addon): logits at the next position,
// whole-sequence shifts, teacher-forced evaluation, naive re-prefill and bare decoding. They run on
// the scheduler thread (runtime::run_sync) while the chat is idle, and leave it as they found it
// unless their purpose is to change it (shift, evaluate).
#pragma once

#include "engine/engine.h"
#include "chat/chat.h"

#include <functional>
#include <vector>

namespace fml {

struct chat_probes {
    // Logits for `token` decoded at the chat's next position (the decode is rolled back).
    static std::vector<float> probe_logits(chat & s, engine & e, int32_t token);
    // Shifts every cached position by `delta` (RoPE is relative, so logits must not change).
    static void shift_positions(chat & s, engine & e, int32_t delta);
    // Saves the sliding layers' window as a turn does before a long prefill, and restores it: the
    // cache must answer as before (a pending K-shift is applied first, else the saved keys would
    // never be rotated). No-op for models without sliding layers.
    static void window_round_trip(chat & s, engine & e);
    // Feeds `tokens` in chunks of `chunk`, evicting with the policy as a conversation would, and
    // returns the logits after every fed token (tokens.size() x n_vocab, row-major).
    static std::vector<float> evaluate_tokens(chat & s, engine & e, const std::vector<int32_t> & tokens, size_t chunk);
    // Clears the chat's cells and prefills the retained tokens again (the naive re-prefill approach,
    // same retained content); returns ms.
    static double replay_history(chat & s, engine & e);
    // A hybrid chat's recurrent state as llama.cpp saves it (empty for other models): eviction, an
    // aborted prefill or a summary must leave it as it was.
    static std::vector<uint8_t> recurrent_state(chat & s, engine & e);
    // The tokens a summary written now (between turns: at the next turn's start) would read before its
    // text: the previous reply's end, then the instruction. Empty for policies that write none.
    static std::vector<int32_t> summary_prompt(chat & s);
    // A chat with tools: whether its exchanges are framed the fast way (1) or with every tool (0); -1 without tools.
    static int tool_frames_fast(chat & s);
    // Sets what runs first in each of the chat's next turn preparations (chat::before_prepare); idle only.
    static void set_prepare_hook(chat & s, std::function<void()> hook);
    // Greedy-decodes n tokens with bare llama_decode + sampling (no ledger, streaming or policy),
    // then rolls back; returns ms.
    static double plain_decode(chat & s, engine & e, int32_t n);

private:
    static void ready(chat & s, engine & e);
    static void make_room(chat & s, engine & e, size_t incoming);
};

} // namespace fml
