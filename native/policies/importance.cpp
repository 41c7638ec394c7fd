#include "policies/importance.h"

#include "policies/semantic.h"

#include <algorithm>

namespace fml {

void mark_lowest_scores(const token_ledger & ledger, size_t wb, size_t count, std::vector<bool> & evict) {
    std::vector<size_t> candidates;
    for (size_t i = 0; i < wb; ++i) {
        if (!ledger[i].pinned && !evict[i]) {
            candidates.push_back(i);
        }
    }
    count = std::min(count, candidates.size());
    std::stable_sort(candidates.begin(), candidates.end(), [&](size_t a, size_t b) {
        return ledger[a].score[SCORE_IMPORTANCE] < ledger[b].score[SCORE_IMPORTANCE];
    });
    for (size_t k = 0; k < count; ++k) {
        evict[candidates[k]] = true;
    }
}

void top_up_oldest(const token_ledger & ledger, size_t wb, size_t need, std::vector<bool> & evict) {
    size_t taken = (size_t) std::count(evict.begin(), evict.end(), true);
    for (int pass = 0; pass < 2 && taken < need; ++pass) {
        const size_t begin = pass == 0 ? 0 : wb;
        const size_t end = pass == 0 ? wb : ledger.size();
        for (size_t i = begin; i < end && taken < need; ++i) {
            if (!ledger[i].pinned && !evict[i]) {
                evict[i] = true;
                ++taken;
            }
        }
    }
}

// 'blend': only the spans in the top quarter by peak are rescued by it (the rest rank by mean): a peak
// is a later query's lookup, rare and sharp, while most spans' peaks are noise around their mean.
static constexpr float BLEND_PEAK_RANK = 0.75f;

// Each span's rank among the spans by `value`, as a share 0 (lowest) .. 1 (highest); ties share a rank.
static std::vector<float> rank_share(const std::vector<float> & value) {
    std::vector<size_t> order(value.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return value[a] < value[b]; });
    std::vector<float> share(value.size(), 0.0f);
    const float denom = value.size() > 1 ? (float) (value.size() - 1) : 1.0f;
    // The start of each run of ties carried forward: walking back from every member was O(n^2) when
    // most values tie (all-zero peaks under the key-norm signal: thousands of spans at 128k tokens).
    size_t first = 0;
    for (size_t k = 0; k < order.size(); ++k) {
        if (k > 0 && !(value[order[k - 1]] == value[order[k]])) first = k;
        share[order[k]] = (float) first / denom;
    }
    return share;
}

std::vector<float> span_scores(const token_ledger & ledger, const std::vector<text_span> & spans, bool blend) {
    std::vector<float> mean(spans.size(), 0.0f);
    std::vector<float> peak(spans.size(), 0.0f);
    for (size_t s = 0; s < spans.size(); ++s) {
        float sum = 0.0f;
        for (size_t i = spans[s].begin; i < spans[s].end; ++i) {
            sum += ledger[i].score[SCORE_IMPORTANCE];
            peak[s] = std::max(peak[s], ledger[i].score[SCORE_PEAK]);
        }
        mean[s] = sum / (float) spans[s].size();
    }
    if (!blend) {
        return mean;
    }
    // 'blend': a span is as safe as its better rank, by mean attention (what fluency leans on) or by
    // its peak (a fact a later query went back for).
    const std::vector<float> by_mean = rank_share(mean);
    const std::vector<float> by_peak = rank_share(peak);
    std::vector<float> score(spans.size());
    for (size_t s = 0; s < spans.size(); ++s) score[s] = by_peak[s] >= BLEND_PEAK_RANK ? std::max(by_mean[s], by_peak[s]) : by_mean[s];
    return score;
}

void mark_lowest_spans(const token_ledger & ledger, size_t wb, uint32_t span_max_tokens, size_t count, std::vector<bool> & evict, bool blend) {
    std::vector<text_span> spans = split_spans(ledger, wb, span_max_tokens, &evict);
    const std::vector<float> score = span_scores(ledger, spans, blend);
    std::vector<std::pair<float, size_t>> by_score;
    for (size_t s = 0; s < spans.size(); ++s) by_score.push_back({ score[s], s });
    std::stable_sort(by_score.begin(), by_score.end());
    size_t taken = 0;
    for (const auto & [score, s] : by_score) {
        if (taken >= count) {
            break;
        }
        for (size_t i = spans[s].begin; i < spans[s].end && taken < count; ++i) {
            evict[i] = true;
            ++taken;
        }
    }
}

eviction_plan kv_policy_importance::plan(const token_ledger & ledger, const eviction_request & req) {
    const size_t wb = window_begin(ledger, opts_.window_size, req.incoming);
    std::vector<bool> evict(ledger.size(), false);
    if (opts_.importance_granularity_spans) {
        mark_lowest_spans(ledger, wb, opts_.span_max_tokens, req.want, evict, opts_.importance_blend);
    } else {
        mark_lowest_scores(ledger, wb, req.want, evict);
    }
    top_up_oldest(ledger, wb, req.need, evict);
    eviction_plan plan;
    plan.ranges = ranges_from_mask(evict);
    return plan;
}

} // namespace fml
