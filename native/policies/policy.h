// A policy decides *which* tokens leave the KV cache; kv-ops decides *how* (seq_rm + seq_add).
// Policies only see the ledger, so they are unit-testable on synthetic ledgers without llama.cpp.
#pragma once

#include "token-ledger.h"

#include <memory>
#include <string>
#include <vector>

namespace fml {

struct policy_options {
    std::string name       = "sliding";
    uint32_t    max_tokens = 2048;
    uint32_t    window_size = 512;   // most recent tokens kept when anything else can go
    uint32_t    sink_tokens = 4;     // first tokens of the sequence, pinned (attention sinks)
};

struct eviction_request {
    size_t need;   // at least this many tokens must leave
    size_t want;   // evicting up to this many amortises the K-shift (want >= need)
};

// The plan is a set of ledger index ranges; never contains a pinned entry.
struct eviction_plan {
    std::vector<index_range> ranges;
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
};

// Tokens a policy may evict at all (everything unpinned).
size_t evictable_count(const token_ledger & ledger);

// Throws fml_error(INVALID_OPTION) for an unknown name.
std::unique_ptr<kv_policy_i> make_policy(const policy_options & opts);

} // namespace fml
