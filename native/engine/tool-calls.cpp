#include "engine/tool-calls.h"

#include "engine/grammar.h"
#include "model/model.h"
#include "util/error.h"

#include "chat.h"
#include "json.h"

#include <algorithm>
#include <exception>
#include <functional>
#include <pthread.h>
#include <stdexcept>
#include <list>
#include <map>
#include <optional>
#include <random>
#include <regex>
#include <set>

namespace fml {

namespace {

[[noreturn]] void invalid(const std::string & why) { throw fml_error(FML_ERR_INVALID_OPTION, why); }
[[noreturn]] void template_failed(const std::string & why) { throw fml_error(FML_ERR_TEMPLATE, why); }
// What the model's template cannot do with tools at all (no template, none for tools, tools in the
// user's turn): the model does not take them.
[[noreturn]] void unsupported(const std::string & why) { throw fml_error(FML_ERR_UNSUPPORTED_MODEL, why); }

// Contents the template renders around; control characters no message text has.
const std::string SENTINEL_USER = "\x1e" "FML_TOOLS_U" "\x1e";
const std::string SENTINEL_SYSTEM = "\x1e" "FML_TOOLS_S" "\x1e";
std::string result_sentinel(size_t i) { return "\x1e" "FML_RESULT_" + std::to_string(i) + "\x1e"; }

bool valid_name(const std::string & s) {
    // OpenAI's rule for function names; it also keeps a name out of the template's markup.
    return !s.empty() && s.size() <= 64 &&
           std::all_of(s.begin(), s.end(), [](char c) { return std::isalnum((unsigned char) c) || c == '_' || c == '-'; });
}

std::vector<common_chat_tool> parse_tools(const std::string & text) {
    if (text.size() > MAX_TOOLS_BYTES) {
        invalid("tools is " + std::to_string(text.size()) + " bytes of JSON; at most " + std::to_string(MAX_TOOLS_BYTES) + " are taken");
    }
    common_json list;
    try {
        list = common_json::parse(text);
    } catch (const std::exception & e) {
        invalid(std::string("tools is not JSON: ") + e.what());
    }
    if (!list.is_array() || list.size() == 0 || list.size() > MAX_TOOLS) {
        invalid("tools must be an array of 1 to " + std::to_string(MAX_TOOLS) + " tools");
    }
    std::vector<common_chat_tool> out;
    for (size_t i = 0; i < list.size(); ++i) {
        const std::string at = "tools[" + std::to_string(i) + "]";
        const common_json & tool = list.at(i);
        if (!tool.is_object() || !tool.contains("type") || !tool.at("type").is_string() || tool.at("type").get<std::string>() != "function" ||
            !tool.contains("function") || !tool.at("function").is_object()) {
            invalid(at + " must be { type: 'function', function: { name, description?, parameters? } }");
        }
        const common_json & fn = tool.at("function");
        if (!fn.contains("name") || !fn.at("name").is_string() || !valid_name(fn.at("name").get<std::string>())) {
            invalid(at + ".function.name must be 1 to 64 letters, digits, '_' or '-'");
        }
        common_chat_tool t;
        t.name = fn.at("name").get<std::string>();
        for (const auto & seen : out) {
            if (seen.name == t.name) invalid(at + ".function.name '" + t.name + "' names an earlier tool too");
        }
        if (fn.contains("description") && !fn.at("description").is_null()) {
            if (!fn.at("description").is_string()) invalid(at + ".function.description must be a string");
            t.description = fn.at("description").get<std::string>();
        }
        t.parameters = "{\"type\":\"object\",\"properties\":{}}";
        if (fn.contains("parameters") && !fn.at("parameters").is_null()) {
            if (!fn.at("parameters").is_object()) invalid(at + ".function.parameters must be a JSON schema (an object)");
            t.parameters = fn.at("parameters").dump();
            // A call's arguments are held to this schema: the converter's limits are checked now,
            // not at the turn that would force a call.
            try {
                (void) gbnf_of_json_schema(t.parameters);
            } catch (const fml_error & e) {
                invalid(at + ".function.parameters: " + e.what());
            }
        }
        out.push_back(std::move(t));
    }
    return out;
}

bool is_json(const std::string & text) {
    try {
        (void) common_json::parse(text);
        return true;
    } catch (const std::exception &) {
        return false;
    }
}

common_chat_msg message(const std::string & role, const std::string & content) {
    common_chat_msg m;
    m.role = role;
    m.content = content;
    return m;
}

// The line of GBNF rule `name`: [begin, end) in `grammar` (npos when it has none).
std::pair<size_t, size_t> rule_line(const std::string & grammar, const std::string & name) {
    const std::string head = name + " ::= ";
    const size_t at = grammar.compare(0, head.size(), head) == 0 ? 0 : grammar.find("\n" + head);
    if (at == std::string::npos) {
        return { std::string::npos, std::string::npos };
    }
    const size_t begin = at == 0 ? 0 : at + 1;
    return { begin, std::min(grammar.find('\n', begin), grammar.size()) };
}

std::string rewrite_rule(const std::string & grammar, const std::string & name, const std::regex & what, const std::string & with) {
    const auto [begin, end] = rule_line(grammar, name);
    if (begin == std::string::npos) {
        return grammar;
    }
    return grammar.substr(0, begin) + std::regex_replace(grammar.substr(begin, end - begin), what, with) + grammar.substr(end);
}

// llama.cpp's grammar for a required call (this version's: test/model/tool-calls.test.ts checks these
// rewrites) lets words come first, up to the call's marker (root ::= "<prompt>" space until-N?
// tool-calls, or until-N where the call's tags are the model's own): held here, the answer starts
// with the call, since a weak model's words could run to maxNewTokens and call nothing, which
// 'required' rules out.
std::string hold_required_call(const std::string & grammar) {
    static const std::regex words(R"( until-[0-9]+\??(?= ))");
    return rewrite_rule(grammar, "root", words, "");
}

// gpt-oss with thinking false: the chat prefills an empty analysis message (reasoning_markers::
// skip_to_channel), and a required call follows it at once, where llama.cpp's grammar takes any
// number of analysis and preamble messages first.
std::string hold_call_after_skip(const std::string & grammar) {
    static const std::regex messages(R"(\(start any\)\*)");
    return rewrite_rule(grammar, "root", messages, "(start any)?");
}

// A harmony call's content type (" <|constrain|>json") is any run of letters in llama.cpp's grammar:
// a weak model's could run to maxNewTokens and never reach the arguments. Held to 16 characters.
std::string hold_constraint_type(std::string grammar) {
    const std::string loose = "\"<|constrain|>\"? [A-Za-z0-9_-]+";
    const std::string held = "\"<|constrain|>\"? [A-Za-z0-9_-]{1,16}";
    for (size_t at = grammar.find(loose); at != std::string::npos; at = grammar.find(loose, at + held.size())) {
        grammar.replace(at, loose.size(), held);
    }
    return grammar;
}

// Where each call has its own markers, llama.cpp's grammar takes one or more of them even when
// parallel calls are off (a required call's tool-calls ::= (tool-call space)+, 'auto''s
// (tool-call? space)+, Hermes-style formats): held here to one, as OpenAI's parallel_tool_calls false.
std::string hold_one_call(const std::string & grammar) {
    static const std::regex several(R"(\(tool-call\?? space\)\+)");
    return rewrite_rule(grammar, "tool-calls", several, "tool-call space");
}

// The format's preserved markers that are single control tokens of this vocabulary (a marker that
// is a plain token reads the same either way; a think marker is the splitter's, by its id). Harmony's
// message markers are the answer's markup with tools (a call is a message of its own): preserved.
void mark_preserved(const fml_model & model, const std::vector<std::string> & markers, tool_turn & t) {
    const reasoning_markers & rm = model.reasoning();
    const std::set<int32_t> reasoning = { rm.think_open, rm.think_close };
    for (const std::string & m : markers) {
        std::vector<int32_t> ids;
        try {
            ids = model.tokenize(m, false, true);
        } catch (const fml_error &) {
            continue;
        }
        if (ids.size() == 1 && reasoning.count(ids[0]) == 0 && model.token_piece(ids[0], true) == m && model.token_piece(ids[0], false) != m) {
            t.preserved.push_back(ids[0]);
        }
    }
    std::sort(t.preserved.begin(), t.preserved.end());
    t.preserved.erase(std::unique(t.preserved.begin(), t.preserved.end()), t.preserved.end());
    std::set_difference(model.non_text_tokens().begin(), model.non_text_tokens().end(), t.preserved.begin(), t.preserved.end(), std::back_inserter(t.non_text));
}

// What wakes 'auto''s lazy grammar, as llama.cpp's common sampler reads the format's triggers: a
// word (or, where it is one token of the vocabulary, that token: as llama-server reads it), a
// pattern, a full pattern anchored at both ends.
grammar_triggers triggers_of(const fml_model & model, const std::vector<common_grammar_trigger> & in) {
    grammar_triggers out;
    for (const common_grammar_trigger & g : in) {
        switch (g.type) {
            case COMMON_GRAMMAR_TRIGGER_TYPE_WORD: {
                std::vector<int32_t> ids;
                try {
                    ids = model.tokenize(g.value, false, true);
                } catch (const fml_error &) {
                }
                if (ids.size() == 1 && model.token_piece(ids[0], true) == g.value) {
                    out.tokens.push_back(ids[0]);
                } else {
                    out.words.push_back(g.value);
                }
                break;
            }
            case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:
                out.patterns.push_back(g.value);
                break;
            case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: {
                const std::string & p = g.value;
                out.patterns.push_back(p.empty() ? "^$" : (p.front() != '^' ? "^" : "") + p + (p.back() != '$' ? "$" : ""));
                break;
            }
            case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:
                if (g.token >= 0 && g.token < model.info().n_vocab) out.tokens.push_back(g.token);
                break;
        }
    }
    return out;
}

// Where the format has the model write a call's id (Mistral Nemo's "id"), llama.cpp's grammar takes
// any string or number, and Mistral's templates refuse to render results for an id of other than 9
// letters and digits: a weak model's id would leave the chat unable to take that call's results.
// Held here to what tool_call_id() makes.
std::string hold_call_ids(std::string grammar) {
    const std::string head = "(\"\\\"id\\\"\" space \":\" space (";
    const std::string tail = " | json-number))";
    for (size_t at = grammar.find(head); at != std::string::npos; at = grammar.find(head, at + 1)) {
        const size_t from = at + head.size();
        const size_t to = grammar.find(tail, from);
        const size_t line_end = grammar.find('\n', from);
        if (to == std::string::npos || to > line_end) {
            continue;
        }
        grammar.replace(from, to + tail.size() - from, "\"\\\"\" [a-zA-Z0-9]{9} \"\\\"\"))");
    }
    return grammar;
}

} // namespace

std::string tool_call_id() {
    static const char ALNUM[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    thread_local std::mt19937_64 rng{ std::random_device{}() };
    std::string id;
    for (int i = 0; i < 9; ++i) id += ALNUM[rng() % (sizeof(ALNUM) - 1)];
    return id;
}

struct tool_set::impl {
    const fml_model * model = nullptr;        // valid while a chat of it uses this (chats hold their model)
    std::weak_ptr<const fml_model> owner;     // whether a cached set-up is still of a live model
    common_chat_templates_ptr templates;
    std::vector<common_chat_tool> tools;
    std::string system_prompt;   // the chat's: every rendering starts as the chat did
    std::map<std::string, std::shared_ptr<const tool_turn>> turns;   // by choice, parallel, thinking: set up once
    std::string reply_before;                 // reply_text's rendering before the reply (every tool), kept
    std::string user_prefix;                  // system_frames' argument and result, kept
    std::vector<std::string> system_frames;
    // How later messages are framed (a reply's calls, a turn of results): rendered with the tools their
    // calls name alone, by the template alone (llama.cpp's force_pure_content: no analysis of the
    // template's format, which renders it dozens of times), where a probe exchange frames the same
    // that way as with every tool through the full apply; checked once (fast_frames_checked). A turn of
    // results framed with every tool took 8.5 ms with one tool and 48 ms with 128, 2-3 ms the fast way
    // (bench/tools.ts), of the worker that prepares the turn.
    bool fast_frames = false;
    bool fast_frames_checked = false;
    std::optional<std::vector<int32_t>> call_closing;   // tool_set::call_closing(), found once
    std::mutex mu;                            // the chats that share it may be on several threads (Workers)

    // `only`: the tools rendered (null: all); `pure`: the template alone.
    common_chat_templates_inputs inputs(std::vector<common_chat_msg> messages, bool add_generation_prompt, const std::vector<common_chat_tool> * only = nullptr,
                                        bool pure = false) const {
        common_chat_templates_inputs in;
        in.messages = std::move(messages);
        in.tools = only != nullptr ? *only : tools;
        in.add_generation_prompt = add_generation_prompt;
        in.use_jinja = true;
        in.force_pure_content = pure;
        // A prompt alone: 'none' renders the tools the same and builds no grammar or parser for them
        // (with 128 tools, a tenth of a second a rendering). turn() sets the choice it sets up.
        in.tool_choice = COMMON_CHAT_TOOL_CHOICE_NONE;
        // Llama 3.x's templates put the tools in the first user message unless told otherwise: with
        // the system prompt, where a chat keeps them (pinned) and every turn after frames alone.
        in.chat_template_kwargs["tools_in_user_message"] = "false";
        return in;
    }
    std::vector<common_chat_msg> opening(const std::string & user) const {
        std::vector<common_chat_msg> out;
        if (!system_prompt.empty()) out.push_back(message("system", system_prompt));
        out.push_back(message("user", user));
        return out;
    }
    // The tools named (by calls or results), or the first where none is: a template renders a call
    // of a tool it is given, and renders tool sections only where there are tools.
    std::vector<common_chat_tool> named(const std::vector<std::string> & names) const {
        std::vector<common_chat_tool> out;
        for (const auto & t : tools) {
            if (std::find(names.begin(), names.end(), t.name) != names.end()) out.push_back(t);
        }
        if (out.empty() && !tools.empty()) out.push_back(tools.front());
        return out;
    }
    std::string render(const common_chat_templates_inputs & in) const {
        try {
            return common_chat_templates_apply(templates.get(), in).prompt;
        } catch (const std::exception & e) {
            // The template's own raise_exception refuses what it was given (Mistral's: call ids of
            // other than 9 characters): the caller's input, not a failure.
            const std::string why = e.what();
            if (why.find("Jinja Exception: ") != std::string::npos) {
                invalid("the model's chat template refuses these messages: " + why.substr(why.find("Jinja Exception: ") + 17));
            }
            template_failed("the chat template could not render tools: " + why);
        }
    }
};

struct tool_turn::impl {
    common_chat_parser_params params;
    std::string before_reasoning;   // the generation prompt up to the think block's opening
    std::string think_open, think_close;
};

namespace {

// Set-ups by model, system prompt and tools: those a chat uses, and the most recent ones held (a
// stateless server's requests make a chat each, one after the other, and the set-up of the same
// tools costs milliseconds of the event loop in createChat: 0.49 s for 128 tools the first time: bench/tools.ts).
constexpr size_t RECENT_SETUPS = 16;
std::mutex g_setups_mu;
std::map<std::string, std::weak_ptr<tool_set::impl>> g_setups;
std::list<std::shared_ptr<tool_set::impl>> g_recent;

std::string setup_key(const fml_model & model, const std::string & tools_json, const std::string & system_prompt) {
    return model.info().fingerprint + ":" + std::to_string(system_prompt.size()) + ":" + system_prompt + tools_json;
}

} // namespace

std::shared_ptr<tool_set::impl> tool_set::acquire(const std::shared_ptr<const fml_model> & model, const std::string & tools_json, const std::string & system_prompt) {
    const std::string key = setup_key(*model, tools_json, system_prompt);
    auto remember = [&](const std::shared_ptr<impl> & p) {
        g_recent.remove(p);
        g_recent.push_front(p);
        if (g_recent.size() > RECENT_SETUPS) g_recent.pop_back();
    };
    {
        std::lock_guard<std::mutex> lock(g_setups_mu);
        if (auto it = g_setups.find(key); it != g_setups.end()) {
            std::shared_ptr<impl> p = it->second.lock();
            // Of this very model: another one of the same file holds its own.
            if (p && p->owner.lock() == model) {
                remember(p);
                return p;
            }
        }
    }
    auto p = std::make_shared<impl>();
    p->model = model.get();
    p->owner = model;
    p->system_prompt = system_prompt;
    try {
        p->templates = common_chat_templates_init(model->raw(), "");
    } catch (const std::exception & e) {
        template_failed(std::string("the model's chat template could not be read for tools: ") + e.what());
    }
    if (!p->templates || !common_chat_templates_was_explicit(p->templates.get())) {
        unsupported("tools need the model's own chat template (tokenizer.chat_template), and this model has none");
    }
    p->tools = parse_tools(tools_json);
    // The tools are rendered into the prompt's markup and tokenized with it: the text of a control
    // token in them would be that token (a forged end of turn), so it is refused.
    check_plain(*model, tools_json, "tools");
    std::lock_guard<std::mutex> lock(g_setups_mu);
    for (auto it = g_setups.begin(); it != g_setups.end();) {
        it = it->second.expired() ? g_setups.erase(it) : std::next(it);
    }
    g_setups[key] = p;
    remember(p);
    return p;
}

tool_set::tool_set(const std::shared_ptr<const fml_model> & model, const std::string & tools_json, const std::string & system_prompt)
    : p_(acquire(model, tools_json, system_prompt)) {}

void tool_set::prepare(const std::shared_ptr<const fml_model> & model, const std::string & tools_json, const std::string & system_prompt,
                       const std::string & choice, bool parallel, bool thinking) {
    tool_set set(model, tools_json, system_prompt);
    std::string user_prefix;
    try {
        user_prefix = model->frame_message(frame_kind::user).prefix;
    } catch (const fml_error &) {
        return;   // a template that cannot frame a user message: the chat says why
    }
    (void) set.system_frames(user_prefix);
    (void) set.turn("auto", true, true);   // what a new chat sets up
    (void) set.turn(choice.empty() ? "auto" : choice, parallel, thinking);
    std::lock_guard<std::mutex> lock(set.p_->mu);
    set.check_fast_frames();   // else the first turn of results checks it
}

tool_set::~tool_set() = default;

std::vector<std::string> tool_set::system_frames(const std::string & user_prefix) const {
    std::lock_guard<std::mutex> lock(p_->mu);
    if (!p_->system_frames.empty() && p_->user_prefix == user_prefix) {
        return p_->system_frames;
    }
    // Rendered with a sentinel for the system prompt, which the chat tokenizes as plain text.
    const bool has_system = !p_->system_prompt.empty();
    std::vector<common_chat_msg> messages;
    if (has_system) messages.push_back(message("system", SENTINEL_SYSTEM));
    messages.push_back(message("user", SENTINEL_USER));
    const std::string with = p_->render(p_->inputs(messages, true));
    common_chat_templates_inputs plain = p_->inputs(messages, true);
    plain.tools.clear();
    if (p_->render(plain) == with) {
        unsupported("the model's chat template does not render tools");
    }
    // Once each, or what the tools hold ("\x1e...") was taken for them.
    auto once = [](const std::string & text, const std::string & what) { const size_t a = text.find(what); return a != std::string::npos && text.find(what, a + 1) == std::string::npos; };
    if (!once(with, SENTINEL_USER) || (has_system && !once(with, SENTINEL_SYSTEM))) {
        invalid("tools hold the framing's own markers (\\x1e...)");
    }
    const size_t at = with.find(SENTINEL_USER);
    // The chat's own user frame may end in a space the template's has not (llama.cpp's built-in
    // Mistral v7 framing writes "[INST] ", Mistral Small 3.2's template "[INST]"): the tools end where
    // either starts.
    auto frame_starts = [&](const std::string & prefix) {
        return at != std::string::npos && at >= prefix.size() && with.compare(at - prefix.size(), prefix.size(), prefix) == 0;
    };
    const std::string trimmed = user_prefix.substr(0, user_prefix.find_last_not_of(" \t\n") + 1);
    const size_t prefix_size = frame_starts(user_prefix) ? user_prefix.size() : frame_starts(trimmed) ? trimmed.size() : std::string::npos;
    if (prefix_size == std::string::npos) {
        unsupported("the model's chat template puts the tools with the user's message, where a chat cannot keep them pinned");
    }
    std::string before = with.substr(0, at - prefix_size);
    // The BOS token is the chat's own first token, not text.
    const int32_t bos = p_->model->bos();
    if (bos >= 0) {
        const std::string bos_text = p_->model->token_piece(bos, true);
        if (!bos_text.empty() && before.compare(0, bos_text.size(), bos_text) == 0) {
            before.erase(0, bos_text.size());
        }
    }
    std::vector<std::string> frames = { before };
    if (has_system) {
        const size_t s = before.find(SENTINEL_SYSTEM);
        if (s == std::string::npos) {
            template_failed("the model's chat template does not render the system prompt before the tools' user turn");
        }
        frames = { before.substr(0, s), before.substr(s + SENTINEL_SYSTEM.size()) };
    }
    p_->user_prefix = user_prefix;
    p_->system_frames = frames;
    return frames;
}

void tool_set::check_plain(const std::string & text, const std::string & what) const {
    check_plain(*p_->model, text, what);
}

void tool_set::check_plain(const fml_model & model, const std::string & text, const std::string & what) {
    const std::string piece = model.control_text_in(text);
    if (!piece.empty()) {
        invalid(what + " holds the text of the model's control token " + piece + ", which would be that token in the prompt");
    }
}

std::string tool_set::reply_text(const std::string & content, const std::vector<tool_call> & calls, const std::string & closing, bool full) const {
    std::lock_guard<std::mutex> lock(p_->mu);
    check_fast_frames();
    return frame_reply(content, calls, closing, p_->fast_frames && !full);
}

result_framing tool_set::result_frames(const std::vector<tool_call> & calls, const std::vector<tool_result> & results, const std::string & closing, bool full) const {
    std::lock_guard<std::mutex> lock(p_->mu);
    check_fast_frames();
    return frame_results(calls, results, closing, p_->fast_frames && !full);
}

void tool_set::check_fast_frames() const {
    if (p_->fast_frames_checked) {
        return;
    }
    p_->fast_frames_checked = true;
    // Probe exchanges, each framed both ways: a reply with a call of the first tool and one of the
    // last, their results in the other order (a template may sort them); and one call alone.
    std::string closing;
    try {
        closing = p_->model->frame_message(frame_kind::assistant).suffix;
    } catch (const fml_error &) {
    }
    // Each way framed apart: where one way throws and the other does not, they differ (DeepSeek V4's
    // full apply sorts results into call order, its template alone does not); where both throw (Llama
    // 3.x's refuse two calls), that probe says nothing, and the one-call probe decides.
    enum class outcome { alike, differ, refused };
    auto compare = [&](const std::vector<tool_call> & calls) {
        std::vector<tool_result> results;
        for (auto c = calls.rbegin(); c != calls.rend(); ++c) results.push_back({ c->id, c->name, "probe result of " + c->id });
        auto framed = [&](bool fast) -> std::optional<std::pair<std::string, result_framing>> {
            try {
                return std::make_pair(frame_reply("Probe.", calls, closing, fast), frame_results(calls, results, closing, fast));
            } catch (const std::exception &) {
                return std::nullopt;
            }
        };
        const auto full = framed(false);
        const auto fast = framed(true);
        if (!full && !fast) return outcome::refused;
        if (!full || !fast) return outcome::differ;
        return full->first == fast->first && full->second.markup == fast->second.markup && full->second.contents == fast->second.contents ? outcome::alike
                                                                                                                                             : outcome::differ;
    };
    const tool_call first = { "call00001", p_->tools.front().name, "{}" };
    const tool_call last = { "call00002", p_->tools.back().name, "{}" };
    // One call too where there are several tools (the fast way renders that tool alone).
    const outcome two = compare({ first, last });
    const outcome one = compare({ first });
    p_->fast_frames = (two == outcome::alike || two == outcome::refused) && one == outcome::alike;
}

std::vector<int32_t> tool_set::call_closing() const {
    std::lock_guard<std::mutex> lock(p_->mu);
    return call_closing_locked();
}

const std::vector<int32_t> & tool_set::call_closing_locked() const {
    if (!p_->call_closing) {
        p_->call_closing = find_call_closing();
    }
    return *p_->call_closing;
}

std::vector<int32_t> tool_set::find_call_closing() const {
    // A reply with a call as the template renders it: its last token, where that ends generation and
    // is not the end of any assistant turn.
    check_fast_frames();
    std::string closing;
    std::string text;
    try {
        closing = p_->model->frame_message(frame_kind::assistant).suffix;
        text = frame_reply("", { { "call00001", p_->tools.front().name, "{}" } }, closing, p_->fast_frames);
    } catch (const std::exception &) {
        return {};
    }
    if (text.empty() || (!closing.empty() && text.size() >= closing.size() && text.compare(text.size() - closing.size(), closing.size(), closing) == 0)) {
        return {};
    }
    const std::vector<int32_t> tokens = p_->model->tokenize(text, false, true);
    const std::vector<int32_t> usual = p_->model->tokenize(closing, false, true);
    // Never longer than the usual end (the carry's room is counted with it).
    if (tokens.empty() || usual.empty() || !p_->model->is_eog(tokens.back()) || usual.back() == tokens.back()) {
        return {};
    }
    return { tokens.back() };
}

bool tool_set::frames_fast() const {
    std::lock_guard<std::mutex> lock(p_->mu);
    check_fast_frames();
    return p_->fast_frames;
}

std::string tool_set::frame_reply(const std::string & content, const std::vector<tool_call> & calls, const std::string & closing, bool fast) const {
    std::vector<std::string> names;
    for (const auto & c : calls) names.push_back(c.name);
    const std::vector<common_chat_tool> only = p_->named(names);
    if (!fast && p_->reply_before.empty()) {
        p_->reply_before = p_->render(p_->inputs(p_->opening("u"), true));
    }
    const std::string before = fast ? p_->render(p_->inputs(p_->opening("u"), true, &only, true)) : p_->reply_before;
    std::vector<common_chat_msg> all = p_->opening("u");
    common_chat_msg reply = message("assistant", content);
    for (const auto & c : calls) {
        // The template parses them and recurses once per level (a SIGSEGV at 30,000).
        if (json_nesting(c.arguments) > MAX_JSON_SCHEMA_NESTING) {
            invalid("the arguments of tool call '" + c.name + "' nest more than " + std::to_string(MAX_JSON_SCHEMA_NESTING) + " deep");
        }
        if (!is_json(c.arguments)) invalid("the arguments of tool call '" + c.name + "' are not JSON");
        reply.tool_calls.push_back({ c.name, c.arguments, c.id });
    }
    all.push_back(reply);
    const std::string after = p_->render(p_->inputs(all, false, fast ? &only : nullptr, fast));
    // From where the two part: a generation prompt the finished reply does not have (an opening
    // <think>) is not the reply's.
    const size_t common = (size_t) (std::mismatch(before.begin(), before.begin() + (long) std::min(before.size(), after.size()), after.begin()).first - before.begin());
    std::string text = after.substr(common);
    if (!closing.empty() && text.size() >= closing.size() && text.compare(text.size() - closing.size(), closing.size(), closing) == 0) {
        text.resize(text.size() - closing.size());
    }
    return text;
}

result_framing tool_set::frame_results(const std::vector<tool_call> & calls, const std::vector<tool_result> & results, const std::string & closing, bool fast) const {
    std::vector<std::string> names;
    for (const auto & c : calls) names.push_back(c.name);
    for (const auto & r : results) names.push_back(r.name);
    const std::vector<common_chat_tool> only = p_->named(names);
    const std::vector<common_chat_tool> * tools = fast ? &only : nullptr;
    std::vector<common_chat_msg> past = p_->opening("u");
    common_chat_msg reply = message("assistant", "");
    for (const auto & c : calls) {
        // The reply is in memory already, as the model wrote it: this rendering only tells where the
        // results go, and a call cut short (maxNewTokens) renders as one with no arguments.
        const bool whole = json_nesting(c.arguments) <= MAX_JSON_SCHEMA_NESTING && is_json(c.arguments);
        reply.tool_calls.push_back({ c.name, whole ? c.arguments : "{}", c.id });
    }
    past.push_back(reply);
    const std::string before = p_->render(p_->inputs(past, false, tools, fast));
    auto rendered = [&](const std::function<std::string(size_t)> & content) {
        std::vector<common_chat_msg> all = past;
        for (size_t i = 0; i < results.size(); ++i) {
            common_chat_msg m = message("tool", content(i));
            m.tool_name = results[i].name;
            m.tool_call_id = results[i].call_id;
            all.push_back(m);
        }
        const std::string after = p_->render(p_->inputs(all, true, tools, fast));
        if (after.compare(0, before.size(), before) == 0) {
            return after.substr(before.size());
        }
        // The template renders the reply otherwise once results follow it (Qwen3's keeps the think
        // block of a reply in a tool loop): that reply is in memory as written, and the results start
        // after its end of turn.
        const size_t first = after.find(content(0));
        const size_t end = first == std::string::npos || closing.empty() ? std::string::npos : after.rfind(closing, first);
        if (end == std::string::npos) {
            template_failed("the model's chat template renders a reply's tool calls differently once their results follow");
        }
        return after.substr(end + closing.size());
    };
    std::string rest = rendered(result_sentinel);
    result_framing out;
    bool encoded = false;
    for (size_t i = 0; i < results.size(); ++i) {
        // As given, or as JSON (Llama 3.1's template writes a string result with tojson).
        std::string s = result_sentinel(i);
        if (rest.find(s) == std::string::npos) {
            s = "\"\\u001eFML_RESULT_" + std::to_string(i) + "\\u001e\"";
            encoded = true;
        }
        const size_t at = rest.find(s);
        if (at == std::string::npos || rest.find(s, at + 1) != std::string::npos) {
            template_failed("the model's chat template drops or repeats tool results");
        }
        out.markup.push_back(rest.substr(0, at));
        rest.erase(0, at + s.size());
    }
    out.markup.push_back(rest);
    for (const auto & r : results) out.contents.push_back(r.content);
    if (encoded) {
        // The contents as the template writes them: read from a rendering with them, between the
        // markup found around the sentinels.
        const std::string real = rendered([&](size_t i) { return results[i].content; });
        size_t pos = 0;
        for (size_t i = 0; i < results.size(); ++i) {
            const std::string & next = out.markup[i + 1];
            const bool last = i + 1 == results.size();
            const size_t end = last ? real.size() - std::min(real.size(), next.size()) : real.find(next, pos + out.markup[i].size());
            if (real.compare(pos, out.markup[i].size(), out.markup[i]) != 0 || end == std::string::npos || end < pos + out.markup[i].size() ||
                (last && real.compare(end, next.size(), next) != 0)) {
                template_failed("the model's chat template writes tool results in a way this chat cannot frame");
            }
            pos += out.markup[i].size();
            out.contents[i] = real.substr(pos, end - pos);
            pos = end;
        }
        // Each piece read must be its result (as given, or as a JSON string of it): a result holding
        // the markup that follows it would have been cut there, its rest read as markup (and
        // tokenized as the template's special tokens).
        for (size_t i = 0; i < results.size(); ++i) {
            bool same = out.contents[i] == results[i].content;
            if (!same) {
                try {
                    const common_json v = common_json::parse(out.contents[i]);
                    same = v.is_string() && v.get<std::string>() == results[i].content;
                } catch (const std::exception &) {
                }
            }
            if (!same) {
                invalid("tool result " + std::to_string(i) + " holds the text of the chat template's own markup");
            }
        }
    }
    return out;
}

std::shared_ptr<const tool_turn> tool_set::turn(const std::string & choice, bool parallel, bool thinking) const {
    std::lock_guard<std::mutex> lock(p_->mu);
    const std::string key = choice + (parallel ? "|p" : "|1") + (thinking ? "|t" : "|n");
    if (auto it = p_->turns.find(key); it != p_->turns.end()) {
        return it->second;
    }
    common_chat_templates_inputs in = p_->inputs(p_->opening("u"), true);
    in.parallel_tool_calls = parallel;
    in.enable_thinking = thinking;
    if (choice == "auto") {
        in.tool_choice = COMMON_CHAT_TOOL_CHOICE_AUTO;
    } else if (choice == "none") {
        in.tool_choice = COMMON_CHAT_TOOL_CHOICE_NONE;
    } else if (choice == "required") {
        in.tool_choice = COMMON_CHAT_TOOL_CHOICE_REQUIRED;
    } else {
        // A named tool: the call is required, and only that tool can be it (the prompt lists them all).
        in.tool_choice = COMMON_CHAT_TOOL_CHOICE_REQUIRED;
        in.tools.erase(std::remove_if(in.tools.begin(), in.tools.end(), [&](const common_chat_tool & t) { return t.name != choice; }), in.tools.end());
        if (in.tools.empty()) invalid("toolChoice '" + choice + "' names no tool of this chat");
    }
    // Set up twice: the parser reads a reply's reasoning too (the chat gives it back in its markers),
    // while the grammar holds the answer alone, which starts after the reasoning.
    common_chat_params parsing, holding;
    try {
        in.reasoning_format = COMMON_REASONING_FORMAT_DEEPSEEK;
        parsing = common_chat_templates_apply(p_->templates.get(), in);
        in.reasoning_format = COMMON_REASONING_FORMAT_NONE;
        holding = common_chat_templates_apply(p_->templates.get(), in);
    } catch (const std::exception & e) {
        template_failed(std::string("the chat template could not set up tool calls: ") + e.what());
    }
    tool_turn t;
    auto impl = std::make_shared<tool_turn::impl>();
    impl->params = common_chat_parser_params(parsing);
    impl->params.reasoning_format = COMMON_REASONING_FORMAT_DEEPSEEK;
    impl->params.parse_tool_calls = in.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE;
    if (!parsing.parser.empty()) {
        impl->params.parser.load(parsing.parser);
    }
    // The parser reads the generation prompt (up to a think block), then the reply as the model wrote
    // it: the chat keeps the reasoning apart, and gives it back inside the model's think markers.
    const reasoning_markers & rm = p_->model->reasoning();
    if (rm.think()) {
        impl->think_open = p_->model->token_piece(rm.think_open, true);
        impl->think_close = p_->model->token_piece(rm.think_close, true);
    }
    // Up to its think block: an opening one, or (DeepSeek V4's, thinking off) a bare closing one.
    auto before_reasoning = [&](const std::string & gp) {
        const size_t open = impl->think_open.empty() ? std::string::npos : gp.find(impl->think_open);
        const size_t close = impl->think_close.empty() ? std::string::npos : gp.find(impl->think_close);
        const size_t at = std::min(open, close);
        return at == std::string::npos ? gp : gp.substr(0, at);
    };
    impl->before_reasoning = before_reasoning(parsing.generation_prompt);
    impl->params.generation_prompt.clear();
    t.p = impl;
    // A required call holds the answer from its first token (its grammar starts with the generation
    // prompt, which it reads first, as llama.cpp's sampler prefills it). With 'auto' (as llama-server)
    // the model may answer in words, and a call's arguments are held to its tool's schema from its
    // first marker on (a lazy grammar, which starts at the trigger: nothing prefilled).
    std::vector<std::string> markers = holding.preserved_tokens;
    const llama_vocab * vocab = p_->model->vocab();
    // A grammar llama.cpp will not compile (a schema's bound past its repetition limit, say) names the tool.
    auto compiled = [&](const std::string & gbnf, const grammar_triggers * lazy) {
        try {
            return reply_grammar::compile_tool_calls(vocab, gbnf, lazy, p_->model->first_bytes());
        } catch (const fml_error &) {
            for (size_t i = 0; i < p_->tools.size(); ++i) {
                reply_grammar::check_compiles(vocab, gbnf_of_json_schema(p_->tools[i].parameters), "tools[" + std::to_string(i) + "].function.parameters' grammar");
            }
            throw;
        }
    };
    if (in.tool_choice == COMMON_CHAT_TOOL_CHOICE_REQUIRED && holding.grammar.empty()) {
        // llama.cpp finds no call format in this template (IBM Granite 3.3's): nothing could hold a call.
        unsupported("the model's chat template has no tool-call format llama.cpp can hold, so a call cannot be required of it (toolChoice 'auto' reads none either)");
    }
    if (!holding.grammar_lazy && in.tool_choice == COMMON_CHAT_TOOL_CHOICE_REQUIRED) {
        std::string gbnf = hold_call_ids(hold_required_call(parallel ? holding.grammar : hold_one_call(holding.grammar)));
        if (rm.harmony() && !thinking) gbnf = hold_call_after_skip(gbnf);
        gbnf = hold_constraint_type(gbnf);
        auto g = compiled(gbnf, nullptr);
        try {
            g->accept_text(before_reasoning(holding.generation_prompt));
            // The prefilled skip (chat.cpp: a chat with tools skips a harmony reply's reasoning so).
            if (rm.harmony() && !thinking) g->accept_text(rm.skip_to_channel_text);
        } catch (const std::exception & e) {
            template_failed(std::string("the tool-call grammar does not start with the template's generation prompt: ") + e.what());
        }
        t.grammar = std::move(g);
    }
    if (holding.grammar_lazy && in.tool_choice == COMMON_CHAT_TOOL_CHOICE_AUTO && !holding.grammar.empty() && !holding.grammar_triggers.empty()) {
        const grammar_triggers triggers = triggers_of(*p_->model, holding.grammar_triggers);
        t.grammar = compiled(hold_constraint_type(hold_call_ids(parallel ? holding.grammar : hold_one_call(holding.grammar))), &triggers);
        for (const common_grammar_trigger & g : holding.grammar_triggers) {
            if (g.type == COMMON_GRAMMAR_TRIGGER_TYPE_WORD) markers.push_back(g.value);   // a trigger the answer can write
        }
    }
    mark_preserved(*p_->model, markers, t);
    t.stops = parsing.additional_stops;
    t.call_closing = call_closing_locked();
    auto shared = std::make_shared<const tool_turn>(std::move(t));
    p_->turns.emplace(key, shared);
    return shared;
}

namespace {

// Runs `f` on a thread whose stack holds `bytes` (reserved address space: only what it touches is
// memory), and rethrows what it threw.
template <typename F>
void on_stack_of(size_t bytes, F && f) {
    struct job {
        F * f;
        std::exception_ptr error;
    } j{ &f, nullptr };
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, bytes);
    pthread_t thread;
    const int rc = pthread_create(&thread, &attr, [](void * arg) -> void * {
        auto * jb = static_cast<job *>(arg);
        try {
            (*jb->f)();
        } catch (...) {
            jb->error = std::current_exception();
        }
        return nullptr;
    }, &j);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        throw std::runtime_error("no thread to parse the reply on");
    }
    pthread_join(thread, nullptr);
    if (j.error) {
        std::rethrow_exception(j.error);
    }
}

// llama.cpp's PEG parser recurses about 2 KB of stack per level of the JSON it reads, without a bound
// (5,000 levels, which a model can write, overflowed an 8 MB stack). A reply with few brackets is
// parsed where it is; one with more on a stack sized for them (their count bounds the depth), and one
// that would need more than this is text.
constexpr size_t PARSE_IN_PLACE_BRACKETS = 1024;
constexpr size_t PARSE_STACK_PER_BRACKET = 4096;
constexpr size_t PARSE_STACK_MAX = (size_t) 1 << 30;

} // namespace

tool_reply tool_turn::parse(const std::string & reasoning, const std::string & answer, bool partial) const {
    std::string text = p->before_reasoning;
    if (!p->think_open.empty() && !reasoning.empty()) {
        text += p->think_open + "\n" + reasoning + "\n" + p->think_close + "\n\n";
    }
    // Harmony's answer has every message's markup in its place, an analysis's without its text
    // (chat/reasoning.h): the parser reads it whole.
    text += answer;
    tool_reply out;
    common_chat_msg msg;
    const size_t brackets = (size_t) std::count_if(text.begin(), text.end(), [](char c) { return c == '[' || c == '{'; });
    const size_t stack = brackets * PARSE_STACK_PER_BRACKET + ((size_t) 16 << 20);
    try {
        if (brackets <= PARSE_IN_PLACE_BRACKETS) {
            msg = common_chat_parse(text, partial, p->params);
        } else if (stack <= PARSE_STACK_MAX) {
            on_stack_of(stack, [&] { msg = common_chat_parse(text, partial, p->params); });
        } else {
            throw std::length_error("too many brackets to read as calls");
        }
    } catch (const std::exception &) {
        // What the format cannot read is an answer in words (while it is written: nothing yet).
        out.content = partial ? std::string() : answer;
        return out;
    }
    // The text around the calls as a message's content: without the blank lines between a think
    // block or a call and it (while the reply is written, its end may yet grow).
    out.content = msg.content;
    // A format whose parser reads no reasoning leaves the think block in the content: it is apart.
    const size_t closed = p->think_close.empty() ? std::string::npos : out.content.rfind(p->think_close);
    if (closed != std::string::npos) {
        out.content.erase(0, closed + p->think_close.size());
    }
    out.content.erase(0, std::min(out.content.find_first_not_of(" \t\r\n"), out.content.size()));
    if (!partial) {
        out.content.erase(out.content.find_last_not_of(" \t\r\n") + 1);
    }
    for (const auto & c : msg.tool_calls) {
        out.calls.push_back({ c.id, c.name, c.arguments });
    }
    return out;
}

} // namespace fml
