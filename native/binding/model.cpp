#include "binding/model.h"

#include "binding/common.h"
#include "binding/options.h"
#include "engine/tool-calls.h"

namespace fml {

Napi::Function js_model::define(Napi::Env env) {
    return DefineClass(env, "NativeModel", {
        InstanceMethod("info", &js_model::js_info),
        InstanceMethod("tokenize", &js_model::js_tokenize),
        InstanceMethod("detokenize", &js_model::js_detokenize),
        InstanceMethod("applyTemplate", &js_model::js_apply_template),
        InstanceMethod("prepareTools", &js_model::js_prepare_tools),
        InstanceMethod("dispose", &js_model::js_dispose),
    });
}

js_model::js_model(const Napi::CallbackInfo & info) : Napi::ObjectWrap<js_model>(info) {
    info.This().As<Napi::Object>().TypeTag(&MODEL_TYPE_TAG);
}

std::shared_ptr<fml_model> js_model::require(Napi::Env env) {
    if (!model) {
        throw_error(env, FML_ERR_DISPOSED, "model is disposed");
    }
    return model;
}

std::shared_ptr<runtime> js_model::require_runtime(Napi::Env env) {
    auto m = require(env);
    if (!runtime_) {
        runtime_options ro;
        ro.threads = load_options.threads;
        ro.engine.max_slots = load_options.slots;
        ro.engine.prefill_chunk = load_options.prefill_chunk;
        ro.engine.unified = load_options.kv_unified;
        ro.engine.test_context_slot_limit = load_options.test_context_slot_limit;
        ro.engine.test_no_key_rotation = load_options.test_no_key_rotation;
        ro.owner = env.GetInstanceData<addon_data>();
        runtime_ = std::make_shared<runtime>(m, ro);
    }
    return runtime_;
}

Napi::Value js_model::js_info(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const model_info & mi = require(env)->info();
    Napi::Object o = Napi::Object::New(env);
    o.Set("architecture", mi.architecture);
    o.Set("description", mi.description);
    o.Set("chatTemplate", mi.chat_template.empty() ? env.Null() : Napi::String::New(env, mi.chat_template));
    o.Set("framing", mi.framing);
    o.Set("backend", mi.backend);
    o.Set("device", mi.device);
    o.Set("nCtxTrain", mi.n_ctx_train);
    o.Set("nEmbd", mi.n_embd);
    o.Set("nLayer", mi.n_layer);
    o.Set("nHead", mi.n_head);
    o.Set("nHeadKv", mi.n_head_kv);
    o.Set("headDim", mi.n_embd_head_k);
    o.Set("nVocab", mi.n_vocab);
    o.Set("sizeBytes", Napi::Number::New(env, (double) mi.size_bytes));
    o.Set("nParams", Napi::Number::New(env, (double) mi.n_params));
    o.Set("fingerprint", mi.fingerprint);
    o.Set("gpuLayers", mi.gpu_layers);
    o.Set("memory", mi.memory);
    o.Set("slidingWindow", mi.sliding_window);
    o.Set("kvLayers", mi.kv_layers);
    o.Set("recurrentBytes", Napi::Number::New(env, (double) mi.recurrent_bytes));
    o.Set("canShift", mi.can_shift);
    o.Set("rope", mi.rope);
    o.Set("reasoning", mi.reasoning);
    o.Set("inPlaceEviction", mi.in_place_eviction);
    o.Set("unsupportedReason", mi.unsupported_reason.empty() ? env.Null() : Napi::String::New(env, mi.unsupported_reason));
    o.Set("threads", load_options.threads);
    o.Set("slots", load_options.slots);
    o.Set("prefillChunk", load_options.prefill_chunk);
    return o;
}

Napi::Value js_model::js_tokenize(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    auto m = require(env);
    const std::string text = string_arg(info, 0, "text");
    const bool add_bos = info.Length() > 1 && info[1].ToBoolean();
    const bool special = info.Length() > 2 && info[2].ToBoolean();
    const std::vector<int32_t> toks = guarded(env, [&] { return m->tokenize(text, add_bos && m->add_bos(), special); });
    Napi::Int32Array arr = Napi::Int32Array::New(env, toks.size());
    std::copy(toks.begin(), toks.end(), arr.Data());
    return arr;
}

Napi::Value js_model::js_detokenize(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    auto m = require(env);
    if (info.Length() < 1 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array) {
        throw_error(env, FML_ERR_INVALID_OPTION, "expected an Int32Array of tokens");   // another typed array was read past its end
    }
    Napi::Int32Array arr = info[0].As<Napi::Int32Array>();
    std::vector<int32_t> toks(arr.Data(), arr.Data() + arr.ElementLength());
    const bool special = info.Length() > 1 && info[1].ToBoolean();
    return Napi::String::New(env, guarded(env, [&] { return m->detokenize(toks, special); }));
}

Napi::Value js_model::js_apply_template(const Napi::CallbackInfo & info) {
    // messages: [role, content, role, content, ...] (flat, validated by the TypeScript layer).
    Napi::Env env = info.Env();
    auto m = require(env);
    if (info.Length() < 1 || !info[0].IsArray()) {
        throw_error(env, FML_ERR_INVALID_OPTION, "expected an array of role and content strings");
    }
    Napi::Array flat = info[0].As<Napi::Array>();
    std::vector<std::pair<std::string, std::string>> messages;
    for (uint32_t i = 0; i + 1 < flat.Length(); i += 2) {
        if (!flat.Get(i).IsString() || !flat.Get(i + 1).IsString()) {
            throw_error(env, FML_ERR_INVALID_OPTION, "expected an array of role and content strings");
        }
        messages.emplace_back(flat.Get(i).As<Napi::String>().Utf8Value(), flat.Get(i + 1).As<Napi::String>().Utf8Value());
    }
    const bool add_assistant = info.Length() > 1 && info[1].ToBoolean();
    return Napi::String::New(env, guarded(env, [&] { return m->apply_template(messages, add_assistant); }));
}

namespace {

// The set-up of a chat's tools on a worker thread: reading the template, checking every tool's
// schema and setting up a turn take milliseconds (0.24 s for 128 tools of an agent's size: bench/tools.ts), which a server
// must not spend on its event loop; the chat made next finds it done.
class tools_worker : public promise_worker {
public:
    tools_worker(Napi::Env env, std::shared_ptr<fml_model> model, std::string tools, std::string system_prompt, generation_options turn)
        : promise_worker(env), model_(std::move(model)), tools_(std::move(tools)), system_prompt_(std::move(system_prompt)), turn_(std::move(turn)) {}

protected:
    void run() override { tool_set::prepare(model_, tools_, system_prompt_, turn_.tool_choice, turn_.parallel_tool_calls, turn_.thinking); }
    Napi::Value result(Napi::Env env) override { return env.Undefined(); }

private:
    std::shared_ptr<fml_model> model_;
    std::string tools_;
    std::string system_prompt_;
    generation_options turn_;
};

} // namespace

// prepareTools(toolsJson, systemPrompt, turnOptions?) -> a promise: the tools' set-up made, with the
// turn of send's toolChoice, parallelToolCalls and thinking in `turnOptions` (or the tools refused).
Napi::Value js_model::js_prepare_tools(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    auto m = require(env);
    const std::string tools = string_arg(info, 0, "tools");
    const std::string system_prompt = string_arg(info, 1, "systemPrompt");
    if (tools.size() > MAX_TOOLS_BYTES) {
        throw_error(env, FML_ERR_INVALID_OPTION, "tools is " + std::to_string(tools.size()) + " bytes of JSON; at most " + std::to_string(MAX_TOOLS_BYTES) + " are taken");
    }
    generation_options turn = guarded(env, [&] { return resolve_generation_options(options_arg(info, 2)); });
    return queue_worker<tools_worker>(env, std::move(m), tools, system_prompt, std::move(turn));
}

Napi::Value js_model::js_dispose(const Napi::CallbackInfo & info) {
    // Chats keep the model and its runtime until they are disposed too.
    model.reset();
    runtime_.reset();
    return info.Env().Undefined();
}

namespace {

// Loads a model on a worker thread; llama.cpp's progress reaches `on_progress` (a JS function, when
// given) through a thread-safe function, at most once per percent.
class load_model_worker : public promise_worker {
public:
    load_model_worker(Napi::Env env, std::string path, model_load_options opts, Napi::Function on_progress)
        : promise_worker(env), path_(std::move(path)), opts_(opts) {
        if (!on_progress.IsEmpty()) {
            progress_ = Napi::ThreadSafeFunction::New(env, on_progress, "finite-memory-llm load progress", 0, 1);
        }
    }
protected:
    void run() override {
        if (!progress_) {
            model_ = fml_model::load(path_, opts_);
            return;
        }
        int last = -1;
        auto report = [&](float p) {
            const int pct = (int) (p * 100.0f);
            if (pct == last) return;
            last = pct;
            progress_.NonBlockingCall([p](Napi::Env env, Napi::Function fn) { fn.Call({ Napi::Number::New(env, p) }); });
        };
        // The promise settles on the JS thread through another queue than these calls, so it could
        // settle before the last of them ran: a -1 after the last tells JS that all have run.
        const auto finish = [this] {
            progress_.NonBlockingCall([](Napi::Env env, Napi::Function fn) { fn.Call({ Napi::Number::New(env, -1) }); });
            progress_.Release();
        };
        try {
            model_ = fml_model::load(path_, opts_, report);
        } catch (...) {
            finish();
            throw;
        }
        finish();
    }
    Napi::Value result(Napi::Env env) override {
        Napi::Object obj = env.GetInstanceData<addon_data>()->model_ctor.New({});
        js_model * m = js_model::Unwrap(obj);
        m->model = model_;
        m->load_options = opts_;
        return obj;
    }
private:
    std::string path_;
    model_load_options opts_;
    std::shared_ptr<fml_model> model_;
    Napi::ThreadSafeFunction progress_;
};

} // namespace

Napi::Value js_load_model(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const std::string path = string_arg(info, 0, "path");
    const model_load_options opts = guarded(env, [&] { return resolve_model_options(options_arg(info, 1), available_cores()); });
    const Napi::Function on_progress = info.Length() > 2 && info[2].IsFunction() ? info[2].As<Napi::Function>() : Napi::Function();
    return queue_worker<load_model_worker>(env, path, opts, on_progress);
}

} // namespace fml
