// A GGUF file checked before llama.cpp sees it: llama.cpp aborts the process (GGML_ASSERT) on some
// malformed headers and out-of-range hyperparameters, so what it would abort on is refused here.
#pragma once

#include <string>

namespace fml {

// Checks that `path` is a readable GGUF whose tensor data lies inside the file and whose
// hyperparameters are in the ranges llama.cpp asserts on. Throws fml_error (MODEL_NOT_FOUND /
// MODEL_INVALID). Returns the model's fingerprint: a hash of every metadata key and value and of
// the tensor layout.
std::string validate_gguf_file(const std::string & path);

} // namespace fml
