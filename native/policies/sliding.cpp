#include "policies/sliding.h"

#include <algorithm>

namespace fml {

eviction_plan kv_policy_sliding::plan(const token_ledger & ledger, const eviction_request & req) {
    eviction_plan plan;
    const size_t n = ledger.size();
    const size_t window_begin = n > opts_.window_size ? n - opts_.window_size : 0;

    // First pass: the oldest unpinned tokens outside the recent window, up to `want`.
    // Second pass, only if `need` is not met yet: the oldest unpinned tokens inside the window.
    size_t taken = 0;
    const size_t pass_limit[2] = { req.want, req.need };
    const size_t pass_begin[2] = { 0, window_begin };
    const size_t pass_end[2]   = { window_begin, n };
    for (int pass = 0; pass < 2; ++pass) {
        size_t run_begin = SIZE_MAX;
        for (size_t i = pass_begin[pass]; i < pass_end[pass] && taken < pass_limit[pass]; ++i) {
            if (ledger[i].pinned) {
                if (run_begin != SIZE_MAX) {
                    plan.ranges.push_back({ run_begin, i });
                    run_begin = SIZE_MAX;
                }
                continue;
            }
            if (run_begin == SIZE_MAX) {
                run_begin = i;
            }
            ++taken;
            if (taken == pass_limit[pass]) {
                plan.ranges.push_back({ run_begin, i + 1 });
                run_begin = SIZE_MAX;
            }
        }
        if (run_begin != SIZE_MAX) {
            plan.ranges.push_back({ run_begin, pass_end[pass] });
        }
        if (taken >= req.need) {
            break;
        }
    }
    plan.ranges = normalize_ranges(std::move(plan.ranges));
    return plan;
}

} // namespace fml
