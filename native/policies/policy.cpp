#include "policies/policy.h"

#include "util/error.h"
#include "policies/hybrid.h"
#include "policies/importance.h"
#include "policies/rolling-summary.h"
#include "policies/semantic.h"
#include "policies/sliding.h"

#include <algorithm>

namespace fml {

size_t evictable_count(const token_ledger & ledger) {
    return ledger.size() - ledger.pinned_count();
}

size_t window_begin(const token_ledger & ledger, uint32_t window_size) {
    return ledger.size() > window_size ? ledger.size() - window_size : 0;
}

size_t window_begin(const token_ledger & ledger, uint32_t window_size, size_t incoming) {
    const uint32_t rest = incoming >= window_size ? 0 : (uint32_t) (window_size - incoming);
    return window_begin(ledger, std::max<uint32_t>(rest, 1));
}

std::vector<index_range> ranges_from_mask(const std::vector<bool> & evict) {
    std::vector<index_range> out;
    for (size_t i = 0; i < evict.size(); ++i) {
        if (!evict[i]) {
            continue;
        }
        if (!out.empty() && out.back().end == i) {
            out.back().end = i + 1;
        } else {
            out.push_back({ i, i + 1 });
        }
    }
    return out;
}

eviction_plan plan_oldest_first(const token_ledger & ledger, const eviction_request & req, uint32_t window_size,
                                const std::vector<bool> * keep) {
    // First pass: the oldest unpinned tokens outside the recent window, up to `want`.
    // Second pass, only if `need` is not met yet: the oldest unpinned tokens inside the window.
    // `keep` (optional) marks tokens a policy prefers to keep; they go only when nothing else can.
    const size_t n = ledger.size();
    const size_t wb = window_begin(ledger, window_size);
    std::vector<bool> evict(n, false);
    size_t taken = 0;
    struct pass { size_t begin, end, limit; bool allow_keep; };
    const pass passes[4] = {
        { 0, wb, req.want, false },
        { 0, wb, req.need, true },
        { wb, n, req.need, false },
        { wb, n, req.need, true },
    };
    for (const pass & p : passes) {
        for (size_t i = p.begin; i < p.end && taken < p.limit; ++i) {
            if (evict[i] || ledger[i].pinned || (!p.allow_keep && keep != nullptr && (*keep)[i])) {
                continue;
            }
            evict[i] = true;
            ++taken;
        }
        if (taken >= req.need && &p != &passes[0]) {
            break;
        }
    }
    eviction_plan plan;
    plan.ranges = ranges_from_mask(evict);
    return plan;
}

std::unique_ptr<kv_policy_i> make_policy(const policy_options & opts) {
    if (opts.name == "sliding") {
        return std::make_unique<kv_policy_sliding>(opts);
    }
    if (opts.name == "importance") {
        return std::make_unique<kv_policy_importance>(opts);
    }
    if (opts.name == "semantic") {
        return std::make_unique<kv_policy_semantic>(opts);
    }
    if (opts.name == "rolling_summary") {
        return std::make_unique<kv_policy_rolling_summary>(opts);
    }
    if (opts.name == "hybrid") {
        return std::make_unique<kv_policy_hybrid>(opts);
    }
    throw fml_error(FML_ERR_INVALID_OPTION,
                    "unknown policy '" + opts.name + "' (available: sliding, importance, semantic, rolling_summary, hybrid)");
}

} // namespace fml
