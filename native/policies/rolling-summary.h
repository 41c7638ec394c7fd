// rolling_summary: when eviction is needed, the oldest whole turns outside the recent window (and the
// previous summary, so the summary rolls) are chosen; the session has the model summarize them and
// puts the summary tokens where they were, marked with role `summary`.
#pragma once

#include "policies/policy.h"

namespace fml {

class kv_policy_rolling_summary : public kv_policy_i {
public:
    explicit kv_policy_rolling_summary(const policy_options & opts) : opts_(opts) {}
    const char * name() const override { return "rolling_summary"; }
    eviction_plan plan(const token_ledger & ledger, const eviction_request & req) override;
    bool summarizes() const override { return opts_.summary_tokens > 0; }
private:
    policy_options opts_;
};

} // namespace fml
