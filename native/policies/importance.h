// importance (heavy hitters, as in H2O): each token's score is the attention it has received from
// later queries, summed over heads and layers (read from the graph, or recomputed from a flash-attention
// node's inputs; a model whose every layer slides has the negated L2 norm of its post-RoPE key instead:
// keys with a low norm draw more attention). Keeps pinned + the recent window + the
// highest-scoring others; evicts the lowest-scoring tokens outside the window.
#pragma once

#include "policies/policy.h"
#include "policies/semantic.h"

namespace fml {

// Marks, among unpinned tokens before the window, the `count` with the lowest score (ties: older first).
void mark_lowest_scores(const token_ledger & ledger, size_t window_begin, size_t count, std::vector<bool> & evict);

// Each span's score, higher = keep: its mean importance, or with `blend` the better of its ranks by
// mean and (for the top quarter by peak) by peak, as shares 0 .. 1 of the spans.
std::vector<float> span_scores(const token_ledger & ledger, const std::vector<text_span> & spans, bool blend);

// Marks whole spans (see semantic.h) with the lowest span_scores until `count` tokens are marked.
void mark_lowest_spans(const token_ledger & ledger, size_t window_begin, uint32_t span_max_tokens, size_t count, std::vector<bool> & evict, bool blend = false);

// Adds the oldest unpinned, unmarked tokens (outside the window first, then inside) until `need` are marked.
void top_up_oldest(const token_ledger & ledger, size_t window_begin, size_t need, std::vector<bool> & evict);

class kv_policy_importance : public kv_policy_i {
public:
    explicit kv_policy_importance(const policy_options & opts) : opts_(opts) {}
    const char * name() const override { return "importance"; }
    eviction_plan plan(const token_ledger & ledger, const eviction_request & req) override;
    bool needs_importance() const override { return true; }
private:
    policy_options opts_;
};

} // namespace fml
