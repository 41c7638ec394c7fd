// A reply held to a grammar: send's `grammar` (GBNF) or `jsonSchema` (converted to GBNF by llama.cpp's
// own converter, as llama-server converts a response_format), run by llama.cpp's grammar sampler.
// Both are checked before llama.cpp parses them: its parser recurses once per nesting level, and a
// schema nested deep enough would overflow the stack of the thread that converts it.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct llama_sampler;
struct llama_vocab;
struct llama_token_data_array;

namespace fml {

constexpr size_t MAX_GRAMMAR_BYTES = 128 * 1024;
constexpr size_t MAX_JSON_SCHEMA_BYTES = 64 * 1024;
constexpr int MAX_GRAMMAR_NESTING = 128;     // groups in groups: ( ( ... ) ) in GBNF
constexpr int MAX_JSON_SCHEMA_NESTING = 64;  // objects and arrays in each other, in the schema's JSON

// The first byte of each token's special rendering (what a grammar reads; -1: empty) and the token
// whose rendering is each single byte (-1: none): a grammar that refuses a byte as the next one
// refuses every token whose text starts with it, so one pass over the single bytes narrows the pass
// over the vocabulary to the tokens it can allow (fml_model::first_bytes builds it).
struct token_first_bytes {
    std::vector<int16_t> first;
    std::array<int32_t, 256> single;
};

class reply_grammar {
public:
    // Send's grammar (GBNF, start rule `root`) or, when that is empty, its JSON schema (JSON text).
    // Throws fml_error(INVALID_OPTION) naming the option.
    static std::unique_ptr<reply_grammar> compile(const llama_vocab * vocab, const std::string & gbnf, const std::string & json_schema);
    ~reply_grammar();
    reply_grammar(const reply_grammar &) = delete;
    reply_grammar & operator=(const reply_grammar &) = delete;

    // Candidates the grammar does not allow next get -inf (end of generation, unless it is complete).
    // With `bytes`, the pass goes over the candidates whose first byte it allows (and end of
    // generation): the same result, for a fraction of the work where few bytes can come next.
    // `cancel`: checked between slices of the candidates; once set, the pass stops where it is (its
    // result is then no result: a turn that ended while it ran).
    void apply(llama_token_data_array * cur, const token_first_bytes * bytes = nullptr, const std::atomic<bool> * cancel = nullptr) const;
    bool allows(int32_t token) const;
    void accept(int32_t token);

private:
    reply_grammar(llama_sampler * s, const llama_vocab * vocab, bool by_bytes) : s_(s), vocab_(vocab), by_bytes_(by_bytes) {}
    llama_sampler * s_;
    const llama_vocab * vocab_;
    // Its rules read characters only: a rule on a token id (<[id]>, <token>) allows tokens whatever
    // their first byte, so such a grammar takes the whole pass.
    bool by_bytes_;
};

// Deepest nesting of objects and arrays in JSON text, outside its strings (llama.cpp's JSON code
// recurses once per level).
int json_nesting(const std::string & json);

// The GBNF of a JSON schema given as JSON text. Throws fml_error(INVALID_OPTION, "jsonSchema ...").
std::string gbnf_of_json_schema(const std::string & schema);

} // namespace fml
