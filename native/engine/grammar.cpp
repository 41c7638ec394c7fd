#include "engine/grammar.h"

#include "util/error.h"

#include "json-schema-to-grammar.h"   // llama.cpp's common/ (fml_json_schema)
#include "llama.h"

#include <cmath>
#include <exception>

namespace fml {

namespace {

[[noreturn]] void invalid(const std::string & message) {
    throw fml_error(FML_ERR_INVALID_OPTION, message);
}

// Deepest nesting of groups in GBNF text, outside its literals ("..."), classes ([...]) and comments.
int gbnf_nesting(const std::string & g) {
    int depth = 0, deepest = 0;
    for (size_t i = 0; i < g.size(); ++i) {
        const char c = g[i];
        if (c == '"' || c == '[') {
            const char close = c == '"' ? '"' : ']';
            for (++i; i < g.size() && g[i] != close; ++i) {
                if (g[i] == '\\') {
                    ++i;
                }
            }
        } else if (c == '#') {
            while (i < g.size() && g[i] != '\n' && g[i] != '\r') {
                ++i;
            }
        } else if (c == '(') {
            deepest = std::max(deepest, ++depth);
        } else if (c == ')') {
            --depth;
        }
    }
    return deepest;
}

// Deepest nesting of objects and arrays in JSON text, outside its strings.
int json_nesting(const std::string & j) {
    int depth = 0, deepest = 0;
    for (size_t i = 0; i < j.size(); ++i) {
        const char c = j[i];
        if (c == '"') {
            for (++i; i < j.size() && j[i] != '"'; ++i) {
                if (j[i] == '\\') {
                    ++i;
                }
            }
        } else if (c == '{' || c == '[') {
            deepest = std::max(deepest, ++depth);
        } else if (c == '}' || c == ']') {
            --depth;
        }
    }
    return deepest;
}

} // namespace

std::string gbnf_of_json_schema(const std::string & schema) {
    if (schema.size() > MAX_JSON_SCHEMA_BYTES) {
        invalid("jsonSchema is " + std::to_string(schema.size()) + " bytes of JSON; at most " + std::to_string(MAX_JSON_SCHEMA_BYTES) + " are taken");
    }
    if (json_nesting(schema) > MAX_JSON_SCHEMA_NESTING) {
        invalid("jsonSchema nests objects and arrays more than " + std::to_string(MAX_JSON_SCHEMA_NESTING) + " deep");
    }
    try {
        const common_json parsed = common_json::parse(schema);
        if (!parsed.is_object() && !parsed.is_boolean()) {
            invalid("jsonSchema must be a JSON schema (an object)");
        }
        return json_schema_to_grammar(parsed, true);
    } catch (const fml_error &) {
        throw;
    } catch (const std::exception & e) {
        // A parse error, or what the converter does not support ("Unrecognized schema: ...").
        invalid(std::string("jsonSchema could not be converted to a grammar: ") + e.what());
    }
}

std::unique_ptr<reply_grammar> reply_grammar::compile(const llama_vocab * vocab, const std::string & gbnf, const std::string & json_schema) {
    const std::string text = json_schema.empty() ? gbnf : gbnf_of_json_schema(json_schema);
    const std::string option = json_schema.empty() ? "grammar" : "jsonSchema's grammar";
    if (text.size() > MAX_GRAMMAR_BYTES) {
        invalid(option + " is " + std::to_string(text.size()) + " bytes; at most " + std::to_string(MAX_GRAMMAR_BYTES) + " are taken");
    }
    if (gbnf_nesting(text) > MAX_GRAMMAR_NESTING) {
        invalid(option + " nests groups more than " + std::to_string(MAX_GRAMMAR_NESTING) + " deep");
    }
    llama_sampler * s = nullptr;
    try {
        s = llama_sampler_init_grammar(vocab, text.c_str(), "root");
    } catch (const std::exception & e) {
        invalid(option + " could not be compiled: " + e.what());
    }
    if (s == nullptr) {
        // llama.cpp printed why to stderr (a syntax error, an undefined rule, left recursion, no root).
        invalid(json_schema.empty() ? "grammar is not valid GBNF with a 'root' rule (llama.cpp's parser printed why to stderr)"
                                    : "jsonSchema's grammar did not compile (llama.cpp's parser printed why to stderr)");
    }
    return std::unique_ptr<reply_grammar>(new reply_grammar(s));
}

reply_grammar::~reply_grammar() {
    llama_sampler_free(s_);
}

void reply_grammar::apply(llama_token_data_array * cur) const {
    llama_sampler_apply(s_, cur);
}

bool reply_grammar::allows(int32_t token) const {
    llama_token_data one = { token, 0.0f, 0.0f };
    llama_token_data_array single = { &one, 1, -1, false };
    llama_sampler_apply(s_, &single);
    return !std::isinf(one.logit);
}

void reply_grammar::accept(int32_t token) {
    llama_sampler_accept(s_, token);
}

} // namespace fml
