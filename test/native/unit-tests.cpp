// C++ unit tests of the token ledger and the eviction policies on synthetic ledgers: no llama.cpp,
// no model, no Node (flash-weights-tests.cpp, in the same binary, runs ggml's CPU kernels). Built as build/<config>/fml_unit_tests by CMake and run by
// test/standalone/native-units.test.ts (so `npm test` runs them). Exit status 1 on any failure.
#include "engine/sampler.h"
#include "kv/token-ledger.h"
#include "policies/policy.h"
#include "util/error.h"
#include "util/utf8.h"

#include "unit-check.h"

#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <set>
#include <string>
#include <vector>

using namespace fml;
using namespace fml_test;

namespace {

// A ledger of `n` tokens: `sinks` pinned at the front, turns of `turn_len` tokens, sentence ends
// every 8 tokens; importance scores from `score(i)` when given.
token_ledger make_ledger(size_t n, size_t sinks, size_t turn_len = 16, const std::function<float(size_t)> & score = nullptr) {
    token_ledger l;
    for (size_t i = 0; i < n; ++i) {
        const uint32_t turn = (uint32_t) (i / turn_len) + 1;
        l.append((int32_t) (100 + i), turn, turn % 2 ? TOKEN_ROLE_USER : TOKEN_ROLE_ASSISTANT, i < sinks, i % 8 == 7);
        if (score) {
            l.at(i).score[SCORE_IMPORTANCE] = score(i);
            l.at(i).score[SCORE_ATTENTION_QUERIES] = 1;
        }
    }
    return l;
}

// The tests' own settings (a chat's come from the options table, which these tests do not link).
policy_options options(const char * name, uint32_t max_tokens, uint32_t window) {
    policy_options o;
    o.name = name;
    o.max_tokens = max_tokens;
    o.window_size = window;
    o.sink_tokens = 4;
    o.importance_granularity_spans = true;
    o.importance_blend = true;
    o.semantic_clusters = 8;
    o.span_max_tokens = 32;
    o.seed = 42;
    o.summary_tokens = std::min<uint32_t>(48, max_tokens / 8);
    o.hybrid_importance_share = 0.5f;
    return o;
}

// The invariants every plan keeps: sorted disjoint in-range ranges, no pinned entry, at least `need`.
void check_plan(const token_ledger & l, const eviction_plan & p, const eviction_request & req) {
    size_t prev_end = 0;
    for (const index_range & r : p.ranges) {
        CHECK(r.begin < r.end);
        CHECK(r.begin >= prev_end);
        CHECK(r.end <= l.size());
        for (size_t i = r.begin; i < r.end && i < l.size(); ++i) {
            CHECK(!l[i].pinned);
        }
        prev_end = r.end;
    }
    CHECK(p.total() >= req.need);
}

std::set<size_t> evicted(const eviction_plan & p) {
    std::set<size_t> out;
    for (const index_range & r : p.ranges) {
        for (size_t i = r.begin; i < r.end; ++i) {
            out.insert(i);
        }
    }
    return out;
}

// ---- ledger ----

TEST(ledger_remove_ranges_keeps_positions_and_renumber_compacts) {
    token_ledger l = make_ledger(20, 2);
    const size_t removed = l.remove_ranges({ { 3, 6 }, { 10, 12 } });
    CHECK(removed == 5);
    CHECK(l.size() == 15);
    CHECK(l[3].token == 106);   // what followed the first range moved up in the ledger
    CHECK(l[7].token == 112);
    CHECK(l[3].pos == 6);       // but kept its position: the gap stays
    CHECK(!l.positions_contiguous());
    CHECK(l.positions_increasing());
    CHECK(l.next_pos() == 20);
    CHECK(l.index_of_pos(6) == 3);
    CHECK(l.index_of_pos(4) == l.size());   // evicted
    CHECK(l.index_of_pos(6, 3) == 3);       // a right hint
    CHECK(l.index_of_pos(6, 9) == 3);       // a wrong one, or one past the end: searched
    CHECK(l.index_of_pos(6, 99) == 3);
    CHECK(l.index_of_pos(4, 2) == l.size());
    l.renumber();
    CHECK(l.positions_contiguous());
    CHECK(l[7].pos == 7 && l.next_pos() == 15);
}

TEST(ledger_normalize_ranges_sorts_merges_and_drops_empty) {
    const std::vector<index_range> r = normalize_ranges({ { 8, 10 }, { 2, 4 }, { 4, 6 }, { 7, 7 } });
    CHECK(r.size() == 2);
    CHECK(r[0].begin == 2 && r[0].end == 6);
    CHECK(r[1].begin == 8 && r[1].end == 10);
}

TEST(ledger_insert_keeps_the_positions_it_is_given) {
    token_ledger l = make_ledger(6, 1);
    l.remove_ranges({ { 2, 4 } });   // positions 0 1 4 5
    ledger_entry e{};
    e.token = 7;
    e.role = TOKEN_ROLE_SUMMARY;
    e.pos = 2;
    ledger_entry f = e;
    f.pos = 3;
    l.insert(2, { e, f });
    CHECK(l.size() == 6);
    CHECK(l[2].role == TOKEN_ROLE_SUMMARY && l[3].role == TOKEN_ROLE_SUMMARY);
    CHECK(l.positions_contiguous());
    CHECK(l.pinned_count() == 1);
    ledger_entry late = e;
    late.pos = 1;                    // out of order: the ledger keeps it, and says so
    l.insert(5, { late });
    CHECK(!l.positions_increasing());
}

TEST(ranges_from_mask_matches_mask) {
    const std::vector<index_range> r = ranges_from_mask({ false, true, true, false, true });
    CHECK(r.size() == 2);
    CHECK(r[0].begin == 1 && r[0].end == 3);
    CHECK(r[1].begin == 4 && r[1].end == 5);
}

// ---- every policy ----

TEST(every_policy_keeps_plan_invariants_on_many_ledgers) {
    for (const char * name : { "sliding", "importance", "semantic", "rolling_summary", "hybrid" }) {
        for (size_t n : { 40, 100, 257 }) {
            for (size_t need : { (size_t) 1, n / 4, n / 2 }) {
                token_ledger l = make_ledger(n, 4, 12, [](size_t i) { return (float) ((i * 37) % 11); });
                if (std::string(name) == "semantic" || std::string(name) == "hybrid") {
                    l.set_embedding_dim(4);
                    for (size_t i = 0; i < n; ++i) {
                        for (size_t d = 0; d < 4; ++d) {
                            l.embedding_mut(i)[d] = (float) (((i / 8) * 13 + d * 7) % 5);
                        }
                    }
                }
                policy_options o = options(name, (uint32_t) n, 16);
                auto policy = make_policy(o);
                const eviction_request req{ need, need + 8 };
                const eviction_plan plan = policy->plan(l, req);
                check_plan(l, plan, req);
            }
        }
    }
}

TEST(pinned_tokens_are_never_planned) {
    for (const char * name : { "sliding", "importance", "semantic", "rolling_summary", "hybrid" }) {
        token_ledger l = make_ledger(80, 4, 10, [](size_t i) { return (float) (i % 3); });
        l.set_embedding_dim(2);
        for (size_t i = 20; i < 30; ++i) {
            l.at(i).pinned = true;   // a pinned turn in the middle
        }
        auto policy = make_policy(options(name, 80, 8));
        const eviction_request req{ 40, 48 };
        const eviction_plan plan = policy->plan(l, req);
        check_plan(l, plan, req);
        for (size_t i : evicted(plan)) {
            CHECK(i < 20 || i >= 30);
        }
    }
}

TEST(unknown_policy_is_invalid_option) {
    bool threw = false;
    try {
        make_policy(options("nope", 64, 8));
    } catch (const fml_error & e) {
        threw = e.code() == FML_ERR_INVALID_OPTION;
    }
    CHECK(threw);
}

// ---- each policy's choice ----

TEST(sliding_evicts_oldest_unpinned_outside_the_window_first) {
    token_ledger l = make_ledger(64, 4);
    auto policy = make_policy(options("sliding", 64, 16));
    const eviction_plan plan = policy->plan(l, { 10, 10 });
    const std::set<size_t> gone = evicted(plan);
    CHECK(gone.size() == 10);
    CHECK(*gone.begin() == 4);    // right after the sinks
    CHECK(*gone.rbegin() == 13);  // contiguous, oldest first
}

TEST(importance_keeps_the_highest_scores) {
    // Scores rise with the index except for a block of high scores early on: importance keeps that
    // block, sliding would evict it first.
    token_ledger l = make_ledger(96, 4, 16, [](size_t i) { return (i >= 8 && i < 16) ? 100.0f : (float) i * 0.01f; });
    policy_options o = options("importance", 96, 16);
    o.importance_granularity_spans = false;
    auto policy = make_policy(o);
    const eviction_plan plan = policy->plan(l, { 30, 30 });
    for (size_t i : evicted(plan)) {
        CHECK(i < 8 || i >= 16);
    }
    check_plan(l, plan, { 30, 30 });
}

TEST(importance_and_hybrid_blend_keep_a_span_a_later_query_went_back_for) {
    // Mean attention falls with age, so 'mean' evicts the oldest spans; tokens 24..31 (an old fact) got
    // a sharp peak from a distant query. 'blend' keeps them; 'mean' evicts them. Hybrid (its kept
    // history all chosen by importance, no summary) ranks its heavy hitters the same way.
    auto run = [](const char * policy, bool blend) {
        token_ledger l = make_ledger(128, 4, 16, [](size_t i) { return (float) i * 0.01f; });
        for (size_t i = 24; i < 32; ++i) l.at(i).score[SCORE_PEAK] = 0.9f;
        policy_options o = options(policy, 128, 16);
        o.span_max_tokens = 8;
        o.importance_blend = blend;
        o.hybrid_importance_share = 1.0f;
        o.summary_tokens = 0;
        const eviction_plan plan = make_policy(o)->plan(l, { 40, 40 });
        check_plan(l, plan, { 40, 40 });
        size_t fact_evicted = 0;
        for (size_t i : evicted(plan)) fact_evicted += (i >= 24 && i < 32) ? 1 : 0;
        return fact_evicted;
    };
    CHECK(run("importance", false) == 8);
    CHECK(run("importance", true) == 0);
    CHECK(run("hybrid", false) == 8);
    CHECK(run("hybrid", true) == 0);
}

TEST(importance_and_hybrid_windows_count_the_incoming_message) {
    // The newest 16 tokens score lowest, everything older highest. With nothing incoming the window
    // (16) protects them; a 16-token message about to arrive is the window itself, so they compete
    // on score and go first (but the newest, see window_begin); with 8 incoming, only the newest 8
    // stay protected.
    auto run = [](const char * policy, size_t incoming, size_t need = 16) {
        token_ledger l = make_ledger(128, 4, 16, [](size_t i) { return i >= 112 ? 0.0f : 1.0f; });
        policy_options o = options(policy, 128, 16);
        o.hybrid_importance_share = 1.0f;
        o.summary_tokens = 0;
        const eviction_plan plan = make_policy(o)->plan(l, { need, need, incoming });
        check_plan(l, plan, { need, need });
        size_t recent_evicted = 0;
        for (size_t i : evicted(plan)) recent_evicted += i >= 112 ? 1 : 0;
        return recent_evicted;
    };
    for (const char * policy : { "importance", "hybrid" }) {
        CHECK(run(policy, 0) == 0);
        CHECK(run(policy, 16, 15) == 15);   // 15: whole spans fit hybrid's kept share exactly
        CHECK(run(policy, 8) == 8);
    }
    token_ledger l = make_ledger(50, 4);
    CHECK(window_begin(l, 10, 4) == 44);
    CHECK(window_begin(l, 10, 10) == 49);   // the newest token always stays
    CHECK(window_begin(l, 10, 30) == 49);
    CHECK(window_begin(l, 0, 0) == 49);
}

TEST(ledger_message_start_walks_back_runs_of_one_turn_and_role) {
    token_ledger l;
    // Messages: system 0..2, user(1) 3..6, assistant(1) 7..8, user(2) 9..11.
    for (int i = 0; i < 3; ++i) l.append(i, 0, TOKEN_ROLE_SYSTEM, true);
    for (int i = 0; i < 4; ++i) l.append(i, 1, TOKEN_ROLE_USER, false);
    for (int i = 0; i < 2; ++i) l.append(i, 1, TOKEN_ROLE_ASSISTANT, false);
    for (int i = 0; i < 3; ++i) l.append(i, 2, TOKEN_ROLE_USER, false);
    CHECK(l.message_start(2, TOKEN_ROLE_USER, 0) == 9);        // continuing the last message
    CHECK(l.message_start(2, TOKEN_ROLE_USER, 1) == 7);
    CHECK(l.message_start(2, TOKEN_ROLE_USER, 2) == 3);
    CHECK(l.message_start(2, TOKEN_ROLE_USER, 3) == 0);
    CHECK(l.message_start(2, TOKEN_ROLE_USER, 9) == 0);        // past the first: 0
    CHECK(l.message_start(2, TOKEN_ROLE_ASSISTANT, 0) == 12);  // a new message: it starts next
    CHECK(l.message_start(2, TOKEN_ROLE_ASSISTANT, 1) == 9);
    CHECK(l.message_start(2, TOKEN_ROLE_ASSISTANT, 2) == 7);
    l.remove_ranges({ { 7, 9 } });                              // the whole assistant message (positions 7, 8)
    CHECK(l.message_start(2, TOKEN_ROLE_USER, 1) == 3);        // an evicted message does not count
    CHECK(token_ledger().message_start(1, TOKEN_ROLE_USER, 2) == 0);
    // A summary where the model could not shift it (after the history, before the carried tokens
    // that close the reply) does not split the reply into two messages.
    token_ledger m;
    for (int i = 0; i < 3; ++i) m.append(i, 1, TOKEN_ROLE_USER, false);        // 0..2
    for (int i = 0; i < 2; ++i) m.append(i, 1, TOKEN_ROLE_ASSISTANT, false);   // 3..4
    for (int i = 0; i < 2; ++i) m.append(i, 1, TOKEN_ROLE_SUMMARY, false);     // 5..6
    for (int i = 0; i < 2; ++i) m.append(i, 1, TOKEN_ROLE_ASSISTANT, false);   // 7..8 (the carry)
    CHECK(m.message_start(2, TOKEN_ROLE_USER, 1) == 3);
    CHECK(m.message_start(2, TOKEN_ROLE_USER, 2) == 0);
    CHECK(m.message_start(1, TOKEN_ROLE_ASSISTANT, 0) == 3);
    CHECK(m.message_start(1, TOKEN_ROLE_ASSISTANT, 1) == 0);
    CHECK(token_ledger().message_start(1, TOKEN_ROLE_USER, 0) == 0);
}

TEST(rolling_summary_asks_for_a_summary) {
    token_ledger l = make_ledger(96, 4);
    auto policy = make_policy(options("rolling_summary", 96, 16));
    CHECK(policy->summarizes());
    const eviction_plan plan = policy->plan(l, { 20, 20 });
    CHECK(plan.summarize);
    check_plan(l, plan, { 20, 20 });
}

TEST(evictable_count_and_window_begin) {
    token_ledger l = make_ledger(50, 4);
    CHECK(evictable_count(l) == 46);
    CHECK(window_begin(l, 10) == 40);
    CHECK(window_begin(l, 100) <= 4 || window_begin(l, 100) == 0);
}

} // namespace

TEST(utf8_sanitize_replaces_each_maximal_subpart) {
    const std::string R = "\xEF\xBF\xBD";
    CHECK(utf8_sanitize("ok \xC3\xA9") == "ok \xC3\xA9");                    // valid: untouched
    CHECK(utf8_sanitize("a\xFF" "b") == "a" + R + "b");                        // an invalid byte
    CHECK(utf8_sanitize("\xE2\x82x") == R + "x");                               // a truncated sequence: one U+FFFD
    CHECK(utf8_sanitize("\xE0\x80") == R + R);                                  // overlong: each byte
    CHECK(utf8_sanitize("\xED\xA0\x80") == R + R + R);                          // a surrogate: each byte
    CHECK(utf8_sanitize("\xF0\x9F\x98\x80") == "\xF0\x9F\x98\x80");            // U+1F600
}

TEST(text_stream_matches_a_stop_string_of_replacement_characters) {
    text_stream t({ "\xEF\xBF\xBD" });
    CHECK(t.push("hello ") == "hello ");
    CHECK(t.push("\xFF") == "");                                               // a bad byte: U+FFFD, the stop string
    CHECK(t.stopped());
    CHECK(t.text() == "hello ");
    text_stream u({});
    std::string out = u.push("x\xE2\x82");                                     // waits for the rest of the character
    out += u.push("y");                                                        // it never came: U+FFFD, then y
    CHECK(out == "x\xEF\xBF\xBDy");
}

// Greedy decoding under a grammar finds the best allowed token by sorting in chunks: the same token
// as a pass over every candidate, whatever the size, where the allowed ones are, and banned ones.
TEST(best_allowed_is_the_highest_logit_the_grammar_allows) {
    uint32_t rng = 12345;
    const auto next = [&] { rng = rng * 1664525u + 1013904223u; return rng >> 8; };
    for (size_t n : { (size_t) 1, (size_t) 63, (size_t) 64, (size_t) 65, (size_t) 1000, (size_t) 152000 }) {
        for (uint32_t every : { 1u, 7u, 5000u, 1000000u }) {
            std::vector<llama_token_data> cur(n);
            for (size_t i = 0; i < n; ++i) {
                const bool banned = next() % 50 == 0;
                cur[i] = { (int32_t) i, banned ? -INFINITY : (float) (next() % 100000) / 100.0f, 0.0f };
            }
            const auto allowed = [&](int32_t id) { return (uint32_t) id % every == 3 % every; };
            int32_t expected = -1;
            float best = -INFINITY;
            for (const auto & d : cur) {
                if (allowed(d.id) && d.logit > best) {
                    best = d.logit;
                    expected = d.id;
                }
            }
            const int32_t got = best_allowed(cur.data(), cur.size(), [&](llama_token_data * part, size_t k) {
                for (size_t i = 0; i < k; ++i) {
                    if (!allowed(part[i].id)) part[i].logit = -INFINITY;
                }
            });
            // Ties could pick another id of the same logit: the logit is what must match.
            CHECK((got < 0) == (expected < 0));
            if (got >= 0 && expected >= 0) {
                CHECK(allowed(got));
                float got_logit = -INFINITY;
                for (const auto & d : cur) {
                    if (d.id == got) got_logit = d.logit;
                }
                CHECK(got_logit == best);
            }
        }
    }
}

int main() {
    for (const test_case & t : registry()) {
        const int before = g_failed;
        try {
            t.fn();
        } catch (const std::exception & e) {
            ++g_failed;
            std::fprintf(stderr, "  FAILED %s: threw %s\n", t.name, e.what());
        }
        std::printf("%s %s\n", g_failed == before ? "ok  " : "FAIL", t.name);
    }
    std::printf("%zu tests, %d checks, %d failed\n", registry().size(), g_checks, g_failed);
    return g_failed == 0 ? 0 : 1;
}
