#include "engine/grammar.h"

#include "util/error.h"

#include "json-schema-to-grammar.h"   // llama.cpp's common/ (fml_json_schema)
#include "llama.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <exception>
#include <regex>
#include <set>
#include <stdexcept>

namespace fml {

namespace {

[[noreturn]] void invalid(const std::string & message) {
    throw fml_error(FML_ERR_INVALID_OPTION, message);
}

// What GBNF text has outside its literals ("..."), classes ([...]) and comments: the deepest nesting
// of groups, and whether it names a token (<[id]>, <token>).
struct gbnf_shape {
    int nesting = 0;
    bool token_rules = false;
};

gbnf_shape shape_of(const std::string & g) {
    gbnf_shape out;
    int depth = 0;
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
            out.nesting = std::max(out.nesting, ++depth);
        } else if (c == ')') {
            --depth;
        } else if (c == '<') {
            out.token_rules = true;
        }
    }
    return out;
}


constexpr size_t MAX_SCHEMA_KEY_BYTES = 256;
constexpr size_t MAX_SCHEMA_PATTERN_BYTES = 1024;
constexpr size_t MAX_OPTIONAL_PROPERTIES = 64;
constexpr size_t MAX_OPTIONAL_PROPERTIES_IN_ALL = 128;
constexpr size_t MAX_TYPE_LIST = 8;

// The target of a local "#/a/0/b" reference as llama.cpp's converter resolves it (no other kind
// resolves there); null when it does not resolve.
const common_json * ref_target(const common_json & root, const std::string & ref) {
    if (ref.rfind("#/", 0) != 0) {
        return nullptr;
    }
    const common_json * at = &root;
    size_t from = 2;
    while (true) {
        const size_t slash = ref.find('/', from);
        const std::string sel = ref.substr(from, slash == std::string::npos ? std::string::npos : slash - from);
        if (at->is_object() && at->contains(sel)) {
            at = &at->at(sel);
        } else if (at->is_array()) {
            // As the converter reads an index: std::stoull ("0x", "+0", " 0" are 0), an unreadable
            // one past the end.
            size_t idx = at->size();
            try {
                idx = (size_t) std::stoull(sel);
            } catch (const std::invalid_argument &) {
            } catch (const std::out_of_range &) {
            }
            if (idx >= at->size()) {
                return nullptr;
            }
            at = &at->at(idx);
        } else {
            return nullptr;
        }
        if (slash == std::string::npos) {
            return at;
        }
        from = slash + 1;
    }
}

// What llama.cpp's converter has no guard against, refused before it runs (it recurses or loops on
// the calling thread): a chain of $refs that comes back to itself with no schema between (allOf
// follows such a chain for ever), object keys over 256 bytes (the rule that excludes known keys
// recurses once per character), a pattern over 1 KiB (its regex reader recurses per group), more
// than 64 optional properties in one object or 128 in all (their rules grow with the cube of the
// count: 2,000 took 17 s; 19 objects of 128, 0.2 s, on the thread that converts; at these caps a
// few ms). Required properties cost little (500: 3 ms). The schema is at most 64 deep here (checked on its text), so this walk recurses little.
class schema_check {
public:
    explicit schema_check(const common_json & root) : root_(root) {}

    void visit(const common_json & node) {
        if (node.is_array()) {
            for (size_t i = 0; i < node.size(); ++i) {
                visit(node.at(i));
            }
            return;
        }
        if (!node.is_object()) {
            return;
        }
        for (const auto & kv : node.items()) {
            if (kv.key().size() > MAX_SCHEMA_KEY_BYTES) {
                invalid("jsonSchema has a key of " + std::to_string(kv.key().size()) + " bytes; at most " + std::to_string(MAX_SCHEMA_KEY_BYTES) + " are taken");
            }
            visit(kv.value());
        }
        if (node.contains("pattern") && node.at("pattern").is_string() && node.at("pattern").get<std::string>().size() > MAX_SCHEMA_PATTERN_BYTES) {
            invalid("jsonSchema has a pattern over " + std::to_string(MAX_SCHEMA_PATTERN_BYTES) + " bytes");
        }
        if (node.contains("properties")) {
            count_optional(optional_of(node, false));
        }
        if (node.contains("allOf") && node.at("allOf").is_array()) {
            // The converter gathers the parts' properties into one object, following their $refs;
            // an anyOf part's are optional (a $ref repeated there counts each time it is gathered).
            size_t optional = 0;
            const common_json & all = node.at("allOf");
            for (size_t i = 0; i < all.size(); ++i) {
                const common_json & part = all.at(i);
                if (part.is_object() && part.contains("anyOf") && part.at("anyOf").is_array()) {
                    const common_json & any = part.at("anyOf");
                    for (size_t k = 0; k < any.size(); ++k) {
                        optional += optional_of(resolved(any.at(k)), true);
                    }
                } else {
                    optional += optional_of(resolved(part), false);
                }
            }
            count_optional(optional);
        }
        if (node.contains("type") && node.at("type").is_array() && node.at("type").size() > MAX_TYPE_LIST) {
            // The converter converts the whole schema once per listed type.
            invalid("jsonSchema lists " + std::to_string(node.at("type").size()) + " types for one value; at most " + std::to_string(MAX_TYPE_LIST) + " are taken");
        }
        if (node.contains("$ref") && node.at("$ref").is_string()) {
            check_ref_chain(node.at("$ref").get<std::string>());
        }
    }

private:
    // The optional properties an object schema brings (all of them: `all_optional`, or those not in
    // its `required`). The converter takes `properties` of any kind: an array's entries are keys "0", "1", ...
    static size_t optional_of(const common_json & node, bool all_optional) {
        if (!node.is_object() || !node.contains("properties")) {
            return 0;
        }
        const common_json & props = node.at("properties");
        if (!props.is_object()) {
            return props.is_array() ? props.size() : 0;
        }
        std::set<std::string> required;
        if (!all_optional && node.contains("required") && node.at("required").is_array()) {
            const common_json & r = node.at("required");
            for (size_t i = 0; i < r.size(); ++i) {
                if (r.at(i).is_string()) {
                    required.insert(r.at(i).get<std::string>());
                }
            }
        }
        size_t optional = 0;
        for (const auto & kv : props.items()) {
            optional += required.count(kv.key()) == 0 ? 1 : 0;
        }
        return optional;
    }

    void count_optional(size_t optional) {
        if (optional > MAX_OPTIONAL_PROPERTIES) {
            invalid("jsonSchema has an object of " + std::to_string(optional) + " optional properties; at most " + std::to_string(MAX_OPTIONAL_PROPERTIES) + " are taken");
        }
        optional_ += optional;
        if (optional_ > MAX_OPTIONAL_PROPERTIES_IN_ALL) {
            invalid("jsonSchema has more than " + std::to_string(MAX_OPTIONAL_PROPERTIES_IN_ALL) + " optional properties in all");
        }
    }

    // A part as allOf gathers it: its $ref chain followed (cycles are refused by then) to the schema.
    const common_json & resolved(const common_json & part) const {
        const common_json * at = &part;
        for (int hops = 0; hops < 10000 && at->is_object() && at->contains("$ref") && at->at("$ref").is_string(); ++hops) {
            const common_json * next = ref_target(root_, at->at("$ref").get<std::string>());
            if (next == nullptr) {
                break;
            }
            at = next;
        }
        return *at;
    }

    // Follows $ref -> a schema that is itself a $ref -> ... until one is not (or does not resolve);
    // each ref is walked once (`settled`), so a document of many refs costs its size.
    void check_ref_chain(std::string ref) {
        std::set<std::string> path;
        while (settled_.count(ref) == 0) {
            if (!path.insert(ref).second) {
                invalid("jsonSchema has a cycle of $refs with no schema between them (" + ref + " comes back to itself)");
            }
            const common_json * target = ref_target(root_, ref);
            if (target == nullptr || !target->is_object() || !target->contains("$ref") || !target->at("$ref").is_string()) {
                break;
            }
            ref = target->at("$ref").get<std::string>();
        }
        settled_.insert(path.begin(), path.end());
    }

    const common_json & root_;
    std::set<std::string> settled_;
    size_t optional_ = 0;
};

} // namespace

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

std::string gbnf_of_json_schema(const std::string & schema) {
    if (schema.size() > MAX_JSON_SCHEMA_BYTES) {
        invalid("jsonSchema is " + std::to_string(schema.size()) + " bytes of JSON; at most " + std::to_string(MAX_JSON_SCHEMA_BYTES) + " are taken");
    }
    if (json_nesting(schema) > MAX_JSON_SCHEMA_NESTING) {
        invalid("jsonSchema nests objects and arrays more than " + std::to_string(MAX_JSON_SCHEMA_NESTING) + " deep");
    }
    try {
        const common_json parsed = common_json::parse(schema);
        if (!parsed.is_object()) {
            invalid("jsonSchema must be a JSON schema (an object)");
        }
        schema_check(parsed).visit(parsed);
        return json_schema_to_grammar(parsed, true);
    } catch (const fml_error &) {
        throw;
    } catch (const std::exception & e) {
        // A parse error, or what the converter does not support ("Unrecognized schema: ...").
        invalid(std::string("jsonSchema could not be converted to a grammar: ") + e.what());
    }
}

// A lazy grammar's triggers, compiled once (shared by its clones: a const std::regex is read by
// many threads safely).
struct reply_grammar::trigger_set {
    std::vector<std::string> words;
    std::vector<std::pair<std::regex, bool>> patterns;   // the regex, and whether it is anchored at both ends
    std::vector<int32_t> tokens;
};

// What a lazy grammar has read before its trigger.
struct reply_grammar::waiting_text {
    std::shared_ptr<const trigger_set> triggers;
    std::string text;
};

reply_grammar::reply_grammar(llama_sampler * s, const llama_vocab * vocab, bool by_bytes, bool lazy) : s_(s), vocab_(vocab), by_bytes_(by_bytes), lazy_(lazy) {}

std::unique_ptr<reply_grammar> reply_grammar::compile(const llama_vocab * vocab, const std::string & gbnf, const std::string & json_schema) {
    bool by_bytes = true;
    llama_sampler * s = compile_text(vocab, json_schema.empty() ? gbnf : gbnf_of_json_schema(json_schema), json_schema.empty() ? "grammar" : "jsonSchema's grammar",
                                     MAX_GRAMMAR_BYTES, by_bytes);
    return std::unique_ptr<reply_grammar>(new reply_grammar(s, vocab, by_bytes, false));
}

std::unique_ptr<reply_grammar> reply_grammar::compile_tool_calls(const llama_vocab * vocab, const std::string & gbnf, const grammar_triggers * lazy,
                                                                 const token_first_bytes & bytes) {
    bool by_bytes = true;
    llama_sampler * s = compile_text(vocab, gbnf, "the tool-call grammar", MAX_TOOL_GRAMMAR_BYTES, by_bytes);
    auto g = std::unique_ptr<reply_grammar>(new reply_grammar(s, vocab, by_bytes, lazy != nullptr));
    g->bytes_ = &bytes;
    if (lazy != nullptr) {
        auto set = std::make_shared<trigger_set>();
        set->words = lazy->words;
        set->tokens = lazy->tokens;
        std::sort(set->tokens.begin(), set->tokens.end());
        for (const std::string & p : lazy->patterns) {
            try {
                set->patterns.emplace_back(std::regex(p), !p.empty() && p.front() == '^' && p.back() == '$');
            } catch (const std::regex_error & e) {
                invalid("the tool-call format's trigger /" + p + "/ is no regex: " + e.what());
            }
        }
        g->waiting_ = std::make_unique<waiting_text>();
        g->waiting_->triggers = std::move(set);
    }
    return g;
}

void reply_grammar::check_compiles(const llama_vocab * vocab, const std::string & gbnf, const std::string & option) {
    bool by_bytes = true;
    llama_sampler_free(compile_text(vocab, gbnf, option, MAX_TOOL_GRAMMAR_BYTES, by_bytes));
}

std::unique_ptr<reply_grammar> reply_grammar::clone() const {
    llama_sampler * s = llama_sampler_clone(s_);
    if (s == nullptr) {
        throw fml_error(FML_ERR_INTERNAL, "llama.cpp could not copy a grammar");
    }
    auto copy = std::unique_ptr<reply_grammar>(new reply_grammar(s, vocab_, by_bytes_, lazy_));
    copy->let_go_ = let_go_;
    copy->bytes_ = bytes_;
    if (waiting_) {
        copy->waiting_ = std::make_unique<waiting_text>(*waiting_);
    }
    return copy;
}

llama_sampler * reply_grammar::compile_text(const llama_vocab * vocab, const std::string & text, const std::string & option, size_t max_bytes, bool & by_bytes) {
    if (text.size() > max_bytes) {
        invalid(option + " is " + std::to_string(text.size()) + " bytes; at most " + std::to_string(max_bytes) + " are taken");
    }
    const gbnf_shape shape = shape_of(text);
    if (shape.nesting > MAX_GRAMMAR_NESTING) {
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
        invalid(option == "grammar" ? "grammar is not valid GBNF with a 'root' rule (llama.cpp's parser printed why to stderr)"
                                    : option + " did not compile (llama.cpp's parser printed why to stderr)");
    }
    by_bytes = !shape.token_rules;
    return s;
}

reply_grammar::~reply_grammar() {
    llama_sampler_free(s_);
}

namespace {

// A grammar's pass in slices (it checks each candidate alone, so slices give the same result), with
// `cancel` checked between them.
void apply_in_slices(llama_sampler * s, llama_token_data * data, size_t n, const std::atomic<bool> * cancel) {
    constexpr size_t SLICE = 8192;
    for (size_t from = 0; from < n; from += SLICE) {
        if (cancel != nullptr && cancel->load()) {
            return;
        }
        llama_token_data_array part = { data + from, std::min(SLICE, n - from), -1, false };
        llama_sampler_apply(s, &part);
    }
}

} // namespace

void reply_grammar::apply(llama_token_data_array * cur, const token_first_bytes * bytes, const std::atomic<bool> * cancel) const {
    if (let_go_ || waiting_) {
        return;
    }
    if (bytes == nullptr || !by_bytes_ || cur->size < 1024) {
        apply_in_slices(s_, cur->data, cur->size, cancel);
        return;
    }
    // Which bytes can come next: one pass over the single-byte tokens. A byte without such a
    // token is kept (nothing is known of it).
    std::vector<llama_token_data> probe;
    for (int32_t t : bytes->single) {
        if (t >= 0) {
            probe.push_back({ t, 0.0f, 0.0f });
        }
    }
    llama_token_data_array pa = { probe.data(), probe.size(), -1, false };
    llama_sampler_apply(s_, &pa);
    // Only an ASCII byte's answer holds for every token it starts: a lone byte of 0x80 or more is
    // checked as a partial character, a looser test than a whole one gets ([^é] refuses 0xC3 alone
    // but allows "ê"), so those bytes are always kept.
    std::array<bool, 256> next{};
    for (size_t b = 0; b < 256; ++b) {
        next[b] = bytes->single[b] < 0 || b >= 0x80;
    }
    for (const llama_token_data & d : probe) {
        if (!std::isinf(d.logit)) {
            next[(uint8_t) bytes->first[(size_t) d.id]] = true;
        }
    }
    // The pass over the rest: the candidates of an allowed first byte, end of generation (allowed
    // once the grammar is complete) and empty pieces (refused by the pass) included; the others
    // are refused here.
    std::vector<size_t> kept;
    std::vector<llama_token_data> sub;
    for (size_t i = 0; i < cur->size; ++i) {
        const int32_t id = cur->data[i].id;
        const int16_t b = id >= 0 && (size_t) id < bytes->first.size() ? bytes->first[(size_t) id] : -1;
        if (b < 0 || next[(size_t) b] || llama_vocab_is_eog(vocab_, id)) {
            kept.push_back(i);
            sub.push_back(cur->data[i]);
        } else {
            cur->data[i].logit = -INFINITY;
        }
    }
    apply_in_slices(s_, sub.data(), sub.size(), cancel);
    for (size_t k = 0; k < kept.size(); ++k) {
        cur->data[kept[k]].logit = sub[k].logit;
    }
}

bool reply_grammar::allows(int32_t token) const {
    if (let_go_ || waiting_) {
        return true;
    }
    llama_token_data one = { token, 0.0f, 0.0f };
    llama_token_data_array single = { &one, 1, -1, false };
    llama_sampler_apply(s_, &single);
    return !std::isinf(one.logit);
}

void reply_grammar::accept(int32_t token) {
    if (let_go_) {
        return;
    }
    if (waiting_) {
        wait_for_trigger(token);
        return;
    }
    if (!lazy_) {
        llama_sampler_accept(s_, token);   // a token the grammar allowed (or a prefill that throws on purpose)
        return;
    }
    take(token);
}

void reply_grammar::take(int32_t token) {
    // Only a lazy grammar's first text can be other than it allows (what followed its trigger in the
    // trigger's token): llama.cpp throws then, its grammar left with no way on.
    try {
        llama_sampler_accept(s_, token);
    } catch (const std::exception &) {
        let_go_ = true;
    }
}

void reply_grammar::wait_for_trigger(int32_t token) {
    const trigger_set & t = *waiting_->triggers;
    if (std::binary_search(t.tokens.begin(), t.tokens.end(), token)) {
        waiting_.reset();
        take(token);
        return;
    }
    std::string & text = waiting_->text;
    const size_t before = text.size();
    char buf[256];
    int32_t n = llama_token_to_piece(vocab_, token, buf, sizeof(buf), 0, true);
    if (n < 0) {
        std::string piece((size_t) -n, '\0');
        n = llama_token_to_piece(vocab_, token, piece.data(), (int32_t) piece.size(), 0, true);
        text.append(piece.data(), n > 0 ? (size_t) n : 0);
    } else {
        text.append(buf, (size_t) n);
    }
    // A word is found where the text changed (only its end is new: searched from there, the whole
    // reply costs its length, not its length squared); a pattern reads all the text, as llama.cpp's.
    size_t start = std::string::npos;
    for (const std::string & w : t.words) {
        const size_t at = text.find(w, before >= w.size() ? before - w.size() + 1 : 0);
        start = std::min(start, at);
    }
    for (const auto & [re, whole] : t.patterns) {
        if (start != std::string::npos) {
            break;
        }
        std::smatch m;
        if (whole ? std::regex_match(text, m, re) : std::regex_search(text, m, re)) {
            start = (size_t) m.position(0);
            for (size_t g = 1; g < m.size(); ++g) {
                if (m.length(g) > 0) {
                    start = (size_t) m.position(g);
                    break;
                }
            }
        }
    }
    if (start == std::string::npos) {
        return;
    }
    // Awake: the grammar reads the text from the trigger on.
    const std::string held = text.substr(start);
    waiting_.reset();
    accept_text(held);
}

void reply_grammar::accept_text(const std::string & text) {
    for (unsigned char b : text) {
        if (let_go_) {
            return;
        }
        if (bytes_->single[b] < 0) {
            if (lazy_) {
                let_go_ = true;
                return;
            }
            throw std::runtime_error("no token of the vocabulary is the byte " + std::to_string(b));
        }
        accept(bytes_->single[b]);
    }
}

} // namespace fml
