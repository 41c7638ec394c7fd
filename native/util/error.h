// One error type for the whole core. `code` is stable and becomes the JS error's `.code`;
// the TypeScript layer maps codes to error classes (src/shared/errors.ts).
#pragma once

#include <stdexcept>
#include <string>

namespace fml {

class fml_error : public std::runtime_error {
public:
    fml_error(std::string code, const std::string & message)
        : std::runtime_error(message), code_(std::move(code)) {}
    const std::string & code() const { return code_; }
private:
    std::string code_;
};

// Every code the core throws, once: X(macro suffix, code). The code becomes the JS error's `.code`;
// the addon exports the list (errorCodes) and src/shared/errors.ts maps each to its class (a test checks
// that every code here has one).
#define FML_ERROR_CODES(X)                                  \
    X(MODEL_NOT_FOUND, "MODEL_NOT_FOUND")                   \
    X(MODEL_INVALID, "MODEL_INVALID")                       \
    X(MODEL_LOAD, "MODEL_LOAD_FAILED")                      \
    X(CONTEXT_CREATE, "CONTEXT_CREATE_FAILED")              \
    X(INVALID_OPTION, "INVALID_OPTION")                     \
    X(PROMPT_TOO_LARGE, "PROMPT_TOO_LARGE")                 \
    X(PIN_LIMIT, "PIN_LIMIT")                               \
    X(DECODE, "DECODE_FAILED")                              \
    X(KV, "KV_OPERATION_FAILED")                            \
    X(BUSY, "CHAT_BUSY")                                    \
    X(ABORTED, "ABORTED")                                   \
    X(DISPOSED, "DISPOSED")                                 \
    X(TEMPLATE, "TEMPLATE_FAILED")                          \
    X(UNSUPPORTED_MODEL, "UNSUPPORTED_MODEL")               \
    X(CHECKPOINT_IO, "CHECKPOINT_IO")                       \
    X(CHECKPOINT_CORRUPT, "CHECKPOINT_CORRUPT")             \
    X(CHECKPOINT_VERSION, "CHECKPOINT_VERSION")             \
    X(CHECKPOINT_MODEL, "CHECKPOINT_MODEL_MISMATCH")        \
    X(INTERNAL, "INTERNAL")

#define FML_DEFINE_ERROR_CODE(name, code) constexpr const char * FML_ERR_##name = code;
FML_ERROR_CODES(FML_DEFINE_ERROR_CODE)
#undef FML_DEFINE_ERROR_CODE

} // namespace fml
