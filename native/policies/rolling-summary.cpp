#include "policies/rolling-summary.h"

#include "policies/importance.h"

namespace fml {

eviction_plan kv_policy_rolling_summary::plan(const token_ledger & ledger, const eviction_request & req) {
    const size_t wb = window_begin(ledger, std::max<uint32_t>(opts_.window_size, 1));   // the newest token stays (see semantic)
    std::vector<bool> evict(ledger.size(), false);
    size_t taken = 0;
    // The previous summary always rolls into the next one.
    for (size_t i = 0; i < ledger.size(); ++i) {
        if (!ledger[i].pinned && ledger[i].role == TOKEN_ROLE_SUMMARY) {
            evict[i] = true;
            ++taken;
        }
    }
    // Then whole turns, oldest first, until `want` is reached (a turn is split only where the window
    // begins, or when the window has to give way below).
    size_t i = 0;
    while (i < wb && taken < req.want) {
        if (ledger[i].pinned || evict[i]) {
            ++i;
            continue;
        }
        const uint32_t turn = ledger[i].turn;
        while (i < wb && ledger[i].turn == turn) {
            if (!ledger[i].pinned && !evict[i]) {
                evict[i] = true;
                ++taken;
            }
            ++i;
        }
    }
    top_up_oldest(ledger, wb, req.need, evict);
    eviction_plan plan;
    plan.ranges = ranges_from_mask(evict);
    plan.summarize = opts_.summary_tokens > 0 && !plan.ranges.empty();
    return plan;
}

} // namespace fml
