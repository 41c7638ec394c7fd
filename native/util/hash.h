// FNV-1a 64: a small, stable hash for model fingerprints and checkpoint checksums (integrity against
// truncation and corruption, not an adversary).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace fml {

class fnv1a64 {
public:
    void add(const void * data, size_t n) {
        const uint8_t * p = static_cast<const uint8_t *>(data);
        for (size_t i = 0; i < n; ++i) {
            h_ ^= p[i];
            h_ *= 0x100000001b3ULL;
        }
    }
    void add_str(const std::string & s) {
        const uint64_t n = s.size();
        add(&n, sizeof(n));
        add(s.data(), s.size());
    }
    uint64_t value() const { return h_; }
    std::string hex() const {
        static const char * digits = "0123456789abcdef";
        std::string out(16, '0');
        for (int i = 0; i < 16; ++i) {
            out[(size_t) (15 - i)] = digits[(h_ >> (4 * i)) & 0xF];
        }
        return out;
    }
private:
    uint64_t h_ = 0xcbf29ce484222325ULL;
};

} // namespace fml
