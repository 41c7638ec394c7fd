#include "engine/options.h"

#include "engine/grammar.h"
#include "engine/tool-calls.h"
#include "kv/token-ledger.h"
#include "util/error.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <sched.h>
#include <thread>

namespace fml {

namespace {

constexpr double MAX_CONTEXT = 1 << 20;
constexpr size_t MAX_TEXT_BYTES = 64u << 20;

std::string number_text(double v) {
    char buf[64];
    if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e15) {
        snprintf(buf, sizeof(buf), "%.0f", v);
    } else {
        snprintf(buf, sizeof(buf), "%g", v);
    }
    return buf;
}

std::string describe(const option_value & v) {
    switch (v.kind) {
        case option_value::UNDEFINED: return "undefined";
        case option_value::NUL:       return "null";
        case option_value::BOOL:      return v.boolean ? "boolean true" : "boolean false";
        case option_value::NUMBER:    return "number " + number_text(v.number);
        case option_value::STRING: {
            // Characters, not bytes: cut at a UTF-8 boundary.
            std::string s = v.text;
            size_t cut = 0, chars = 0;
            while (cut < s.size() && chars < 40) {
                ++cut;
                while (cut < s.size() && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) ++cut;
                ++chars;
            }
            const bool more = cut < s.size();
            s.resize(cut);
            std::string out = "string \"";
            for (char c : s) {
                if (c == '"' || c == '\\') out += '\\';
                if (static_cast<unsigned char>(c) < 0x20) { out += "\\u00"; const char * hex = "0123456789abcdef"; out += hex[(c >> 4) & 0xF]; out += hex[c & 0xF]; continue; }
                out += c;
            }
            return out + (more ? "…\"" : "\"");
        }
        case option_value::ARRAY:     return "object";
        case option_value::OTHER:     return v.text.empty() ? "object" : v.text;
    }
    return "object";
}

[[noreturn]] void fail(const std::string & expected, const std::string & name, const option_value & v) {
    throw fml_error(FML_ERR_INVALID_OPTION, "Expected " + expected + " for " + name + " but received " + describe(v));
}

double int_in(const std::string & name, const option_value & v, double lo, double hi) {
    if (v.kind != option_value::NUMBER || !std::isfinite(v.number) || v.number != std::floor(v.number) || v.number < lo || v.number > hi) {
        fail("an integer between " + number_text(lo) + " and " + number_text(hi), name, v);
    }
    return v.number;
}

double number_in(const std::string & name, const option_value & v, double lo, double hi) {
    if (v.kind != option_value::NUMBER || !std::isfinite(v.number) || v.number < lo || v.number > hi) {
        fail("a number between " + number_text(lo) + " and " + number_text(hi), name, v);
    }
    return v.number;
}

std::string text_of(const std::string & name, const option_value & v, size_t max_bytes) {
    if (v.kind != option_value::STRING) {
        fail("a string", name, v);
    }
    if (v.text.size() > max_bytes) {
        fail("a string of at most " + std::to_string(max_bytes) + " bytes", name, v);
    }
    return v.text;
}

std::string choice_of(const std::string & name, const option_value & v, const std::vector<const char *> & choices) {
    for (const char * c : choices) {
        if (v.kind == option_value::STRING && v.text == c) {
            return v.text;
        }
    }
    std::string list;
    for (size_t i = 0; i < choices.size(); ++i) {
        list += (i ? ", " : "") + std::string(choices[i]);
    }
    fail("one of " + list, name, v);
}

bool boolean_of(const std::string & name, const option_value & v) {
    if (v.kind != option_value::BOOL) {
        fail("a boolean", name, v);
    }
    return v.boolean;
}

// Looks options up by name and reports unknown ones; every lookup marks its key as known.
class option_reader {
public:
    option_reader(const option_map & raw, std::vector<const char *> known) : raw_(raw), known_(std::move(known)) {
        for (const auto & kv : raw_) {
            if (kv.second.kind == option_value::UNDEFINED) {
                continue;   // { x: undefined } means "not given", as in JS
            }
            if (std::find_if(known_.begin(), known_.end(), [&](const char * k) { return kv.first == k; }) == known_.end()) {
                std::string list;
                for (size_t i = 0; i < known_.size(); ++i) {
                    list += (i ? ", " : "") + std::string(known_[i]);
                }
                throw fml_error(FML_ERR_INVALID_OPTION, "Unknown option options." + kv.first + " (known: " + list + ")");
            }
        }
    }
    // Null when the option was not given (absent or undefined).
    const option_value * get(const char * name) const {
        for (const auto & kv : raw_) {
            if (kv.first == name && kv.second.kind != option_value::UNDEFINED) {
                return &kv.second;
            }
        }
        return nullptr;
    }
private:
    const option_map & raw_;
    std::vector<const char *> known_;
};

const std::vector<const char *> POLICY_NAMES = { "sliding", "importance", "semantic", "rolling_summary", "hybrid" };
const std::vector<const char *> KV_TYPES = { "f16", "f32", "q8_0" };
const std::vector<const char *> GRANULARITIES = { "span", "token" };
const std::vector<const char *> IMPORTANCE_SCORES = { "mean", "peak", "blend" };
const std::vector<const char *> POSITION_MODES = { "keep", "compact" };
const std::vector<const char *> PAST_REASONING_MODES = { "drop", "first", "keep" };
// llama.cpp positions are int32; a limit this far from overflow leaves room for the park-and-move of
// a compaction (kv-ops) and for any trained context a model declares today.
constexpr double MAX_POSITION_LIMIT = MAX_POSITION;

// The one table: a row per option, its documentation (what the docs and the TypeScript types show)
// next to the code that validates it and sets its default. Rows run in order, so a default or bound
// may depend on an earlier row (windowSize on maxTokens). option_docs() is the rows' documentation.

template <typename Target>
struct option_row {
    option_doc doc;
    // Validates the value (null: not given) and sets the field, its default included.
    void (*resolve)(Target & t, const option_value * v);
};

// What each scope's rows resolve into: the options, and what their defaults depend on.
struct model_target { model_load_options o; int32_t cores; };
struct chat_target { chat_options o; int32_t default_threads; bool weights_by_default; };
struct send_target { generation_options g; };

const option_row<model_target> MODEL_ROWS[] = {
    { { "model", "gpuLayers", "number | 'auto'", "'auto'", "0 .. 100000", "Layers offloaded to the GPU; 'auto' = all when a GPU backend is active, else none.", false },
      [](model_target & t, const option_value * v) {
          t.o.gpu_layers = -1;
          if (v && !(v->kind == option_value::STRING && v->text == "auto")) {
              if (v->kind != option_value::NUMBER) fail("an integer between 0 and 100000 or 'auto'", "gpuLayers", *v);
              t.o.gpu_layers = (int32_t) int_in("gpuLayers", *v, 0, 100000);
          }
      } },
    { { "model", "threads", "number", "the cores", "1 .. 256", "The model's CPU thread budget: every decode of its chats, batched together, uses this many ggml threads, whatever the number of chats.", false },
      [](model_target & t, const option_value * v) { t.o.threads = v ? (int32_t) int_in("threads", *v, 1, 256) : std::max(1, std::min(256, t.cores)); } },
    { { "model", "useMmap", "boolean", "true", "", "Memory-map the weights.", false },
      [](model_target & t, const option_value * v) { t.o.use_mmap = v ? boolean_of("useMmap", *v) : true; } },
    { { "model", "slots", "number", "8", "1 .. 256", "Chats decoded together in one llama.cpp context (a KV stream each; the context grows to this as chats arrive). More chats than slots work: idle ones are parked in host memory and restored at their next turn.", false },
      [](model_target & t, const option_value * v) { t.o.slots = v ? (uint32_t) int_in("slots", *v, 1, 256) : 8; } },
    { { "model", "prefillChunk", "number", "64", "1 .. 65536", "Prefill tokens a step may add per prefilling chat while other chats are generating, so a long prompt holds their next token back by one bounded step, and prompts that arrive together are each in by the next step or so.", false },
      [](model_target & t, const option_value * v) { t.o.prefill_chunk = v ? (uint32_t) int_in("prefillChunk", *v, 1, 65536) : 64; } },
    { { "model", "kvUnified", "boolean", "false", "", "One KV buffer for all chats instead of a stream each (every token then attends over all chats' cells: slower for long chats; for benchmarks).", true },
      [](model_target & t, const option_value * v) { t.o.kv_unified = v ? boolean_of("kvUnified", *v) : false; } },
    { { "model", "testContextSlotLimit", "number", "0", "0 .. 256", "Test hook: creating a context of more slots than this fails, as when memory runs out (0: never).", true },
      [](model_target & t, const option_value * v) { t.o.test_context_slot_limit = v ? (uint32_t) int_in("testContextSlotLimit", *v, 0, 256) : 0; } },
    { { "model", "testNoKeyRotation", "boolean", "false", "", "Test hook: keys llama.cpp cannot shift right (M-RoPE, YaRN, layers without positions, some quantized caches) are not rotated, as in a build without the internals: compaction re-prefills the retained tokens, summaries stay after the history, positions 'compact' is refused.", true },
      [](model_target & t, const option_value * v) { t.o.test_no_key_rotation = v ? boolean_of("testNoKeyRotation", *v) : false; } },
};

const option_row<chat_target> CHAT_ROWS[] = {
    { { "chat", "kvType", "'f16' | 'f32' | 'q8_0'", "'f16'", "", "KV cache element type; 'q8_0' needs flash attention.", false },
      [](chat_target & t, const option_value * v) { t.o.kv_type = v ? choice_of("kvType", *v, KV_TYPES) : "f16"; } },
    { { "chat", "flashAttention", "boolean", "off on the CPU, llama.cpp's choice on a GPU", "", "Flash attention on or off; kvType 'q8_0' turns it on. Left to choose, importance and hybrid turn it off and read the graph's attention weights; forced on, they recompute the weights from the flash-attention node's inputs (same scores, a dearer step: bench/RESULTS.md).", false },
      [](chat_target & t, const option_value * v) {
          t.o.flash_attention = v ? (boolean_of("flashAttention", *v) ? 1 : 0) : -1;
          if (t.o.kv_type == "q8_0" && t.o.flash_attention == 0) {
              throw fml_error(FML_ERR_INVALID_OPTION, "kvType 'q8_0' needs flash attention (a quantized V cache requires it)");
          }
      } },
    // The default keeps what later turns went back for (issue #29's goals, met on the CPU: docs/models.md),
    // with flash attention on or off (on, the weights are recomputed from the flash node's inputs: the
    // same recall, bench/RESULTS.md "Recall, contenders compared"). On a GPU, reading the weights copies every attention
    // layer's weights (or keys and queries) to the host, a cost not measured yet, so a GPU model's
    // chats keep the cheapest policy; so do a model's whose every layer slides (its key-norm proxy
    // kept fewer facts than sliding: docs/models.md).
    { { "chat", "policy", "'sliding' | 'importance' | 'semantic' | 'rolling_summary' | 'hybrid'", "'importance' on the CPU, 'sliding' on a GPU or where attention weights cannot be read (every layer slides)", "", "Which tokens leave the KV cache when the budget is full.", false },
      [](chat_target & t, const option_value * v) {
          t.o.policy.name = v ? choice_of("policy", *v, POLICY_NAMES) : t.weights_by_default ? "importance" : "sliding";
      } },
    // 16 is a floor, not the real minimum: that depends on the model's chat template and the system
    // prompt, and the chat checks it when created (chat::check_budget).
    { { "chat", "maxTokens", "number", "2048", "16 .. 1048576", "Hard cap on tokens in this chat's KV cache. The real minimum depends on the chat template and system prompt; createChat says what does not fit.", false },
      [](chat_target & t, const option_value * v) { t.o.policy.max_tokens = v ? (uint32_t) int_in("maxTokens", *v, 16, MAX_CONTEXT) : 2048; } },
    { { "chat", "windowSize", "number", "maxTokens / 4", "0 .. maxTokens - 1", "Most recent tokens a policy keeps when anything else can go (importance and hybrid count the incoming message in it, and keep the newest token).", false },
      [](chat_target & t, const option_value * v) { auto & p = t.o.policy; p.window_size = v ? (uint32_t) int_in("windowSize", *v, 0, p.max_tokens - 1) : p.max_tokens / 4; } },
    { { "chat", "sinkTokens", "number", "4", "0 .. maxTokens / 2 - 1", "First tokens of the sequence, pinned as attention sinks.", false },
      [](chat_target & t, const option_value * v) { auto & p = t.o.policy; p.sink_tokens = v ? (uint32_t) int_in("sinkTokens", *v, 0, p.max_tokens / 2 - 1) : 4; } },
    { { "chat", "systemPrompt", "string", "''", "", "System prompt; pinned, never evicted.", false },
      [](chat_target & t, const option_value * v) { t.o.system_prompt = v ? text_of("systemPrompt", *v, MAX_TEXT_BYTES) : ""; } },
    { { "chat", "tools", "object[] | string", "none", "1 .. 128 tools, at most 262144 bytes of JSON", "Tools the model may call, as OpenAI lists them ([{ type: 'function', function: { name, description?, parameters? } }]): rendered with the system prompt by the model's own chat template (pinned), and a reply's calls are read back in its format (TurnResult.toolCalls). Fixed for the chat's life.", false },
      [](chat_target & t, const option_value * v) {
          // TypeScript gives an array as its JSON text; tool_set (engine/tool-calls.cpp) checks the list.
          if (v && v->kind != option_value::STRING) fail("a list of tools (an array, or its JSON text)", "tools", *v);
          t.o.tools = v ? text_of("tools", *v, MAX_TOOLS_BYTES) : "";
      } },
    { { "chat", "threads", "number", "the model's threads", "1 .. the model's threads", "CPU threads of this chat's decodes; chats with fewer threads than the model's decode in their own context.", false },
      [](chat_target & t, const option_value * v) { t.o.threads = v ? (int32_t) int_in("threads", *v, 1, 256) : std::max(1, std::min(256, t.default_threads)); } },
    { { "chat", "batchSize", "number", "512", "1 .. 65536", "Most prefill tokens of this chat per step.", false },
      [](chat_target & t, const option_value * v) { t.o.batch_size = v ? (int32_t) int_in("batchSize", *v, 1, 65536) : 512; } },
    { { "chat", "importanceDecay", "number", "1", "0 .. 1", "importance/hybrid: attention scores are multiplied by this once per turn (key-norm scores, a property of the key, do not age).", false },
      [](chat_target & t, const option_value * v) { t.o.policy.importance_decay = v ? (float) number_in("importanceDecay", *v, 0, 1) : 1.0f; } },
    { { "chat", "importanceGranularity", "'span' | 'token'", "'span'", "", "importance: evict whole low-scoring spans or single tokens (H2O).", false },
      [](chat_target & t, const option_value * v) { t.o.policy.importance_granularity_spans = v ? choice_of("importanceGranularity", *v, GRANULARITIES) == "span" : true; } },
    { { "chat", "importanceScore", "'mean' | 'peak' | 'blend'", "'blend'", "", "importance/hybrid: rank tokens by the mean attention they receive per query, or by the peak weight a distant query paid them (at least 32 positions later, or two whole messages later when one head gave them at least 0.9, a copy: tokens the model went back for); 'blend' (spans): a span stays when either ranks it high among the spans (its peak only counts in the top quarter by peak). Why 'blend': docs/models.md.", false },
      [](chat_target & t, const option_value * v) {
          const std::string s = v ? choice_of("importanceScore", *v, IMPORTANCE_SCORES) : "blend";
          t.o.policy.importance_peak = s == "peak";
          t.o.policy.importance_blend = s == "blend";
      } },
    { { "chat", "semanticClusters", "number", "8", "1 .. 4096", "semantic/hybrid: k-means clusters (topics).", false },
      [](chat_target & t, const option_value * v) { t.o.policy.semantic_clusters = v ? (uint32_t) int_in("semanticClusters", *v, 1, 4096) : 8; } },
    { { "chat", "spanMaxTokens", "number", "32", "1 .. 4096", "semantic/hybrid: longest span when history is split into spans.", false },
      [](chat_target & t, const option_value * v) { t.o.policy.span_max_tokens = v ? (uint32_t) int_in("spanMaxTokens", *v, 1, 4096) : 32; } },
    { { "chat", "policySeed", "number", "42", "0 .. 4294967295", "semantic/hybrid: k-means++ seed.", false },
      [](chat_target & t, const option_value * v) { t.o.policy.seed = v ? (uint32_t) int_in("policySeed", *v, 0, 4294967295.0) : 42; } },
    { { "chat", "summaryTokens", "number", "min(48, maxTokens / 8)", "0 .. maxTokens / 4", "rolling_summary/hybrid: longest summary; 0 turns summaries off in hybrid.", false },
      [](chat_target & t, const option_value * v) {
          auto & p = t.o.policy;
          p.summary_tokens = v ? (uint32_t) int_in("summaryTokens", *v, 0, p.max_tokens / 4) : std::min<uint32_t>(48, p.max_tokens / 8);
      } },
    // 0 by default: freeing maxTokens / 4 at once cost hybrid much of its recall (bench/recall.ts, the
    // "(summaryEvictTokens maxTokens / 4)" rows), a price for latency that is the user's to choose.
    { { "chat", "summaryEvictTokens", "number", "0", "0 .. maxTokens / 2", "rolling_summary/hybrid: an eviction that writes a summary frees at least this many tokens beyond what the turn needs, room for the next turns: a summary (up to summaryTokens decodes) every few turns instead of at every one once the budget is full, for less retained and lower recall (bench/RESULTS.md). 0: only what the turn needs.", false },
      [](chat_target & t, const option_value * v) {
          auto & p = t.o.policy;
          p.summary_evict_tokens = v ? (uint32_t) int_in("summaryEvictTokens", *v, 0, p.max_tokens / 2) : 0;
      } },
    { { "chat", "hybridImportanceShare", "number", "0.5", "0 .. 1", "hybrid: share of the kept history chosen by importance (the rest by semantic representatives).", false },
      [](chat_target & t, const option_value * v) { t.o.policy.hybrid_importance_share = v ? (float) number_in("hybridImportanceShare", *v, 0, 1) : 0.5f; } },
    { { "chat", "maxPolicyMs", "number", "50", "0 .. 3600000", "Latency guard: a policy slower than this falls back to sliding (after 3 in a row, sliding alone for the next 16 evictions); 0 disables.", false },
      [](chat_target & t, const option_value * v) { t.o.max_policy_ms = v ? number_in("maxPolicyMs", *v, 0, 3600000) : 50.0; } },
    { { "chat", "positions", "'keep' | 'compact'", "'keep'", "", "After an eviction the retained tokens keep their positions ('keep': their true distances; new tokens are numbered on, and positions are compacted only when the next one would pass positionLimit) or are renumbered 0..n-1 at every eviction ('compact': a K-shift of the whole context each time; needs a model whose keys can shift).", false },
      [](chat_target & t, const option_value * v) { t.o.keep_positions = v ? choice_of("positions", *v, POSITION_MODES) == "keep" : true; } },
    // The model's side of the bounds (its trained context, the summary scratch) is checked by the chat.
    { { "chat", "positionLimit", "number", "the model's nCtxTrain", "maxTokens plus summary scratch .. the model's nCtxTrain", "positions 'keep': compact (by K-shift, or by re-prefilling the retained tokens where keys cannot move) when the next position would pass this.", false },
      [](chat_target & t, const option_value * v) { t.o.position_limit = v ? (uint32_t) int_in("positionLimit", *v, t.o.policy.max_tokens, MAX_POSITION_LIMIT) : 0; } },
    // 'drop' by default: the chat templates of reasoning models (Qwen3, Qwen3.5, DeepSeek-R1, gpt-oss)
    // render past replies without their reasoning, so a model never saw its old reasoning in training.
    { { "chat", "pastReasoning", "'drop' | 'first' | 'keep'", "'drop'", "", "Earlier replies' reasoning (think blocks, gpt-oss's analysis channel: ModelInfo.reasoning): 'drop' evicts it from the KV cache when the next turn starts, as the model's chat template drops it from the history it renders; 'first' keeps it while there is room and evicts it before anything the policy would choose; 'keep' leaves it to the policy like any other token.", false },
      [](chat_target & t, const option_value * v) {
          const std::string s = v ? choice_of("pastReasoning", *v, PAST_REASONING_MODES) : "drop";
          t.o.past_reasoning = s == "first" ? past_reasoning_mode::first : s == "keep" ? past_reasoning_mode::keep : past_reasoning_mode::drop;
      } },
    { { "chat", "testFailSummaryDecode", "boolean", "false", "", "Test hook: every decode holding this chat's summary (its instruction or text) fails, as llama_decode can.", true },
      [](chat_target & t, const option_value * v) { t.o.test_fail_summary_decode = v ? boolean_of("testFailSummaryDecode", *v) : false; } },
    { { "chat", "testReply", "string", "''", "at most 65536 bytes", "Test hook: every reply is this text's tokens (control tokens parsed), taken in order in place of sampled ones, then the end of generation ('': sampled).", true },
      [](chat_target & t, const option_value * v) { t.o.test_reply = v ? text_of("testReply", *v, 65536) : ""; } },
    { { "chat", "testReplyThenSample", "boolean", "false", "", "Test hook: after testReply's tokens the reply goes on with sampled ones (a forced start: a think block, a channel), not the end. Forced tokens are no grammar's (a forced start ends before the answer), but a lazy one's (toolChoice 'auto' wakes on a forced call's marker).", true },
      [](chat_target & t, const option_value * v) { t.o.test_reply_then_sample = v ? boolean_of("testReplyThenSample", *v) : false; } },
    { { "chat", "testFullToolFrames", "boolean", "false", "", "Test hook: a reply's calls and a turn of results are framed with every tool through llama.cpp's full apply, never the fast way (the called tools alone, the template alone), to check that both frame alike.", true },
      [](chat_target & t, const option_value * v) { t.o.test_full_tool_frames = v ? boolean_of("testFullToolFrames", *v) : false; } },
    { { "chat", "testPolicyDelayMs", "number", "0", "0 .. 60000", "Test hook: every policy choice takes this long.", true },
      [](chat_target & t, const option_value * v) { t.o.test_policy_delay_ms = v ? number_in("testPolicyDelayMs", *v, 0, 60000) : 0.0; } },
    { { "chat", "testTokenDelayMs", "number", "0", "0 .. 60000", "Test hook: this chat waits this long after each of its decodes (the others do not).", true },
      [](chat_target & t, const option_value * v) { t.o.test_token_delay_ms = v ? number_in("testTokenDelayMs", *v, 0, 60000) : 0.0; } },
    { { "chat", "testFailAfterTokens", "number", "0", "0 .. 65536", "Test hook: a reply's next decode fails (FML_ERR_DECODE) once it has this many tokens (0: never).", true },
      [](chat_target & t, const option_value * v) { t.o.test_fail_after_tokens = v ? (uint32_t) int_in("testFailAfterTokens", *v, 0, 65536) : 0; } },
    { { "chat", "testInternalErrorAfterTokens", "number", "0", "0 .. 65536", "Test hook: an unexpected error escapes the scheduler's step once a reply has this many tokens (0: never).", true },
      [](chat_target & t, const option_value * v) { t.o.test_internal_error_after_tokens = v ? (uint32_t) int_in("testInternalErrorAfterTokens", *v, 0, 65536) : 0; } },
};

const option_row<send_target> SEND_ROWS[] = {
    { { "send", "maxNewTokens", "number", "256", "0 .. 1048576", "Most tokens to generate.", false },
      [](send_target & t, const option_value * v) { t.g.max_new_tokens = v ? (int32_t) int_in("maxNewTokens", *v, 0, MAX_CONTEXT) : 256; } },
    { { "send", "temperature", "number", "0.8", "0 .. 100", "Sampling temperature; 0 = greedy.", false },
      [](send_target & t, const option_value * v) { t.g.sampling.temperature = v ? (float) number_in("temperature", *v, 0, 100) : 0.8f; } },
    { { "send", "topK", "number", "40", "0 .. 16777216", "Top-k sampling; 0 = off.", false },
      [](send_target & t, const option_value * v) { t.g.sampling.top_k = v ? (int32_t) int_in("topK", *v, 0, 1 << 24) : 40; } },
    { { "send", "topP", "number", "0.95", "0 .. 1", "Nucleus sampling; 1 = off.", false },
      [](send_target & t, const option_value * v) { t.g.sampling.top_p = v ? (float) number_in("topP", *v, 0, 1) : 0.95f; } },
    { { "send", "minP", "number", "0.05", "0 .. 1", "Min-p sampling; 0 = off.", false },
      [](send_target & t, const option_value * v) { t.g.sampling.min_p = v ? (float) number_in("minP", *v, 0, 1) : 0.05f; } },
    { { "send", "repeatPenalty", "number", "1", "0.01 .. 100", "Repetition penalty; 1 = off.", false },
      [](send_target & t, const option_value * v) { t.g.sampling.repeat_penalty = v ? (float) number_in("repeatPenalty", *v, 0.01, 100) : 1.0f; } },
    { { "send", "repeatLastN", "number", "64", "0 .. 1048576", "Tokens the repetition penalty looks back over.", false },
      [](send_target & t, const option_value * v) { t.g.sampling.repeat_last_n = v ? (int32_t) int_in("repeatLastN", *v, 0, MAX_CONTEXT) : 64; } },
    // 0xFFFFFFFF is llama.cpp's "random seed"; a given seed must be below it.
    { { "send", "seed", "number", "random", "0 .. 4294967294", "Sampler seed: same seed and history, same reply.", false },
      [](send_target & t, const option_value * v) { t.g.sampling.seed = v ? (uint32_t) int_in("seed", *v, 0, 4294967294.0) : 0xFFFFFFFFu; } },
    { { "send", "stop", "string[]", "[]", "at most 64, each at most 1024 bytes", "Generation stops before the first of these strings (not included in the reply).", false },
      [](send_target & t, const option_value * v) {
          t.g.stop.clear();
          if (!v) return;
          if (v->kind != option_value::ARRAY || v->items.size() > 64) {
              fail("an array of at most 64 strings", "stop", *v);
          }
          for (size_t i = 0; i < v->items.size(); ++i) {
              std::string s_i = text_of("stop[" + std::to_string(i) + "]", v->items[i], 1024);
              if (!s_i.empty()) {
                  t.g.stop.push_back(std::move(s_i));
              }
          }
      } },
    { { "send", "thinking", "boolean", "true", "", "false: a reasoning model (ModelInfo.reasoning) answers without reasoning: its reply starts with an empty think block, as Qwen3's template with enable_thinking false, or with gpt-oss's final channel (a chat with tools: an empty analysis, the channel left to the reply, which may call); no effect on other models.", false },
      [](send_target & t, const option_value * v) { t.g.thinking = v ? boolean_of("thinking", *v) : true; } },
    { { "send", "ignoreEos", "boolean", "false", "", "End-of-generation tokens are never sampled, so the reply runs to maxNewTokens or a stop string (as llama-server's ignore_eos: equal work in benchmarks).", false },
      [](send_target & t, const option_value * v) { t.g.ignore_eos = v ? boolean_of("ignoreEos", *v) : false; } },
    // Compiled (and the two checked against each other) with the model's vocabulary: engine/grammar.cpp.
    { { "send", "grammar", "string", "none", "at most 131072 bytes", "A GBNF grammar (llama.cpp's, start rule root) the answer follows; a reasoning model's reasoning stays free. The reply ends when the grammar is complete.", false },
      [](send_target & t, const option_value * v) { t.g.grammar = v ? text_of("grammar", *v, MAX_GRAMMAR_BYTES) : ""; } },
    { { "send", "testFullGrammarPass", "boolean", "false", "", "Test hook: every token a grammar refuses takes the pass over the whole vocabulary (no shortcut: the best candidates first, first bytes), to check that the shortcuts choose the same.", true },
      [](send_target & t, const option_value * v) { t.g.sampling.test_full_grammar_pass = v ? boolean_of("testFullGrammarPass", *v) : false; } },
    { { "send", "testGrammarPassDelayMs", "number", "0", "0 .. 60000", "Test hook: every pass of a grammar over the vocabulary (off the scheduler thread) takes this much longer.", true },
      [](send_target & t, const option_value * v) { t.g.sampling.test_grammar_pass_delay_ms = v ? number_in("testGrammarPassDelayMs", *v, 0, 60000) : 0.0; } },
    { { "send", "testGrammarPassOn", "'step' | 'thread'", "the chat's choice", "", "Test hook: where a grammar's pass over the vocabulary runs: in the step, holding it for every chat, or on a thread of its own (what tests and bench/structured.ts compare).", true },
      [](send_target & t, const option_value * v) {
          t.g.sampling.test_grammar_pass_on = !v ? 0 : choice_of("testGrammarPassOn", *v, { "step", "thread" }) == "step" ? 1 : 2;
      } },
    { { "send", "toolChoice", "'auto' | 'none' | 'required' | { name }", "'auto'", "a chat with tools", "Whether the reply may call tools ('auto'), must not ('none': calls are not read from it) or must ('required'; { name }: that tool), as OpenAI's tool_choice; a required call holds the answer to the template's call format (a grammar); with 'auto' a call the model starts is held from its first marker on.", false },
      [](send_target & t, const option_value * v) {
          // TypeScript gives { name } as the name itself.
          t.g.tool_choice = v ? text_of("toolChoice", *v, 64) : "";
          if (v && t.g.tool_choice.empty()) fail("'auto', 'none', 'required' or a tool's name", "toolChoice", *v);
      } },
    { { "send", "parallelToolCalls", "boolean", "true", "a chat with tools", "A reply may make several calls (false: one at most: a held call is held to one, and of a reply that wrote several the first is read).", false },
      [](send_target & t, const option_value * v) { t.g.parallel_tool_calls = v ? boolean_of("parallelToolCalls", *v) : true; } },
    { { "send", "jsonSchema", "object | string", "none", "at most 65536 bytes of JSON, nested at most 64 deep (more limits: docs/api.md)", "A JSON schema the answer follows (converted to a grammar as llama-server converts response_format's); a reasoning model's reasoning stays free. The reply ends when the JSON value is complete.", false },
      [](send_target & t, const option_value * v) {
          // TypeScript gives an object as its JSON text.
          if (v && v->kind != option_value::STRING) fail("a JSON schema (an object, or its JSON text)", "jsonSchema", *v);
          t.g.json_schema = v ? text_of("jsonSchema", *v, MAX_JSON_SCHEMA_BYTES) : "";
          if (v && t.g.json_schema.empty()) fail("a JSON schema (an object, or its JSON text)", "jsonSchema", *v);
      } },
};

std::atomic<bool> g_test_options{false};

// A test hook's row (testPolicyDelayMs, ...): known only to the test build of the addon.
bool test_hook(const option_doc & d) {
    return std::strncmp(d.name, "test", 4) == 0;
}

// Resolves `raw` with a scope's rows: unknown names are refused, every row runs (given or default).
template <typename Target, size_t N>
void resolve_rows(const option_row<Target> (&rows)[N], const option_map & raw, Target & t) {
    const bool hooks = g_test_options.load();
    std::vector<const char *> known;
    for (const auto & r : rows) {
        if (hooks || !test_hook(r.doc)) known.push_back(r.doc.name);
    }
    option_reader reader(raw, known);
    for (const auto & r : rows) r.resolve(t, hooks || !test_hook(r.doc) ? reader.get(r.doc.name) : nullptr);
}

} // namespace

int32_t available_cores() {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        return std::max(1, CPU_COUNT(&set));
    }
    return (int32_t) std::max(1u, std::thread::hardware_concurrency());
}

void enable_test_options() {
    g_test_options.store(true);
}

model_load_options resolve_model_options(const option_map & raw, int32_t cores) {
    model_target t{ {}, cores };
    resolve_rows(MODEL_ROWS, raw, t);
    return t.o;
}

chat_options resolve_chat_options(const option_map & raw, int32_t default_threads, bool weights_by_default) {
    chat_target t{ {}, default_threads, weights_by_default };
    resolve_rows(CHAT_ROWS, raw, t);
    return t.o;
}

generation_options resolve_generation_options(const option_map & raw) {
    send_target t{};
    resolve_rows(SEND_ROWS, raw, t);
    if (!t.g.grammar.empty() && !t.g.json_schema.empty()) {
        throw fml_error(FML_ERR_INVALID_OPTION, "grammar and jsonSchema were both given; an answer follows one of them");
    }
    return t.g;
}


option_map chat_options_to_map(const chat_options & o, bool persisted_only) {
    const policy_options & p = o.policy;
    option_map m = {
        { "policy", option_value::of(p.name) },
        { "maxTokens", option_value::of((double) p.max_tokens) },
        { "windowSize", option_value::of((double) p.window_size) },
        { "sinkTokens", option_value::of((double) p.sink_tokens) },
        { "systemPrompt", option_value::of(o.system_prompt) },
        { "threads", option_value::of((double) o.threads) },
        { "batchSize", option_value::of((double) o.batch_size) },
        { "kvType", option_value::of(o.kv_type) },
        { "importanceDecay", option_value::of((double) p.importance_decay) },
        { "importanceGranularity", option_value::of(std::string(p.importance_granularity_spans ? "span" : "token")) },
        { "importanceScore", option_value::of(std::string(p.importance_peak ? "peak" : p.importance_blend ? "blend" : "mean")) },
        { "semanticClusters", option_value::of((double) p.semantic_clusters) },
        { "spanMaxTokens", option_value::of((double) p.span_max_tokens) },
        { "policySeed", option_value::of((double) p.seed) },
        { "summaryTokens", option_value::of((double) p.summary_tokens) },
        { "summaryEvictTokens", option_value::of((double) p.summary_evict_tokens) },
        { "hybridImportanceShare", option_value::of((double) p.hybrid_importance_share) },
        { "maxPolicyMs", option_value::of(o.max_policy_ms) },
        { "positions", option_value::of(std::string(o.keep_positions ? "keep" : "compact")) },
        { "pastReasoning", option_value::of(std::string(o.past_reasoning == past_reasoning_mode::first ? "first" : o.past_reasoning == past_reasoning_mode::keep ? "keep" : "drop")) },
    };
    if (!o.tools.empty()) {
        m.push_back({ "tools", option_value::of(o.tools) });
    }
    if (o.position_limit > 0) {
        m.push_back({ "positionLimit", option_value::of((double) o.position_limit) });
    }
    if (o.flash_attention >= 0) {
        m.push_back({ "flashAttention", option_value::of(o.flash_attention == 1) });
    }
    if (!persisted_only) {
        if (o.test_policy_delay_ms > 0) m.push_back({ "testPolicyDelayMs", option_value::of(o.test_policy_delay_ms) });
        if (o.test_token_delay_ms > 0) m.push_back({ "testTokenDelayMs", option_value::of(o.test_token_delay_ms) });
        if (o.test_fail_after_tokens > 0) m.push_back({ "testFailAfterTokens", option_value::of((double) o.test_fail_after_tokens) });
        if (o.test_fail_summary_decode) m.push_back({ "testFailSummaryDecode", option_value::of(true) });
        if (!o.test_reply.empty()) m.push_back({ "testReply", option_value::of(o.test_reply) });
        if (o.test_reply_then_sample) m.push_back({ "testReplyThenSample", option_value::of(true) });
        if (o.test_full_tool_frames) m.push_back({ "testFullToolFrames", option_value::of(true) });
        if (o.test_internal_error_after_tokens > 0) m.push_back({ "testInternalErrorAfterTokens", option_value::of((double) o.test_internal_error_after_tokens) });
    }
    return m;
}

const std::vector<option_doc> & option_docs() {
    static const std::vector<option_doc> docs = [] {
        std::vector<option_doc> out;
        for (const auto & r : MODEL_ROWS) out.push_back(r.doc);
        for (const auto & r : CHAT_ROWS) out.push_back(r.doc);
        for (const auto & r : SEND_ROWS) out.push_back(r.doc);
        return out;
    }();
    return docs;
}

} // namespace fml
