#include "engine/sampler.h"

#include "engine/grammar.h"
#include "util/error.h"

#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <thread>

namespace fml {

sampler_chain::sampler_chain(const sampling_options & o, int32_t n_vocab, const std::vector<int32_t> & banned)
    : full_pass_(o.test_full_grammar_pass), pass_delay_ms_(o.test_grammar_pass_delay_ms), banned_(banned) {
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

int32_t best_allowed_first(llama_token_data * cur, size_t n, const std::function<void(llama_token_data *, size_t)> & allow) {
    const size_t first = std::min(n, BEST_ALLOWED_FIRST);
    // Ties go to the lower id, as llama.cpp's greedy sampler takes them over candidates in id order.
    std::partial_sort(cur, cur + first, cur + n, [](const llama_token_data & a, const llama_token_data & b) {
        return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
    });
    allow(cur, first);
    for (size_t i = 0; i < first; ++i) {
        if (!std::isinf(cur[i].logit)) {
            return cur[i].id;
        }
    }
    return -1;
}

int32_t best_allowed_rest(llama_token_data * rest, size_t n, const std::function<void(llama_token_data *, size_t)> & allow) {
    allow(rest, n);
    const llama_token_data * best = nullptr;
    for (size_t i = 0; i < n; ++i) {
        if (!std::isinf(rest[i].logit) && (best == nullptr || rest[i].logit > best->logit || (rest[i].logit == best->logit && rest[i].id < best->id))) {
            best = &rest[i];
        }
    }
    return best != nullptr ? best->id : -1;
}

int32_t best_allowed(llama_token_data * cur, size_t n, const std::function<void(llama_token_data *, size_t)> & allow) {
    const int32_t first = best_allowed_first(cur, n, allow);
    const size_t checked = std::min(n, BEST_ALLOWED_FIRST);
    return first >= 0 ? first : best_allowed_rest(cur + checked, n - checked, allow);
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

llama_token_data_array sampler_chain::candidates() {
    cur_.resize(logits_.size());
    for (size_t t = 0; t < logits_.size(); ++t) {
        cur_[t] = { (int32_t) t, logits_[t], 0.0f };
    }
    return llama_token_data_array{ cur_.data(), cur_.size(), -1, false };
}

bool sampler_chain::sample_among_best(const reply_grammar & grammar, const std::vector<int32_t> & non_text, int32_t & tok) {
    // After its top-k the chain sees only the k best candidates the grammar allows, and without a
    // repetition penalty their order is the logits' (the bias only bans): when the best few hundred
    // hold k allowed ones, they are those k, and the pass over the rest would change nothing.
    llama_token_data_array cur = candidates();
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

sampler_chain::held_step sampler_chain::finish(reply_grammar & grammar, int32_t tok, bool held) {
    if (held && !llama_vocab_is_eog(vocab_, tok)) {
        grammar.accept(tok);
    }
    llama_sampler_accept(chain_, tok);
    return { true, tok, held };
}

sampler_chain::held_step sampler_chain::sample_held(llama_context * ctx, int32_t row, reply_grammar & grammar, const std::vector<int32_t> & non_text,
                                                    const std::function<bool(int32_t)> & constrained) {
    const float * logits = llama_get_logits_ith(ctx, row);
    if (logits == nullptr) {
        throw fml_error(FML_ERR_INTERNAL, "no logits for the row to sample from");
    }
    vocab_ = llama_model_get_vocab(llama_get_model(ctx));
    logits_.assign(logits, logits + llama_vocab_n_tokens(vocab_));
    const auto fits = [&](int32_t t) { return !std::binary_search(non_text.begin(), non_text.end(), t) && grammar.allows(t); };
    llama_token_data_array cur = candidates();
    llama_sampler_apply(chain_, &cur);
    int32_t tok = cur.data[cur.selected].id;
    const bool held = constrained(tok);
    if (!held || fits(tok)) {
        return finish(grammar, tok, held);
    }
    if (greedy_ && !full_pass_) {
        // The chain left every candidate with its logit, in id order (bias and penalties applied;
        // greedy only selects): the best the grammar allows is the token a pass over all of them gives.
        refuse(cur, non_text);
        tok = best_allowed_first(cur.data, cur.size, [&](llama_token_data * part, size_t k) {
            llama_token_data_array a = { part, k, -1, false };
            grammar.apply(&a);
        });
        if (tok >= 0) {
            return finish(grammar, tok, constrained(tok));
        }
        const size_t checked = std::min(cur.size, BEST_ALLOWED_FIRST);
        unchecked_.assign(cur.data + checked, cur.data + cur.size);
        return {};
    }
    if (top_k_ > 0 && !penalized_ && !full_pass_ && sample_among_best(grammar, non_text, tok)) {
        return finish(grammar, tok, constrained(tok));
    }
    return {};
}

sampler_chain::held_step sampler_chain::sample_rest(reply_grammar & grammar, const std::vector<int32_t> & non_text, const token_first_bytes & bytes,
                                   const std::function<bool(int32_t)> & constrained, const std::atomic<bool> * cancel) {
    const auto cancelled = [&] { return cancel != nullptr && cancel->load(); };
    for (double slept = 0; slept < pass_delay_ms_ && !cancelled(); slept += 10) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    int32_t tok = -1;
    if (greedy_ && !full_pass_) {
        tok = best_allowed_rest(unchecked_.data(), unchecked_.size(), [&](llama_token_data * part, size_t k) {
            llama_token_data_array a = { part, k, -1, false };
            grammar.apply(&a, &bytes, cancel);
        });
    } else {
        llama_token_data_array cur = candidates();
        grammar.apply(&cur, full_pass_ ? nullptr : &bytes, cancel);
        refuse(cur, non_text);
        const bool any = std::any_of(cur.data, cur.data + cur.size, [&](const llama_token_data & d) {
            return !std::isinf(d.logit) && !std::binary_search(banned_.begin(), banned_.end(), d.id);
        });
        if (any && !cancelled()) {
            llama_sampler_apply(chain_, &cur);
            tok = cur.data[cur.selected].id;
        }
    }
    return tok < 0 || cancelled() ? held_step{ true, -1, false } : finish(grammar, tok, constrained(tok));
}

} // namespace fml
