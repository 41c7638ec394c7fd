// NativeModel: a loaded GGUF model and, from its first chat on, the runtime (scheduler thread and
// engines) that every chat of the model shares.
#pragma once

#include <napi.h>

#include "engine/runtime.h"
#include "model/model.h"

#include <memory>

namespace fml {

class js_model : public Napi::ObjectWrap<js_model> {
public:
    static Napi::Function define(Napi::Env env);
    explicit js_model(const Napi::CallbackInfo & info);

    std::shared_ptr<fml_model> model;
    model_load_options load_options;

    // Throws DISPOSED.
    std::shared_ptr<fml_model> require(Napi::Env env);
    // The model's runtime, started at the first chat.
    std::shared_ptr<runtime> require_runtime(Napi::Env env);

private:
    Napi::Value js_info(const Napi::CallbackInfo & info);
    Napi::Value js_tokenize(const Napi::CallbackInfo & info);
    Napi::Value js_detokenize(const Napi::CallbackInfo & info);
    Napi::Value js_apply_template(const Napi::CallbackInfo & info);
    Napi::Value js_prepare_tools(const Napi::CallbackInfo & info);
    Napi::Value js_dispose(const Napi::CallbackInfo & info);

    std::shared_ptr<runtime> runtime_;
};

// loadModel(path, options) -> Promise<NativeModel>
Napi::Value js_load_model(const Napi::CallbackInfo & info);

} // namespace fml
