#include "kv/token-ledger.h"

#include <algorithm>
#include <cstring>

namespace fml {

const char * token_role_name(token_role role) {
    switch (role) {
        case TOKEN_ROLE_SYSTEM:    return "system";
        case TOKEN_ROLE_USER:      return "user";
        case TOKEN_ROLE_ASSISTANT: return "assistant";
        case TOKEN_ROLE_SUMMARY:   return "summary";
        case TOKEN_ROLE_REASONING: return "reasoning";
    }
    return "unknown";
}

void token_ledger::append(int32_t token, uint32_t turn, token_role role, bool pinned, bool sentence_end) {
    ledger_entry e{};
    e.token  = token;
    e.pos    = next_pos();
    e.turn   = turn;
    e.role   = role;
    e.pinned = pinned;
    e.sentence_end = sentence_end;
    entries_.push_back(e);
    if (embedding_dim_ > 0) {
        embeddings_.resize(entries_.size() * embedding_dim_, 0.0f);
    }
}

void token_ledger::insert(size_t at, const std::vector<ledger_entry> & items) {
    at = std::min(at, entries_.size());
    entries_.insert(entries_.begin() + (long) at, items.begin(), items.end());
    if (embedding_dim_ > 0) {
        embeddings_.insert(embeddings_.begin() + (long) (at * embedding_dim_), items.size() * embedding_dim_, 0.0f);
    }
}

size_t token_ledger::pinned_count() const {
    size_t n = 0;
    for (const auto & e : entries_) {
        n += e.pinned ? 1 : 0;
    }
    return n;
}

size_t token_ledger::remove_ranges(const std::vector<index_range> & ranges) {
    if (ranges.empty()) {
        return 0;
    }
    // Compacted in place: the kept entries (and their embeddings, n x n_embd floats: hundreds of MiB
    // at 32k tokens of a 4096-wide model) move down over the removed ones, with no second copy.
    size_t r = 0;
    size_t out = 0;
    const size_t dim = embedding_dim_;
    for (size_t i = 0; i < entries_.size(); ++i) {
        while (r < ranges.size() && i >= ranges[r].end) {
            ++r;
        }
        const bool removed = r < ranges.size() && i >= ranges[r].begin && i < ranges[r].end;
        if (!removed) {
            if (out != i) {
                entries_[out] = entries_[i];
                if (dim > 0) {
                    std::memmove(embeddings_.data() + out * dim, embeddings_.data() + i * dim, sizeof(float) * dim);
                }
            }
            ++out;
        }
    }
    const size_t removed = entries_.size() - out;
    entries_.resize(out);
    embeddings_.resize(out * dim);
    return removed;
}

void token_ledger::renumber() {
    for (size_t i = 0; i < entries_.size(); ++i) {
        entries_[i].pos = (int32_t) i;
    }
}

bool token_ledger::positions_contiguous() const {
    for (size_t i = 0; i < entries_.size(); ++i) {
        if (entries_[i].pos != (int32_t) i) {
            return false;
        }
    }
    return true;
}

bool token_ledger::positions_increasing() const {
    for (size_t i = 0; i < entries_.size(); ++i) {
        if (entries_[i].pos < 0 || (i > 0 && entries_[i].pos <= entries_[i - 1].pos)) {
            return false;
        }
    }
    return true;
}

size_t token_ledger::index_of_pos(int32_t pos) const {
    const auto it = std::lower_bound(entries_.begin(), entries_.end(), pos, [](const ledger_entry & e, int32_t p) { return e.pos < p; });
    return it != entries_.end() && it->pos == pos ? (size_t) (it - entries_.begin()) : entries_.size();
}

size_t token_ledger::index_of_pos(int32_t pos, size_t hint) const {
    return hint < entries_.size() && entries_[hint].pos == pos ? hint : index_of_pos(pos);
}

int32_t token_ledger::message_start(uint32_t turn, token_role role, size_t back) const {
    // Summary entries are not a message: a summary placed inside a message (or before the tokens that
    // close it) leaves it one message, so the horizon never moves closer than the history says.
    const auto skip_summaries = [&](size_t end) {
        while (end > 0 && entries_[end - 1].role == TOKEN_ROLE_SUMMARY) --end;
        return end;
    };
    // Index of the first entry of the message whose last entry is end - 1 (not a summary).
    const auto run_start = [&](size_t end) {
        const uint32_t t = entries_[end - 1].turn;
        const token_role r = message_role(entries_[end - 1].role);
        size_t first = end - 1;
        for (size_t i = first; i > 0; --i) {
            const ledger_entry & p = entries_[i - 1];
            if (p.role == TOKEN_ROLE_SUMMARY) continue;
            if (p.turn != t || message_role(p.role) != r) break;
            first = i - 1;
        }
        return first;
    };
    size_t i = skip_summaries(entries_.size());
    const bool continues = i > 0 && entries_[i - 1].turn == turn && message_role(entries_[i - 1].role) == message_role(role);
    if (!continues) {
        if (back == 0) {
            return next_pos();
        }
        --back;   // the next entries start a new message: the last one is the one before it
    }
    if (i == 0) {
        return 0;
    }
    i = run_start(i);
    for (; back > 0; --back) {
        i = skip_summaries(i);
        if (i == 0) {
            return 0;
        }
        i = run_start(i);
    }
    return entries_[i].pos;
}

std::vector<index_range> normalize_ranges(std::vector<index_range> ranges) {
    std::sort(ranges.begin(), ranges.end(), [](const index_range & a, const index_range & b) {
        return a.begin < b.begin;
    });
    std::vector<index_range> out;
    for (const auto & r : ranges) {
        if (r.end <= r.begin) {
            continue;
        }
        if (!out.empty() && r.begin <= out.back().end) {
            out.back().end = std::max(out.back().end, r.end);
        } else {
            out.push_back(r);
        }
    }
    return out;
}

} // namespace fml
