#include "policies/sliding.h"

namespace fml {

eviction_plan kv_policy_sliding::plan(const token_ledger & ledger, const eviction_request & req) {
    return plan_oldest_first(ledger, req, opts_.window_size);
}

} // namespace fml
