#include "policies/policy.h"

#include "error.h"
#include "policies/sliding.h"

namespace fml {

size_t evictable_count(const token_ledger & ledger) {
    return ledger.size() - ledger.pinned_count();
}

std::unique_ptr<kv_policy_i> make_policy(const policy_options & opts) {
    if (opts.name == "sliding") {
        return std::make_unique<kv_policy_sliding>(opts);
    }
    throw fml_error(FML_ERR_INVALID_OPTION, "unknown policy '" + opts.name + "' (available: sliding)");
}

} // namespace fml
