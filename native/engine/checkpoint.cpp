#include "engine/checkpoint.h"

#include "util/error.h"
#include "util/hash.h"

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <dirent.h>
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

// Options are stored by name, as resolve_chat_options reads them: a checkpoint's options are
// validated exactly like createChat's (a file with a valid checksum can still hold any value).
void put_value(byte_writer & w, const option_value & v) {
    w.put<uint8_t>((uint8_t) v.kind);
    switch (v.kind) {
        case option_value::BOOL:   w.put<uint8_t>(v.boolean ? 1 : 0); break;
        case option_value::NUMBER: w.put<double>(v.number); break;
        case option_value::STRING: w.str(v.text); break;
        default: break;   // chat options are only booleans, numbers and strings
    }
}

option_value get_value(byte_reader & r) {
    option_value v;
    const uint8_t kind = r.get<uint8_t>();
    switch (kind) {
        case option_value::BOOL:   v.kind = option_value::BOOL; v.boolean = r.get<uint8_t>() != 0; break;
        case option_value::NUMBER: v.kind = option_value::NUMBER; v.number = r.get<double>(); break;
        case option_value::STRING: v.kind = option_value::STRING; v.text = r.str(); break;
        default: throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint has an option of an unknown kind");
    }
    return v;
}

void put_options(byte_writer & w, const chat_options & o) {
    const option_map m = chat_options_to_map(o, true);
    w.put<uint64_t>(m.size());
    for (const auto & kv : m) {
        w.str(kv.first);
        put_value(w, kv.second);
    }
}

chat_options resolve_stored(const option_map & m) {
    try {
        return resolve_chat_options(m, 1, true);   // every option is stored by name: no default is used
    } catch (const fml_error & e) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, std::string("the checkpoint's options are not valid: ") + e.what());
    }
}

chat_options get_options(byte_reader & r) {
    const uint64_t n = r.count(2);
    option_map m;
    for (uint64_t i = 0; i < n; ++i) {
        std::string name = r.str();
        m.emplace_back(std::move(name), get_value(r));
    }
    return resolve_stored(m);
}

// Format 1 stored the option struct field by field.
chat_options get_options_v1(byte_reader & r) {
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
    // What format 1 did not store takes the table's default.
    option_map m = chat_options_to_map(o, true);
    m.erase(std::remove_if(m.begin(), m.end(), [](const auto & kv) { return kv.first == "importanceScore" || kv.first == "positions"; }), m.end());
    return resolve_stored(m);
}

std::string errno_text() { return std::strerror(errno); }

// A C string ends at the first NUL: "dir/a\0b" would silently become "dir/a".
void check_path(const std::string & path) {
    if (path.empty() || path.find('\0') != std::string::npos) {
        throw fml_error(FML_ERR_CHECKPOINT_IO, path.empty() ? "checkpoint path is empty" : "checkpoint path contains a NUL character");
    }
}

std::pair<std::string, std::string> split_path(const std::string & path) {
    const size_t slash = path.find_last_of('/');
    if (slash == std::string::npos) return { ".", path };
    return { slash == 0 ? "/" : path.substr(0, slash), path.substr(slash + 1) };
}

// "<name>.tmp-<pid>-<digits>": the pid, or 0 when `file` is not one of our temp files (for `name`,
// when given).
long temp_file_pid(const std::string & file, const std::string & name) {
    const size_t at = file.rfind(".tmp-");
    if (at == std::string::npos || at == 0 || (!name.empty() && file.compare(0, at, name) != 0) || (!name.empty() && at != name.size())) {
        return 0;
    }
    const char * p = file.c_str() + at + 5;
    char * end = nullptr;
    const long pid = strtol(p, &end, 10);
    if (end == p || *end != '-' || pid <= 0) return 0;
    p = end + 1;
    if (*p == '\0') return 0;
    for (; *p; ++p) {
        if (*p < '0' || *p > '9') return 0;
    }
    return pid;
}

} // namespace

size_t remove_stale_checkpoint_temps(const std::string & dir, const std::string & only_name) {
    DIR * d = opendir(dir.c_str());
    if (d == nullptr) {
        return 0;
    }
    size_t removed = 0;
    while (dirent * e = readdir(d)) {
        const long pid = temp_file_pid(e->d_name, only_name);
        // Only files whose writer is gone: a live process (this one included) may be mid-save.
        if (pid > 0 && pid != (long) getpid() && kill((pid_t) pid, 0) != 0 && errno == ESRCH) {
            const std::string file = dir + "/" + e->d_name;
            if (unlink(file.c_str()) == 0) {
                ++removed;
            }
        }
    }
    closedir(d);
    return removed;
}

std::vector<uint8_t> encode_checkpoint(const std::string & fingerprint, const chat_state & s, bool ledger_only) {
    ledger_only = ledger_only || s.ledger_only;
    byte_writer w;
    w.raw(MAGIC, sizeof(MAGIC));
    w.put<uint32_t>(CHECKPOINT_FORMAT_VERSION);
    w.put<uint32_t>(ledger_only ? CHECKPOINT_FLAG_LEDGER_ONLY : 0);
    w.str(fingerprint);
    put_options(w, s.options);
    w.put<uint32_t>(s.turn);
    w.put<uint8_t>(s.started ? 1 : 0);
    w.put<uint64_t>(s.carry.size());
    for (int32_t t : s.carry) w.put<int32_t>(t);
    w.put<uint8_t>(s.carry_reasoning ? 1 : 0);
    w.str(s.summary_text);
    w.put<uint64_t>(s.stats.turns); w.put<uint64_t>(s.stats.tokens_seen); w.put<uint64_t>(s.stats.tokens_evicted);
    w.put<uint64_t>(s.stats.evictions); w.put<uint64_t>(s.stats.fallback_count);
    w.put<uint64_t>(s.stats.compactions);
    w.str(s.transcript);
    w.put<uint64_t>(s.ledger.size());
    for (const ledger_entry & e : s.ledger) {
        w.put<int32_t>(e.token); w.put<int32_t>(e.pos); w.put<uint32_t>(e.turn); w.put<uint8_t>((uint8_t) e.role);
        w.put<uint8_t>(e.pinned ? 1 : 0); w.put<uint8_t>(e.sentence_end ? 1 : 0);
        for (int k = 0; k < LEDGER_SCORE_SLOTS; ++k) w.put<float>(e.score[k]);
    }
    w.put<uint64_t>(s.embedding_dim);
    w.put<uint64_t>(s.embeddings.size());
    w.raw(s.embeddings.data(), s.embeddings.size() * sizeof(float));
    const size_t n_kv = ledger_only ? 0 : s.kv.size();
    w.put<uint64_t>(n_kv);
    w.raw(s.kv.data(), n_kv);
    fnv1a64 h;
    h.add(w.buf.data(), w.buf.size());
    w.put<uint64_t>(h.value());
    return std::move(w.buf);
}

void write_checkpoint(const std::string & path, const std::string & fingerprint, const chat_state & s) {
    check_path(path);
    byte_writer w;
    w.buf = encode_checkpoint(fingerprint, s, false);

    // Atomic replace: temp file next to the target, fsync, rename, fsync the directory. A process
    // killed mid-save leaves its temp file behind; the next save of the same target removes it.
    const auto [dir, name] = split_path(path);
    remove_stale_checkpoint_temps(dir, name);
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
    const int dfd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
}

chat_state read_checkpoint(const std::string & path, const std::string & expected_fingerprint) {
    check_path(path);
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
    if (got != buf.size()) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint is truncated: " + path);
    }
    try {
        return decode_checkpoint(buf.data(), buf.size(), expected_fingerprint);
    } catch (const fml_error & e) {
        throw fml_error(e.code(), std::string(e.what()) + ": " + path);
    }
}

chat_state decode_checkpoint(const uint8_t * data, size_t size, const std::string & expected_fingerprint, bool any_model) {
    if (size < sizeof(MAGIC) + 8 + 8) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint is truncated");
    }
    if (memcmp(data, MAGIC, sizeof(MAGIC)) != 0) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "not a finite-memory-llm checkpoint");
    }
    uint32_t version = 0;
    uint32_t flags = 0;
    memcpy(&version, data + sizeof(MAGIC), sizeof(version));
    memcpy(&flags, data + sizeof(MAGIC) + 4, sizeof(flags));
    if (version == 0) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint has an invalid format version");
    }
    if (version > CHECKPOINT_FORMAT_VERSION) {
        throw fml_error(FML_ERR_CHECKPOINT_VERSION, "checkpoint format version " + std::to_string(version) +
                        " is newer than this library's (" + std::to_string(CHECKPOINT_FORMAT_VERSION) + ")");
    }
    uint64_t stored = 0;
    memcpy(&stored, data + size - 8, 8);
    fnv1a64 h;
    h.add(data, size - 8);
    if (h.value() != stored) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint checksum mismatch (corrupted or truncated)");
    }
    if ((flags & ~CHECKPOINT_FLAG_LEDGER_ONLY) != 0 || (version < 4 && flags != 0)) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint has unknown flags");
    }
    byte_reader r(data + sizeof(MAGIC) + 8, size - sizeof(MAGIC) - 8 - 8);
    const std::string fingerprint = r.str();
    if (!any_model && fingerprint != expected_fingerprint) {
        throw fml_error(FML_ERR_CHECKPOINT_MODEL, "checkpoint was made with another model (fingerprint " + fingerprint +
                        ", this model " + expected_fingerprint + ")");
    }
    chat_state s;
    s.ledger_only = (flags & CHECKPOINT_FLAG_LEDGER_ONLY) != 0;
    s.options = version == 1 ? get_options_v1(r) : get_options(r);
    s.turn = r.get<uint32_t>();
    s.started = r.get<uint8_t>() != 0;
    const uint64_t n_carry = r.count(4);
    for (uint64_t i = 0; i < n_carry; ++i) s.carry.push_back(r.get<int32_t>());
    s.carry_reasoning = version >= 6 && r.get<uint8_t>() != 0;
    s.summary_text = r.str();
    s.stats.turns = r.get<uint64_t>(); s.stats.tokens_seen = r.get<uint64_t>(); s.stats.tokens_evicted = r.get<uint64_t>();
    s.stats.evictions = r.get<uint64_t>(); s.stats.fallback_count = r.get<uint64_t>();
    s.stats.compactions = version >= 3 ? r.get<uint64_t>() : 0;
    s.transcript = version >= 4 ? r.str() : "";
    // Entries of format 5 keep three score slots, earlier ones two: the bound uses the version's size.
    const uint64_t n_ledger = r.count(15 + 4 * (version >= 5 ? LEDGER_SCORE_SLOTS : 2));
    s.ledger.resize(n_ledger);
    for (ledger_entry & e : s.ledger) {
        e.token = r.get<int32_t>(); e.pos = r.get<int32_t>(); e.turn = r.get<uint32_t>();
        const uint8_t role = r.get<uint8_t>();
        if (role > (version >= 6 ? TOKEN_ROLE_REASONING : TOKEN_ROLE_SUMMARY)) {
            throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint has an invalid token role");
        }
        e.role = (token_role) role;
        e.pinned = r.get<uint8_t>() != 0; e.sentence_end = r.get<uint8_t>() != 0;
        // Format 5 keeps three score slots (the peak added); earlier ones two (the peak starts at 0).
        const int slots = version >= 5 ? LEDGER_SCORE_SLOTS : 2;
        for (int k = 0; k < LEDGER_SCORE_SLOTS; ++k) e.score[k] = k < slots ? r.get<float>() : 0.0f;
    }
    s.embedding_dim = r.get<uint64_t>();
    const uint64_t n_emb = r.count(4);
    s.embeddings.resize(n_emb);
    r.raw(s.embeddings.data(), n_emb * sizeof(float));
    const uint64_t n_kv = r.count(1);
    if (s.ledger_only && n_kv != 0) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "a ledger-only checkpoint holds a KV state");
    }
    s.kv.resize(n_kv);
    r.raw(s.kv.data(), n_kv);
    if (r.remaining() != 0) {
        throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, "checkpoint has trailing bytes");
    }
    return s;
}

} // namespace fml
