// hybrid: sinks + pinned system prompt + rolling summary + heavy hitters + semantic representatives +
// recent window, inside one budget. Of the evictable middle (unpinned, before the window), the part
// that stays is split: `hybrid_importance_share` (default 0.5) goes to the highest importance scores,
// the rest to semantic representatives (round-robin over clusters). Everything else in the middle,
// and the previous summary, is evicted and summarized (when `summary_tokens` > 0).
#pragma once

#include "policies/policy.h"

namespace fml {

class kv_policy_hybrid : public kv_policy_i {
public:
    explicit kv_policy_hybrid(const policy_options & opts) : opts_(opts) {}
    const char * name() const override { return "hybrid"; }
    eviction_plan plan(const token_ledger & ledger, const eviction_request & req) override;
    bool needs_importance() const override { return true; }
    bool needs_embeddings() const override { return true; }
    bool summarizes() const override { return opts_.summary_tokens > 0; }
private:
    policy_options opts_;
};

} // namespace fml
