#include "util/utf8.h"

#include <algorithm>

namespace fml {

static size_t utf8_seq_len(unsigned char c) {
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0) return 2;
    if ((c & 0xF0) == 0xE0) return 3;
    if ((c & 0xF8) == 0xF0) return 4;
    return 1;   // continuation or invalid lead byte: treat as a complete (invalid) unit
}

size_t utf8_complete_prefix(const std::string & s) {
    size_t i = 0;
    while (i < s.size()) {
        const size_t len = utf8_seq_len((unsigned char) s[i]);
        if (i + len > s.size()) {
            // Only wait for the rest if the bytes so far are valid continuations.
            bool valid = true;
            for (size_t j = i + 1; j < s.size(); ++j) {
                valid = valid && (((unsigned char) s[j] & 0xC0) == 0x80);
            }
            return valid ? i : s.size();
        }
        i += len;
    }
    return i;
}

std::string utf8_sanitize(const std::string & s) {
    static const char REPLACEMENT[] = "\xEF\xBF\xBD";
    std::string out;
    out.reserve(s.size());
    size_t i = 0;
    while (i < s.size()) {
        const unsigned char c = (unsigned char) s[i];
        if (c < 0x80) {
            out += (char) c;
            ++i;
            continue;
        }
        size_t need = 0;
        unsigned char lower = 0x80;
        unsigned char upper = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            lower = c == 0xE0 ? 0xA0 : 0x80;   // no overlong forms
            upper = c == 0xED ? 0x9F : 0xBF;   // no surrogates
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            lower = c == 0xF0 ? 0x90 : 0x80;
            upper = c == 0xF4 ? 0x8F : 0xBF;   // nothing past U+10FFFF
        }
        size_t j = i + 1;
        size_t got = 0;
        while (got < need && j < s.size()) {
            const unsigned char d = (unsigned char) s[j];
            if (d < lower || d > upper) {
                break;
            }
            lower = 0x80;
            upper = 0xBF;
            ++j;
            ++got;
        }
        if (need > 0 && got == need) {
            out.append(s, i, j - i);
        } else {
            out += REPLACEMENT;   // the lead byte and the valid continuations after it: one U+FFFD
        }
        i = j;
    }
    return out;
}

text_stream::text_stream(std::vector<std::string> stop_strings) {
    for (auto & s : stop_strings) {
        if (!s.empty()) {
            max_stop_ = std::max(max_stop_, s.size());
            stops_.push_back(std::move(s));
        }
    }
}

size_t text_stream::hold_back() const {
    // Longest suffix of the unemitted text that is a proper prefix of some stop string.
    size_t hold = 0;
    const size_t avail = text_.size() - emitted_;
    for (const auto & stop : stops_) {
        for (size_t len = std::min(avail, stop.size() - 1); len > hold; --len) {
            if (text_.compare(text_.size() - len, len, stop, 0, len) == 0) {
                hold = len;
                break;
            }
        }
    }
    return hold;
}

std::string text_stream::push(const std::string & piece) {
    if (stopped_) {
        return {};
    }
    bytes_ += piece;
    const size_t complete = utf8_complete_prefix(bytes_);
    const size_t search_from = text_.size() > max_stop_ ? text_.size() - max_stop_ : 0;
    text_ += utf8_sanitize(bytes_.substr(0, complete));
    bytes_.erase(0, complete);

    size_t cut = std::string::npos;
    for (const auto & stop : stops_) {
        const size_t at = text_.find(stop, search_from);
        if (at != std::string::npos && at < cut) {
            cut = at;
        }
    }
    if (cut != std::string::npos) {
        stopped_ = true;
        text_.resize(std::max(cut, emitted_));
        std::string out = text_.substr(emitted_);
        emitted_ = text_.size();
        return out;
    }
    const size_t end = text_.size() - hold_back();
    std::string out = text_.substr(emitted_, end - emitted_);
    emitted_ = end;
    return out;
}

std::string text_stream::finish() {
    if (!stopped_ && !bytes_.empty()) {
        text_ += utf8_sanitize(bytes_);   // a dangling partial character: U+FFFD
        bytes_.clear();
    }
    std::string out = text_.substr(emitted_);
    emitted_ = text_.size();
    return out;
}

} // namespace fml
