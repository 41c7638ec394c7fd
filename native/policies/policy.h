// A policy decides *which* tokens leave the KV cache; kv-ops decides *how* (seq_rm + seq_add).
// Policies only see the ledger, so they are unit-testable on synthetic ledgers without llama.cpp.
#pragma once

#include "kv/token-ledger.h"

#include <memory>
#include <string>
#include <vector>

namespace fml {

// A chat's values, defaults included, come from the options table (engine/options.cpp), the one
// place defaults live (JS, the docs and checkpoints see that table); the fields here start empty.
struct policy_options {
    std::string name;
    uint32_t    max_tokens  = 0;
    uint32_t    window_size = 0;   // most recent tokens kept when anything else can go
    uint32_t    sink_tokens = 0;   // first tokens of the sequence, pinned (attention sinks)
    // importance
    float       importance_decay = 1.0f;   // scores are multiplied by this once per turn (1 = no decay)
    bool        importance_granularity_spans = false;   // evict whole low-scoring spans, not single tokens
    // The attention score: false = mean attention received per query that could see the token;
    // true = the peak single weight a distant query paid it (signals.h, PEAK_MIN_DISTANCE).
    bool        importance_peak = false;
    // 'blend': a span stays when either its mean attention or its peak ranks high among the spans.
    bool        importance_blend = false;
    // semantic
    uint32_t    semantic_clusters = 0;
    uint32_t    span_max_tokens = 0;
    uint32_t    seed = 0;
    // rolling_summary / hybrid
    uint32_t    summary_tokens = 0;   // upper bound of one summary; 0 disables summaries in hybrid
    uint32_t    summary_evict_tokens = 0;   // room an eviction that summarizes frees beyond the turn's need
    // hybrid: how the kept part of the evictable middle is split (the rest of the budget is the
    // window, pinned tokens and the summary)
    float       hybrid_importance_share = 0.0f;   // of the kept middle, by importance score
    // (1 - hybrid_importance_share) of the kept middle goes to semantic representatives
};

struct eviction_request {
    size_t need;   // at least this many tokens must leave
    size_t want;   // evicting up to this many amortises the K-shift (want >= need)
    size_t incoming = 0;   // tokens about to be added (the scored policies' window counts them)
};

// The plan is a set of ledger index ranges; never contains a pinned entry.
struct eviction_plan {
    std::vector<index_range> ranges;
    // rolling_summary / hybrid: the evicted tokens are summarized by the model and the summary is
    // inserted where the first evicted token was.
    bool summarize = false;
    size_t total() const {
        size_t n = 0;
        for (const auto & r : ranges) {
            n += r.size();
        }
        return n;
    }
};

class kv_policy_i {
public:
    virtual ~kv_policy_i() = default;
    virtual const char * name() const = 0;
    // Returns the tokens to evict. Must free at least `req.need` tokens when the ledger holds that
    // many unpinned ones; the caller checks this before asking (see evictable_count).
    virtual eviction_plan plan(const token_ledger & ledger, const eviction_request & req) = 0;

    // Signals the session must collect for this policy.
    virtual bool needs_importance() const { return false; }
    virtual bool needs_embeddings() const { return false; }
    // Whether plans may ask for a summary (the session then reserves room for it).
    virtual bool summarizes() const { return false; }
};

// Tokens a policy may evict at all (everything unpinned).
size_t evictable_count(const token_ledger & ledger);

// Index where the recent window begins (tokens at or after it are "recent").
size_t window_begin(const token_ledger & ledger, uint32_t window_size);
// The scored policies' window: the last `window_size` tokens counting the `incoming` ones. A new
// message is itself the most recent context, so one as long as the window leaves the older tokens
// to compete on score: a window kept over them crowded out what the scores would keep (a fact asked
// for just before three long messages: 0 of 16 kept at 25%, docs/models.md). The newest token stays
// (even with window_size 0; only a turn that needs every evictable token takes it): it holds the
// sequence's last position, and a sliding-window cache that has dropped its older cells would be left
// with a lower one than the ledger's and refuse the next decode (Gemma 4 with hybrid did).
size_t window_begin(const token_ledger & ledger, uint32_t window_size, size_t incoming);

// Evicts the oldest unpinned tokens: first outside the window up to `want`, then inside it up to
// `need`. The shared fallback (sliding itself, and every policy when the rest is not enough).
eviction_plan plan_oldest_first(const token_ledger & ledger, const eviction_request & req, uint32_t window_size,
                                const std::vector<bool> * keep = nullptr);

// Converts a per-index eviction mask into sorted ranges.
std::vector<index_range> ranges_from_mask(const std::vector<bool> & evict);

// Throws fml_error(INVALID_OPTION) for an unknown name.
std::unique_ptr<kv_policy_i> make_policy(const policy_options & opts);

} // namespace fml
