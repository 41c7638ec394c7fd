// The addon's entry point: the classes (binding/model.cpp, binding/chat.cpp), module functions, and
// the probes that only the test build links (binding/probes.cpp; binding/no-probes.cpp otherwise).
#include <napi.h>

#include "binding/chat.h"
#include "binding/common.h"
#include "binding/model.h"
#include "binding/options.h"
#include "engine/checkpoint.h"
#include "engine/grammar.h"
#include "engine/runtime.h"

#include "ggml-backend.h"
#include "llama.h"

#include <mutex>

namespace fml {

void register_probes(Napi::Env env, Napi::Object exports);   // probes.cpp or no-probes.cpp

namespace {

// jsonSchemaToGrammar(schemaJson) -> the GBNF send's jsonSchema holds an answer to (throws INVALID_OPTION).
Napi::Value js_json_schema_to_grammar(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const std::string schema = string_arg(info, 0, "jsonSchema");
    return Napi::String::New(env, guarded(env, [&] { return gbnf_of_json_schema(schema); }));
}

// jsonSchemaToGrammarAsync(schemaJson) -> a promise of the same, converted on a worker thread (a
// server converts a request's schema without holding its event loop: up to tens of ms at the limits).
class json_schema_worker : public promise_worker {
public:
    json_schema_worker(Napi::Env env, std::string schema) : promise_worker(env), schema_(std::move(schema)) {}

protected:
    void run() override { grammar_ = gbnf_of_json_schema(schema_); }
    Napi::Value result(Napi::Env env) override { return Napi::String::New(env, grammar_); }

private:
    std::string schema_;
    std::string grammar_;
};

Napi::Value js_json_schema_to_grammar_async(const Napi::CallbackInfo & info) {
    return queue_worker<json_schema_worker>(info.Env(), string_arg(info, 0, "jsonSchema"));
}

// resolveChatOptions(raw, defaultThreads) -> the resolved options (throws INVALID_OPTION).
Napi::Value js_resolve_chat_options(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const int32_t threads = info.Length() > 1 && info[1].IsNumber() ? info[1].ToNumber().Int32Value() : 1;
    const chat_options o = guarded(env, [&] { return resolve_chat_options(options_arg(info, 0), threads, true); });   // no model: the CPU's defaults
    return from_option_map(env, chat_options_to_map(o, false));
}

Napi::Value js_option_docs(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const std::vector<option_doc> & docs = option_docs();
    Napi::Array out = Napi::Array::New(env, docs.size());
    for (size_t i = 0; i < docs.size(); ++i) {
        Napi::Object o = Napi::Object::New(env);
        o.Set("scope", docs[i].scope);
        o.Set("name", docs[i].name);
        o.Set("type", docs[i].type);
        o.Set("default", docs[i].default_text);
        o.Set("range", docs[i].range_text);
        o.Set("description", docs[i].description);
        o.Set("internal", docs[i].internal);
        out[(uint32_t) i] = o;
    }
    return out;
}

Napi::Value js_remove_stale_checkpoint_temps(const Napi::CallbackInfo & info) {
    const std::string dir = string_arg(info, 0, "dir");
    return Napi::Number::New(info.Env(), (double) remove_stale_checkpoint_temps(dir, ""));
}

// checkpointTranscript(bytes) -> the transcript (JSON) a checkpoint of any model carries, after its
// integrity checks (CHECKPOINT_CORRUPT / _VERSION): what a server rebuilds a session from when the
// checkpoint was made with another model.
// A checkpoint of any model given as bytes (info[0]), decoded after its integrity checks.
chat_state any_checkpoint_arg(const Napi::CallbackInfo & info, const char * fn) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
        throw_error(env, FML_ERR_CHECKPOINT_CORRUPT, std::string(fn) + " expects the checkpoint's bytes (a Uint8Array)");
    }
    Napi::Uint8Array bytes = info[0].As<Napi::Uint8Array>();
    return guarded(env, [&] { return decode_checkpoint(bytes.Data(), bytes.ByteLength(), std::string(), true); });
}

Napi::Value js_checkpoint_transcript(const Napi::CallbackInfo & info) {
    return Napi::String::New(info.Env(), any_checkpoint_arg(info, "checkpointTranscript").transcript);
}

// checkpointSettings(bytes) -> { systemPrompt, policy, maxTokens, tools } the chat was created with, read as
// checkpointTranscript reads its transcript: what a session rebuilt on another model keeps.
Napi::Value js_checkpoint_settings(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const chat_state s = any_checkpoint_arg(info, "checkpointSettings");
    Napi::Object o = Napi::Object::New(env);
    o.Set("systemPrompt", s.options.system_prompt);
    o.Set("policy", s.options.policy.name);
    o.Set("maxTokens", (double) s.options.policy.max_tokens);
    o.Set("tools", s.options.tools);
    return o;
}

// GPU devices ggml can use in this binary (0 for the CPU variant, or when no driver/device is present).
Napi::Value js_gpu_device_count(const Napi::CallbackInfo & info) {
    size_t n = 0;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        n += ggml_backend_dev_type(ggml_backend_dev_get(i)) == GGML_BACKEND_DEVICE_TYPE_GPU ? 1 : 0;
    }
    return Napi::Number::New(info.Env(), (double) n);
}

Napi::Value js_system_info(const Napi::CallbackInfo & info) {
    return Napi::String::New(info.Env(), llama_print_system_info());
}

} // namespace

Napi::Object init(Napi::Env env, Napi::Object exports) {
    // Once per process: every Worker that loads the addon runs init() again in its own environment.
    static std::once_flag backend_once;
    std::call_once(backend_once, [] {
        install_llama_log();
        llama_backend_init();
    });
    auto * data = new addon_data();
    Napi::Function model_ctor = js_model::define(env);
    Napi::Function chat_ctor = js_chat::define(env);
    data->model_ctor = Napi::Persistent(model_ctor);
    data->chat_ctor = Napi::Persistent(chat_ctor);
    env.SetInstanceData(data);
    // Scheduler threads must be gone before their environment is (they call into it); only this
    // environment's: a Worker's exit must not stop the main thread's models.
    env.AddCleanupHook([data] { runtime::stop_owned(data); });
    exports.Set("NativeModel", model_ctor);
    exports.Set("NativeChat", chat_ctor);
    exports.Set("loadModel", Napi::Function::New(env, js_load_model));
    exports.Set("loadChat", Napi::Function::New(env, js_load_chat));
    exports.Set("resolveChatOptions", Napi::Function::New(env, js_resolve_chat_options));
    exports.Set("optionDocs", Napi::Function::New(env, js_option_docs));
    exports.Set("jsonSchemaToGrammar", Napi::Function::New(env, js_json_schema_to_grammar));
    exports.Set("jsonSchemaToGrammarAsync", Napi::Function::New(env, js_json_schema_to_grammar_async));
    exports.Set("removeStaleCheckpointTemps", Napi::Function::New(env, js_remove_stale_checkpoint_temps));
    exports.Set("checkpointTranscript", Napi::Function::New(env, js_checkpoint_transcript));
    exports.Set("checkpointSettings", Napi::Function::New(env, js_checkpoint_settings));
    exports.Set("gpuDeviceCount", Napi::Function::New(env, js_gpu_device_count));
    exports.Set("systemInfo", Napi::Function::New(env, js_system_info));
    Napi::Array codes = Napi::Array::New(env);
#define FML_EXPORT_ERROR_CODE(name, code) codes.Set(codes.Length(), Napi::String::New(env, code));
    FML_ERROR_CODES(FML_EXPORT_ERROR_CODE)
#undef FML_EXPORT_ERROR_CODE
    exports.Set("errorCodes", codes);
    exports.Set("llamaCppVersion", Napi::String::New(env, "v0.4.0 (node-llama-cpp@3.21.1 bundle)"));
    register_probes(env, exports);
    return exports;
}

} // namespace fml

static Napi::Object init_addon(Napi::Env env, Napi::Object exports) {
    return fml::init(env, exports);
}

NODE_API_MODULE(finite_memory_llm, init_addon)
