// What the files of llama.cpp's common library compiled into fml_llama_common (CMakeLists.txt: the
// JSON-schema converter, the chat templates and their tool-call parsers) take from the rest of it. The
// addon does not link that library (argument parsing, downloads, sampling: none of it is used), so the
// helpers are here, declared by its own headers; and its logger is silent, because its worker thread
// would print to the embedding process's stdout (a server's, say) and outlive the addon.
#include "common.h"
#include "log.h"

#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

std::string string_join(const std::vector<std::string> & values, const std::string & separator) {
    std::string out;
    for (size_t i = 0; i < values.size(); ++i) {
        if (i > 0) {
            out += separator;
        }
        out += values[i];
    }
    return out;
}

std::vector<std::string> string_split(const std::string & str, const std::string & delimiter) {
    if (delimiter.empty()) {
        return { str };
    }
    std::vector<std::string> parts;
    size_t start = 0;
    for (size_t end = str.find(delimiter); end != std::string::npos; end = str.find(delimiter, start)) {
        parts.push_back(str.substr(start, end - start));
        start = end + delimiter.size();
    }
    parts.push_back(str.substr(start));
    return parts;
}

std::string string_repeat(const std::string & str, size_t n) {
    std::string out;
    out.reserve(str.size() * n);
    for (size_t i = 0; i < n; ++i) {
        out += str;
    }
    return out;
}

void string_replace_all(std::string & s, const std::string & search, const std::string & replace) {
    if (search.empty()) {
        return;
    }
    std::string out;
    size_t from = 0;
    for (size_t at = s.find(search); at != std::string::npos; at = s.find(search, from)) {
        out.append(s, from, at - from);
        out += replace;
        from = at + search.size();
    }
    out.append(s, from, std::string::npos);
    s = std::move(out);
}

std::vector<llama_token> common_tokenize(const struct llama_vocab * vocab, const std::string & text, bool add_special, bool parse_special) {
    std::vector<llama_token> out(text.size() + 2);
    int32_t n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), add_special, parse_special);
    if (n < 0) {
        out.resize((size_t) -n);
        n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), add_special, parse_special);
    }
    if (n < 0) {
        throw std::runtime_error("tokenization failed");
    }
    out.resize((size_t) n);
    return out;
}

std::string common_token_to_piece(const struct llama_vocab * vocab, llama_token token, bool special) {
    std::string piece(16, '\0');
    int32_t n = llama_token_to_piece(vocab, token, piece.data(), (int32_t) piece.size(), 0, special);
    if (n < 0) {
        piece.resize((size_t) -n);
        n = llama_token_to_piece(vocab, token, piece.data(), (int32_t) piece.size(), 0, special);
    }
    piece.resize(n < 0 ? 0 : (size_t) n);
    return piece;
}

// Below every message's verbosity: LOG_TMPL checks this before it formats anything.
int common_log_get_verbosity_thold(void) { return -1; }
struct common_log * common_log_main() { return nullptr; }
void common_log_add(struct common_log *, enum ggml_log_level, const char *, ...) {}
