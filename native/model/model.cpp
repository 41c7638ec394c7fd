#include "model/model.h"
#include "model/gguf-file.h"
#include "kv/kv-internals.h"

#include "util/error.h"
#include "util/hash.h"

#include "ggml-backend.h"

#include <algorithm>
#include <tuple>
#include "gguf.h"
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <mutex>
#include <set>
#include <sys/stat.h>

namespace fml {

// ---- llama.cpp log capture -------------------------------------------------------------------

static std::mutex  g_log_mutex;
static std::string g_last_errors;

static void llama_log_to_buffer(enum ggml_log_level level, const char * text, void * /*user*/) {
    if (level != GGML_LOG_LEVEL_ERROR && level != GGML_LOG_LEVEL_WARN) {
        return;
    }
    if (getenv("FML_LLAMA_LOG") != nullptr) {
        fputs(text, stderr);
    }
    if (level == GGML_LOG_LEVEL_ERROR) {
        std::lock_guard<std::mutex> lock(g_log_mutex);
        g_last_errors += text;
        if (g_last_errors.size() > 4096) {
            g_last_errors.erase(0, g_last_errors.size() - 4096);
        }
    }
}

void install_llama_log() { llama_log_set(llama_log_to_buffer, nullptr); }

std::string last_llama_errors() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    std::string out;
    out.swap(g_last_errors);
    while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) {
        out.pop_back();
    }
    return out;
}

// ---- model -----------------------------------------------------------------------------------

static std::atomic<size_t> g_live_models{0};
size_t fml_model::live_count() { return g_live_models.load(); }

static std::string meta_str(const llama_model * model, const char * key) {
    char buf[256];
    const int32_t n = llama_model_meta_val_str(model, key, buf, sizeof(buf));
    return n < 0 ? std::string() : std::string(buf, std::min<size_t>((size_t) n, sizeof(buf) - 1));
}

// The backend doing the work and its device's name: the first GPU device ggml registered (backend
// name, e.g. "cuda", and description, e.g. the card's name) when layers are offloaded to it, else the CPU.
static std::pair<std::string, std::string> detect_backend(bool offloading) {
    std::string cpu_name = "CPU";
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const char * desc = ggml_backend_dev_description(dev);
        const enum ggml_backend_dev_type type = ggml_backend_dev_type(dev);
        if (type == GGML_BACKEND_DEVICE_TYPE_GPU && offloading) {
            const char * reg = ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev));
            std::string name = reg ? reg : "gpu";
            for (auto & c : name) {
                c = (char) tolower((unsigned char) c);
            }
            return { name, desc && *desc ? desc : ggml_backend_dev_name(dev) };
        }
        if (type == GGML_BACKEND_DEVICE_TYPE_CPU && desc && *desc) {
            cpu_name = desc;
        }
    }
    return { "cpu", cpu_name };
}

static const char * rope_name(enum llama_rope_type rope) {
    switch (rope) {
        case LLAMA_ROPE_TYPE_NORM:   return "norm";
        case LLAMA_ROPE_TYPE_NEOX:   return "neox";
        case LLAMA_ROPE_TYPE_MROPE:  return "mrope";
        case LLAMA_ROPE_TYPE_IMROPE: return "imrope";
        case LLAMA_ROPE_TYPE_VISION: return "vision";
        case LLAMA_ROPE_TYPE_NONE:   return "none";
    }
    return "none";
}

// What kind of memory the model has and whether finite memory can evict from it in place. Decided
// per architecture family before any chat exists, so createChat can say why not. Evicting needs
// only seq_rm; positions are kept, and compacted (K-shift, or a re-prefill where keys cannot move)
// only at the position limit. A hybrid evicts from its attention half alone.
static void describe_memory(const llama_model * model, const model_load_options & opts, model_info & info) {
    info.sliding_window = llama_model_n_swa(model);
    const enum llama_rope_type rope = llama_model_rope_type(model);
    info.rope = rope_name(rope);
    const kv_model_layout layout = kv_layout_of(model);
    if (layout.attention_layers > 0 && layout.rotary_layers == 0) {
        info.rope = "none";   // attention without positions (NoPE): only recurrent layers see order
    }
    info.kv_layers = layout.attention_layers;
    info.sliding_layers = layout.sliding_layers;
    info.kv_values_per_token = layout.kv_values_per_token;
    if (layout.kv_heads > 0) {
        info.n_head_kv = layout.kv_heads;   // LFM2's layer 0 is a convolution: llama_model_n_head_kv says 0
    }
    info.recurrent_bytes = layout.recurrent_bytes;
    // llama_kv_cache::get_can_shift: multi-section positions (M-RoPE) have no K-shift in llama.cpp,
    // and its shift gets some keys wrong (kv_llama_shift_unsound); kv-internals rotates such keys
    // itself (kv_rotate_positions). The engine decides with its context (kv_can_shift), which also
    // knows the chat's key type.
    const bool mrope = rope == LLAMA_ROPE_TYPE_MROPE || rope == LLAMA_ROPE_TYPE_IMROPE;
    const bool llama_shift_exact = !mrope && !kv_shift_may_be_unsound(model);
    info.can_shift = (llama_shift_exact || (kv_rotation_supported(model) && !opts.test_no_key_rotation)) && info.architecture != "step35";
    const std::string arch = "architecture " + info.architecture;
    if (llama_model_is_recurrent(model)) {
        info.memory = "recurrent";
        info.unsupported_reason = arch + " keeps a recurrent state instead of a KV cache: llama.cpp can only clear "
            "that state, not remove tokens from it, so nothing can be evicted in place (and its memory is already fixed-size)";
    } else if (llama_model_is_hybrid(model)) {
        info.memory = "hybrid";
        if (!kv_internals_available()) {
            info.unsupported_reason = arch + " mixes attention layers with a recurrent state, and this build cannot reach "
                "llama.cpp's attention half (its internal headers were not found at build time), so nothing can be evicted in place";
        } else if (!layout.hybrid_supported) {
            info.unsupported_reason = arch + " keeps a hybrid memory with sliding-window or indexer caches next to its "
                "attention and recurrent halves, which finite memory does not evict from yet";
        }
    } else {
        info.memory = info.sliding_window > 0 ? "kv-swa" : "kv";
    }
    info.in_place_eviction = info.unsupported_reason.empty();
}

std::shared_ptr<fml_model> fml_model::load(const std::string & path, const model_load_options & opts,
                                           const std::function<void(float)> & on_progress) {
    if (path.find('\0') != std::string::npos) {
        throw fml_error(FML_ERR_MODEL_NOT_FOUND, "model path contains a NUL character");
    }
    const std::string fingerprint = validate_gguf_file(path);

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = opts.gpu_layers;
    if (!opts.use_mmap) {
        mp.load_mode = LLAMA_LOAD_MODE_NONE;
    }
    if (on_progress) {
        mp.progress_callback = [](float p, void * user) {
            (*static_cast<const std::function<void(float)> *>(user))(p);
            return true;   // never cancels the load
        };
        mp.progress_callback_user_data = const_cast<std::function<void(float)> *>(&on_progress);
    }
    last_llama_errors();   // drop stale messages
    llama_model * model = nullptr;
    try {
        model = llama_model_load_from_file(path.c_str(), mp);
    } catch (const std::exception & e) {
        throw fml_error(FML_ERR_MODEL_LOAD, std::string("llama.cpp failed to load the model: ") + e.what());
    }
    if (model == nullptr) {
        const std::string why = last_llama_errors();
        throw fml_error(FML_ERR_MODEL_LOAD, "llama.cpp failed to load the model" + (why.empty() ? std::string() : ": " + why));
    }

    std::shared_ptr<fml_model> m(new fml_model());
    m->model_ = model;
    g_live_models++;
    m->vocab_ = llama_model_get_vocab(model);
    if (llama_vocab_type(m->vocab_) == LLAMA_VOCAB_TYPE_NONE) {
        // llama.cpp loads a GGUF without a tokenizer (tokenizer.ggml.model "none"), then aborts on the
        // first tokenization; a chat model needs one.
        throw fml_error(FML_ERR_MODEL_INVALID, "the GGUF has no tokenizer (tokenizer.ggml.model is 'none'): " + path);
    }
    for (int32_t t = 0; t < llama_vocab_n_tokens(m->vocab_); ++t) {
        if (llama_vocab_is_eog(m->vocab_, t)) {
            m->eog_tokens_.push_back(t);
        }
    }
    m->default_threads_ = opts.threads;

    model_info & info = m->info_;
    info.architecture = meta_str(model, "general.architecture");
    char desc[256];
    llama_model_desc(model, desc, sizeof(desc));
    info.description = desc;
    const char * tmpl = llama_model_chat_template(model, nullptr);
    info.chat_template = tmpl ? tmpl : "";
    info.n_ctx_train = llama_model_n_ctx_train(model);
    info.n_embd = llama_model_n_embd(model);
    info.n_layer = llama_model_n_layer(model);
    info.n_head = llama_model_n_head(model);
    info.n_head_kv = llama_model_n_head_kv(model);
    info.n_vocab = llama_vocab_n_tokens(m->vocab_);
    const std::string key_len = meta_str(model, (info.architecture + ".attention.key_length").c_str());
    const std::string val_len = meta_str(model, (info.architecture + ".attention.value_length").c_str());
    const int32_t default_head = info.n_head > 0 ? info.n_embd / info.n_head : 0;
    info.n_embd_head_k = key_len.empty() ? default_head : atoi(key_len.c_str());
    info.n_embd_head_v = val_len.empty() ? info.n_embd_head_k : atoi(val_len.c_str());
    info.size_bytes = llama_model_size(model);
    info.n_params = llama_model_n_params(model);
    info.gpu_layers = opts.gpu_layers < 0 ? info.n_layer : std::min(opts.gpu_layers, info.n_layer);
    // A GPU build with nothing offloaded (gpuLayers: 0) runs on the CPU and reports it.
    std::tie(info.backend, info.device) = detect_backend(info.gpu_layers != 0);
    info.fingerprint = fingerprint;
    if (info.backend == "cpu") {
        info.gpu_layers = 0;
    }

    describe_memory(model, opts, info);
    if (opts.kv_unified && info.sliding_window > 0) {
        // One buffer for all chats would let one chat's decodes reuse another's out-of-window cells
        // in the sliding layers, so a chat's output would depend on the others.
        throw fml_error(FML_ERR_INVALID_OPTION, "kvUnified is not supported for models with sliding-window layers (" + info.architecture +
                        "): chats would share the window cache's cells; leave it off (one KV stream per chat)");
    }

    // The model's template when llama.cpp recognises it; ChatML for one it does not (a chat model
    // whose template is not built into llama.cpp most likely knows ChatML); and for a model with no
    // template (a base model) a plain "User: ... / Assistant:" framing that costs a few tokens a turn
    // instead of ChatML's dozens.
    if (info.chat_template.empty()) {
        info.framing = "plain";
    } else {
        m->template_ = info.chat_template;
        info.framing = "template";
        llama_chat_message probe = { "user", "x" };
        if (llama_chat_apply_template(m->template_.c_str(), &probe, 1, true, nullptr, 0) < 0) {
            m->template_ = "chatml";
            info.framing = "chatml";
        }
        // llama.cpp's built-in gpt-oss formatter (what it picks for a harmony template).
        m->harmony_framing_ = m->apply_template({ { "user", "u" }, { "assistant", "a" } }, false) == "<|start|>user<|message|>u<|end|><|start|>assistant<|message|>a<|return|>";
    }
    m->compute_frames();
    m->find_reasoning_markers();
    m->find_non_text_tokens();
    return m;
}

const token_first_bytes & fml_model::first_bytes() const {
    std::call_once(first_bytes_once_, [&] {
        first_bytes_.first.assign((size_t) info_.n_vocab, -1);
        first_bytes_.single.fill(-1);
        for (int32_t t = 0; t < info_.n_vocab; ++t) {
            const std::string piece = token_piece(t, true);
            if (piece.empty()) {
                continue;
            }
            const uint8_t b = (uint8_t) piece[0];
            first_bytes_.first[(size_t) t] = b;
            if (piece.size() == 1 && first_bytes_.single[b] < 0 && !llama_vocab_is_eog(vocab_, t)) {
                first_bytes_.single[b] = t;
            }
        }
    });
    return first_bytes_;
}

std::string fml_model::control_text_in(const std::string & text) const {
    std::call_once(control_trie_once_, [&] {
        text_trie & t = control_trie_;
        t.next.emplace_back();
        t.token.push_back(-1);
        for (int32_t tok = 0; tok < info_.n_vocab; ++tok) {
            if ((llama_vocab_get_attr(vocab_, tok) & LLAMA_TOKEN_ATTR_CONTROL) == 0) {
                continue;
            }
            int32_t node = 0;
            for (unsigned char c : token_piece(tok, true)) {
                auto it = t.next[(size_t) node].find(c);
                if (it == t.next[(size_t) node].end()) {
                    t.next.emplace_back();
                    t.token.push_back(-1);
                    it = t.next[(size_t) node].emplace(c, (int32_t) t.next.size() - 1).first;
                }
                node = it->second;
            }
            if (node != 0) t.token[(size_t) node] = tok;
        }
    });
    const text_trie & t = control_trie_;
    for (size_t start = 0; start < text.size(); ++start) {
        int32_t node = 0;
        for (size_t i = start; i < text.size(); ++i) {
            const auto it = t.next[(size_t) node].find((unsigned char) text[i]);
            if (it == t.next[(size_t) node].end()) break;
            node = it->second;
            if (t.token[(size_t) node] >= 0) return text.substr(start, i + 1 - start);
        }
    }
    return std::string();
}

void fml_model::find_non_text_tokens() {
    // Tokens whose text differs as special text (what a grammar reads: "<|end|>", "<unk>") from the
    // reply's (none): control and unknown tokens. And the markers: <think> may be an ordinary
    // (user-defined) token, but the reply's part turns on it.
    const reasoning_markers & r = reasoning_;
    const std::set<int32_t> markers = { r.think_open, r.think_close, r.start, r.channel, r.message, r.end };
    for (int32_t t = 0; t < info_.n_vocab; ++t) {
        if (llama_vocab_is_eog(vocab_, t)) {
            continue;
        }
        const bool plain = (llama_vocab_get_attr(vocab_, t) & (LLAMA_TOKEN_ATTR_NORMAL | LLAMA_TOKEN_ATTR_BYTE)) != 0;
        if (markers.count(t) != 0 || (!plain && token_piece(t, true) != token_piece(t, false))) {
            non_text_tokens_.push_back(t);
        }
    }
}

void fml_model::find_reasoning_markers() {
    // A marker counts only as one token of its own (what the model emits), never as text spelled
    // in pieces: "<think>" typed in a message of a model without it is just text.
    auto single = [&](const char * text) -> int32_t {
        try {
            const std::vector<int32_t> t = tokenize(text, false, true);
            return t.size() == 1 && token_piece(t[0], true) == text ? t[0] : -1;
        } catch (const fml_error &) {
            return -1;   // a vocabulary without byte fallback that cannot spell it: no such token either
        }
    };
    reasoning_markers & r = reasoning_;
    r.start = single("<|start|>");
    r.channel = single("<|channel|>");
    r.message = single("<|message|>");
    r.end = single("<|end|>");
    // Each think-block format, and the empty block that skips the reasoning (send's thinking false) as
    // the family's template writes it.
    struct think_format { const char * open; const char * close; bool named; const char * skip; };
    static const think_format FORMATS[] = {
        { "<think>", "</think>", false, "<think>\n\n</think>\n\n" },
        { "[THINK]", "[/THINK]", false, "[THINK][/THINK]" },
        { "<|channel>", "<channel|>", true, "<|channel>thought\n<channel|>" },
    };
    if (!r.harmony()) {
        r.start = r.channel = r.message = r.end = -1;
        for (const think_format & f : FORMATS) {
            r.think_open = single(f.open);
            r.think_close = single(f.close);
            if (r.think()) {
                r.close_text = f.close;
                r.named = f.named;
                r.skip = tokenize(f.skip, false, true);
                break;
            }
            r.think_open = r.think_close = -1;
        }
    } else {
        r.skip = tokenize("<|channel|>final<|message|>", false, true);
        r.skip_to_channel_text = "<|channel|>analysis<|message|><|end|><|start|>assistant";
        r.skip_to_channel = tokenize(r.skip_to_channel_text, false, true);
    }
    info_.reasoning = r.harmony() ? "harmony" : r.think() ? "think" : "none";
}

fml_model::~fml_model() {
    if (model_ != nullptr) {
        g_live_models--;
        llama_model_free(model_);
    }
}

// The first character of `text` that the vocabulary cannot tokenize alone, as "'c' (U+XXXX)".
std::string fml_model::first_unrepresentable(const std::string & text) const {
    std::vector<llama_token> out(16);
    size_t i = 0;
    while (i < text.size()) {
        const unsigned char c = (unsigned char) text[i];
        const size_t len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
        const std::string ch = text.substr(i, len);
        try {
            llama_tokenize(vocab_, ch.data(), (int32_t) ch.size(), out.data(), (int32_t) out.size(), false, false);
        } catch (const std::exception &) {
            uint32_t cp = len == 1 ? c : c & (0xFF >> (len + 1));
            for (size_t k = 1; k < ch.size(); ++k) cp = (cp << 6) | ((unsigned char) ch[k] & 0x3F);
            char hex[16];
            snprintf(hex, sizeof(hex), "U+%04X", cp);
            return "'" + ch + "' (" + hex + ")";
        }
        i += len;
    }
    return "a character";
}

std::vector<int32_t> fml_model::tokenize(const std::string & text, bool add_bos, bool parse_special) const {
    if (text.size() > (size_t) INT32_MAX / 2) {
        throw fml_error(FML_ERR_PROMPT_TOO_LARGE, "text too large to tokenize");
    }
    std::vector<llama_token> out(text.size() + 8);
    int32_t n = 0;
    try {
        n = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), add_bos, parse_special);
        if (n < 0 && n != INT32_MIN) {
            out.resize((size_t) -n);
            n = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), add_bos, parse_special);
        }
    } catch (const std::exception &) {
        // SPM vocabularies without byte-fallback tokens throw on characters they cannot represent
        // (llama.cpp's message is a container's, `unordered_map::at`): name the first such character.
        throw fml_error(FML_ERR_INVALID_OPTION, "the text contains " + first_unrepresentable(text) +
                        ", which this model's vocabulary cannot represent (it has no byte-fallback tokens)");
    }
    if (n < 0) {
        throw fml_error(FML_ERR_PROMPT_TOO_LARGE, "tokenization overflow");
    }
    out.resize((size_t) n);
    return std::vector<int32_t>(out.begin(), out.end());
}

std::string fml_model::token_piece(int32_t token, bool render_special) const {
    char buf[128];
    int32_t n = llama_token_to_piece(vocab_, token, buf, sizeof(buf), 0, render_special);
    if (n >= 0) {
        return std::string(buf, (size_t) n);
    }
    std::string big((size_t) -n, '\0');
    n = llama_token_to_piece(vocab_, token, big.data(), (int32_t) big.size(), 0, render_special);
    return n < 0 ? std::string() : big.substr(0, (size_t) n);
}

std::string fml_model::detokenize(const std::vector<int32_t> & tokens, bool render_special) const {
    for (int32_t t : tokens) {
        if (t < 0 || t >= info_.n_vocab) {
            throw fml_error(FML_ERR_INVALID_OPTION, "token id out of range: " + std::to_string(t));
        }
    }
    std::string out(tokens.size() * 8 + 16, '\0');
    int32_t n = llama_detokenize(vocab_, tokens.data(), (int32_t) tokens.size(), out.data(), (int32_t) out.size(), false, render_special);
    if (n < 0) {
        out.resize((size_t) -n);
        n = llama_detokenize(vocab_, tokens.data(), (int32_t) tokens.size(), out.data(), (int32_t) out.size(), false, render_special);
    }
    out.resize(n < 0 ? 0 : (size_t) n);
    return out;
}

bool fml_model::is_eog(int32_t token) const { return llama_vocab_is_eog(vocab_, token); }
int32_t fml_model::bos() const { return llama_vocab_bos(vocab_); }
bool fml_model::add_bos() const { return llama_vocab_get_add_bos(vocab_) && llama_vocab_bos(vocab_) != LLAMA_TOKEN_NULL; }

std::string fml_model::apply_template(const std::vector<std::pair<std::string, std::string>> & messages, bool add_assistant) const {
    if (info_.framing == "plain") {
        // No template: the plain frames, each user message ending in the "Assistant:" cue.
        // Without add_assistant a last user message ends without the cue, as a template's would.
        std::string out;
        for (size_t i = 0; i < messages.size(); ++i) {
            const auto & m = messages[i];
            const frame_kind k = m.first == "system" ? frame_kind::system : m.first == "user" ? frame_kind::user : frame_kind::assistant;
            out += frames_[(int) k].prefix + m.second;
            out += k == frame_kind::user && i + 1 == messages.size() && !add_assistant ? "\n" : frames_[(int) k].suffix;
        }
        return out;
    }
    if (harmony_framing_) {
        // gpt-oss: llama.cpp's formatter writes an assistant message as <|message|>text<|return|>; the
        // model's own template (what it was trained on) writes a past one in the final channel, ended
        // by <|end|> ("<|return|> should never be an input to the model"), as a chat then keeps it.
        std::string out;
        for (const auto & m : messages) {
            out += "<|start|>" + m.first + (m.first == "assistant" ? "<|channel|>final" : "") + "<|message|>" + m.second + "<|end|>";
        }
        return add_assistant ? out + "<|start|>assistant" : out;
    }
    std::vector<llama_chat_message> chat;
    size_t total = 0;
    for (const auto & m : messages) {
        chat.push_back({ m.first.c_str(), m.second.c_str() });
        total += m.second.size();
    }
    std::vector<char> buf(total * 2 + 256);
    int32_t n = llama_chat_apply_template(template_.c_str(), chat.data(), chat.size(), add_assistant, buf.data(), (int32_t) buf.size());
    if (n > (int32_t) buf.size()) {
        buf.resize((size_t) n);
        n = llama_chat_apply_template(template_.c_str(), chat.data(), chat.size(), add_assistant, buf.data(), (int32_t) buf.size());
    }
    if (n < 0) {
        throw fml_error(FML_ERR_TEMPLATE, "chat template could not be applied");
    }
    return std::string(buf.data(), (size_t) n);
}

namespace {

const std::string SENTINEL_A = "\x1e" "FML_A" "\x1e";
const std::string SENTINEL_B = "\x1e" "FML_B" "\x1e";

// Splits `rendered` around `sentinel`; false when the template dropped it.
bool split_at(const std::string & rendered, const std::string & sentinel, std::string & before, std::string & after) {
    const size_t at = rendered.find(sentinel);
    if (at == std::string::npos) {
        return false;
    }
    before = rendered.substr(0, at);
    after = rendered.substr(at + sentinel.size());
    return true;
}

bool ends_with(const std::string & s, const std::string & tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

std::string trim_spaces(const std::string & s) {
    const size_t a = s.find_first_not_of(" \t\n\r\v\f");
    if (a == std::string::npos) {
        return std::string();
    }
    const size_t b = s.find_last_not_of(" \t\n\r\v\f");
    return s.substr(a, b - a + 1);
}

} // namespace

void fml_model::compute_frames() {
    // Messages are framed one at a time (history is never re-rendered): each frame is the text the
    // template puts around a sentinel content. Whether the template trims content is seen by padding
    // the sentinel with spaces.
    auto & user = frames_[(int) frame_kind::user];
    auto & lone_user = frames_[(int) frame_kind::first_user];
    auto & first_user = frames_[(int) frame_kind::first_user_after_system];
    auto & system = frames_[(int) frame_kind::system];
    auto & assistant = frames_[(int) frame_kind::assistant];
    if (info_.framing == "plain") {
        user = { "User: ", "\nAssistant:" };
        lone_user = user;
        first_user = user;
        system = { "", "\n\n" };
        assistant = { "", "\n" };
    } else {
        render_frames();
    }
    // What the rendered conversation has right before each message: a reply follows the generation
    // prompt, a later user turn the previous reply's closing, the first user turn of a merged
    // template the system prompt's tail.
    assistant.left = user.suffix;
    user.left = assistant.suffix;
    first_user.left = system.suffix;
    for (int k = 0; k < FRAME_KINDS; ++k) {
        message_frame & f = frames_[k];
        try {
            f.prefix_tokens = tokenize(f.prefix, false, true);
            f.suffix_tokens = tokenize(f.suffix, false, true);
            f.left_tokens = tokenize(f.left, false, true);
        } catch (const fml_error & e) {
            // Like a template that cannot frame this kind: the chat that needs it gets the error.
            if (frame_errors_[k].empty()) {
                frame_errors_[k] = e.what();
                frame_error_codes_[k] = e.code();
            }
        }
    }
}

void fml_model::render_frames() {
    auto & user = frames_[(int) frame_kind::user];
    auto & lone_user = frames_[(int) frame_kind::first_user];
    auto & first_user = frames_[(int) frame_kind::first_user_after_system];
    auto & system = frames_[(int) frame_kind::system];
    auto & assistant = frames_[(int) frame_kind::assistant];
    const std::string padded = " " + SENTINEL_A + " ";
    // A template trims content when padding it changes nothing. (Looking for the padded sentinel in
    // the rendering missed Llama 2's, whose frame has a space on both sides of the stripped content.)
    auto trims = [&](const auto & render) { return render(padded) == render(SENTINEL_A); };
    auto fail = [&](frame_kind k, const std::string & why) { frame_errors_[(int) k] = why; };
    try {
        if (!split_at(apply_template({ { "user", SENTINEL_A } }, true), SENTINEL_A, lone_user.prefix, lone_user.suffix)) {
            fail(frame_kind::first_user, "the chat template drops the content of user messages");
            fail(frame_kind::user, "the chat template drops the content of user messages");
        }
        lone_user.trim = trims([&](const std::string & c) { return apply_template({ { "user", c } }, true); });
        // A later user message: what it adds to a conversation of one exchange.
        const std::string exchange = apply_template({ { "user", "u" }, { "assistant", "a" } }, false);
        auto after_exchange = [&](const std::string & content) {
            std::string r = apply_template({ { "user", "u" }, { "assistant", "a" }, { "user", content } }, true);
            return r.compare(0, exchange.size(), exchange) == 0 ? r.substr(exchange.size()) : std::string();
        };
        if (!split_at(after_exchange(SENTINEL_A), SENTINEL_A, user.prefix, user.suffix)) {
            user = lone_user;   // the template re-renders earlier turns differently: frame like the first
        } else {
            user.trim = trims(after_exchange);
        }

        // The assistant's frame is what its message adds after a user turn with the generation prompt.
        const std::string context = apply_template({ { "user", "u" } }, true);
        auto after_user = [&](const std::string & content) {
            std::string r = apply_template({ { "user", "u" }, { "assistant", content } }, false);
            // A generation prompt the finished turn does not have (an opening <think>, say): the frame
            // starts where the two renderings part, never at the start (the probe's user message in it).
            const size_t common = (size_t) (std::mismatch(context.begin(), context.begin() + (long) std::min(context.size(), r.size()), r.begin()).first - context.begin());
            return r.substr(common);
        };
        if (!split_at(after_user(SENTINEL_A), SENTINEL_A, assistant.prefix, assistant.suffix)) {
            fail(frame_kind::assistant, "the chat template drops the content of assistant messages");
        }
        assistant.trim = trims(after_user);

        // The system prompt is framed with the first user turn, because some templates (Gemma,
        // Mistral) put it inside that turn: system + user renders as A S B U C. When B ends with the
        // usual user prefix, the system prompt is a message of its own; otherwise B belongs to the
        // system prompt and the first user turn starts right at its content.
        std::string a, rest, b, c;
        const std::string both = apply_template({ { "system", SENTINEL_A }, { "user", SENTINEL_B } }, true);
        if (!split_at(both, SENTINEL_A, a, rest) || !split_at(rest, SENTINEL_B, b, c)) {
            fail(frame_kind::system, "the chat template drops the system prompt");
            fail(frame_kind::first_user_after_system, "the chat template drops the system prompt");
        } else if (ends_with(b, lone_user.prefix)) {
            system = { a, b.substr(0, b.size() - lone_user.prefix.size()), false };
            first_user = lone_user;
        } else {
            system = { a, b, false };
            first_user = { "", c, lone_user.trim };
        }
        system.trim = trims([&](const std::string & c) { return apply_template({ { "system", c }, { "user", SENTINEL_B } }, true); });
    } catch (const fml_error & e) {
        for (auto & err : frame_errors_) {
            if (err.empty()) err = e.what();
        }
    }
}

const message_frame & fml_model::frame_message(frame_kind kind) const {
    if (!frame_errors_[(int) kind].empty()) {
        const std::string & code = frame_error_codes_[(int) kind];
        throw fml_error(code.empty() ? FML_ERR_TEMPLATE : code, frame_errors_[(int) kind]);
    }
    return frames_[(int) kind];
}

std::vector<int32_t> fml_model::frame_tokens(frame_kind kind, const std::string & content, bool with_suffix) const {
    const message_frame & f = frame_message(kind);
    const std::string & suffix_text = with_suffix ? f.suffix : std::string();
    static const std::vector<int32_t> no_tokens;
    const std::vector<int32_t> & suffix = with_suffix ? f.suffix_tokens : no_tokens;
    const std::string body = f.trim ? trim_spaces(content) : content;
    // Tokenized after what precedes the message in the rendered conversation, which is then dropped
    // again: a SentencePiece vocabulary tokenizes text that continues other text differently from
    // text that starts a fragment (its leading space).
    std::vector<int32_t> whole = tokenize(f.left + f.prefix + body + suffix_text, false, true);
    if (whole.size() >= f.left_tokens.size() && std::equal(f.left_tokens.begin(), f.left_tokens.end(), whole.begin())) {
        whole.erase(whole.begin(), whole.begin() + (long) f.left_tokens.size());
    } else {
        whole = tokenize(f.prefix + body + suffix_text, false, true);
    }
    auto specials = [&](const std::vector<int32_t> & toks) {
        size_t n = 0;
        for (int32_t t : toks) {
            // Control tokens only: user-defined ones (Gemma's whitespace runs, HTML tags) match with
            // special parsing off too, so they are no injection.
            n += (llama_vocab_get_attr(vocab_, t) & LLAMA_TOKEN_ATTR_CONTROL) != 0;
        }
        return n;
    };
    if (specials(whole) == specials(f.prefix_tokens) + specials(suffix)) {
        return whole;
    }
    // The content holds the text of a control token: it must stay text, so it is tokenized apart.
    std::vector<int32_t> out = f.prefix_tokens;
    const std::vector<int32_t> text = tokenize(body, false, false);
    out.insert(out.end(), text.begin(), text.end());
    out.insert(out.end(), suffix.begin(), suffix.end());
    return out;
}

} // namespace fml
