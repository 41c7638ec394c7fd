#include "engine/sampler.h"

#include "engine/grammar.h"
#include "util/error.h"

#include "llama.h"

#include <algorithm>
#include <cmath>

namespace fml {

sampler_chain::sampler_chain(const sampling_options & o, int32_t n_vocab, const std::vector<int32_t> & banned)
    : full_pass_(o.test_full_grammar_pass), banned_(banned) {
    std::sort(banned_.begin(), banned_.end());
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
        penalized_ = true;
        llama_sampler_chain_add(chain_, llama_sampler_init_penalties(n_vocab, o.repeat_last_n, o.repeat_penalty, 0.0f, 0.0f));
    }
    if (o.temperature <= 0.0f) {
        greedy_ = true;
        llama_sampler_chain_add(chain_, llama_sampler_init_greedy());
        return;
    }
    if (o.top_k > 0) {
        top_k_ = o.top_k;
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

int32_t best_allowed(llama_token_data * cur, size_t n, const std::function<void(llama_token_data *, size_t)> & allow) {
    // The best few first (a partial sort costs a fraction of a grammar's pass); when the grammar
    // allows none of them, the rest in one pass, and their best by a scan.
    const size_t first = std::min<size_t>(n, 64);
    std::partial_sort(cur, cur + first, cur + n, [](const llama_token_data & a, const llama_token_data & b) { return a.logit > b.logit; });
    allow(cur, first);
    for (size_t i = 0; i < first; ++i) {
        if (!std::isinf(cur[i].logit)) {
            return cur[i].id;
        }
    }
    allow(cur + first, n - first);
    const llama_token_data * best = nullptr;
    for (size_t i = first; i < n; ++i) {
        if (!std::isinf(cur[i].logit) && (best == nullptr || cur[i].logit > best->logit)) {
            best = &cur[i];
        }
    }
    return best != nullptr ? best->id : -1;
}

namespace {

// Sets the candidates in `tokens` (sorted ids) to -inf: by index while the array is in id order (as
// filled, and after the greedy chain, which only selects), else by a search per candidate.
void refuse(llama_token_data_array & cur, const std::vector<int32_t> & tokens) {
    for (int32_t t : tokens) {
        if ((size_t) t < cur.size && cur.data[t].id == t) {
            cur.data[t].logit = -INFINITY;
        } else {
            for (size_t i = 0; i < cur.size; ++i) {
                if (std::binary_search(tokens.begin(), tokens.end(), cur.data[i].id)) {
                    cur.data[i].logit = -INFINITY;
                }
            }
            return;
        }
    }
}

} // namespace

bool sampler_chain::sample_among_best(llama_token_data_array & cur, const std::function<llama_token_data_array()> & candidates,
                                      const reply_grammar & grammar, const std::vector<int32_t> & non_text, int32_t & tok) {
    // After its top-k the chain sees only the k best candidates the grammar allows, and without a
    // repetition penalty their order is the logits' (the bias only bans): when the best few hundred
    // hold k allowed ones, they are those k, and the pass over the rest would change nothing.
    cur = candidates();
    refuse(cur, banned_);
    const size_t head = std::min(cur.size, std::max<size_t>(256, 4 * (size_t) top_k_));
    std::partial_sort(cur.data, cur.data + head, cur.data + cur.size, [](const llama_token_data & a, const llama_token_data & b) { return a.logit > b.logit; });
    llama_token_data_array best = { cur.data, head, -1, false };
    grammar.apply(&best);
    refuse(best, non_text);
    const size_t allowed = (size_t) std::count_if(best.data, best.data + best.size, [](const llama_token_data & d) { return !std::isinf(d.logit); });
    if (allowed < (size_t) top_k_) {
        return false;
    }
    llama_sampler_apply(chain_, &best);
    tok = best.data[best.selected].id;
    return true;
}

int32_t sampler_chain::sample(llama_context * ctx, int32_t row, reply_grammar & grammar, const std::vector<int32_t> & non_text,
                              const token_first_bytes & bytes, const std::function<bool(int32_t)> & constrained) {
    const float * logits = llama_get_logits_ith(ctx, row);
    if (logits == nullptr) {
        throw fml_error(FML_ERR_INTERNAL, "no logits for the row to sample from");
    }
    const llama_vocab * vocab = llama_model_get_vocab(llama_get_model(ctx));
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    const auto candidates = [&] {
        cur_.resize((size_t) n_vocab);
        for (int32_t t = 0; t < n_vocab; ++t) {
            cur_[(size_t) t] = { t, logits[t], 0.0f };
        }
        return llama_token_data_array{ cur_.data(), cur_.size(), -1, false };
    };
    const auto fits = [&](int32_t t) { return !std::binary_search(non_text.begin(), non_text.end(), t) && grammar.allows(t); };
    llama_token_data_array cur = candidates();
    llama_sampler_apply(chain_, &cur);
    int32_t tok = cur.data[cur.selected].id;
    bool held = constrained(tok);
    if (held && !fits(tok) && greedy_ && !full_pass_) {
        // The chain left every candidate with its logit, in id order (bias and penalties applied;
        // greedy only selects): the best the grammar allows is the token a pass over all of them gives.
        refuse(cur, non_text);
        tok = best_allowed(cur.data, cur.size, [&](llama_token_data * part, size_t k) {
            llama_token_data_array a = { part, k, -1, false };
            grammar.apply(&a, &bytes);
        });
        if (tok < 0) {
            return -1;
        }
        held = constrained(tok);
    } else if (held && !fits(tok) && top_k_ > 0 && !penalized_ && !full_pass_ && sample_among_best(cur, candidates, grammar, non_text, tok)) {
        held = constrained(tok);
    } else if (held && !fits(tok)) {
        cur = candidates();
        grammar.apply(&cur, full_pass_ ? nullptr : &bytes);
        refuse(cur, non_text);
        const bool any = std::any_of(cur.data, cur.data + cur.size, [&](const llama_token_data & d) {
            return !std::isinf(d.logit) && !std::binary_search(banned_.begin(), banned_.end(), d.id);
        });
        if (!any) {
            return -1;
        }
        llama_sampler_apply(chain_, &cur);
        tok = cur.data[cur.selected].id;
        held = constrained(tok);
    }
    if (held && !llama_vocab_is_eog(vocab, tok)) {
        grammar.accept(tok);
    }
    llama_sampler_accept(chain_, tok);
    return tok;
}

} // namespace fml
