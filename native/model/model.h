// A loaded GGUF model: validation before llama.cpp sees the file, metadata, tokenization and
// chat-template formatting. Shared (std::shared_ptr) by every chat created from it, so the weights
// outlive the last context even if the JS Model is disposed first.
#pragma once

#include "engine/grammar.h"
#include "engine/options.h"

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

struct llama_model;
struct llama_vocab;

namespace fml {

struct model_info {
    std::string architecture;
    std::string description;
    std::string chat_template;   // empty when the GGUF has none
    std::string framing;         // how messages are framed: "template" (the model's), "chatml" (its template is
                                 // unknown to llama.cpp) or "plain" (no template: "User: ...\nAssistant:")
    std::string backend;         // "cpu" or "cuda"
    std::string device;          // the device that holds the offloaded layers, else the CPU (its name)
    std::string fingerprint;     // hash of the GGUF's metadata and tensor layout (checkpoints check it)
    int32_t n_ctx_train = 0;
    int32_t n_embd = 0;
    int32_t n_layer = 0;
    int32_t n_head = 0;
    int32_t n_head_kv = 0;
    int32_t n_embd_head_k = 0;   // key head dim (metadata key_length; may differ from n_embd / n_head)
    int32_t n_embd_head_v = 0;
    int32_t n_vocab = 0;
    uint64_t size_bytes = 0;
    uint64_t n_params = 0;
    int32_t gpu_layers = 0;
    // What the model's memory is and whether finite memory can evict in place on it (decided at load,
    // before any chat: createChat refuses with UNSUPPORTED_MODEL and this reason otherwise).
    std::string memory;               // "kv", "kv-swa" (some layers slide), "recurrent", "hybrid"
    int32_t sliding_window = 0;       // the sliding layers' window (0: none)
    // Per layer: it attends within the sliding window (its attention weights are indexed by the window
    // cache's cells, so importance reads only the other layers'). Empty when unknown (no internals).
    std::vector<bool> sliding_layers;
    int32_t kv_layers = 0;            // layers with a KV cache: what finite memory bounds
    uint64_t kv_values_per_token = 0; // K and V elements one retained token holds over those layers
    uint64_t recurrent_bytes = 0;     // one chat's recurrent state (hybrid: fixed-size, never evicted)
    bool can_shift = false;           // keys can be re-rotated to new positions (by llama.cpp, or by kv_rotate_positions)
    std::string rope;                 // "norm", "neox", "mrope", "imrope", "vision" or "none"
    bool in_place_eviction = false;
    std::string unsupported_reason;   // why not, when not
    std::string reasoning;            // how replies carry reasoning: "think", "harmony" or "none" (reasoning_markers)
};

// The tokens that set a reply's reasoning apart (chat/reasoning.h), each -1 where the vocabulary lacks
// it as a single token. "think": a block between two markers: <think> ... </think> (Qwen3, Qwen3.5,
// DeepSeek-R1, SmolLM3, GLM, Nemotron, LFM2.5, MiniMax), [THINK] ... [/THINK] (Magistral), or
// <|channel>thought ... <channel|> (Gemma 4, whose opener is followed by the channel's name line).
// "harmony" (gpt-oss): messages <|start|>role<|channel|>name<|message|>text<|end|>, reasoning in the
// "analysis" channel.
struct reasoning_markers {
    int32_t think_open = -1;
    int32_t think_close = -1;
    std::string close_text;      // the closing marker as text (an imported reply is cut after it)
    bool named = false;          // the opener is followed by a name line (Gemma 4's "thought\n"), framing too
    int32_t start = -1;
    int32_t channel = -1;
    int32_t message = -1;
    int32_t end = -1;
    // What a reply starts with to skip its reasoning (send's `thinking: false`): an empty think block
    // (Qwen3's template with enable_thinking false), or harmony's final channel opened at once.
    std::vector<int32_t> skip;
    // harmony, a chat with tools: an empty analysis message, after which the reply opens the channel it
    // takes (a call's commentary, or final), so `thinking: false` leaves calls possible.
    std::string skip_to_channel_text;
    std::vector<int32_t> skip_to_channel;
    bool harmony() const { return start >= 0 && channel >= 0 && message >= 0 && end >= 0; }
    bool think() const { return think_open >= 0 && think_close >= 0; }
};

// The text around a message's content once a chat template is applied: prefix + content + suffix.
// `trim`: the template strips whitespace around the content (Llama 3, Gemma), so framing does too.
// The token vectors are the texts' tokens (and those of what precedes the message in a rendering,
// `left`), computed once at load because every framed message needs them.
struct message_frame {
    std::string prefix;
    std::string suffix;
    bool trim = false;
    std::string left;
    std::vector<int32_t> prefix_tokens;
    std::vector<int32_t> suffix_tokens;
    std::vector<int32_t> left_tokens;
};

// Which message a frame is for. A template that merges the system prompt into the first user turn
// (Gemma, Mistral) frames that turn differently from the ones after it, and some templates open the
// conversation with text only the first message gets (chatglm's [gMASK]<sop>).
enum class frame_kind { system, first_user_after_system, first_user, user, assistant };
constexpr int FRAME_KINDS = 5;

class fml_model {
public:
    // Throws fml_error (MODEL_NOT_FOUND / MODEL_INVALID / MODEL_LOAD_FAILED).
    // `on_progress` (optional) hears llama.cpp's load progress, 0..1, on the loading thread.
    static std::shared_ptr<fml_model> load(const std::string & path, const model_load_options & opts,
                                           const std::function<void(float)> & on_progress = nullptr);
    ~fml_model();
    static size_t live_count();

    fml_model(const fml_model &) = delete;
    fml_model & operator=(const fml_model &) = delete;

    llama_model * raw() const { return model_; }
    const llama_vocab * vocab() const { return vocab_; }
    const model_info & info() const { return info_; }
    // Threads of this model's chats unless a chat sets its own (loadModel's `threads`).
    int32_t default_threads() const { return default_threads_; }

    // `parse_special`: control tokens written as text (<|im_start|>) become control tokens. User
    // content is tokenized with it off so it cannot inject template tokens.
    std::vector<int32_t> tokenize(const std::string & text, bool add_bos, bool parse_special) const;
    std::string detokenize(const std::vector<int32_t> & tokens, bool render_special) const;
    std::string token_piece(int32_t token, bool render_special) const;
    bool is_eog(int32_t token) const;
    // Every end-of-generation token of the vocabulary (send's ignoreEos bans them).
    const std::vector<int32_t> & eog_tokens() const { return eog_tokens_; }
    // Tokens that are no text of a reply (sorted; end of generation apart): those whose special
    // rendering differs from their text (control, unknown) and the reasoning markers. A grammar
    // holding an answer refuses them.
    const std::vector<int32_t> & non_text_tokens() const { return non_text_tokens_; }
    // What narrows a grammar's pass (engine/grammar.h), built at first use (a grammar's).
    const token_first_bytes & first_bytes() const;
    // The first text of a control token (end-of-generation ones too) found in `text`, '' when none: for
    // text tokenized with special parsing on that must not hold one (tools rendered into a prompt).
    // One pass over `text` whatever the vocabulary's control tokens (Gemma has thousands), through a
    // trie of their texts built at first use.
    std::string control_text_in(const std::string & text) const;
    int32_t bos() const;
    bool add_bos() const;
    const reasoning_markers & reasoning() const { return reasoning_; }

    // Frames for one message under the model's template. For user messages, the suffix includes the
    // assistant generation prompt.
    const message_frame & frame_message(frame_kind kind) const;
    // The tokens of one framed message, equal to that message's slice of the whole conversation
    // rendered by the template and tokenized at once (what llama.cpp's own server feeds the model).
    // Content is never parsed for control tokens: text such as "<|im_start|>" in it stays text.
    // Without the suffix for an ingested reply, whose closing is carried into the next turn.
    std::vector<int32_t> frame_tokens(frame_kind kind, const std::string & content, bool with_suffix = true) const;
    // The whole conversation rendered by the model's template ({role, content} pairs).
    std::string apply_template(const std::vector<std::pair<std::string, std::string>> & messages, bool add_assistant) const;

private:
    std::string first_unrepresentable(const std::string & text) const;
    fml_model() = default;

    llama_model * model_ = nullptr;
    const llama_vocab * vocab_ = nullptr;
    model_info info_;
    int32_t default_threads_ = 1;
    std::string template_;   // what llama_chat_apply_template gets
    bool harmony_framing_ = false;   // llama.cpp frames it with its gpt-oss formatter: past replies as the template writes them
    std::vector<int32_t> eog_tokens_;
    reasoning_markers reasoning_;
    void find_reasoning_markers();
    void find_non_text_tokens();
    std::vector<int32_t> non_text_tokens_;
    mutable std::once_flag first_bytes_once_;
    struct text_trie {
        std::vector<std::map<unsigned char, int32_t>> next;   // node -> byte -> node (node 0: the root)
        std::vector<int32_t> token;                            // node -> the token whose text ends there (-1)
    };
    mutable std::once_flag control_trie_once_;
    mutable text_trie control_trie_;
    mutable token_first_bytes first_bytes_;
    // Frames per frame_kind, rendered once at load; a template that cannot frame a kind leaves its
    // error here, thrown when a chat needs that frame.
    message_frame frames_[FRAME_KINDS];
    std::string frame_errors_[FRAME_KINDS];
    std::string frame_error_codes_[FRAME_KINDS];   // TEMPLATE_FAILED unless tokenizing the frame failed
    void compute_frames();
    void render_frames();   // the template's frames (compute_frames adds plain framing and the tokens)
};

// The last error lines llama.cpp logged (llama.cpp reports load failures only through its log).
std::string last_llama_errors();
void install_llama_log();

} // namespace fml
