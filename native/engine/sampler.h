// Sampler chain from generation options: banned tokens, repeat penalty, top-k, top-p, min-p,
// temperature, seeded distribution; greedy when temperature is 0.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct llama_sampler;

namespace fml {

struct sampling_options {
    float    temperature    = 0.8f;
    int32_t  top_k          = 40;
    float    top_p          = 0.95f;
    float    min_p          = 0.05f;
    float    repeat_penalty = 1.0f;
    int32_t  repeat_last_n  = 64;
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
