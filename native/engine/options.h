// The one table of options (options.cpp: a row per option, its documentation next to the code that
// validates it and sets its default), for models (loadModel), chats (createChat and the options stored
// in a checkpoint) and turns (send); option_docs() is the rows' documentation, which the docs and
// the TypeScript types are checked against. Every
// value that reaches the core passes through resolve_*(), so createChat and loadChat validate alike
// and TypeScript (which only strips its JS-only options: telemetry, onToken, signal) shares the
// same defaults. Messages follow "Expected X for name but received Y".
#pragma once

#include "policies/policy.h"
#include "engine/sampler.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fml {

// A raw option value as the caller gave it (a JS value, or a field read from a checkpoint).
struct option_value {
    enum kind_t : uint8_t { UNDEFINED, NUL, BOOL, NUMBER, STRING, ARRAY, OTHER };
    kind_t kind = UNDEFINED;
    bool boolean = false;
    double number = 0;
    std::string text;                  // STRING; for OTHER, the JS type name ("object", "function", ...)
    std::vector<option_value> items;   // ARRAY

    static option_value of(double v) { option_value o; o.kind = NUMBER; o.number = v; return o; }
    static option_value of(bool v) { option_value o; o.kind = BOOL; o.boolean = v; return o; }
    static option_value of(std::string v) { option_value o; o.kind = STRING; o.text = std::move(v); return o; }
};

// Name -> value, in the caller's order.
using option_map = std::vector<std::pair<std::string, option_value>>;

// The fields start empty: every value, default included, comes from the table (options.cpp).
struct model_load_options {
    int32_t  gpu_layers = 0;     // -1 = all that the backend can take ('auto')
    bool     use_mmap   = false;
    int32_t  threads    = 0;     // the model's CPU thread budget: ggml threads of every decode
    uint32_t slots      = 0;     // chats decoded together per context; more are parked while idle
    uint32_t prefill_chunk = 0;  // prefill tokens per step while other chats generate
    bool     kv_unified = false; // one KV buffer for all chats (benchmarks compare; slower for long chats)
    uint32_t test_context_slot_limit = 0; // test hook: a context of more slots fails to be created (0: never)
    bool     test_no_key_rotation = false; // test hook: keys llama.cpp cannot shift are not rotated (the path of builds that cannot)
};

// What becomes of earlier replies' reasoning (pastReasoning).
enum class past_reasoning_mode : uint8_t { drop, first, keep };

struct chat_options {
    policy_options policy;
    std::string system_prompt;
    int32_t     threads = 0;
    int32_t     batch_size = 0;
    std::string kv_type;              // f16 | f32 | q8_0
    int32_t     flash_attention = -1; // -1 auto, 0 off, 1 on
    double      max_policy_ms = 0;    // latency guard: slower choices fall back to sliding (<= 0: off)
    // Positions after an eviction: kept (the retained tokens keep their true distances and new tokens
    // are numbered on; compaction only when the next position would pass `position_limit`) or
    // compacted at every eviction (positions 0..n-1 again: a K-shift of the whole context each time).
    bool        keep_positions = false;
    uint32_t    position_limit = 0;   // 0: the model's trained context (n_ctx_train)
    past_reasoning_mode past_reasoning = past_reasoning_mode::drop;
    std::string tools;                // OpenAI's tool list as JSON text ('': none), rendered with the system prompt
    double      test_policy_delay_ms = 0; // test hook: makes every policy choice this slow
    double      test_token_delay_ms = 0;  // test hook: makes every decode of a turn this slow (deterministic aborts)
    uint32_t    test_fail_after_tokens = 0; // test hook: a reply's decode fails (as llama_decode can) once it has this many tokens
    bool        test_fail_summary_decode = false; // test hook: every decode of a summary's scratch fails (as llama_decode can)
    std::string test_reply;               // test hook: every reply is this text's tokens (control tokens parsed), not sampled ones
    bool        test_reply_then_sample = false; // test hook: ... then sampled ones (a forced start)
    bool        test_full_tool_frames = false;  // test hook: a reply's calls and results framed the full way (tool_set's fast_frames off)
    uint32_t    test_internal_error_after_tokens = 0; // test hook: an unexpected error escapes the step once a reply has this many tokens
};

struct generation_options {
    sampling_options sampling;
    int32_t max_new_tokens = 0;
    bool ignore_eos = false;     // end-of-generation tokens are never sampled: the reply runs to max_new_tokens (or a stop string)
    bool thinking = true;        // false: a reasoning model's reply starts by skipping its reasoning (reasoning_markers::skip)
    std::vector<std::string> stop;
    std::string grammar;         // GBNF the answer follows ('': none); compiled by chat::prepare_turn (engine/grammar.h)
    std::string json_schema;     // a JSON schema (JSON text) the answer follows, converted to GBNF ('': none)
    std::string tool_choice;     // a chat with tools: auto ('' too), none, required, or a tool's name
    bool parallel_tool_calls = true;
};

// CPUs this process may run on (its affinity mask), like Node's os.availableParallelism().
int32_t available_cores();

// Throw fml_error(INVALID_OPTION) naming the option, what was expected and what was given.
model_load_options resolve_model_options(const option_map & raw, int32_t cores);
// `weights_by_default`: the model runs on the CPU and its attention weights can be read
// (chat::reads_attention_weights): the default policy is importance, else sliding.
chat_options       resolve_chat_options(const option_map & raw, int32_t default_threads, bool weights_by_default);
generation_options resolve_generation_options(const option_map & raw);

// The resolved chat options as a map (the same names): what `chat.options` reports and what a
// checkpoint stores. `persisted_only` leaves out test hooks.
option_map chat_options_to_map(const chat_options & opts, bool persisted_only);

// The test hooks among the chat options (testPolicyDelayMs, testTokenDelayMs) exist only in the test
// build of the addon (native/binding/probes.cpp turns them on); the shipped one refuses them as unknown.
void enable_test_options();

// The table itself, for documentation (scripts/options-doc.ts) and tests.
struct option_doc {
    const char * scope;        // "model" | "chat" | "send"
    const char * name;
    const char * type;         // as written in TypeScript
    const char * default_text; // e.g. "maxTokens / 4"
    const char * range_text;   // e.g. "1 .. 256"
    const char * description;
    bool         internal;     // test hooks, left out of the docs
};
const std::vector<option_doc> & option_docs();

} // namespace fml
