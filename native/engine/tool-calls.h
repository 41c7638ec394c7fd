// Tool calling through the model's own chat template, as llama-server does it with --jinja: llama.cpp's
// common/chat.cpp renders the tools where the template puts them, says how a call is written (the
// grammar that forces one) and parses the calls back out of a reply. A chat frames messages one at a
// time, so the template is rendered around sentinels once, and each message takes its frame: the
// tools with the system prompt (pinned), and a turn of tool results after a reply's calls.
#pragma once

#include "engine/grammar.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace fml {

class fml_model;

struct tool_call {
    std::string id;
    std::string name;
    std::string arguments;   // JSON text, as the model wrote it
};

struct tool_result {
    std::string call_id;
    std::string name;
    std::string content;
};

// A turn of tool results as the template writes it: markup (results.size() + 1 pieces, tokenized
// with the template's special tokens) around each result's text (tokenized as plain text: the
// content as given, or as the template encodes it, JSON for Llama 3.1's).
struct result_framing {
    std::vector<std::string> markup;
    std::vector<std::string> contents;
};

// A reply read by the template's format: the answer's text without its calls, and the calls.
struct tool_reply {
    std::string content;
    std::vector<tool_call> calls;
};

// A fresh call id where the format has none: 9 letters and digits, what Mistral's templates require
// of an id (they refuse to render others) and what any other takes.
std::string tool_call_id();

constexpr size_t MAX_TOOLS_BYTES = 256 * 1024;
constexpr size_t MAX_TOOLS = 128;

// One turn's way with the tools: the grammar that holds the answer to calls ('' when it is free) and
// the parser of what the reply says.
class tool_turn {
public:
    // The grammar that holds the answer (null: none), compiled once: a required call's (the
    // generation prompt already read, as llama.cpp's sampler prefills it), or 'auto''s lazy one,
    // which holds the reply from a call's first marker on. Each turn takes a clone.
    std::shared_ptr<const reply_grammar> grammar;
    // The format's markers that are control tokens of the vocabulary ([TOOL_CALLS], LFM2's
    // <|tool_call_start|>): the reply's text has their special text, which its parser reads, and a
    // grammar may hold the answer to them (llama-server's preserved tokens). Sorted.
    std::vector<int32_t> preserved;
    // The tokens a held answer never takes: the model's non-text tokens but the preserved ones. Sorted.
    std::vector<int32_t> non_text;
    std::vector<std::string> stops;   // what the format ends a reply with, beyond end-of-generation tokens
    // What ends a reply with calls where the template writes other than an assistant turn's usual end
    // (gpt-oss's <|call|>, an end-of-generation token): a chat carries it after such a reply. Empty: the usual.
    std::vector<int32_t> call_closing;
    // `reasoning`: the reply's reasoning ('' when none); the parser reads the reply as the model
    // wrote it after the template's generation prompt (harmony's answer has its analysis's markup in
    // place, so its reasoning is not needed). `partial`: the reply is still being written.
    tool_reply parse(const std::string & reasoning, const std::string & answer, bool partial) const;
    struct impl;
    std::shared_ptr<const impl> p;
};

class tool_set {
public:
    // `tools_json`: OpenAI's tool list, [{ "type": "function", "function": { name, description?,
    // parameters? } }]; `system_prompt`: the chat's. Throws fml_error(INVALID_OPTION) for a list that is not one, and
    // fml_error(TEMPLATE) for a model whose template cannot render tools.
    tool_set(const std::shared_ptr<const fml_model> & model, const std::string & tools_json, const std::string & system_prompt);
    // The set-up a chat with these tools will use (its frames, its first turn's, and the turn of
    // `choice`, `parallel`, `thinking`: send's options), made now and kept among the recent ones (and
    // in the set-up of a live chat with the same tools): for a caller that can make it off its event
    // loop. Throws as the constructor, and as turn() for a choice naming no tool.
    static void prepare(const std::shared_ptr<const fml_model> & model, const std::string & tools_json, const std::string & system_prompt,
                        const std::string & choice, bool parallel, bool thinking);
    ~tool_set();
    tool_set(const tool_set &) = delete;
    tool_set & operator=(const tool_set &) = delete;

    // What the template renders before the first user message's opening `user_prefix`, the system
    // prompt and the tools (no BOS token's text): one piece, or two around the system prompt (which the
    // chat tokenizes as plain text). Throws fml_error(TEMPLATE) when the template puts the tools
    // elsewhere (in the last user message: a chat could not keep them pinned).
    std::vector<std::string> system_frames(const std::string & user_prefix) const;
    // A turn of tool results after a reply that made `calls`.
    // `closing`: a reply's end of turn as the chat frames it (where results start when the template
    // renders the reply differently once they follow).
    // `full`: framed with every tool through llama.cpp's full apply, never the fast way (a test hook's).
    result_framing result_frames(const std::vector<tool_call> & calls, const std::vector<tool_result> & results, const std::string & closing,
                                 bool full = false) const;
    // A reply with calls as the template renders it after the generation prompt, without its end of
    // turn `closing` (the chat carries that into the next turn): what an imported conversation prefills.
    std::string reply_text(const std::string & content, const std::vector<tool_call> & calls, const std::string & closing, bool full = false) const;
    // Throws fml_error(INVALID_OPTION) when `text`, rendered into the template's markup, would hold a
    // control token (its text); `what` names it.
    void check_plain(const std::string & text, const std::string & what) const;
    static void check_plain(const fml_model & model, const std::string & text, const std::string & what);
    // `choice`: "auto", "none", "required", or a tool's name (that tool is called).
    std::shared_ptr<const tool_turn> turn(const std::string & choice, bool parallel, bool thinking) const;

    // Whether a reply's calls and a turn of results are framed the fast way (checked once).
    bool frames_fast() const;
    // tool_turn::call_closing: the template's end of a reply with calls where it is not an assistant
    // turn's usual end (found once, by rendering a reply with a call).
    std::vector<int32_t> call_closing() const;

    struct impl;

private:
    // Under the set-up's lock: whether later messages can be framed the fast way (impl::fast_frames),
    // checked once; and the framings, either way.
    void check_fast_frames() const;
    // call_closing(), under the set-up's lock: found once (find_call_closing) and kept.
    const std::vector<int32_t> & call_closing_locked() const;
    std::vector<int32_t> find_call_closing() const;
    std::string frame_reply(const std::string & content, const std::vector<tool_call> & calls, const std::string & closing, bool fast) const;
    result_framing frame_results(const std::vector<tool_call> & calls, const std::vector<tool_result> & results, const std::string & closing, bool fast) const;
    static std::shared_ptr<impl> acquire(const std::shared_ptr<const fml_model> & model, const std::string & tools_json, const std::string & system_prompt);
    // Shared by every chat of the model with the same tools and system prompt (a server's sessions of
    // one agent): the template is read, and each kind of turn set up, once.
    std::shared_ptr<impl> p_;
};

} // namespace fml
