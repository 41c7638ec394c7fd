// The token ledger mirrors llama.cpp's KV cache for one sequence: one entry per cached token, in
// position order. Positions strictly increase but may have gaps: an eviction that keeps positions
// leaves the retained tokens where they were (their true distances), and only a compaction numbers
// them 0..n-1 again. Policies read it by index to decide what to evict; only kv-ops mutates positions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fml {

// The highest position a chat can reach (positionLimit's upper bound): a loaded state with a cell
// beyond it is corrupt.
constexpr int32_t MAX_POSITION = 1 << 30;

enum token_role : uint8_t {
    TOKEN_ROLE_SYSTEM    = 0,
    TOKEN_ROLE_USER      = 1,
    TOKEN_ROLE_ASSISTANT = 2,
    TOKEN_ROLE_SUMMARY   = 3,
    TOKEN_ROLE_REASONING = 4,   // a reply's reasoning (chat/reasoning.h): part of the assistant's message
};

const char * token_role_name(token_role role);
// The role of the message a token belongs to: a reply's reasoning is part of the assistant's.
inline token_role message_role(token_role role) { return role == TOKEN_ROLE_REASONING ? TOKEN_ROLE_ASSISTANT : role; }

// Score slots for policies that rank tokens. Unused by `sliding`.
constexpr int LEDGER_SCORE_SLOTS = 3;
constexpr int SCORE_IMPORTANCE = 0;   // attention received per query that could see the token, or -(key L2 norm)
constexpr int SCORE_ATTENTION_QUERIES = 1;   // queries that have attended to the token so far (normaliser)
constexpr int SCORE_PEAK = 2;         // the peak weight a distant query paid the token (importanceScore 'blend')

struct ledger_entry {
    int32_t    token;
    int32_t    pos;
    uint32_t   turn;
    token_role role;
    bool       pinned;        // never evicted: system prompt and attention sinks
    bool       sentence_end;  // the token's text ends a sentence or line (span boundary for `semantic`)
    float      score[LEDGER_SCORE_SLOTS];
};

// A half-open range [begin, end) of ledger indices.
struct index_range {
    size_t begin;
    size_t end;
    size_t size() const { return end - begin; }
};

class token_ledger {
public:
    void append(int32_t token, uint32_t turn, token_role role, bool pinned, bool sentence_end = false);
    void clear() { entries_.clear(); embeddings_.clear(); }

    // Optional per-token hidden states (semantic policy). dim 0 = none stored.
    void set_embedding_dim(size_t dim) { embedding_dim_ = dim; embeddings_.assign(entries_.size() * dim, 0.0f); }
    size_t embedding_dim() const { return embedding_dim_; }
    const float * embedding(size_t i) const { return embedding_dim_ ? embeddings_.data() + i * embedding_dim_ : nullptr; }
    float * embedding_mut(size_t i) { return embedding_dim_ ? embeddings_.data() + i * embedding_dim_ : nullptr; }

    // Inserts entries before index `at`, with the positions they carry (the caller keeps the order).
    void insert(size_t at, const std::vector<ledger_entry> & items);

    size_t size() const { return entries_.size(); }
    bool   empty() const { return entries_.empty(); }
    size_t pinned_count() const;
    int32_t next_pos() const { return entries_.empty() ? 0 : entries_.back().pos + 1; }

    const ledger_entry & operator[](size_t i) const { return entries_[i]; }
    ledger_entry & at(size_t i) { return entries_[i]; }
    const std::vector<ledger_entry> & entries() const { return entries_; }

    // Removes the given (sorted, disjoint) ranges; the others keep their positions. Returns the
    // number of entries removed. kv-ops calls this after mutating the cache the same way.
    size_t remove_ranges(const std::vector<index_range> & ranges);
    // Numbers the entries' positions 0..n-1 (a compaction; kv-ops moves the cache the same way).
    void renumber();

    // True when positions are exactly 0..n-1 (never evicted with kept positions, or just compacted).
    bool positions_contiguous() const;
    // True when positions are non-negative and strictly increasing: the invariant in every mode.
    bool positions_increasing() const;
    // Index of the entry at position `pos`, or size() when no entry holds it (binary search).
    size_t index_of_pos(int32_t pos) const;
    // The same, trying `hint` first: cells hold runs of consecutive entries, so the entry after the
    // previous cell's is usually the one (perf: a search per cell per decode was 3% of a step).
    size_t index_of_pos(int32_t pos, size_t hint) const;
    // A message is a run of entries of one turn and role (summary entries inside it do not split it and
    // are not a message of their own). Position of the first entry of the message
    // `back` messages before the one of (turn, role) that the next entries belong to (back 0: that
    // message's own start, next_pos() when it has no entries yet). Runs evicted whole do not count,
    // so the answer can only be earlier than with the full history; 0 when the ledger runs out.
    int32_t message_start(uint32_t turn, token_role role, size_t back) const;

private:
    std::vector<ledger_entry> entries_;
    std::vector<float> embeddings_;
    size_t embedding_dim_ = 0;
};

// Normalises a list of ranges: sorted by begin, merged where they touch, empty ones dropped.
std::vector<index_range> normalize_ranges(std::vector<index_range> ranges);

} // namespace fml
