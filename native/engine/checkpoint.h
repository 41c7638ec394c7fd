// Checkpoints: a chat's KV state, token ledger, policy state (scores, embeddings, summary), options,
// counters and transcript, behind a versioned header with the model's fingerprint and a checksum, as
// bytes (for any store) or as a file.
//
//   "FMLCKPT\0"  u32 format version  u32 flags (bit 0: ledger only, no KV state)
//   str model fingerprint
//   options, session counters, transcript, ledger (+ embeddings), KV blob   (little-endian, length-prefixed)
//   u64 FNV-1a 64 of every byte before it
//
// Two kinds: the full one restores without any decode; the ledger-only one (a few bytes per retained
// token) restores by prefilling the retained tokens once, at positions 0..n-1 (and, for a hybrid
// model, rebuilds the recurrent state from them). File writes are atomic: a temp file in the same
// directory, fsync, rename, fsync of the directory; a crash mid-save leaves the previous checkpoint
// intact. Reads validate everything before touching a chat.
#pragma once

#include "chat/chat.h"

#include <string>

namespace fml {

// 1: options as a struct; 2: options by name (validated by resolve_chat_options when read);
// 3: the compaction counter (positions may have gaps: kept positions); 4: the transcript, and the
// ledger-only kind; 5: a third score slot per ledger entry (peaks).
constexpr uint32_t CHECKPOINT_FORMAT_VERSION = 6;   // 6: the reasoning role, and whether the carry starts with reasoning
constexpr uint32_t CHECKPOINT_FLAG_LEDGER_ONLY = 1;

// The checkpoint as bytes; `ledger_only` leaves the KV state out.
std::vector<uint8_t> encode_checkpoint(const std::string & model_fingerprint, const chat_state & state, bool ledger_only);
// Throws fml_error (CHECKPOINT_CORRUPT / _VERSION / _MODEL). `expected_fingerprint` must match unless
// `any_model` (reading what another model's checkpoint holds, e.g. its transcript: never to restore it).
chat_state decode_checkpoint(const uint8_t * data, size_t size, const std::string & expected_fingerprint, bool any_model = false);

void write_checkpoint(const std::string & path, const std::string & model_fingerprint, const chat_state & state);

// Deletes temp files of a save whose process died (kill -9 mid-write), in `dir`; only those of the
// checkpoint file named `only_name` when it is not empty. Returns how many were removed.
size_t remove_stale_checkpoint_temps(const std::string & dir, const std::string & only_name);

// Throws fml_error with one of the codes above. `expected_fingerprint` must match the file's.
chat_state read_checkpoint(const std::string & path, const std::string & expected_fingerprint);

} // namespace fml
