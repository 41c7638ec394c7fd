// One chat = one sequence in a shared engine (a llama_context with a KV stream per chat), its
// token ledger, its policy and its turn. A turn prefills only its new tokens; when the budget would
// overflow, the policy picks tokens and kv-ops removes them in place. The retained tokens keep their
// positions (positions 'keep'); they are compacted when the next position would pass the chat's
// position limit, by a K-shift (or kv-internals' rotation where llama.cpp's is wrong: M-RoPE, YaRN,
// layers without positions) or, where keys cannot move at all, by re-prefilling them once. For a
// hybrid model only the attention KV is finite: the recurrent state keeps going, and is put back from
// a snapshot whenever tokens it saw must leave no trace (an aborted prefill, a summary's scratch).
//
// Threads: the JS thread creates a chat, reads its state and resets it while idle; a turn is prepared
// (framing, the fit check) on a worker thread while the chat is claimed for it (binding/chat.cpp);
// everything that touches the KV cache runs on the model's scheduler thread
// (engine/runtime.h), which drives the turn step by step: tokens_wanted() says how many tokens the chat
// needs, contribute() what it adds to the next batch (making room first), on_decoded() takes the
// result. Shared state is guarded by one mutex.
#pragma once

#include "engine/grammar.h"
#include "engine/options.h"
#include "engine/sampler.h"
#include "engine/signals.h"
#include "engine/tool-calls.h"
#include "chat/step-context.h"
#include "kv/token-ledger.h"
#include "model/model.h"
#include "policies/policy.h"
#include "util/error.h"
#include "util/utf8.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

struct llama_context;

namespace fml {

class engine;

// Where importance scores come from (see signals.h).
enum importance_signal { IMPORTANCE_NONE, IMPORTANCE_ATTENTION, IMPORTANCE_KEY_NORM };
const char * importance_signal_name(importance_signal s);

enum stop_reason { STOP_EOS, STOP_MAX_TOKENS, STOP_STRING, STOP_ABORT };
const char * stop_reason_name(stop_reason r);

// One eviction event (telemetry): what left, where it was, and what choosing it cost.
struct eviction_record {
    uint32_t evicted = 0;
    std::vector<index_range> positions;   // positions before the eviction, [begin, end)
    double policy_ms = 0;
    double evict_ms = 0;
    bool fallback = false;
    bool past_reasoning = false;          // earlier replies' reasoning (pastReasoning), not the policy's choice
    uint32_t summary_tokens = 0;
    uint32_t summary_prompt_tokens = 0;   // decoded before the summary: the open reply's close, the instruction
    bool during_generation = false;
};

struct turn_stats {
    uint32_t turn = 0;               // this turn's number in memory() (pin/unpin/forget take it)
    uint32_t prompt_tokens = 0;      // tokens prefilled this turn (only the new ones)
    uint32_t generated_tokens = 0;
    double   prefill_ms = 0;
    double   decode_ms = 0;
    double   tokens_per_second = 0;
    double   policy_ms = 0;          // time policies spent choosing
    double   evict_ms = 0;           // time spent in seq_rm (+ seq_add when compacting)
    uint32_t evicted_tokens = 0;
    uint32_t evictions = 0;          // eviction events this turn
    uint32_t compactions = 0;        // times positions were numbered 0..n-1 again this turn
    double   compact_ms = 0;         // time they took (a re-prefill's decodes; a K-shift's own cost is in the next decode)
    uint32_t retained_tokens = 0;
    double   latency_ms = 0;
    double   first_token_ms = 0;     // from the call (send) to its first generated token
    double   prepare_ms = 0;         // the turn's preparation on a worker: framing, tokenizing, a tool turn's set-up, a grammar
    bool     fallback = false;
    double   summary_ms = 0;          // time the model spent writing summaries this turn
    uint32_t summary_tokens = 0;      // summary tokens placed in the cache this turn
    uint32_t signal_reads = 0;        // decodes of this turn whose importance signals the scores took
    uint32_t grammar_passes = 0;      // send's grammar: passes over the vocabulary (the sampler's choice did not fit)
    double   grammar_ms = 0;          // ... and the time they took (in the step or on a thread of their own)
    std::string policy;
    std::vector<eviction_record> eviction_log;
};

struct turn_result {
    std::string response;            // the answer (a reasoning model's reasoning apart: `reasoning`; tool calls apart: `tool_calls`)
    std::string reasoning;
    std::vector<tool_call> tool_calls;   // a chat with tools: the calls the reply made, in the template's format
    stop_reason reason = STOP_EOS;
    turn_stats stats;
};

struct cumulative_stats {
    uint64_t turns = 0;
    uint64_t tokens_seen = 0;        // every token decoded into the cache and kept past its turn
    uint64_t tokens_evicted = 0;
    uint64_t evictions = 0;
    uint64_t fallback_count = 0;
    uint64_t compactions = 0;
};

struct memory_entry {
    int32_t token;
    int32_t pos;
    uint32_t turn;
    token_role role;
    bool pinned;
    float score;
    std::string text;
};

// Everything needed to rebuild a chat (see checkpoint.h for the file format).
struct chat_state {
    chat_options options;
    uint32_t turn = 0;
    bool started = false;
    std::vector<int32_t> carry;
    bool carry_reasoning = false;   // the carry's first token (the reply's last sampled one) is reasoning
    std::string summary_text;
    cumulative_stats stats;
    std::vector<ledger_entry> ledger;
    size_t embedding_dim = 0;
    std::vector<float> embeddings;
    std::vector<uint8_t> kv;
    bool ledger_only = false;   // no KV state: the retained tokens are prefilled again on restore
    std::string transcript;     // the JS side's transcript (JSON), kept with the chat
};

// The KV geometry a chat needs (the chat computes it from the model and its options). Chats with equal
// geometries share one engine (one llama_context).
struct kv_geometry {
    uint32_t cells = 0;            // KV cells per sequence: the budget plus summary scratch, rounded up
    std::string kv_type;
    int32_t flash_attention = -1;  // -1 llama.cpp's choice, 0 off, 1 on
    bool attention = false;        // signals the chats need (signals.h)
    bool key_norm = false;
    int32_t hidden_layer = -1;
    int32_t threads = 1;
    uint32_t n_batch = 512;
    bool operator==(const kv_geometry & o) const {
        return cells == o.cells && kv_type == o.kv_type && flash_attention == o.flash_attention && attention == o.attention &&
               key_norm == o.key_norm && hidden_layer == o.hidden_layer && threads == o.threads && n_batch == o.n_batch;
    }
};

struct turn_callbacks {
    // Scheduler thread, in order; never splits UTF-8. `reasoning`: the piece is reasoning, not answer.
    std::function<void(const std::string &, bool reasoning)> on_piece;
    std::function<void(turn_result &&)> on_done;         // exactly one of on_done / on_error, once
    std::function<void(const fml_error &)> on_error;
};

// A turn as the JS thread prepared it: the message framed and checked to fit.
struct turn_request {
    bool ingest = false;             // a finished exchange (transcript import): prefill, generate nothing
    bool pin = false;                // the user message stays through every eviction (send's `pin`)
    std::vector<int32_t> framed;     // the user message in its template framing
    std::vector<int32_t> reply;      // ingest: the assistant's reply
    bool reasoning_opened = false;   // the framing's generation prompt opens a think block
    // The reply's start, prefilled: the think block the generation prompt opened, and (thinking false)
    // what skips the reasoning.
    std::vector<int32_t> reply_prefix;
    token_role reply_prefix_role = TOKEN_ROLE_REASONING;
    bool reasoning_skipped = false;  // thinking false: the reply starts after its (empty) reasoning
    generation_options gen;
    std::unique_ptr<reply_grammar> grammar;   // gen's grammar or jsonSchema, compiled, or the tool call's (null: none)
    bool grammar_of_tools = false;            // the grammar is the tool call's (its preserved markers are text)
    // harmony with tools: the answer keeps its messages' markup as text (the tools' parser reads it;
    // a call is a message of its own) and its end after a call is the format's (<|call|>).
    bool tool_markup = false;
    // What closes this reply when not the template's usual end of an assistant turn (an imported
    // reply with calls: the format's, gpt-oss's <|call|>); carried into the next turn.
    std::vector<int32_t> closing;
    std::shared_ptr<const tool_turn> tools;   // a chat with tools: this turn's grammar and parser
    turn_callbacks cb;
    std::chrono::steady_clock::time_point called_at{};   // when the caller asked for it (default: when it began)
    double prepare_ms = 0;
};

// A step's part of one chat: tokens at consecutive positions of its sequence.
struct contribution {
    std::vector<int32_t> tokens;
    int32_t pos0 = 0;
    bool logits_last = false;   // the chat samples after its last token
    bool scratch = false;       // summary cells: not in the ledger, no signals
    bool replay = false;        // retained tokens prefilled again (a ledger-only restore): in the ledger already, no signals
    int32_t peak_horizon = -1;  // see group_member (engine/signals.h)
};

// Probe view of the cache (tests, the demo): the ledger's and llama.cpp's idea of the sequence.
struct cache_view {
    size_t ledger_tokens = 0;
    size_t pinned_tokens = 0;
    int32_t cache_pos_min = -1;
    int32_t cache_pos_max = -1;
    bool positions_contiguous = true;
    bool positions_increasing = true;
    int32_t ledger_pos_first = -1;   // the ledger's first and last positions (-1: empty)
    int32_t ledger_pos_last = -1;
    int32_t position_limit = 0;
    uint32_t cells = 0;
    size_t carried_tokens = 0;
    size_t pending_system_tokens = 0;
    int32_t slot = -1;
    bool parked = false;
    int32_t scratch_pos_max = -1;   // highest cached position beyond the ledger (summary scratch left behind)
    bool window_intact = true;      // sliding layers: they hold exactly the ledger's tokens the next one sees
    uint64_t window_repairs = 0;    // times repair_window decoded the window's tokens again (or left a replay)
};

class chat {
public:
    // Validates what depends on the model (the budget's real minimum). Throws fml_error. No KV yet:
    // the scheduler gives the chat a slot in its engine at its first turn.
    chat(std::shared_ptr<fml_model> model, const chat_options & opts, int32_t model_threads);
    ~chat();
    chat(const chat &) = delete;
    chat & operator=(const chat &) = delete;
    static size_t live_count();
    // Whether importance can read this model's attention weights (the cell map of llama.cpp's
    // internals, and a layer that does not slide: a sliding layer's weights index the window cache).
    static bool reads_attention_weights(const model_info & mi);

    // ---- a turn's preparation: a worker thread (or any one thread), the chat claimed for the turn ----
    // Runs first in every turn's preparation: a test seam (chat_probes::hold_prepare), nothing otherwise.
    void before_prepare() const {
        if (prepare_hook_) prepare_hook_();
    }
    // Frames the message and checks it fits (PROMPT_TOO_LARGE otherwise; nothing changes).
    turn_request prepare_turn(const std::string & user_text, generation_options gen, bool pin = false);
    turn_request prepare_ingest(const std::string & user_text, const std::string & assistant_text);
    // A turn of tool results after a reply's calls (a chat created with tools), framed as the
    // template frames them; the reply that follows is generated as after a user message.
    turn_request prepare_tool_results(const std::vector<tool_result> & results, generation_options gen, bool pin = false);
    // A finished exchange of a conversation with tools (an OpenAI request's history): its input (the
    // user's text, or results when `results` is not empty) and the reply (its text and calls).
    turn_request prepare_ingest_tools(const std::string & user_text, const std::vector<tool_result> & results, const std::string & assistant_text,
                                      const std::vector<tool_call> & calls);

    // ---- JS thread ----
    // The running (or last) turn's reply read by the tools' format: for streaming, `partial`.
    tool_reply parse_tool_reply(const std::string & reasoning, const std::string & answer, bool partial) const;
    std::atomic<bool> & busy() { return busy_; }
    void request_abort() { abort_.store(true); }
    void clear_abort() { abort_.store(false); }
    // Forgets the conversation (idle only). The cache cells are freed by the scheduler before the
    // chat's next use.
    void reset();
    std::vector<memory_entry> memory() const;
    // Pins (idle only): a pinned turn's tokens are never evicted. pin_turn pins the user message of
    // `turn` (and its reply with `with_reply`); pins count against maxTokens, so a pin that would
    // leave no room for the smallest next turn throws PIN_LIMIT and changes nothing. unpin_turn
    // releases a turn's pins (never the system prompt's or the attention sinks'). Both return the
    // number of tokens whose pin changed; a turn not in memory is INVALID_OPTION.
    size_t pin_turn(uint32_t turn, bool with_reply);
    size_t unpin_turn(uint32_t turn);
    // The turns with pinned tokens (system prompt and sinks excluded), and how many tokens each.
    std::vector<std::pair<uint32_t, size_t>> pinned_turns() const;
    cumulative_stats stats() const;
    size_t retained_tokens() const;
    uint64_t kv_bytes() const;
    std::string summary_text() const;
    size_t count_turn_tokens(const std::string & user_text) const;
    const chat_options & options() const { return opts_; }
    const kv_geometry & key() const { return key_; }
    int32_t position_limit() const { return position_limit_; }
    importance_signal signal() const { return signal_; }
    const std::string & model_fingerprint() const { return model_->info().fingerprint; }
    // A chat rebuilt from a checkpoint: its KV state stays parked until the scheduler gives it a slot.
    void adopt_state(chat_state && state);

    // ---- scheduler thread ----
    void begin_turn(turn_request && req);
    bool has_turn() const { return turn_ != nullptr; }
    // What the chat wants from the next step: 0 (nothing, or not ready before `ready_at`), 1 (one token:
    // generation or summary), or the prefill tokens still to decode.
    size_t tokens_wanted(std::chrono::steady_clock::time_point now) const;
    // This step's contribution, at most `budget` tokens (room is made first: the policy may evict, or
    // start a summary whose tokens are then what it contributes). Empty when the turn ended here.
    // Evictions of several chats in one step share the K-shift of the step's first decode; a chat
    // never evicts earlier than it would alone, so its output does not depend on the others.
    contribution contribute(size_t budget, step_context & e);
    // After the llama_decode that held tokens [from, to) of `c`. `logits_row` is the batch row of
    // c's last token when it is in that decode (-1 otherwise).
    void on_decoded(const contribution & c, size_t from, size_t to, int32_t logits_row, const capture_member * signals, step_context & e);
    // The decode that held the contribution failed: the turn ends with the error (the cache is rolled back).
    void decode_failed(const fml_error & err, step_context & e);
    // The turn ends before the chat ever decoded for it (no slot, no engine, a state that did not load).
    void fail_unstarted(const fml_error & err);
    // An error escaped a step (a bug, not a failed decode): the turn ends with INTERNAL, its own tokens
    // leave the ledger, and the cache is rebuilt from the ledger before the next turn. Never throws.
    void fail_unexpected(const std::exception & ex, step_context & e) noexcept;
    // Abort requested (or the runtime is stopping): the turn ends now, with what it has.
    bool abort_pending() const { return abort_.load(); }
    void abort_turn(step_context & e);
    std::chrono::steady_clock::time_point ready_at() const { return ready_at_; }
    std::chrono::steady_clock::time_point last_used() const { return last_used_; }

    // Slot bookkeeping (engine.cpp).
    int32_t slot() const { return slot_; }
    engine * owner() const { return engine_; }
    void bind_engine(engine * e) { engine_ = e; }
    void set_slot(int32_t s) {
        std::lock_guard<std::mutex> lock(mu_);
        slot_ = s;
    }
    bool parked() const { return parked_; }
    // Its cache is to be prefilled from the ledger before its next turn (a ledger-only restore).
    bool replay_pending() const { return replay_pending_; }
    // That prefill is under way as its turn's contributions (scheduler thread).
    bool replaying() const { return replay_pending_ && replays_in_chunks(); }
    // The context was rebuilt (grown) without its cells: a replay under way starts over.
    void context_lost();
    // Moves the KV state out of the slot (its cells are freed by the caller) / back into one.
    void park(llama_context * ctx);
    // Back into the slot the engine gave it: the parked KV state, or (a ledger-only checkpoint) the
    // retained tokens prefilled again.
    void unpark(step_context & e);
    // The transcript a checkpoint carried (the JS side's, as JSON; empty when it had none).
    std::string restored_transcript() const { std::lock_guard<std::mutex> lock(mu_); return transcript_; }
    // Frees what reset() left in the cache; call before using the slot.
    void sync_after_reset(llama_context * ctx);

    // Scheduler-thread tasks.
    // Evicts every token of `turn` now (pins included; never the system prompt or the sinks), and
    // the newest turn's undecoded tail with it; positions are compacted only with positions
    // 'compact'. Returns the tokens evicted (0 when the turn is not in memory).
    size_t forget_turn(uint32_t turn, step_context & e);
    // `ctx`: the chat's engine context, or null when the chat never had a turn.
    // With `ctx` null: the ledger-only state. Everything it reads is guarded by mu_, so a ledger-only
    // export may run on any thread without waiting for the scheduler's step.
    chat_state export_state(llama_context * ctx, bool with_kv = true);
    cache_view view(llama_context * ctx) const;

private:
    friend struct chat_probes;
    struct turn_state;
    struct summary_job;
    struct grammar_pass;

    frame_kind next_user_frame() const;
    void check_budget();
    size_t pinned_after_start() const;
    // Tokens the smallest next turn needs besides the pinned ones (carry, a one-token message in its
    // framing, one reply token); fixed at construction.
    size_t turn_floor_ = 0;
    bool user_owned(size_t index) const;   // what pin/unpin/forget may touch: not a sink, not the system prompt
    bool unpinnable(size_t index) const;   // a pin the user may release (pinned and user_owned)
    // Frees room for `incoming` more tokens, asking the policy for at least the excess and up to
    // `slack` more (amortises the K-shift). False when a summary started instead (its tokens come
    // first; the room exists once it is done). Throws PROMPT_TOO_LARGE when pinned tokens leave no room.
    bool make_room(size_t incoming, size_t slack, step_context & e);
    // Where keys stop being neighbours for a peak, for queries of (role, turn): the start of the
    // message PEAK_MESSAGES_BETWEEN before theirs; -1 without attention signals.
    int32_t peak_horizon(token_role role, uint32_t turn) const;
    // pastReasoning: earlier turns' reasoning tokens leave the cache, oldest first, up to `want` of
    // them (SIZE_MAX: all, 'drop'). Returns how many left.
    size_t evict_past_reasoning(size_t want, step_context & e);
    // Removes the ranges (ledger indices) from the cache and the ledger and records the eviction.
    void apply_eviction(const std::vector<index_range> & ranges, eviction_record && rec, step_context & e);
    // The reply's tokens [from, to) change part (reasoning_splitter's relabel): those already in the
    // ledger take the role too.
    void relabel_reply(size_t from, size_t to, token_role role);
    // The reply's next sampled token: its part, its text to the right stream and callback.
    void split_piece(int32_t tok);
    // A reply token's text: its plain text, or a tool format's preserved marker's special text.
    std::string reply_piece(const turn_state & t, int32_t tok) const;
    // `req` is the policy's (with a summary's room); `plain` what the turn needs without one: the
    // latency guard's fallback (sliding) asks for that, as sliding itself would.
    bool evict(const eviction_request & req, const eviction_request & plain, step_context & e);
    // Positions: compacts when `incoming` more would pass the limit (early by `slack`: a compaction
    // at a turn's start beats one mid-reply).
    void fit_positions(size_t incoming, size_t slack, step_context & e);
    void compact(step_context & e);
    // After tokens were removed (a rollback, a summary's scratch, forget, an eviction of the newest),
    // the sliding layers can lack tokens the next one sees: llama.cpp reused their cells once they
    // were outside the window of the newest token, and the removal moved the end back. Then the last
    // `window` tokens are decoded again (a compaction of that tail). It always does when the window
    // cache does not end at the ledger's last token (the next decode would be refused); `thorough`:
    // also when the window differs otherwise (the end moved back, or a snapshot was refused). Not
    // otherwise: after a compaction, tokens that had left the window stay out by design. Must run
    // outside a step's decode (it decodes); never throws: if a decode fails, the cache is rebuilt
    // from the ledger before the next one (replay_pending_).
    void repair_window(step_context & e, bool thorough);
    // Whether repair_window would decode: the window cache does not end at the ledger's last token,
    // or (`thorough`) it differs from the ledger's window otherwise.
    bool window_needs_repair(llama_context * ctx, bool thorough) const;
    // A cache cleared by a failed repair, or not prefilled yet after a ledger-only restore
    // (replay_pending_), is rebuilt from the ledger now, all of what is left at once.
    void replay_if_pending(step_context & e);
    // Before the chat decodes: the window a finished summary left suspect is checked (repair_window),
    // then a cache a failed repair cleared is rebuilt.
    void settle_cache(step_context & e);
    // The next chunk of that rebuild, as the turn's first contributions (replay_done_ tokens are in).
    contribution replay_contribution(size_t budget, step_context & e);
    // A rebuild from nothing: the slot emptied and the ledger numbered 0..n-1, where it puts the tokens.
    void restart_replay(llama_context * ctx);
    // A pending replay goes in chunks when it opens a turn (nothing of the turn decoded yet); a cache
    // cleared mid-turn is rebuilt at once.
    bool replays_in_chunks() const;
    // Decodes the ledger's `tokens` at pos0, pos0 + 1, ... in the engine's batches (no signals, no
    // logits kept); false when a decode fails.
    bool decode_run(step_context & e, const std::vector<int32_t> & tokens, int32_t pos0);
    // The recurrent state at the turn's start (hybrids) goes back after the turn's tokens were removed.
    void restore_recurrent(const std::vector<uint8_t> & snapshot, step_context & e);
    // The sliding layers' window (kv_window_save), pending K-shift applied first; empty without them.
    std::vector<uint8_t> save_window(step_context & e);
    // How many of the turn's own tokens (turn_state::own) `ranges` hold, and the index of its first.
    size_t own_among(const std::vector<index_range> & ranges) const;
    size_t first_own() const;
    // What the model reads before it writes a summary: the open reply closed, then the instruction.
    std::vector<int32_t> summary_prompt() const;
    contribution summary_contribution(size_t budget);
    // Counts `n` prompt tokens in; true once the whole prompt is (the next logits are the summary's).
    bool summary_prompt_decoded(size_t n);
    void summary_decoded(step_context & e, int32_t logits_row);
    void finish_summary(step_context & e);
    // After a pushed summary: the snapshot keeps the entries still in the ledger, at their new positions
    // (kept_before: the kept entries' positions before, in order; the summary sits at insert_at, n_summary long).
    void remap_positions(std::vector<ledger_entry> & snapshot, const std::vector<int32_t> & kept_before, size_t insert_at, size_t n_summary) const;
    void cancel_summary(step_context & e);
    void append_decoded(const int32_t * tokens, size_t n, uint32_t turn, token_role role, bool pin = false);
    void absorb_signals(const capture_member & m, size_t first_new, size_t n_new);
    void rollback_to(size_t keep, step_context & e);
    void restore_scores(const std::vector<ledger_entry> & before);
    void sample_next(step_context & e, int32_t logits_row);
    // What follows a sampled token (sample_next's, or a grammar pass's): the reply's part, stops.
    void take_sampled(int32_t tok, step_context & e);
    // The next token of a reply held to send's grammar (held-reply.cpp).
    void sample_held_reply(step_context & e, int32_t logits_row);
    // A grammar's pass that ran off the scheduler thread has its token: taken (true), or not yet.
    bool take_grammar_pass(step_context & e);
    // Whether send's grammar holds this candidate of the reply (turn.cpp); and a held token taken.
    bool held_by_grammar(const turn_state & t, int32_t tok) const;
    // The tokens the held answer never takes now (sorted).
    const std::vector<int32_t> & refused_in_answer(const turn_state & t) const;
    void take_grammar_token(const sampler_chain::held_step & step, step_context & e);
    static void count_grammar_pass(turn_state & t, double ms);
    void finish_turn(stop_reason reason, step_context & e);
    // `state_lost`: a decode failed partway, so a hybrid's recurrent state may hold part of it and the
    // whole turn is rolled back (a KV cache alone only needs its unledgered cells dropped).
    void fail_turn(const fml_error & err, step_context & e, bool state_lost = false);
    // A failed turn whose prompt was in takes its number back, and the previous reply's carry.
    void forget_turn_number(const turn_state & t);
    // Ledger index ranges as position ranges [begin, end), split where positions have gaps.
    std::vector<index_range> position_ranges(const std::vector<index_range> & ranges) const;
    void start_generation();

    std::shared_ptr<fml_model> model_;
    chat_options opts_;
    kv_geometry key_;
    importance_signal signal_ = IMPORTANCE_NONE;
    std::unique_ptr<kv_policy_i> policy_;
    std::vector<int32_t> system_tokens_;
    std::unique_ptr<tool_set> tools_;       // createChat's tools (null: none); rendered into system_tokens_
    std::shared_ptr<const tool_turn> tool_turn_;   // the running or last turn's (set and read under mu_)
    std::vector<tool_call> last_calls_;     // the last reply's calls (what a turn of results follows)
    turn_request prepare_framed(std::vector<int32_t> framed, generation_options gen, bool pin);
    std::vector<int32_t> frame_tool_results(const std::vector<tool_result> & results) const;
    std::vector<int32_t> summary_instruction_;
    std::vector<int32_t> closing_tokens_;   // the template's end of an assistant turn
    // A grammar's pass over the vocabulary runs on a thread of its own: a core is spare (the model's
    // thread budget leaves one, or a GPU decodes). Else in the step (turn.cpp, sample_next).
    bool grammar_thread_ = false;
    std::function<void()> prepare_hook_;    // before_prepare's (set by chat_probes while the chat is idle)
    std::vector<int32_t> test_reply_;       // test hook testReply: every reply's tokens (its start, with testReplyThenSample)
    // The most a carry holds: a reply's last sampled token and the template's end of turn.
    size_t carry_capacity() const { return 1 + closing_tokens_.size(); }
    size_t chunk_ = 512;                    // most prefill tokens per step (batchSize)
    int32_t position_limit_ = 0;            // positions stay below this (compaction otherwise)

    mutable std::mutex mu_;                 // guards everything below against JS-thread readers
    token_ledger ledger_;
    cumulative_stats cumulative_;
    std::vector<int32_t> carry_;            // closes the last assistant turn; prefilled at the next turn
    bool carry_reasoning_ = false;          // its first token is the reply's last, and reasoning (a reply cut mid-thought)
    // Times retained tokens' positions moved (compactions, window repairs, pushed summaries): what a
    // rollback saved by position (scores, the window's cells) no longer matches after one.
    uint64_t positions_moved_ = 0;
    std::string summary_text_;
    uint32_t turn_no_ = 0;
    bool started_ = false;                  // the system prompt is in the cache
    bool reset_pending_ = false;            // reset() ran; the slot still holds the old cells
    std::unique_ptr<turn_state> turn_;

    engine * engine_ = nullptr;
    int32_t slot_ = -1;
    // Written under mu_ (reset() runs on the JS thread), read by the scheduler without it.
    std::atomic<bool> parked_{false};
    std::vector<uint8_t> parked_kv_;
    // Prefill the retained tokens before the next decode (a ledger-only checkpoint: in chunks, as the
    // next turn's first contributions, so other chats' steps go on; a failed repair: at once). While no
    // turn runs, the slot's cache then holds none of them.
    bool replay_pending_ = false;
    size_t replay_done_ = 0;                // ledger entries prefilled so far by replay contributions
    uint64_t window_repairs_ = 0;           // for cacheState: tests check that a repair path ran
    // Latency guard: evictions in a row whose policy ran over maxPolicyMs, and how many evictions go to
    // sliding without running it (the guard otherwise paid the slow plan and sliding at every one).
    uint32_t slow_plans_in_a_row_ = 0;
    uint32_t plans_to_skip_ = 0;
    bool window_suspect_ = false;           // a summary finished inside a step: repair_window at the next contribution
    bool window_thorough_ = false;          // ... thorough (see repair_window)
    std::string transcript_;
    void replay_ledger(step_context & e);
    std::chrono::steady_clock::time_point ready_at_{};
    std::chrono::steady_clock::time_point last_used_{};

    std::atomic<bool> abort_{false};
    std::atomic<bool> busy_{false};
};

} // namespace fml
