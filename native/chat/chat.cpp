// A chat's life on the JS thread: creation and its checks against the model, the budget and the
// framing of a turn (prepared before it is queued), reset and the views (memory, stats).
#include "chat/chat.h"

#include "chat/turn-state.h"
#include "kv/kv-internals.h"
#include "kv/kv-ops.h"

#include "llama.h"

#include <algorithm>

namespace fml {

const char * stop_reason_name(stop_reason r) {
    switch (r) {
        case STOP_EOS:        return "eos";
        case STOP_MAX_TOKENS: return "maxTokens";
        case STOP_STRING:     return "stop";
        case STOP_ABORT:      return "abort";
    }
    return "eos";
}

const char * importance_signal_name(importance_signal s) {
    switch (s) {
        case IMPORTANCE_ATTENTION: return "attention";
        case IMPORTANCE_KEY_NORM:  return "keyNorm";
        case IMPORTANCE_NONE:      return "";
    }
    return "";
}

// What the summarizer is asked, as a user message after the history.
static const char * SUMMARY_INSTRUCTION = "Summarize the conversation so far in one or two short sentences.";

static std::atomic<size_t> g_live_chats{0};
size_t chat::live_count() { return g_live_chats.load(); }

bool chat::reads_attention_weights(const model_info & mi) {
    const size_t sliding = (size_t) std::count(mi.sliding_layers.begin(), mi.sliding_layers.end(), true);
    return kv_internals_available() && (mi.sliding_window == 0 || (int32_t) sliding < mi.kv_layers);
}

chat::chat(std::shared_ptr<fml_model> model, const chat_options & opts, int32_t model_threads)
    : model_(std::move(model)), opts_(opts) {
    // Option values were validated by resolve_chat_options (options.cpp); what is checked here
    // depends on the model.
    const policy_options & p = opts_.policy;
    if (!model_->info().in_place_eviction) {
        throw fml_error(FML_ERR_UNSUPPORTED_MODEL, "finite memory cannot run on this model: " + model_->info().unsupported_reason);
    }
    if (opts_.threads > model_threads) {
        throw fml_error(FML_ERR_INVALID_OPTION, "Expected an integer between 1 and " + std::to_string(model_threads) +
                        " (the model's thread budget) for threads but received number " + std::to_string(opts_.threads));
    }
    policy_ = make_policy(p);
    grammar_thread_ = model_->info().backend != "cpu" || model_threads < available_cores();
    if (model_->add_bos()) {
        system_tokens_.push_back(model_->bos());
    }
    auto append = [&](const std::vector<int32_t> & toks) { system_tokens_.insert(system_tokens_.end(), toks.begin(), toks.end()); };
    if (!opts_.tools.empty()) {
        // The tools are where the template puts them, with the system prompt (pinned), rendered once;
        // the first user message then takes the usual opening. The prompt is tokenized as plain text.
        tools_ = std::make_unique<tool_set>(model_, opts_.tools, opts_.system_prompt);
        const std::vector<std::string> frames = tools_->system_frames(model_->frame_message(frame_kind::user).prefix);
        // A template whose calls llama.cpp cannot read or hold fails here, not at the first turn (the
        // set-up is kept for it).
        (void) tools_->turn("auto", true, true);
        append(model_->tokenize(frames[0], false, true));
        if (frames.size() > 1) {
            append(model_->tokenize(opts_.system_prompt, false, false));
            append(model_->tokenize(frames[1], false, true));
        }
    } else if (!opts_.system_prompt.empty()) {
        append(model_->frame_tokens(frame_kind::system, opts_.system_prompt));
    }
    check_budget();
    chunk_ = (size_t) std::max(1, std::min<int32_t>(opts_.batch_size, (int32_t) p.max_tokens));

    // Signals the policy needs. Attention weights need the cell -> position map; otherwise
    // importance uses the key-norm proxy.
    const model_info & mi = model_->info();
    int32_t fa = opts_.flash_attention;
    if (policy_->needs_importance()) {
        // Sliding-window layers index their attention by the window cache's cells: the weights are
        // read from the full layers alone, and a model without one uses the key-norm proxy.
        if (reads_attention_weights(mi)) {
            signal_ = IMPORTANCE_ATTENTION;
            key_.attention = true;
            // With flash attention on (forced, or for a q8_0 cache) the weights are recomputed from
            // its inputs (engine/flash-weights.h); left to llama.cpp, it is turned off so the graph's
            // own weights are read.
            if (fa < 0 && opts_.kv_type != "q8_0") {
                fa = 0;
            }
        } else {
            signal_ = IMPORTANCE_KEY_NORM;
            key_.key_norm = true;
        }
    }
    if (opts_.kv_type == "q8_0") {
        if (fa == 0) {
            throw fml_error(FML_ERR_INVALID_OPTION, "kvType q8_0 needs flash attention (the quantized V cache requires it)");
        }
        fa = 1;
    }
    if (fa < 0 && mi.backend == "cpu") {
        // llama.cpp's automatic choice is "on"; on the CPU that measured slower per decode step on the
        // realistic-geometry model and stories260K (bench/flash-attention.ts), so CPU chats run with it
        // off unless asked.
        fa = 0;
    }
    if (policy_->needs_embeddings()) {
        // A middle layer: the last one is pruned to the output rows, and middle layers carry more
        // topical (less next-token-specific) information.
        key_.hidden_layer = std::max(0, std::min(mi.n_layer - 2, mi.n_layer / 2));
        ledger_.set_embedding_dim((size_t) mi.n_embd);
    }
    if (!opts_.test_reply.empty()) {
        test_reply_ = model_->tokenize(opts_.test_reply, false, true);
    }
    uint32_t scratch = 0;
    if (policy_->summarizes()) {
        summary_instruction_ = model_->frame_tokens(frame_kind::user, SUMMARY_INSTRUCTION);
        // The prompt closes a reply left open (its last token and end of turn) before the instruction.
        scratch = (uint32_t) (carry_capacity() + summary_instruction_.size()) + p.summary_tokens + 8;
    }
    // Streams of one engine are equally long: round up so that nearby budgets share an engine.
    key_.cells = (p.max_tokens + scratch + 255) / 256 * 256;
    // Positions: a limit below the budget and its scratch could not hold even a compacted chat; one
    // above the trained context would run the model on positions it never saw.
    if (!opts_.keep_positions && !mi.can_shift) {
        throw fml_error(FML_ERR_INVALID_OPTION, "positions 'compact' needs keys that can move, and architecture " + mi.architecture +
                        " (" + mi.rope + " positions) has keys llama.cpp cannot shift right (M-RoPE, YaRN, layers without positions) "
                        "that this build cannot rotate either: use positions 'keep'");
    }
    const uint32_t trained = std::max<uint32_t>((uint32_t) std::max(0, mi.n_ctx_train), p.max_tokens + scratch);
    const uint32_t floor = p.max_tokens + scratch;
    if (opts_.position_limit > 0 && (opts_.position_limit < floor || opts_.position_limit > trained)) {
        throw fml_error(FML_ERR_INVALID_OPTION, "Expected an integer between " + std::to_string(floor) + " (maxTokens plus " +
                        std::to_string(scratch) + " summary scratch) and " + std::to_string(trained) +
                        " (the model's trained context) for positionLimit but received number " + std::to_string(opts_.position_limit));
    }
    position_limit_ = (int32_t) (opts_.position_limit > 0 ? opts_.position_limit : trained);
    // A quantized cache stores each head in blocks of 32 values: llama.cpp would refuse the context
    // at the first turn ("block size 32 does not divide n_embd_head_k"); refuse the chat now.
    if (opts_.kv_type == "q8_0" && (mi.n_embd_head_k % 32 != 0 || mi.n_embd_head_v % 32 != 0)) {
        throw fml_error(FML_ERR_INVALID_OPTION, "kvType 'q8_0' stores each attention head in blocks of 32 values, and this model's heads have " +
                        std::to_string(mi.n_embd_head_k) + " (keys) and " + std::to_string(mi.n_embd_head_v) + " (values): use kvType 'f16' or 'f32'");
    }
    key_.kv_type = opts_.kv_type;
    key_.flash_attention = fa;
    key_.threads = opts_.threads;
    key_.n_batch = std::max<uint32_t>(512, 1u << (32 - __builtin_clz((uint32_t) std::max<size_t>(1, chunk_ - 1))));
    g_live_chats++;
}

chat::~chat() {
    g_live_chats--;
}

frame_kind chat::next_user_frame() const {
    // Until a first user message is in, a template that merges the system prompt into it frames
    // that message without its usual opening.
    std::lock_guard<std::mutex> lock(mu_);
    if (turn_no_ > 0 || tools_) {
        return frame_kind::user;
    }
    return opts_.system_prompt.empty() ? frame_kind::first_user : frame_kind::first_user_after_system;
}

size_t chat::count_turn_tokens(const std::string & user_text) const {
    return model_->frame_tokens(next_user_frame(), user_text).size();
}

size_t chat::pinned_after_start() const {
    // Sinks are the first tokens of the chat, so once a turn is in, max(system prompt, sinks) are pinned.
    return std::max(started_ ? ledger_.pinned_count() : system_tokens_.size(), (size_t) opts_.policy.sink_tokens);
}

void chat::check_budget() {
    // The smallest turn a chat must always be able to take: the carried end of the previous reply
    // (its last sampled token and the template's end-of-turn), a one-token message in its framing,
    // and one reply token, on top of the pinned prefix (system prompt and attention sinks). Summaries
    // take whatever room an eviction frees beyond that, so they add nothing here.
    closing_tokens_ = model_->frame_message(frame_kind::assistant).suffix_tokens;
    const size_t pinned = pinned_after_start();
    const size_t carry = carry_capacity();
    const size_t framing = std::max(model_->frame_tokens(frame_kind::user, "x").size(),
                                    model_->frame_tokens(opts_.system_prompt.empty() ? frame_kind::first_user : frame_kind::first_user_after_system, "x").size());
    turn_floor_ = carry + framing + 1;
    const size_t required = pinned + turn_floor_;
    if (required <= opts_.policy.max_tokens) {
        return;
    }
    const std::string why = "maxTokens " + std::to_string(opts_.policy.max_tokens) + " cannot hold a turn of this chat: " +
        std::to_string(pinned) + " pinned tokens (system prompt " + std::to_string(system_tokens_.size()) + ", attention sinks " +
        std::to_string(opts_.policy.sink_tokens) + "), " + std::to_string(framing) + " for a one-token message in the chat template, " +
        std::to_string(carry) + " carried from the previous reply and 1 to reply: maxTokens must be at least " + std::to_string(required);
    // The system prompt is what does not fit when the same chat without it would: the prompt is too
    // large. Otherwise the budget is too small for this model's framing.
    const size_t without_system = std::max((size_t) (model_->add_bos() ? 1 : 0), (size_t) opts_.policy.sink_tokens) + carry + framing + 1;
    throw fml_error((!opts_.system_prompt.empty() || tools_) && without_system <= opts_.policy.max_tokens ? FML_ERR_PROMPT_TOO_LARGE : FML_ERR_INVALID_OPTION, why);
}

turn_request chat::prepare_turn(const std::string & user_text, generation_options gen, bool pin) {
    return prepare_framed(model_->frame_tokens(next_user_frame(), user_text), std::move(gen), pin);
}

turn_request chat::prepare_tool_results(const std::vector<tool_result> & results, generation_options gen, bool pin) {
    if (!tools_) {
        throw fml_error(FML_ERR_INVALID_OPTION, "tool results need a chat created with tools");
    }
    return prepare_framed(frame_tool_results(results), std::move(gen), pin);
}

std::vector<int32_t> chat::frame_tool_results(const std::vector<tool_result> & results) const {
    if (results.empty()) {
        throw fml_error(FML_ERR_INVALID_OPTION, "Expected at least one tool result");
    }
    std::vector<tool_call> calls;
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (turn_no_ == 0) {
            throw fml_error(FML_ERR_INVALID_OPTION, "tool results follow a reply's calls, and this chat has no reply yet");
        }
        calls = last_calls_;
    }
    for (const auto & r : results) {
        // Templates render them into their markup (Kimi K2's "## Return of <id>"): plain text, and
        // no control characters (the framing's own markers are some).
        const std::string named_by = r.call_id + r.name;
        tools_->check_plain(named_by, "a tool result's toolCallId or name");
        if (std::any_of(named_by.begin(), named_by.end(), [](char c) { return (unsigned char) c < 0x20; })) {
            throw fml_error(FML_ERR_INVALID_OPTION, "a tool result's toolCallId or name holds a control character");
        }
    }
    // Each result with the call its id names (its name from it where it has none), in the order of
    // the calls (as llama.cpp's apply orders DeepSeek V4's): a template that writes results without
    // ids pairs them with the calls by place; those whose ids name no call keep their order, after.
    std::vector<std::pair<size_t, tool_result>> by_call;
    for (const auto & r : results) {
        const auto call = std::find_if(calls.begin(), calls.end(), [&](const tool_call & c) { return !r.call_id.empty() && c.id == r.call_id; });
        by_call.emplace_back((size_t) (call - calls.begin()), r);
        if (call != calls.end() && r.name.empty()) by_call.back().second.name = call->name;
    }
    std::stable_sort(by_call.begin(), by_call.end(), [](const auto & a, const auto & b) { return a.first < b.first; });
    std::vector<tool_result> named;
    for (auto & [index, r] : by_call) named.push_back(std::move(r));
    if (calls.empty()) {
        // A reply of a restored chat, or one the caller answers anyway: the results name the calls.
        for (const auto & r : named) calls.push_back({ r.call_id, r.name, "{}" });
    }
    const result_framing frames = tools_->result_frames(calls, named, model_->frame_message(frame_kind::assistant).suffix, opts_.test_full_tool_frames);
    // The markup is the template's; the results are the tools' text, never control tokens.
    std::vector<int32_t> framed;
    for (size_t i = 0; i < named.size(); ++i) {
        const std::vector<int32_t> markup = model_->tokenize(frames.markup[i], false, true);
        const std::vector<int32_t> content = model_->tokenize(frames.contents[i], false, false);
        framed.insert(framed.end(), markup.begin(), markup.end());
        framed.insert(framed.end(), content.begin(), content.end());
    }
    const std::vector<int32_t> tail = model_->tokenize(frames.markup.back(), false, true);
    framed.insert(framed.end(), tail.begin(), tail.end());
    return framed;
}

tool_reply chat::parse_tool_reply(const std::string & reasoning, const std::string & answer, bool partial) const {
    std::shared_ptr<const tool_turn> turn;
    {
        std::lock_guard<std::mutex> lock(mu_);
        turn = tool_turn_;
    }
    if (!turn) {
        return { answer, {} };
    }
    return turn->parse(reasoning, answer, partial);
}

turn_request chat::prepare_framed(std::vector<int32_t> framed, generation_options gen, bool pin) {
    turn_request req;
    req.framed = std::move(framed);
    const reasoning_markers & rm = model_->reasoning();
    // A generation prompt that opens the think block (Bailing's): its <think> and the blank tokens
    // after it are the reply's reasoning, dropped with it (a past reply's rendering has none of it).
    size_t open = req.framed.size();
    auto blank_token = [&](int32_t tok) {
        const std::string piece = model_->token_piece(tok, false);
        return !piece.empty() && is_blank(piece);
    };
    while (open > 0 && rm.think() && blank_token(req.framed[open - 1])) {
        --open;
    }
    if (open > 0 && rm.think() && req.framed[open - 1] == rm.think_open) {
        req.reasoning_opened = true;
        req.reply_prefix.assign(req.framed.begin() + (long) open - 1, req.framed.end());
        req.framed.resize(open - 1);
    }
    const bool own_grammar = !gen.grammar.empty() || !gen.json_schema.empty();
    req.tool_markup = tools_ && rm.harmony() && !own_grammar;
    if (!gen.thinking && (rm.think() || rm.harmony())) {
        // An empty think block is reasoning (closed here when the prompt opened it); harmony's final
        // channel header is what a past reply keeps (with tools: an empty analysis, the channel left
        // to the reply, which may call).
        const std::vector<int32_t> skip = req.reasoning_opened ? model_->tokenize("\n\n" + rm.close_text + "\n\n", false, true)
                                          : req.tool_markup ? rm.skip_to_channel : rm.skip;
        req.reply_prefix.insert(req.reply_prefix.end(), skip.begin(), skip.end());
        req.reply_prefix_role = rm.harmony() ? TOKEN_ROLE_ASSISTANT : TOKEN_ROLE_REASONING;
        req.reasoning_skipped = true;
    }
    if (tools_) {
        std::shared_ptr<const tool_turn> turn = tools_->turn(gen.tool_choice.empty() ? "auto" : gen.tool_choice, gen.parallel_tool_calls, gen.thinking);
        if (turn->grammar && !turn->grammar->lazy() && own_grammar) {
            throw fml_error(FML_ERR_INVALID_OPTION, "toolChoice '" + gen.tool_choice + "' holds the answer to a call, and grammar or jsonSchema to something else: give one");
        }
        // Send's own grammar (a response format) holds the whole answer over 'auto''s lazy one: the
        // answer is then no call.
        if (turn->grammar && !own_grammar) {
            req.grammar = turn->grammar->clone();
            req.grammar_of_tools = true;
        }
        gen.stop.insert(gen.stop.end(), turn->stops.begin(), turn->stops.end());
        req.tools = std::move(turn);
    } else if (!gen.tool_choice.empty()) {
        throw fml_error(FML_ERR_INVALID_OPTION, "toolChoice needs a chat created with tools");
    }
    if (!req.grammar && (!gen.grammar.empty() || !gen.json_schema.empty())) {
        req.grammar = reply_grammar::compile(model_->vocab(), gen.grammar, gen.json_schema);
    }

    req.gen = std::move(gen);
    req.pin = pin;
    std::lock_guard<std::mutex> lock(mu_);
    const size_t budget = opts_.policy.max_tokens;
    const size_t prompt = carry_.size() + req.framed.size() + req.reply_prefix.size();
    const size_t pinned = pinned_after_start();
    if (pin && pinned + req.framed.size() + turn_floor_ > budget) {
        throw fml_error(FML_ERR_PIN_LIMIT,
                        "pinning this message (" + std::to_string(req.framed.size()) + " tokens) would leave " + std::to_string(pinned) +
                        " pinned tokens plus it in maxTokens " + std::to_string(budget) + ", and the next turn needs " +
                        std::to_string(turn_floor_) + " more: unpin or forget a turn, or raise maxTokens");
    }
    if (pinned + prompt + 1 > budget) {
        throw fml_error(FML_ERR_PROMPT_TOO_LARGE,
                        "the message needs " + std::to_string(req.framed.size()) + " tokens but maxTokens " + std::to_string(budget) +
                        " leaves room for " + std::to_string(budget - std::min(budget, pinned + carry_.size() + 1)) + " after pinned tokens");
    }
    if (req.tools) {
        tool_turn_ = req.tools;
    }
    return req;
}

turn_request chat::prepare_ingest(const std::string & user_text, const std::string & assistant_text) {
    return prepare_ingest_tools(user_text, {}, assistant_text, {});
}

turn_request chat::prepare_ingest_tools(const std::string & user_text, const std::vector<tool_result> & results, const std::string & assistant_text,
                                        const std::vector<tool_call> & calls) {
    if ((!results.empty() || !calls.empty()) && !tools_) {
        throw fml_error(FML_ERR_INVALID_OPTION, "tool calls and results need a chat created with tools");
    }
    turn_request req;
    req.ingest = true;
    req.framed = results.empty() ? model_->frame_tokens(next_user_frame(), user_text) : frame_tool_results(results);
    // The reply as the template renders it (its opening and content); its closing is carried into
    // the next turn, as after a generated reply. A past reply's think block is left out, as the
    // reasoning models' templates render one (what follows its last </think>, blank lines stripped).
    std::string answer = assistant_text;
    const reasoning_markers & rm = model_->reasoning();
    const size_t close = rm.think() ? answer.rfind(rm.close_text) : std::string::npos;
    if (close != std::string::npos) {
        answer.erase(0, close + rm.close_text.size());
        answer.erase(0, std::min(answer.find_first_not_of('\n'), answer.size()));
    }
    if (calls.empty()) {
        req.reply = model_->frame_tokens(frame_kind::assistant, answer, false);
    } else {
        // Rendered with its calls by the template, markup and all: text that would be a control
        // token there is refused, as in the tools.
        tools_->check_plain(answer, "an assistant message's content");
        for (const auto & c : calls) {
            tools_->check_plain(c.name + c.arguments + c.id, "a tool call");
        }
        req.reply = model_->tokenize(tools_->reply_text(answer, calls, model_->frame_message(frame_kind::assistant).suffix, opts_.test_full_tool_frames), false, true);
        // Its end as the format closes a reply with calls (gpt-oss's <|call|>) is carried, as a generated one's.
        const std::vector<int32_t> call_closing = tools_->call_closing();
        if (!call_closing.empty() && req.reply.size() >= call_closing.size() &&
            std::equal(call_closing.begin(), call_closing.end(), req.reply.end() - (long) call_closing.size())) {
            req.reply.resize(req.reply.size() - call_closing.size());
            req.closing = call_closing;
        }
    }
    std::lock_guard<std::mutex> lock(mu_);
    const size_t budget = opts_.policy.max_tokens;
    const size_t pinned = pinned_after_start();
    if (pinned + carry_.size() + req.framed.size() + 1 > budget || pinned + req.reply.size() + 1 > budget) {
        throw fml_error(FML_ERR_PROMPT_TOO_LARGE, "a transcript message does not fit in maxTokens");
    }
    if (tools_) {
        last_calls_ = calls;
    }
    return req;
}

void chat::reset() {
    std::lock_guard<std::mutex> lock(mu_);
    ledger_.clear();
    carry_.clear();
    carry_reasoning_ = false;
    summary_text_.clear();
    turn_no_ = 0;
    started_ = false;
    cumulative_ = cumulative_stats{};
    parked_ = false;
    parked_kv_.clear();
    replay_pending_ = false;
    replay_done_ = 0;
    transcript_.clear();
    last_calls_.clear();
    reset_pending_ = slot_ >= 0;
}

std::vector<memory_entry> chat::memory() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<memory_entry> out;
    out.reserve(ledger_.size());
    for (const auto & e : ledger_.entries()) {
        out.push_back({ e.token, e.pos, e.turn, e.role, e.pinned, e.score[SCORE_IMPORTANCE], model_->token_piece(e.token, true) });
    }
    return out;
}

cumulative_stats chat::stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return cumulative_;
}

size_t chat::retained_tokens() const {
    std::lock_guard<std::mutex> lock(mu_);
    return ledger_.size();
}

uint64_t chat::kv_bytes() const {
    // Bytes the retained tokens occupy: per attention layer, a K and a V row of n_head_kv * head_dim
    // elements (a hybrid's recurrent state is extra and fixed: model.info.recurrentBytes).
    const double elem = opts_.kv_type == "f32" ? 4.0 : opts_.kv_type == "q8_0" ? 34.0 / 32.0 : 2.0;
    return (uint64_t) ((double) retained_tokens() * (double) model_->info().kv_values_per_token * elem);
}

std::string chat::summary_text() const {
    std::lock_guard<std::mutex> lock(mu_);
    return summary_text_;
}

} // namespace fml
