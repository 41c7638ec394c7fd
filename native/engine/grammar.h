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
// A tool call's grammar, made by llama.cpp from at most 256 KiB of checked tools (128 tools of ~1.6
// KiB made 209 KB): a bound on what is parsed, far above what such a list makes.
constexpr size_t MAX_TOOL_GRAMMAR_BYTES = 16 * 1024 * 1024;
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

// What wakes a lazy grammar (a tool call's with toolChoice 'auto': the format's triggers, as llama.cpp's
// common sampler reads them), checked at each token the answer takes: a word written (found in the
// text the token ends), a pattern over all the text so far (a regex; anchored ^...$: the whole of it;
// the held text starts at its first group that matched, or else at the match, as llama.cpp's), or a
// token of these (sorted; the held text starts with it).
struct grammar_triggers {
    std::vector<std::string> words;
    std::vector<std::string> patterns;
    std::vector<int32_t> tokens;
};

class reply_grammar {
public:
    // Send's grammar (GBNF, start rule `root`) or, when that is empty, its JSON schema (JSON text).
    // Throws fml_error(INVALID_OPTION) naming the option.
    static std::unique_ptr<reply_grammar> compile(const llama_vocab * vocab, const std::string & gbnf, const std::string & json_schema);
    // The grammar of a tool call, as the tool set-up has it (llama.cpp's, from tools already checked:
    // no user grammar's size limit). `lazy` (null: none): it holds nothing until a trigger, then the
    // text from the trigger on (a call's arguments held to its schema once the model starts one, as
    // llama-server holds them with toolChoice 'auto'); the text before is read for the trigger alone.
    // Where the text through the trigger is not the grammar's (the model wrote the marker, then
    // something else in the same token), it lets go: the rest of the reply is free, never a failed turn.
    // `bytes`: the model's (it outlives the grammar), to feed the grammar text.
    static std::unique_ptr<reply_grammar> compile_tool_calls(const llama_vocab * vocab, const std::string & gbnf, const grammar_triggers * lazy,
                                                             const token_first_bytes & bytes);
    // Throws fml_error(INVALID_OPTION) where llama.cpp would not compile `gbnf` (a tool's schema's, to
    // say which tool a tool-call grammar failed on).
    static void check_compiles(const llama_vocab * vocab, const std::string & gbnf, const std::string & option);
    // A copy in the same state (each turn takes one of its tool set-up's grammar, prefilled once).
    std::unique_ptr<reply_grammar> clone() const;
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
    // A tool call's grammar reads `text` byte by byte (a token whose text is each byte: every
    // vocabulary has them), not as the text's tokens: a SentencePiece vocabulary tokenizes
    // "<|im_start|>assistant" with a space the grammar's literal has not. Where the text is not the
    // grammar's, a lazy grammar lets go and another throws.
    void accept_text(const std::string & text);
    bool lazy() const { return lazy_; }
    // A lazy grammar before its trigger: it holds nothing yet.
    bool waiting() const { return waiting_ != nullptr; }

private:
    struct trigger_set;
    struct waiting_text;
    reply_grammar(llama_sampler * s, const llama_vocab * vocab, bool by_bytes, bool lazy);
    static llama_sampler * compile_text(const llama_vocab * vocab, const std::string & text, const std::string & option, size_t max_bytes, bool & by_bytes);
    void wait_for_trigger(int32_t token);
    void take(int32_t token);
    llama_sampler * s_;
    const llama_vocab * vocab_;
    // Its rules read characters only: a rule on a token id (<[id]>, <token>) allows tokens whatever
    // their first byte, so such a grammar takes the whole pass.
    bool by_bytes_;
    bool lazy_;
    bool let_go_ = false;
    const token_first_bytes * bytes_ = nullptr;
    std::unique_ptr<waiting_text> waiting_;   // a lazy grammar's text so far, until its trigger
};

// Deepest nesting of objects and arrays in JSON text, outside its strings (llama.cpp's JSON code
// recurses once per level).
int json_nesting(const std::string & json);

// The GBNF of a JSON schema given as JSON text. Throws fml_error(INVALID_OPTION, "jsonSchema ...").
std::string gbnf_of_json_schema(const std::string & schema);

} // namespace fml
