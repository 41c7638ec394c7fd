// semantic: the evictable region (unpinned, before the recent window) is cut into spans at sentence
// ends, turn changes and `span_max_tokens`; each span's embedding is the mean of its tokens' hidden
// states (the model's own, from a middle layer). Spans are clustered with seeded k-means++ (k =
// `semantic_clusters`); spans are kept round-robin across clusters, nearest the centroid first, so
// every topic keeps a representative; the rest are evicted.
#pragma once

#include "policies/policy.h"

namespace fml {

struct text_span {
    size_t begin;
    size_t end;
    size_t size() const { return end - begin; }
};

// Spans over unpinned tokens before `window_begin` that are not already marked in `exclude`.
std::vector<text_span> split_spans(const token_ledger & ledger, size_t window_begin, uint32_t max_tokens,
                                   const std::vector<bool> * exclude = nullptr);

// Order in which spans should be kept (most representative first), round-robin over clusters.
// Deterministic for a given seed. Without embeddings every span is its own topic, newest first.
std::vector<size_t> semantic_keep_order(const token_ledger & ledger, const std::vector<text_span> & spans,
                                        uint32_t clusters, uint32_t seed, std::vector<int> * cluster_of = nullptr);

class kv_policy_semantic : public kv_policy_i {
public:
    explicit kv_policy_semantic(const policy_options & opts) : opts_(opts) {}
    const char * name() const override { return "semantic"; }
    eviction_plan plan(const token_ledger & ledger, const eviction_request & req) override;
    bool needs_embeddings() const override { return true; }
private:
    policy_options opts_;
};

} // namespace fml
