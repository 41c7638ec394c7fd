#include "policies/hybrid.h"

#include "policies/importance.h"
#include "policies/semantic.h"

#include <algorithm>
#include <cmath>

namespace fml {

eviction_plan kv_policy_hybrid::plan(const token_ledger & ledger, const eviction_request & req) {
    const size_t n = ledger.size();
    const size_t wb = window_begin(ledger, opts_.window_size, req.incoming);
    const bool summarize = opts_.summary_tokens > 0;
    std::vector<bool> evict(n, false);
    std::vector<bool> settled(n, false);   // decided: kept or evicted
    size_t taken = 0;
    if (summarize) {
        for (size_t i = 0; i < n; ++i) {
            if (!ledger[i].pinned && ledger[i].role == TOKEN_ROLE_SUMMARY) {
                evict[i] = settled[i] = true;
                ++taken;
            }
        }
    }
    std::vector<size_t> middle;
    for (size_t i = 0; i < wb; ++i) {
        if (!ledger[i].pinned && !settled[i]) {
            middle.push_back(i);
        }
    }
    const size_t to_evict = std::min(middle.size(), req.want > taken ? req.want - taken : 0);
    const size_t keep_total = middle.size() - to_evict;
    const size_t keep_importance = (size_t) std::lround((double) keep_total * std::clamp(opts_.hybrid_importance_share, 0.0f, 1.0f));

    // Heavy hitters first: whole spans with the highest span_scores (mean attention, or 'blend'); span
    // granularity keeps the kept text locally coherent (single scattered tokens measured worse in
    // bench/quality).
    size_t kept = 0;
    if (opts_.importance_granularity_spans) {
        const std::vector<text_span> spans = split_spans(ledger, wb, opts_.span_max_tokens, &settled);
        const std::vector<float> score = span_scores(ledger, spans, opts_.importance_blend);
        std::vector<std::pair<float, size_t>> by_score;
        for (size_t k = 0; k < spans.size(); ++k) {
            by_score.push_back({ -score[k], k });
        }
        std::stable_sort(by_score.begin(), by_score.end());
        for (const auto & [neg, k] : by_score) {
            if (kept + spans[k].size() > keep_importance) {
                continue;
            }
            for (size_t i = spans[k].begin; i < spans[k].end; ++i) {
                settled[i] = true;
            }
            kept += spans[k].size();
        }
    } else {
        std::vector<size_t> by_score = middle;
        std::stable_sort(by_score.begin(), by_score.end(), [&](size_t a, size_t b) {
            return ledger[a].score[SCORE_IMPORTANCE] > ledger[b].score[SCORE_IMPORTANCE];
        });
        for (size_t k = 0; k < keep_importance && k < by_score.size(); ++k) {
            settled[by_score[k]] = true;
        }
        kept = std::min(keep_importance, by_score.size());
    }
    // Then semantic representatives among what is left.
    const std::vector<text_span> spans = split_spans(ledger, wb, opts_.span_max_tokens, &settled);
    for (size_t idx : semantic_keep_order(ledger, spans, opts_.semantic_clusters, opts_.seed)) {
        const text_span & s = spans[idx];
        if (kept + s.size() > keep_total) {
            continue;
        }
        for (size_t i = s.begin; i < s.end; ++i) {
            settled[i] = true;
        }
        kept += s.size();
    }
    // The rest of the middle goes.
    for (size_t i : middle) {
        if (!settled[i]) {
            evict[i] = true;
        }
    }
    top_up_oldest(ledger, wb, req.need, evict);
    eviction_plan plan;
    plan.ranges = ranges_from_mask(evict);
    plan.summarize = summarize && !plan.ranges.empty();
    return plan;
}

} // namespace fml
