// The state of a chat's running turn and of a summary in progress: internals of native/chat/,
// shared only with the probes (native/probes), which drive them outside a step.
#pragma once

#include "chat/chat.h"
#include "chat/reasoning.h"

#include <atomic>
#include <chrono>
#include <exception>
#include <memory>
#include <thread>
#include <vector>

namespace fml {

using clock_type = std::chrono::steady_clock;

inline double ms_since(clock_type::time_point t0) {
    return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

inline clock_type::duration ms_duration(double ms) {
    return std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double, std::milli>(ms));
}

// A summary in progress: the model writes it greedily in scratch cells after the chat's history;
// when it is done, the evicted tokens go and the summary takes their place (kv_evict_and_insert).
struct chat::summary_job {
    std::vector<index_range> ranges;
    uint32_t max_tokens = 0;
    std::vector<int32_t> prompt;      // what the model reads before writing it (chat::summary_prompt)
    int32_t prompt_pos0 = 0;
    size_t prompt_done = 0;
    std::vector<int32_t> tokens;
    std::unique_ptr<sampler_chain> sampler;
    clock_type::time_point t0;
    eviction_record rec;
    std::vector<uint8_t> recurrent;   // a hybrid's recurrent state before the scratch: it must not keep it
    std::vector<uint8_t> window;      // the sliding layers' window before the scratch (kv_window_save)
};

struct chat::turn_state {
    struct segment {
        std::vector<int32_t> tokens;
        uint32_t turn;
        token_role role;
        bool room;     // make room for this segment and the ones after it up to the next that needs room
        bool system;
    };
    turn_request req;
    std::vector<segment> segments;
    size_t seg = 0;           // prefill cursor
    size_t off = 0;
    size_t room_made_for = SIZE_MAX;
    bool rollback_set = false;
    // The turn's own tokens in the ledger since the rollback point: always its last `own` entries
    // (appended at the end; evictions take some, summaries land among older positions). A rollback
    // removes them, whatever was evicted in between (an index would point elsewhere by then).
    size_t own = 0;
    std::vector<uint8_t> recurrent;   // a hybrid's recurrent state at the rollback point
    // The sliding layers' window at the rollback point (save_window), and chat::positions_moved_ then (none
    // since: it holds).
    std::vector<uint8_t> window;
    uint64_t window_positions_moved = 0;
    int32_t window_end = 0;   // the ledger's next position then
    // Positions [first, second) of the summaries written since, which a rollback keeps (not in `window` yet).
    std::vector<std::pair<int32_t, int32_t>> window_summaries;
    std::vector<ledger_entry> scored_before;   // importance/hybrid: the ledger's scores as the turn began
    uint64_t positions_moved_before = 0;       // (positions moved since: they cannot be matched)
    std::vector<int32_t> carry_before;   // what closed the previous reply (back if the whole turn is rolled back)
    bool carry_reasoning_before = false;
    uint32_t turn_no = 0;
    bool generating = false;
    // the contribution in flight: role and turn of each token
    std::vector<std::pair<token_role, uint32_t>> inflight;
    std::unique_ptr<sampler_chain> sampler;
    std::unique_ptr<text_stream> stream;             // the answer's text (stop strings apply to it)
    std::unique_ptr<text_stream> reasoning_stream;   // the reasoning's (no stop strings)
    std::unique_ptr<reasoning_splitter> splitter;
    bool answer_held = false;   // send's grammar has taken the answer's first token: it holds every token from here
    std::vector<token_role> reply_roles;             // per sampled token of the reply: ASSISTANT or REASONING
    // Where each of them appended to the ledger so far was (its size: how many are), and
    // chat::positions_moved_ then: a relabel finds them by position while no compaction moved them
    // since (entries evicted in between cannot shift the count).
    std::vector<int32_t> reply_pos;
    uint64_t reply_pos_moved = 0;
    size_t reply_pos_valid = 0;                      // reply_pos[k] for k >= this still hold
    bool past_reasoning_done = false;                // pastReasoning 'drop' ran for this turn
    size_t forced_next = 0;                          // testReply: the next of chat::test_reply_
    int32_t pending = -1;     // sampled, not yet decoded
    std::unique_ptr<summary_job> summary;
    // A summary whose decode failed: the eviction it was for, applied at the next contribution.
    std::vector<index_range> unsummarized;
    eviction_record unsummarized_rec;
    turn_result result;
    clock_type::time_point t_start;
    clock_type::time_point t_called;   // the call (the preparation before t_start): latency and first token count from it
    clock_type::time_point t_generate;
    bool first_token = false;
    size_t gen_chunk = 1;
    size_t prefill_slack = 0;
    // A grammar's pass over the vocabulary, on a thread of its own while steps go on without this
    // chat (chat::sample_next). Last: it is joined before what it reads (the sampler, the grammar,
    // the splitter) is destroyed.
    std::unique_ptr<grammar_pass> pass;
};

// The thread of a grammar's pass and what it found. Destroyed (a turn ended while it ran: an abort,
// a failure), it stops the pass and waits for it (a slice of the vocabulary's candidates at most).
struct chat::grammar_pass {
    std::thread worker;
    std::atomic<bool> done{ false };
    std::atomic<bool> cancel{ false };   // the turn ended: the pass stops at its next slice
    sampler_chain::held_step step;   // the token it took
    double ms = 0;
    std::exception_ptr error;
    ~grammar_pass() {
        cancel.store(true);
        if (worker.joinable()) {
            worker.join();
        }
    }
};

} // namespace fml
