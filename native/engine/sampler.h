// Sampler chain from generation options: banned tokens, repeat penalty, top-k, top-p, min-p,
// temperature, seeded distribution; greedy when temperature is 0.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

struct llama_context;
struct llama_vocab;
struct llama_sampler;
struct llama_token_data;
struct llama_token_data_array;

namespace fml {

class reply_grammar;
struct token_first_bytes;

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
    bool     test_full_grammar_pass = false;   // test hook: a grammar's every refusal takes the whole pass (no shortcut)
    double   test_grammar_pass_delay_ms = 0;   // test hook: a grammar's pass over the vocabulary takes this long more
    // Test hook: where a grammar's pass over the vocabulary runs: 0 the chat's choice (a thread of
    // its own when a core is spare), 1 the step (the scheduler thread), 2 a thread of its own.
    int8_t   test_grammar_pass_on = 0;
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

    // The next token from the logits of `row`, held to `grammar` where `constrained(token)` says so
    // (the reply's answer: a reasoning model's thinking stays free), in two parts: `sample_held` on
    // the thread that owns the context, then, when it could not decide, `sample_rest` (any thread:
    // it reads a copy of what it needs) for the pass over the vocabulary. The chain's own choice is
    // taken when the grammar allows it, else the chain chooses among what the grammar allows (as
    // llama.cpp's common sampler: one token is checked far faster than the vocabulary); greedy
    // decoding checks its best 64 candidates first and top-k sampling its best 256, which decide
    // alike when they hold what is needed. A held token is never one of `non_text` (sorted: control
    // tokens and reasoning markers, which the grammar would read as their special text though the
    // answer's text has none of it). The grammar accepts the token when it was held. -1: the grammar
    // allows nothing that is not banned (it is complete and end of generation is banned, or it can
    // go on with no token of the vocabulary).
    struct held_step {
        bool decided = false;
        int32_t token = -1;
        bool held = false;   // constrained(token): the grammar took it
    };
    held_step sample_held(llama_context * ctx, int32_t row, reply_grammar & grammar, const std::vector<int32_t> & non_text,
                          const std::function<bool(int32_t)> & constrained);
    // `cancel` (may be null): once set, the pass stops and returns token -1 without taking one.
    held_step sample_rest(reply_grammar & grammar, const std::vector<int32_t> & non_text, const token_first_bytes & bytes,
                        const std::function<bool(int32_t)> & constrained, const std::atomic<bool> * cancel = nullptr);

private:
    bool sample_among_best(const reply_grammar & grammar, const std::vector<int32_t> & non_text, int32_t & tok);
    llama_token_data_array candidates();
    held_step finish(reply_grammar & grammar, int32_t tok, bool held);
    llama_sampler * chain_ = nullptr;
    const llama_vocab * vocab_ = nullptr;
    bool greedy_ = false;
    int32_t top_k_ = 0;          // the chain's top-k (0: none)
    bool penalized_ = false;     // the chain has a repetition penalty (it changes the logits' order)
    bool full_pass_ = false;     // test hook testFullGrammarPass
    double pass_delay_ms_ = 0;   // test hook testGrammarPassDelayMs
    std::vector<int32_t> banned_;            // sorted
    std::vector<llama_token_data> cur_;      // the candidates, reused from token to token
    // What sample_rest works from: the row's logits (sampling), or the candidates greedy decoding
    // has not checked yet, with the chain's logits (bias and penalties applied).
    std::vector<float> logits_;
    std::vector<llama_token_data> unchecked_;
};

// Greedy decoding under a grammar: the candidate of the highest logit among those `allow` leaves
// finite (it sets the others to -inf, as a grammar sampler's apply does). best_allowed_first checks
// the best 64 (sorting them to the front: a grammar's pass over a 150k-token vocabulary costs ~10 ms,
// and the best allowed token is mostly among them); when none is allowed, best_allowed_rest the
// others (from `cur + first`). -1: none allowed. best_allowed: both.
constexpr size_t BEST_ALLOWED_FIRST = 64;
int32_t best_allowed_first(llama_token_data * cur, size_t n, const std::function<void(llama_token_data *, size_t)> & allow);
int32_t best_allowed_rest(llama_token_data * rest, size_t n, const std::function<void(llama_token_data *, size_t)> & allow);
int32_t best_allowed(llama_token_data * cur, size_t n, const std::function<void(llama_token_data *, size_t)> & allow);

} // namespace fml
