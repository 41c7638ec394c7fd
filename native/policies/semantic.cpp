#include "policies/semantic.h"

#include "policies/importance.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace fml {

std::vector<text_span> split_spans(const token_ledger & ledger, size_t wb, uint32_t max_tokens, const std::vector<bool> * exclude) {
    std::vector<text_span> spans;
    size_t begin = SIZE_MAX;
    auto close = [&](size_t end) {
        if (begin != SIZE_MAX && end > begin) {
            spans.push_back({ begin, end });
        }
        begin = SIZE_MAX;
    };
    for (size_t i = 0; i < wb; ++i) {
        const ledger_entry & e = ledger[i];
        if (e.pinned || (exclude != nullptr && (*exclude)[i])) {
            close(i);
            continue;
        }
        if (begin != SIZE_MAX && (ledger[begin].turn != e.turn || ledger[begin].role != e.role || i - begin >= max_tokens)) {
            close(i);
        }
        if (begin == SIZE_MAX) {
            begin = i;
        }
        if (e.sentence_end) {
            close(i + 1);
        }
    }
    close(wb);
    return spans;
}

// xorshift32: a fixed, portable PRNG so clustering is reproducible across platforms.
static uint32_t next_rand(uint32_t & s) {
    s ^= s << 13;
    s ^= s >> 17;
    s ^= s << 5;
    return s;
}

static float sq_dist(const float * a, const float * b, size_t d) {
    float s = 0.0f;
    for (size_t k = 0; k < d; ++k) {
        const float x = a[k] - b[k];
        s += x * x;
    }
    return s;
}

// Span embeddings are snapped to this grid (per unit-vector component) before clustering: the hidden
// states they come from differ in their last bits between a chat decoded alone and one batched with
// others (~1e-4), and k-means turns such differences into other choices. On the grid both decodes give
// the same inputs, so a chat's choices do not depend on its neighbours, unless a component lies within
// that noise of a grid boundary.
static constexpr float SEMANTIC_GRID = 32.0f;

std::vector<size_t> semantic_keep_order(const token_ledger & ledger, const std::vector<text_span> & spans,
                                        uint32_t clusters, uint32_t seed, std::vector<int> * cluster_of) {
    const size_t n = spans.size();
    const size_t d = ledger.embedding_dim();
    std::vector<size_t> order;
    if (n == 0) {
        return order;
    }
    if (d == 0) {
        for (size_t i = n; i-- > 0;) {
            order.push_back(i);
        }
        return order;
    }
    // Span embeddings: mean of token hidden states, L2-normalised (cosine geometry).
    std::vector<float> emb(n * d, 0.0f);
    for (size_t s = 0; s < n; ++s) {
        float * out = emb.data() + s * d;
        for (size_t i = spans[s].begin; i < spans[s].end; ++i) {
            const float * e = ledger.embedding(i);
            for (size_t k = 0; k < d; ++k) {
                out[k] += e[k];
            }
        }
        float norm = 0.0f;
        for (size_t k = 0; k < d; ++k) {
            norm += out[k] * out[k];
        }
        norm = std::sqrt(norm);
        if (norm > 0.0f) {
            for (size_t k = 0; k < d; ++k) {
                out[k] = std::round(out[k] / norm * SEMANTIC_GRID) / SEMANTIC_GRID;
            }
        }
    }
    const size_t k = std::max<size_t>(1, std::min<size_t>(clusters, n));
    uint32_t rng = seed * 2654435761u + 1u;
    if (rng == 0) {
        rng = 1;
    }
    // k-means++ seeding.
    std::vector<float> cent(k * d);
    std::vector<float> best(n, std::numeric_limits<float>::max());
    size_t first = next_rand(rng) % n;
    std::copy(emb.begin() + (long) (first * d), emb.begin() + (long) ((first + 1) * d), cent.begin());
    for (size_t c = 1; c < k; ++c) {
        double total = 0.0;
        for (size_t s = 0; s < n; ++s) {
            best[s] = std::min(best[s], sq_dist(emb.data() + s * d, cent.data() + (c - 1) * d, d));
            total += best[s];
        }
        size_t pick = n - 1;
        if (total > 0.0) {
            double r = (next_rand(rng) / 4294967296.0) * total;
            for (size_t s = 0; s < n; ++s) {
                r -= best[s];
                if (r <= 0.0) {
                    pick = s;
                    break;
                }
            }
        } else {
            pick = next_rand(rng) % n;
        }
        std::copy(emb.begin() + (long) (pick * d), emb.begin() + (long) ((pick + 1) * d), cent.begin() + (long) (c * d));
    }
    // Lloyd iterations.
    std::vector<int> assign(n, 0);
    for (int iter = 0; iter < 12; ++iter) {
        bool changed = false;
        for (size_t s = 0; s < n; ++s) {
            int bc = 0;
            float bd = std::numeric_limits<float>::max();
            for (size_t c = 0; c < k; ++c) {
                const float dist = sq_dist(emb.data() + s * d, cent.data() + c * d, d);
                if (dist < bd) {
                    bd = dist;
                    bc = (int) c;
                }
            }
            changed = changed || assign[s] != bc;
            assign[s] = bc;
        }
        if (!changed && iter > 0) {
            break;
        }
        // A cluster left empty keeps its centroid: zeroed, it sat at the origin, about as far from
        // every (normalised) span, and gathered the outliers of all topics as one "cluster".
        const std::vector<float> previous = cent;
        std::fill(cent.begin(), cent.end(), 0.0f);
        std::vector<size_t> count(k, 0);
        for (size_t s = 0; s < n; ++s) {
            count[(size_t) assign[s]]++;
            for (size_t q = 0; q < d; ++q) {
                cent[(size_t) assign[s] * d + q] += emb[s * d + q];
            }
        }
        for (size_t c = 0; c < k; ++c) {
            if (count[c] > 0) {
                for (size_t q = 0; q < d; ++q) {
                    cent[c * d + q] /= (float) count[c];
                }
            } else {
                std::copy(previous.begin() + (long) (c * d), previous.begin() + (long) ((c + 1) * d), cent.begin() + (long) (c * d));
            }
        }
    }
    // Per cluster: spans nearest the centroid first; then round-robin across clusters.
    std::vector<std::vector<std::pair<float, size_t>>> members(k);
    for (size_t s = 0; s < n; ++s) {
        members[(size_t) assign[s]].push_back({ sq_dist(emb.data() + s * d, cent.data() + (size_t) assign[s] * d, d), s });
    }
    for (auto & m : members) {
        std::sort(m.begin(), m.end());
    }
    for (size_t rank = 0; order.size() < n; ++rank) {
        for (size_t c = 0; c < k; ++c) {
            if (rank < members[c].size()) {
                order.push_back(members[c][rank].second);
            }
        }
    }
    if (cluster_of != nullptr) {
        cluster_of->assign(assign.begin(), assign.end());
    }
    return order;
}

eviction_plan kv_policy_semantic::plan(const token_ledger & ledger, const eviction_request & req) {
    // The newest token stays with windowSize 0 too, as in importance and hybrid: evicting it moves the
    // cache's end back (a sliding-window model's window is then decoded again).
    const size_t wb = window_begin(ledger, std::max<uint32_t>(opts_.window_size, 1));
    const std::vector<text_span> spans = split_spans(ledger, wb, opts_.span_max_tokens);
    size_t region = 0;
    for (const auto & s : spans) {
        region += s.size();
    }
    const size_t target_evict = std::min(req.want, region);
    const size_t keep_budget = region - target_evict;
    std::vector<bool> evict(ledger.size(), false);
    for (const auto & s : spans) {
        for (size_t i = s.begin; i < s.end; ++i) {
            evict[i] = true;
        }
    }
    size_t kept = 0;
    for (size_t idx : semantic_keep_order(ledger, spans, opts_.semantic_clusters, opts_.seed)) {
        const text_span & s = spans[idx];
        if (kept + s.size() > keep_budget) {
            continue;   // a smaller span of a later rank may still fit
        }
        for (size_t i = s.begin; i < s.end; ++i) {
            evict[i] = false;
        }
        kept += s.size();
    }
    top_up_oldest(ledger, wb, req.need, evict);
    eviction_plan plan;
    plan.ranges = ranges_from_mask(evict);
    return plan;
}

} // namespace fml
