// Sampler chain from generation options: banned tokens, repeat penalty, top-k, top-p, min-p,
// temperature, seeded distribution; greedy when temperature is 0.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct llama_sampler;

namespace fml {

// As constructed: greedy, no penalty (what the core's own decodes use, summaries and probes); a
// turn's values, defaults included, come from the options table (options.cpp).
struct sampling_options {
    float    temperature    = 0.0f;
    int32_t  top_k          = 0;
    float    top_p          = 1.0f;
    float    min_p          = 0.0f;
    float    repeat_penalty = 1.0f;
    int32_t  repeat_last_n  = 0;
    uint32_t seed           = 0xFFFFFFFF;   // LLAMA_DEFAULT_SEED: random
};

// Owns the llama_sampler chain.
class sampler_chain {
public:
    // `banned`: tokens never sampled (a logit bias of -inf: send's ignoreEos bans end-of-generation tokens).
    sampler_chain(const sampling_options & opts, int32_t n_vocab, const std::vector<int32_t> & banned = {});
    ~sampler_chain();
    sampler_chain(const sampler_chain &) = delete;
    sampler_chain & operator=(const sampler_chain &) = delete;
    llama_sampler * raw() const { return chain_; }
private:
    llama_sampler * chain_ = nullptr;
};

} // namespace fml
