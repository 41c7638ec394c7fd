// Checkpoint files: a chat's KV state, token ledger, policy state (scores, embeddings, summary),
// options and counters, behind a versioned header with the model's fingerprint and a checksum.
//
//   "FMLCKPT\0"  u32 format version  u32 flags(0)
//   str model fingerprint
//   options, session counters, ledger (+ embeddings), KV blob     (little-endian, length-prefixed)
//   u64 FNV-1a 64 of every byte before it
//
// Writes are atomic: a temp file in the same directory, fsync, rename, fsync of the directory; a crash
// mid-save leaves the previous checkpoint intact. Reads validate everything before touching a chat.
#pragma once

#include "engine/sequence.h"

#include <string>

namespace fml {

// 1: options as a struct; 2: options by name (validated by resolve_chat_options when read);
// 3: the compaction counter (positions may have gaps: kept positions).
constexpr uint32_t CHECKPOINT_FORMAT_VERSION = 3;

void write_checkpoint(const std::string & path, const std::string & model_fingerprint, const chat_state & state);

// Deletes temp files of a save whose process died (kill -9 mid-write), in `dir`; only those of the
// checkpoint file named `only_name` when it is not empty. Returns how many were removed.
size_t remove_stale_checkpoint_temps(const std::string & dir, const std::string & only_name);

// Throws fml_error with one of the codes above. `expected_fingerprint` must match the file's.
chat_state read_checkpoint(const std::string & path, const std::string & expected_fingerprint);

} // namespace fml
