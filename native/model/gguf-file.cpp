#include "model/gguf-file.h"

#include "util/error.h"
#include "util/hash.h"

#include "gguf.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <sys/stat.h>
#include <vector>

namespace fml {

static size_t gguf_scalar_size(enum gguf_type t) {
    switch (t) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
        case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
        case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
        default: return 0;
    }
}

// Metadata and tensor layout, plus the first bytes of every tensor's data: two files with the same
// shapes but different weights (fine-tunes, other seeds) must not share a fingerprint.
static std::string gguf_fingerprint(const gguf_context * g, FILE * f) {
    fnv1a64 h;
    for (int64_t k = 0; k < gguf_get_n_kv(g); ++k) {
        h.add_str(gguf_get_key(g, k));
        const enum gguf_type t = gguf_get_kv_type(g, k);
        h.add(&t, sizeof(t));
        if (t == GGUF_TYPE_STRING) {
            h.add_str(gguf_get_val_str(g, k));
        } else if (t == GGUF_TYPE_ARRAY) {
            const enum gguf_type at = gguf_get_arr_type(g, k);
            const uint64_t n = gguf_get_arr_n(g, k);
            h.add(&at, sizeof(at));
            h.add(&n, sizeof(n));
            if (at == GGUF_TYPE_STRING) {
                for (uint64_t i = 0; i < n; ++i) {
                    h.add_str(gguf_get_arr_str(g, k, i));
                }
            } else if (gguf_scalar_size(at) > 0) {
                h.add(gguf_get_arr_data(g, k), n * gguf_scalar_size(at));
            }
        } else if (gguf_scalar_size(t) > 0) {
            h.add(gguf_get_val_data(g, k), gguf_scalar_size(t));
        }
    }
    for (int64_t i = 0; i < gguf_get_n_tensors(g); ++i) {
        h.add_str(gguf_get_tensor_name(g, i));
        const enum ggml_type tt = gguf_get_tensor_type(g, i);
        h.add(&tt, sizeof(tt));
        h.add(gguf_get_tensor_ne(g, i), sizeof(int64_t) * GGML_MAX_DIMS);
        const uint64_t off = gguf_get_tensor_offset(g, i);
        h.add(&off, sizeof(off));
        if (f != nullptr) {
            unsigned char sample[256];
            const size_t want = std::min<size_t>(sizeof(sample), gguf_get_tensor_size(g, i));
            if (fseeko(f, (off_t) (gguf_get_data_offset(g) + off), SEEK_SET) == 0) {
                const size_t got = fread(sample, 1, want, f);
                h.add(sample, got);
            }
        }
    }
    return h.hex();
}

// ---- hyperparameters llama.cpp asserts on ---------------------------------------------------------
//
// llama.cpp reads these with GGML_ASSERTs (at load, or in a kernel at the first decode), which abort
// the process; a value of the wrong type it refuses itself with an error, so only values of the
// expected type are judged here. Mirrors llama_model_base::load_hparams and the per-architecture
// loaders of the pinned source.

constexpr int64_t MAX_LAYERS = 512;    // LLAMA_MAX_LAYERS (llama.cpp's llama-hparams.h)
constexpr int64_t MAX_EXPERTS = 1024;  // LLAMA_MAX_EXPERTS

static bool is_int_type(enum gguf_type t) {
    return t == GGUF_TYPE_UINT8 || t == GGUF_TYPE_INT8 || t == GGUF_TYPE_UINT16 || t == GGUF_TYPE_INT16 ||
           t == GGUF_TYPE_UINT32 || t == GGUF_TYPE_INT32 || t == GGUF_TYPE_UINT64 || t == GGUF_TYPE_INT64;
}

static int64_t int_at(enum gguf_type t, const void * p) {
    switch (t) {
        case GGUF_TYPE_UINT8:  return *(const uint8_t *) p;
        case GGUF_TYPE_INT8:   return *(const int8_t *) p;
        case GGUF_TYPE_UINT16: return *(const uint16_t *) p;
        case GGUF_TYPE_INT16:  return *(const int16_t *) p;
        case GGUF_TYPE_UINT32: return *(const uint32_t *) p;
        case GGUF_TYPE_INT32:  return *(const int32_t *) p;
        case GGUF_TYPE_UINT64: { const uint64_t v = *(const uint64_t *) p; return v > (uint64_t) INT64_MAX ? INT64_MAX : (int64_t) v; }
        case GGUF_TYPE_INT64:  return *(const int64_t *) p;
        default:               return 0;
    }
}

// The integer value(s) of `key`: a scalar, or every item of an array (per-layer values); empty when
// the key is absent or holds something else.
static std::vector<int64_t> ints_of(const gguf_context * g, const std::string & key) {
    std::vector<int64_t> out;
    const int64_t k = gguf_find_key(g, key.c_str());
    if (k < 0) {
        return out;
    }
    const enum gguf_type t = gguf_get_kv_type(g, k);
    if (is_int_type(t)) {
        out.push_back(int_at(t, gguf_get_val_data(g, k)));
    } else if (t == GGUF_TYPE_ARRAY && is_int_type(gguf_get_arr_type(g, k))) {
        const enum gguf_type at = gguf_get_arr_type(g, k);
        const auto * data = (const uint8_t *) gguf_get_arr_data(g, k);
        for (size_t i = 0; i < gguf_get_arr_n(g, k); ++i) {
            out.push_back(int_at(at, data + i * gguf_scalar_size(at)));
        }
    }
    return out;
}

static std::optional<int64_t> int_of(const gguf_context * g, const std::string & key) {
    const std::vector<int64_t> v = ints_of(g, key);
    if (v.empty() || gguf_get_kv_type(g, gguf_find_key(g, key.c_str())) == GGUF_TYPE_ARRAY) {
        return std::nullopt;
    }
    return v[0];
}

static void check_hparams(const gguf_context * g, const std::string & path) {
    const int64_t arch_key = gguf_find_key(g, "general.architecture");
    if (arch_key < 0 || gguf_get_kv_type(g, arch_key) != GGUF_TYPE_STRING) {
        return;   // refused by the caller, or by llama.cpp
    }
    const std::string arch = gguf_get_val_str(g, arch_key);
    const auto key = [&](const char * k) { return arch + "." + k; };
    const auto refuse = [&](const std::string & why) {
        throw fml_error(FML_ERR_MODEL_INVALID, "the GGUF's " + why + " (llama.cpp would abort on it): " + path);
    };

    const std::optional<int64_t> layers = int_of(g, key("block_count"));
    if (layers && (*layers < 1 || *layers > MAX_LAYERS)) {
        refuse(key("block_count") + " is " + std::to_string(*layers) + ", not 1.." + std::to_string(MAX_LAYERS));
    }
    const int64_t n_layer = layers.value_or(MAX_LAYERS);
    if (int_of(g, key("nextn_predict_layers")).value_or(0) > n_layer) {
        refuse(key("nextn_predict_layers") + " is more than its block_count");
    }

    // Experts: how many, how many a token uses (per layer), and their groups.
    int64_t experts = int_of(g, key("expert_count")).value_or(0);
    const std::vector<int64_t> used_per_layer = ints_of(g, key("expert_used_count"));
    int64_t used = used_per_layer.empty() ? 0 : *std::max_element(used_per_layer.begin(), used_per_layer.end());
    const int64_t groups = int_of(g, key("expert_group_count")).value_or(0);
    const int64_t groups_used = int_of(g, key("expert_group_used_count")).value_or(0);
    if ((arch == "hunyuan-dense" || arch == "hunyuan_vl") && experts <= 1) {
        experts = used = 0;   // llama.cpp reads these as dense models
    }
    const bool experts_ok = experts == 0
        ? used == 0 && groups == 0
        : experts <= MAX_EXPERTS && used > 0 && used <= experts && groups >= 0 && groups < experts &&
          (groups <= 1 || (experts % groups == 0 && groups_used > 0 && groups_used < groups));
    if (!experts_ok || (used_per_layer.size() > 1 && *std::min_element(used_per_layer.begin(), used_per_layer.end()) < 0)) {
        refuse("expert counts are inconsistent (" + std::to_string(experts) + " experts, " + std::to_string(used) +
               " used per token, " + std::to_string(groups) + " groups, " + std::to_string(groups_used) + " groups used)");
    }

    const int64_t scaling = gguf_find_key(g, key("rope.scaling.type").c_str());
    if (scaling >= 0 && gguf_get_kv_type(g, scaling) == GGUF_TYPE_STRING) {
        const std::string type = gguf_get_val_str(g, scaling);
        if (type != "none" && type != "linear" && type != "yarn" && type != "longrope") {
            refuse(key("rope.scaling.type") + " '" + type + "' is none of none, linear, yarn, longrope");
        }
    }

    // Normalization epsilons: ggml asserts eps >= 0 (a NaN fails it too).
    for (int64_t k = 0; k < gguf_get_n_kv(g); ++k) {
        const std::string name = gguf_get_key(g, k);
        if (name.rfind(arch + ".", 0) != 0 || (name.find("epsilon") == std::string::npos && name.find(".eps") == std::string::npos)) {
            continue;
        }
        std::vector<double> values;
        const enum gguf_type t = gguf_get_kv_type(g, k);
        if (t == GGUF_TYPE_FLOAT32) {
            values.push_back(gguf_get_val_f32(g, k));
        } else if (t == GGUF_TYPE_FLOAT64) {
            values.push_back(gguf_get_val_f64(g, k));
        } else if (t == GGUF_TYPE_ARRAY && gguf_get_arr_type(g, k) == GGUF_TYPE_FLOAT32) {
            const auto * data = (const float *) gguf_get_arr_data(g, k);
            values.assign(data, data + gguf_get_arr_n(g, k));
        }
        for (double v : values) {
            if (!std::isfinite(v) || v < 0) {
                refuse(name + " is " + std::to_string(v) + ", not a finite value >= 0");
            }
        }
    }

    // Hybrids of attention and a recurrent state: every n-th layer attends (n = 0 divides by zero).
    if (int_of(g, key("full_attention_interval")).value_or(1) < 1) {
        refuse(key("full_attention_interval") + " is 0");
    }

    // M-RoPE: the sections split a head's rotary dimensions (the kernel divides by their sum, asserts
    // one of the first three is used and that they fit the head).
    const std::vector<int64_t> sections = ints_of(g, key("rope.dimension_sections"));
    if (!sections.empty()) {
        int64_t sum = 0;
        bool negative = false;
        for (int64_t v : sections) {
            negative = negative || v < 0;
            sum += std::max<int64_t>(v, 0);
        }
        const int64_t head = int_of(g, key("rope.dimension_count")).value_or(int_of(g, key("attention.key_length")).value_or(INT64_MAX));
        const bool spatial = (sections.size() > 0 && sections[0] > 0) || (sections.size() > 1 && sections[1] > 0) || (sections.size() > 2 && sections[2] > 0);
        if (negative || !spatial || sum > head) {
            refuse(key("rope.dimension_sections") + " are negative, all zero or more than the head's rotary dimensions");
        }
    }

    // Recurrent layers' sizes, which the graph asserts on at the first decode (or the loader at load).
    const std::optional<int64_t> d_inner = int_of(g, key("ssm.inner_size"));
    const std::optional<int64_t> ssm_heads = int_of(g, key("ssm.time_step_rank"));
    const std::optional<int64_t> ssm_groups = int_of(g, key("ssm.group_count"));
    const std::optional<int64_t> ssm_state = int_of(g, key("ssm.state_size"));
    // Mamba-2 (build_mamba2_layer): heads and groups split the inner size; the CPU scan splits heads by groups.
    if ((arch == "mamba2" || arch == "granitehybrid" || arch == "nemotron_h" || arch == "nemotron_h_moe" || arch == "falcon-h1") &&
        d_inner && ssm_heads && ssm_groups &&
        (*ssm_heads < 1 || *ssm_groups < 1 || *d_inner % *ssm_heads != 0 || *d_inner % *ssm_groups != 0 || *ssm_heads % *ssm_groups != 0)) {
        refuse("Mamba-2 sizes do not divide (inner " + std::to_string(*d_inner) + ", " + std::to_string(*ssm_heads) + " heads, " +
               std::to_string(*ssm_groups) + " groups)");
    }
    const std::optional<int64_t> embd = int_of(g, key("embedding_length"));
    if (arch == "granitehybrid" && d_inner && embd && *d_inner != 2 * *embd) {
        refuse(key("ssm.inner_size") + " is not twice its embedding_length (the only expansion llama.cpp supports)");
    }
    // Gated DeltaNet (Qwen3.5, Qwen3-Next): value heads of state_size values, a whole number per key head.
    if ((arch == "qwen35" || arch == "qwen35moe" || arch == "qwen3next") && d_inner && ssm_heads && ssm_groups && ssm_state &&
        (*ssm_heads < 1 || *ssm_groups < 1 || *ssm_heads % *ssm_groups != 0 || *d_inner != *ssm_state * *ssm_heads)) {
        refuse("Gated DeltaNet sizes disagree (inner " + std::to_string(*d_inner) + ", state " + std::to_string(*ssm_state) + " x " +
               std::to_string(*ssm_heads) + " value heads, " + std::to_string(*ssm_groups) + " key heads)");
    }
    // Latent attention (DeepSeek-V2/V3, GLM-4.7-Flash): a head's key holds the rotary dims and at least
    // one more, and every head reads the one latent row a token caches.
    if (arch == "deepseek2") {
        const std::optional<int64_t> heads = int_of(g, key("attention.head_count"));
        const int64_t head_default = embd && heads && *heads > 0 ? *embd / *heads : 0;
        const int64_t key_len = int_of(g, key("attention.key_length")).value_or(head_default);
        const std::optional<int64_t> key_mla = int_of(g, key("attention.key_length_mla"));
        const bool mla = key_mla && int_of(g, key("attention.value_length_mla"));
        const int64_t rot = int_of(g, key("rope.dimension_count")).value_or(key_len);
        if (key_mla.value_or(key_len) - rot < 1) {
            refuse("latent attention keys have no dims besides their " + std::to_string(rot) + " rotary ones");
        }
        for (int64_t kv_heads : ints_of(g, key("attention.head_count_kv"))) {
            if (mla && kv_heads != 1) {
                refuse("latent attention has " + std::to_string(kv_heads) + " KV heads, not the one latent row every head reads");
            }
        }
    }

    // Gemma 4: the last shared_kv_layers reuse the KV of earlier ones; at least two keep their own.
    if (arch == "gemma4") {
        const int64_t shared = int_of(g, key("attention.shared_kv_layers")).value_or(0);
        if (n_layer - shared < 2) {
            refuse(key("attention.shared_kv_layers") + " leaves fewer than two layers with a KV cache of their own");
        }
    }

    // Token texts must be unique (the vocabulary maps text to id).
    const int64_t tokens = gguf_find_key(g, "tokenizer.ggml.tokens");
    if (tokens >= 0 && gguf_get_kv_type(g, tokens) == GGUF_TYPE_ARRAY && gguf_get_arr_type(g, tokens) == GGUF_TYPE_STRING) {
        std::vector<std::string_view> seen;
        seen.reserve(gguf_get_arr_n(g, tokens));
        for (size_t i = 0; i < gguf_get_arr_n(g, tokens); ++i) {
            const char * text = gguf_get_arr_str(g, tokens, i);
            if (*text != '\0') {
                seen.emplace_back(text);   // empty ones llama.cpp names [EMPTY_<id>]
            }
        }
        std::sort(seen.begin(), seen.end());
        const auto dup = std::adjacent_find(seen.begin(), seen.end());
        if (dup != seen.end()) {
            refuse("vocabulary holds the token '" + std::string(*dup).substr(0, 40) + "' twice");
        }
    }
}

std::string validate_gguf_file(const std::string & path) {
    struct stat st {};
    if (path.empty() || stat(path.c_str(), &st) != 0) {
        throw fml_error(FML_ERR_MODEL_NOT_FOUND, "model file not found: " + path);
    }
    if (S_ISDIR(st.st_mode)) {
        throw fml_error(FML_ERR_MODEL_INVALID, "model path is a directory: " + path);
    }
    FILE * f = fopen(path.c_str(), "rb");
    if (f == nullptr) {
        throw fml_error(FML_ERR_MODEL_NOT_FOUND, "model file is not readable: " + path);
    }
    char magic[4] = {0};
    const size_t n = fread(magic, 1, 4, f);
    fclose(f);
    if (n < 4 || memcmp(magic, "GGUF", 4) != 0) {
        throw fml_error(FML_ERR_MODEL_INVALID, "not a GGUF file (bad magic): " + path);
    }
    // gguf's own parser reports malformed headers by returning NULL (no abort).
    gguf_init_params params = { /*no_alloc =*/ true, /*ctx =*/ nullptr };
    gguf_context * g = gguf_init_from_file(path.c_str(), params);
    if (g == nullptr) {
        throw fml_error(FML_ERR_MODEL_INVALID, "malformed GGUF header: " + path);
    }
    const size_t data_offset = gguf_get_data_offset(g);
    const int64_t n_tensors = gguf_get_n_tensors(g);
    uint64_t data_end = data_offset;
    for (int64_t i = 0; i < n_tensors; ++i) {
        const uint64_t end = data_offset + gguf_get_tensor_offset(g, i) + gguf_get_tensor_size(g, i);
        data_end = end > data_end ? end : data_end;
    }
    const bool has_arch = gguf_find_key(g, "general.architecture") >= 0;
    try {
        check_hparams(g, path);
    } catch (...) {
        gguf_free(g);
        throw;
    }
    std::string fingerprint;
    if (data_end <= (uint64_t) st.st_size) {
        FILE * data = fopen(path.c_str(), "rb");
        fingerprint = gguf_fingerprint(g, data);
        if (data != nullptr) {
            fclose(data);
        }
    }
    gguf_free(g);
    if (n_tensors == 0) {
        throw fml_error(FML_ERR_MODEL_INVALID, "GGUF file holds no tensors: " + path);
    }
    if (!has_arch) {
        throw fml_error(FML_ERR_MODEL_INVALID, "GGUF file has no general.architecture: " + path);
    }
    if (data_end > (uint64_t) st.st_size) {
        throw fml_error(FML_ERR_MODEL_INVALID,
                        "truncated GGUF file: tensor data ends at byte " + std::to_string(data_end) +
                        " but the file has " + std::to_string((uint64_t) st.st_size) + ": " + path);
    }
    return fingerprint;
}

} // namespace fml
