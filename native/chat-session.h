// One chat = one llama_context whose KV cache holds at most `max_tokens` tokens, a token ledger that
// mirrors it, and a policy that chooses evictions. A turn prefills only its new tokens; when the
// budget would overflow, the policy picks tokens, kv-ops removes them and compacts positions in place.
#pragma once

#include "model.h"
#include "options.h"
#include "policies/policy.h"
#include "sampler.h"
#include "signals.h"
#include "token-ledger.h"

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "llama.h"

namespace fml {

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
    uint32_t summary_tokens = 0;
    bool during_generation = false;
};

struct turn_stats {
    uint32_t prompt_tokens = 0;      // tokens prefilled this turn (only the new ones)
    uint32_t generated_tokens = 0;
    double   prefill_ms = 0;
    double   decode_ms = 0;
    double   tokens_per_second = 0;
    double   policy_ms = 0;          // time policies spent choosing
    double   evict_ms = 0;           // time spent in seq_rm + seq_add
    uint32_t evicted_tokens = 0;
    uint32_t evictions = 0;          // eviction events this turn
    uint32_t retained_tokens = 0;
    double   latency_ms = 0;
    bool     fallback = false;
    double   summary_ms = 0;          // time the model spent writing summaries this turn
    uint32_t summary_tokens = 0;      // summary tokens placed in the cache this turn
    std::string policy;
    std::vector<eviction_record> eviction_log;
    bool generating = false;          // set while the reply is being generated (for the log)
};

struct turn_result {
    std::string response;
    stop_reason reason = STOP_EOS;
    turn_stats stats;
};

struct cumulative_stats {
    uint64_t turns = 0;
    uint64_t tokens_seen = 0;        // every token ever decoded into the cache
    uint64_t tokens_evicted = 0;
    uint64_t evictions = 0;
    uint64_t fallback_count = 0;
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

// Called from the worker thread with text that never splits a UTF-8 character.
using piece_callback = std::function<void(const std::string &)>;

// Everything needed to rebuild a chat (see checkpoint.h for the file format).
struct chat_state {
    chat_options options;
    uint32_t turn = 0;
    bool started = false;
    std::vector<int32_t> carry;
    std::string summary_text;
    cumulative_stats stats;
    std::vector<ledger_entry> ledger;
    size_t embedding_dim = 0;
    std::vector<float> embeddings;
    std::vector<uint8_t> kv;
};

// Clears an abort flag when a turn-like operation ends, however it ends.
struct abort_reset_guard {
    std::atomic<bool> & flag;
    ~abort_reset_guard() { flag.store(false); }
};

class chat_session {
public:
    // Validates options against the model and creates the context. Throws fml_error.
    chat_session(std::shared_ptr<fml_model> model, const chat_options & opts);
    ~chat_session();
    chat_session(const chat_session &) = delete;
    chat_session & operator=(const chat_session &) = delete;

    // Runs one turn on the calling (worker) thread. Throws fml_error; on error the cache and ledger
    // are rolled back to their state before the turn's prefill (evictions already done stay done).
    turn_result run_turn(const std::string & user_text, const generation_options & gen, const piece_callback & on_piece);

    static size_t live_count();
    void request_abort() { abort_.store(true); }
    void clear_abort() { abort_.store(false); }
    std::atomic<bool> & busy() { return busy_; }

    void reset();
    std::vector<memory_entry> memory() const;
    const cumulative_stats & stats() const { return cumulative_; }
    const token_ledger & ledger() const { return ledger_; }
    const chat_options & options() const { return opts_; }
    const std::string & model_fingerprint() const { return model_->info().fingerprint; }
    uint32_t context_size() const;
    uint64_t kv_bytes() const;
    int32_t cache_pos_min() const;
    int32_t cache_pos_max() const;
    // Tokens that close the last assistant turn; they are prefilled at the start of the next turn.
    size_t carried_tokens() const { return carry_.size(); }
    // System prompt tokens the next turn will prefill (0 once they are in the cache).
    size_t pending_system_tokens() const { return started_ ? 0 : system_tokens_.size(); }
    // Token count of a user message once framed by the template (what a turn would prefill).
    size_t count_turn_tokens(const std::string & user_text) const;

    // Test hooks: logits for `token` decoded at the next position (the decode is rolled back), and a
    // whole-sequence position shift (RoPE is relative, so logits must not change).
    std::vector<float> probe_logits(int32_t token);
    void shift_positions(int32_t delta);

    // Teacher-forced evaluation (quality benchmark): feeds `tokens` in chunks of `chunk`, evicting with
    // the policy as a conversation would, and returns the logits after every fed token
    // (tokens.size() x n_vocab, row-major).
    std::vector<float> evaluate_tokens(const std::vector<int32_t> & tokens, size_t chunk);

    // Adds a finished exchange without generating (transcript import): the user message, the reply,
    // and the reply's end-of-turn, with eviction as a normal turn would do. Returns tokens prefilled.
    size_t ingest_exchange(const std::string & user_text, const std::string & assistant_text);

    // Snapshot for a checkpoint. Applies a pending K-shift first (a decode of one token, rolled back).
    chat_state export_state();
    // Replaces this chat's state (the options must match the ones it was created with). On failure
    // the chat is reset to empty and the error rethrown.
    void import_state(const chat_state & state);

    // Benchmark hooks. replay_history: clears the cache and prefills the retained tokens again (the
    // naive re-prefill approach, same retained content); returns ms. plain_decode: greedy-decodes
    // n tokens with bare llama_decode + sampling (no ledger, streaming or policy), then rolls back;
    // returns ms.
    double replay_history();
    double plain_decode(int32_t n);

    importance_signal signal() const { return signal_; }
    const eval_capture & capture() const { return capture_; }
    // -1 when the summarizer's scratch sequence holds nothing (or the chat has none).
    int32_t scratch_pos_max() const;
    const std::string & summary_text() const { return summary_text_; }

private:
    std::vector<int32_t> frame_tokens(const std::string & role, const std::string & content) const;
    // Throws unless maxTokens holds the pinned prefix and the smallest possible turn (says what does not fit).
    void check_budget();
    size_t pinned_after_start() const;
    bool ensure_started();   // false when aborted (the cache is then empty again)
    // Frees room for `incoming` more tokens, asking the policy for at least the excess and up to
    // `slack` more (amortises the K-shift). Throws PROMPT_TOO_LARGE when pinned tokens leave no room.
    void make_room(size_t incoming, size_t slack, turn_stats & st);
    // Decodes tokens at the end of the sequence and appends them to the ledger. Returns false on abort.
    bool decode_tokens(const std::vector<int32_t> & tokens, uint32_t turn, token_role role, bool want_logits);
    // Appends tokens just decoded to the ledger (sinks pinned, sentence ends marked) and absorbs signals.
    void append_decoded(const int32_t * tokens, size_t n, uint32_t turn, token_role role);
    // Moves what the eval callback captured during the last decode into the ledger.
    void absorb_signals(size_t first_new, size_t n_new);
    // Asks the policy (under the latency guard) and applies the plan.
    void evict(const eviction_request & req, size_t hard_need, turn_stats & st);
    // The model summarizes the evicted tokens in a scratch sequence; the summary takes their place.
    void summarize_and_evict(const eviction_plan & plan, size_t hard_need, turn_stats & st);
    // Removes ledger entries from `keep` on, from the cache too, and uncounts them (tokens_seen).
    void rollback_to(size_t keep);
    void test_token_delay() const;   // test hook (chat_options::test_token_delay_ms)
    bool decode_scratch(const std::vector<int32_t> & tokens, int32_t pos0);

    std::shared_ptr<fml_model> model_;
    chat_options opts_;
    llama_context * ctx_ = nullptr;
    llama_batch batch_ {};         // reused by every decode (sized chunk_)
    size_t chunk_ = 1;             // most tokens per llama_decode (batchSize, at most maxTokens)
    std::unique_ptr<kv_policy_i> policy_;
    token_ledger ledger_;
    cumulative_stats cumulative_;
    std::vector<int32_t> system_tokens_;
    std::vector<int32_t> summary_instruction_;
    std::string summary_text_;
    eval_capture capture_;
    importance_signal signal_ = IMPORTANCE_NONE;
    std::vector<int32_t> carry_;
    std::vector<int32_t> closing_tokens_;   // the template's end of an assistant turn
    uint32_t turn_ = 0;
    bool started_ = false;
    bool shift_pending_ = false;   // seq_add done, K-shift not yet applied by a decode
    void apply_pending_shift();
    std::atomic<bool> abort_{false};
    std::atomic<bool> busy_{false};
};

} // namespace fml
