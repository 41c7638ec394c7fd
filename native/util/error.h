// One error type for the whole core. `code` is stable and becomes the JS error's `.code`;
// the TypeScript layer maps codes to error classes (src/errors.ts).
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

// Codes shared with src/errors.ts. Keep both lists in sync.
#define FML_ERR_MODEL_NOT_FOUND   "MODEL_NOT_FOUND"
#define FML_ERR_MODEL_INVALID     "MODEL_INVALID"
#define FML_ERR_MODEL_LOAD        "MODEL_LOAD_FAILED"
#define FML_ERR_CONTEXT_CREATE    "CONTEXT_CREATE_FAILED"
#define FML_ERR_INVALID_OPTION    "INVALID_OPTION"
#define FML_ERR_PROMPT_TOO_LARGE  "PROMPT_TOO_LARGE"
#define FML_ERR_PIN_LIMIT         "PIN_LIMIT"
#define FML_ERR_DECODE            "DECODE_FAILED"
#define FML_ERR_KV                "KV_OPERATION_FAILED"
#define FML_ERR_BUSY              "CHAT_BUSY"
#define FML_ERR_ABORTED           "ABORTED"
#define FML_ERR_DISPOSED          "DISPOSED"
#define FML_ERR_TEMPLATE          "TEMPLATE_FAILED"
#define FML_ERR_UNSUPPORTED_MODEL "UNSUPPORTED_MODEL"
#define FML_ERR_INTERNAL          "INTERNAL"

} // namespace fml
