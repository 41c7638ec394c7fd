#include "checkpoint.h"

#include "error.h"
#include "hash.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <random>
#include <sys/stat.h>
#include <unistd.h>

namespace fml {

static const char MAGIC[8] = { 'F', 'M', 'L', 'C', 'K', 'P', 'T', '\0' };

namespace {

class byte_writer {
public:
    std::vector<uint8_t> buf;
    void raw(const void * p, size_t n) { buf.insert(buf.end(), (const uint8_t *) p, (const uint8_t *) p + n); }
    template <typename T> void put(T v) { raw(&v, sizeof(v)); }
    void str(const std::string & s) { put<uint64_t>(s.size()); raw(s.data(), s.size()); }
};

class byte_reader {
public:
    byte_reader(const uint8_t * p, size_t n) : p_(p), n_(n) {}
    void raw(void * out, size_t n) {
        if (n > n_ - off_) {
            throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint is truncated or malformed");
        }
        memcpy(out, p_ + off_, n);
        off_ += n;
    }
    template <typename T> T get() { T v; raw(&v, sizeof(v)); return v; }
    uint64_t count(size_t elem_size) {
        const uint64_t n = get<uint64_t>();
        if (elem_size > 0 && n > (n_ - off_) / elem_size) {
            throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint has an impossible length field");
        }
        return n;
    }
    std::string str() {
        const uint64_t n = count(1);
        std::string s(n, '\0');
        raw(s.data(), n);
        return s;
    }
    size_t remaining() const { return n_ - off_; }
private:
    const uint8_t * p_;
    size_t n_;
    size_t off_ = 0;
};

void put_options(byte_writer & w, const chat_options & o) {
    const policy_options & p = o.policy;
    w.str(p.name);
    w.put<uint32_t>(p.max_tokens); w.put<uint32_t>(p.window_size); w.put<uint32_t>(p.sink_tokens);
    w.put<float>(p.importance_decay); w.put<uint8_t>(p.importance_granularity_spans ? 1 : 0);
    w.put<uint32_t>(p.semantic_clusters); w.put<uint32_t>(p.span_max_tokens); w.put<uint32_t>(p.seed);
    w.put<uint32_t>(p.summary_tokens); w.put<float>(p.hybrid_importance_share);
    w.str(o.system_prompt);
    w.put<int32_t>(o.threads); w.put<int32_t>(o.batch_size); w.str(o.kv_type); w.put<int32_t>(o.flash_attention);
    w.put<double>(o.max_policy_ms);
}

chat_options get_options(byte_reader & r) {
    chat_options o;
    policy_options & p = o.policy;
    p.name = r.str();
    p.max_tokens = r.get<uint32_t>(); p.window_size = r.get<uint32_t>(); p.sink_tokens = r.get<uint32_t>();
    p.importance_decay = r.get<float>(); p.importance_granularity_spans = r.get<uint8_t>() != 0;
    p.semantic_clusters = r.get<uint32_t>(); p.span_max_tokens = r.get<uint32_t>(); p.seed = r.get<uint32_t>();
    p.summary_tokens = r.get<uint32_t>(); p.hybrid_importance_share = r.get<float>();
    o.system_prompt = r.str();
    o.threads = r.get<int32_t>(); o.batch_size = r.get<int32_t>(); o.kv_type = r.str(); o.flash_attention = r.get<int32_t>();
    o.max_policy_ms = r.get<double>();
    return o;
}

std::string errno_text() { return std::strerror(errno); }

} // namespace

void write_checkpoint(const std::string & path, const std::string & fingerprint, const chat_state & s) {
    byte_writer w;
    w.raw(MAGIC, sizeof(MAGIC));
    w.put<uint32_t>(CHECKPOINT_FORMAT_VERSION);
    w.put<uint32_t>(0);
    w.str(fingerprint);
    put_options(w, s.options);
    w.put<uint32_t>(s.turn);
    w.put<uint8_t>(s.started ? 1 : 0);
    w.put<uint64_t>(s.carry.size());
    for (int32_t t : s.carry) w.put<int32_t>(t);
    w.str(s.summary_text);
    w.put<uint64_t>(s.stats.turns); w.put<uint64_t>(s.stats.tokens_seen); w.put<uint64_t>(s.stats.tokens_evicted);
    w.put<uint64_t>(s.stats.evictions); w.put<uint64_t>(s.stats.fallback_count);
    w.put<uint64_t>(s.ledger.size());
    for (const ledger_entry & e : s.ledger) {
        w.put<int32_t>(e.token); w.put<int32_t>(e.pos); w.put<uint32_t>(e.turn); w.put<uint8_t>((uint8_t) e.role);
        w.put<uint8_t>(e.pinned ? 1 : 0); w.put<uint8_t>(e.sentence_end ? 1 : 0);
        for (int k = 0; k < LEDGER_SCORE_SLOTS; ++k) w.put<float>(e.score[k]);
    }
    w.put<uint64_t>(s.embedding_dim);
    w.put<uint64_t>(s.embeddings.size());
    w.raw(s.embeddings.data(), s.embeddings.size() * sizeof(float));
    w.put<uint64_t>(s.kv.size());
    w.raw(s.kv.data(), s.kv.size());
    fnv1a64 h;
    h.add(w.buf.data(), w.buf.size());
    w.put<uint64_t>(h.value());

    // Atomic replace: temp file next to the target, fsync, rename, fsync the directory.
    std::random_device rd;
    const std::string tmp = path + ".tmp-" + std::to_string(getpid()) + "-" + std::to_string(rd());
    const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        throw fml_error(FML_ERR_CHECKPOINT_IO, "cannot write checkpoint " + path + ": " + errno_text());
    }
    size_t off = 0;
    while (off < w.buf.size()) {
        const ssize_t n = ::write(fd, w.buf.data() + off, w.buf.size() - off);
        if (n < 0) {
            if (errno == EINTR) continue;
            const std::string why = errno_text();
            close(fd);
            unlink(tmp.c_str());
            throw fml_error(FML_ERR_CHECKPOINT_IO, "cannot write checkpoint " + path + ": " + why);
        }
        off += (size_t) n;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        const std::string why = errno_text();
        unlink(tmp.c_str());
        throw fml_error(FML_ERR_CHECKPOINT_IO, "cannot sync checkpoint " + path + ": " + why);
    }
    if (rename(tmp.c_str(), path.c_str()) != 0) {
        const std::string why = errno_text();
        unlink(tmp.c_str());
        throw fml_error(FML_ERR_CHECKPOINT_IO, "cannot move checkpoint into place at " + path + ": " + why);
    }
    const size_t slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    const int dfd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
}

chat_state read_checkpoint(const std::string & path, const std::string & expected_fingerprint) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) {
        throw fml_error(FML_ERR_CHECKPOINT_IO, "checkpoint not found: " + path);
    }
    if (!S_ISREG(st.st_mode)) {
        throw fml_error(FML_ERR_CHECKPOINT_IO, "checkpoint is not a regular file: " + path);
    }
    std::vector<uint8_t> buf((size_t) st.st_size);
    FILE * f = fopen(path.c_str(), "rb");
    if (f == nullptr) {
        throw fml_error(FML_ERR_CHECKPOINT_IO, "cannot read checkpoint " + path + ": " + errno_text());
    }
    const size_t got = fread(buf.data(), 1, buf.size(), f);
    fclose(f);
    if (got != buf.size() || buf.size() < sizeof(MAGIC) + 8 + 8) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint is truncated: " + path);
    }
    if (memcmp(buf.data(), MAGIC, sizeof(MAGIC)) != 0) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "not a finite-memory-llm checkpoint: " + path);
    }
    uint32_t version = 0;
    memcpy(&version, buf.data() + sizeof(MAGIC), sizeof(version));
    if (version > CHECKPOINT_FORMAT_VERSION) {
        throw fml_error(FML_ERR_CHECKPOINT_VERSION, "checkpoint format version " + std::to_string(version) +
                        " is newer than this library's (" + std::to_string(CHECKPOINT_FORMAT_VERSION) + ")");
    }
    uint64_t stored = 0;
    memcpy(&stored, buf.data() + buf.size() - 8, 8);
    fnv1a64 h;
    h.add(buf.data(), buf.size() - 8);
    if (h.value() != stored) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint checksum mismatch (corrupted or truncated): " + path);
    }
    byte_reader r(buf.data() + sizeof(MAGIC) + 8, buf.size() - sizeof(MAGIC) - 8 - 8);
    const std::string fingerprint = r.str();
    if (fingerprint != expected_fingerprint) {
        throw fml_error(FML_ERR_CHECKPOINT_MODEL, "checkpoint was made with another model (fingerprint " + fingerprint +
                        ", this model " + expected_fingerprint + ")");
    }
    chat_state s;
    s.options = get_options(r);
    s.turn = r.get<uint32_t>();
    s.started = r.get<uint8_t>() != 0;
    const uint64_t n_carry = r.count(4);
    for (uint64_t i = 0; i < n_carry; ++i) s.carry.push_back(r.get<int32_t>());
    s.summary_text = r.str();
    s.stats.turns = r.get<uint64_t>(); s.stats.tokens_seen = r.get<uint64_t>(); s.stats.tokens_evicted = r.get<uint64_t>();
    s.stats.evictions = r.get<uint64_t>(); s.stats.fallback_count = r.get<uint64_t>();
    const uint64_t n_ledger = r.count(15 + 4 * LEDGER_SCORE_SLOTS);
    s.ledger.resize(n_ledger);
    for (ledger_entry & e : s.ledger) {
        e.token = r.get<int32_t>(); e.pos = r.get<int32_t>(); e.turn = r.get<uint32_t>();
        const uint8_t role = r.get<uint8_t>();
        if (role > TOKEN_ROLE_SUMMARY) {
            throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint has an invalid token role");
        }
        e.role = (token_role) role;
        e.pinned = r.get<uint8_t>() != 0; e.sentence_end = r.get<uint8_t>() != 0;
        for (int k = 0; k < LEDGER_SCORE_SLOTS; ++k) e.score[k] = r.get<float>();
    }
    s.embedding_dim = r.get<uint64_t>();
    const uint64_t n_emb = r.count(4);
    s.embeddings.resize(n_emb);
    r.raw(s.embeddings.data(), n_emb * sizeof(float));
    const uint64_t n_kv = r.count(1);
    s.kv.resize(n_kv);
    r.raw(s.kv.data(), n_kv);
    if (r.remaining() != 0) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint has trailing bytes");
    }
    return s;
}

} // namespace fml
