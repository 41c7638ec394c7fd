#include "engine/sampler.h"

#include "llama.h"

#include <cmath>

namespace fml {

sampler_chain::sampler_chain(const sampling_options & o, int32_t n_vocab, const std::vector<int32_t> & banned) {
    llama_sampler_chain_params p = llama_sampler_chain_default_params();
    p.no_perf = true;
    chain_ = llama_sampler_chain_init(p);
    if (!banned.empty()) {
        std::vector<llama_logit_bias> bias;
        for (int32_t t : banned) {
            bias.push_back({ t, -INFINITY });
        }
        llama_sampler_chain_add(chain_, llama_sampler_init_logit_bias(n_vocab, (int32_t) bias.size(), bias.data()));
    }
    if (o.repeat_penalty != 1.0f && o.repeat_last_n != 0) {
        llama_sampler_chain_add(chain_, llama_sampler_init_penalties(n_vocab, o.repeat_last_n, o.repeat_penalty, 0.0f, 0.0f));
    }
    if (o.temperature <= 0.0f) {
        llama_sampler_chain_add(chain_, llama_sampler_init_greedy());
        return;
    }
    if (o.top_k > 0) {
        llama_sampler_chain_add(chain_, llama_sampler_init_top_k(o.top_k));
    }
    if (o.top_p < 1.0f) {
        llama_sampler_chain_add(chain_, llama_sampler_init_top_p(o.top_p, 1));
    }
    if (o.min_p > 0.0f) {
        llama_sampler_chain_add(chain_, llama_sampler_init_min_p(o.min_p, 1));
    }
    llama_sampler_chain_add(chain_, llama_sampler_init_temp(o.temperature));
    llama_sampler_chain_add(chain_, llama_sampler_init_dist(o.seed));
}

sampler_chain::~sampler_chain() {
    if (chain_ != nullptr) {
        llama_sampler_free(chain_);
    }
}

} // namespace fml
