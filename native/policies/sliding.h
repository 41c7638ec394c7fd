// sliding: StreamingLLM-style. Pinned tokens (system prompt + attention sinks) stay, the most recent
// `window_size` tokens stay, the oldest others go first. If the window itself must shrink to meet the
// budget (a very long prompt), its oldest tokens go next; pinned tokens never go.
#pragma once

#include "policies/policy.h"

namespace fml {

class kv_policy_sliding : public kv_policy_i {
public:
    explicit kv_policy_sliding(const policy_options & opts) : opts_(opts) {}
    const char * name() const override { return "sliding"; }
    eviction_plan plan(const token_ledger & ledger, const eviction_request & req) override;
private:
    policy_options opts_;
};

} // namespace fml
