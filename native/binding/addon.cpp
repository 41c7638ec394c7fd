// N-API glue: converts JS values to the core's plain structs, dispatches, converts results back.
// No logic lives here. Long work (model load, a turn) runs in AsyncWorkers; streamed pieces reach JS
// through the worker's progress queue (a thread-safe function), in order.
#include <napi.h>

#include "bench/evict-bench.h"
#include "chat-session.h"
#include "checkpoint.h"
#include "error.h"
#include "model.h"

#include "ggml-backend.h"
#include "llama.h"

#include <memory>
#include <string>

using namespace fml;

namespace {

struct addon_data {
    Napi::FunctionReference model_ctor;
    Napi::FunctionReference chat_ctor;
};

Napi::Error make_error(Napi::Env env, const std::string & code, const std::string & message) {
    Napi::Error err = Napi::Error::New(env, message);
    err.Set("code", Napi::String::New(env, code));
    return err;
}

[[noreturn]] void throw_error(Napi::Env env, const std::string & code, const std::string & message) {
    throw make_error(env, code, message);
}

// Runs `fn`, turning core errors into JS errors with a code.
template <typename F>
auto guarded(Napi::Env env, F fn) -> decltype(fn()) {
    try {
        return fn();
    } catch (const fml_error & e) {
        throw_error(env, e.code(), e.what());
    } catch (const Napi::Error &) {
        throw;
    } catch (const std::exception & e) {
        throw_error(env, FML_ERR_INTERNAL, e.what());
    }
}

// ---- options: JS values become an option_map; options.cpp validates and fills in defaults ----

option_value to_option_value(Napi::Value v, int depth = 0) {
    option_value o;
    switch (v.Type()) {
        case napi_undefined: o.kind = option_value::UNDEFINED; break;
        case napi_null:      o.kind = option_value::NUL; break;
        case napi_boolean:   o = option_value::of(v.As<Napi::Boolean>().Value()); break;
        case napi_number:    o = option_value::of(v.As<Napi::Number>().DoubleValue()); break;
        case napi_string:    o = option_value::of(v.As<Napi::String>().Utf8Value()); break;
        case napi_object:
            if (v.IsArray() && depth == 0) {
                Napi::Array a = v.As<Napi::Array>();
                o.kind = option_value::ARRAY;
                for (uint32_t i = 0; i < a.Length(); ++i) {
                    o.items.push_back(to_option_value(a.Get(i), depth + 1));
                }
            } else {
                o.kind = option_value::OTHER;
                o.text = "object";
            }
            break;
        case napi_function:  o.kind = option_value::OTHER; o.text = "function"; break;
        case napi_symbol:    o.kind = option_value::OTHER; o.text = "symbol"; break;
        case napi_bigint:    o.kind = option_value::OTHER; o.text = "bigint"; break;
        default:             o.kind = option_value::OTHER; o.text = "object"; break;
    }
    return o;
}

// Options argument i: undefined means none; anything but a plain object is an INVALID_OPTION.
option_map options_arg(const Napi::CallbackInfo & info, size_t i) {
    option_map m;
    if (info.Length() <= i || info[i].IsUndefined()) {
        return m;
    }
    if (!info[i].IsObject() || info[i].IsArray() || info[i].IsFunction()) {
        throw_error(info.Env(), FML_ERR_INVALID_OPTION, "Expected an object for options but received " +
                    std::string(info[i].IsNull() ? "null" : info[i].IsArray() ? "object" : info[i].IsFunction() ? "function" : info[i].IsString() ? "string" : info[i].IsNumber() ? "number" : "boolean"));
    }
    Napi::Object o = info[i].As<Napi::Object>();
    Napi::Array keys = o.GetPropertyNames();
    for (uint32_t k = 0; k < keys.Length(); ++k) {
        const std::string key = keys.Get(k).ToString().Utf8Value();
        m.emplace_back(key, to_option_value(o.Get(key)));
    }
    return m;
}

Napi::Value from_option_value(Napi::Env env, const option_value & v) {
    switch (v.kind) {
        case option_value::BOOL:   return Napi::Boolean::New(env, v.boolean);
        case option_value::NUMBER: return Napi::Number::New(env, v.number);
        case option_value::STRING: return Napi::String::New(env, v.text);
        case option_value::NUL:    return env.Null();
        default:                   return env.Undefined();
    }
}

Napi::Object from_option_map(Napi::Env env, const option_map & m) {
    Napi::Object o = Napi::Object::New(env);
    for (const auto & kv : m) {
        o.Set(kv.first, from_option_value(env, kv.second));
    }
    return o;
}

double get_number(const Napi::Object & o, const char * key, double def) {
    Napi::Value v = o.Get(key);
    return v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : def;
}

std::string string_arg(const Napi::CallbackInfo & info, size_t i, const char * what) {
    if (info.Length() <= i || !info[i].IsString()) {
        throw_error(info.Env(), FML_ERR_INVALID_OPTION, std::string("expected a string for ") + what);
    }
    return info[i].As<Napi::String>().Utf8Value();
}

// ---- Model -------------------------------------------------------------------------------------

class js_model : public Napi::ObjectWrap<js_model> {
public:
    static Napi::Function define(Napi::Env env) {
        return DefineClass(env, "NativeModel", {
            InstanceMethod("info", &js_model::js_info),
            InstanceMethod("tokenize", &js_model::js_tokenize),
            InstanceMethod("detokenize", &js_model::js_detokenize),
            InstanceMethod("dispose", &js_model::js_dispose),
        });
    }
    explicit js_model(const Napi::CallbackInfo & info) : Napi::ObjectWrap<js_model>(info) {}

    std::shared_ptr<fml_model> model;

    std::shared_ptr<fml_model> require(Napi::Env env) {
        if (!model) {
            throw_error(env, FML_ERR_DISPOSED, "model is disposed");
        }
        return model;
    }

private:
    Napi::Value js_info(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        const model_info & mi = require(env)->info();
        Napi::Object o = Napi::Object::New(env);
        o.Set("architecture", mi.architecture);
        o.Set("description", mi.description);
        o.Set("chatTemplate", mi.chat_template.empty() ? env.Null() : Napi::String::New(env, mi.chat_template));
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
        o.Set("framing", mi.framing);
        o.Set("threads", require(env)->default_threads());
        return o;
    }

    Napi::Value js_tokenize(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        auto m = require(env);
        const std::string text = string_arg(info, 0, "text");
        const bool add_bos = info.Length() > 1 && info[1].ToBoolean();
        const bool special = info.Length() > 2 && info[2].ToBoolean();
        const std::vector<int32_t> toks = guarded(env, [&] { return m->tokenize(text, add_bos && m->add_bos(), special); });
        Napi::Int32Array arr = Napi::Int32Array::New(env, toks.size());
        for (size_t i = 0; i < toks.size(); ++i) {
            arr[i] = toks[i];
        }
        return arr;
    }

    Napi::Value js_detokenize(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        auto m = require(env);
        if (info.Length() < 1 || !info[0].IsTypedArray()) {
            throw_error(env, FML_ERR_INVALID_OPTION, "expected an Int32Array of tokens");
        }
        Napi::Int32Array arr = info[0].As<Napi::Int32Array>();
        std::vector<int32_t> toks(arr.Data(), arr.Data() + arr.ElementLength());
        const bool special = info.Length() > 1 && info[1].ToBoolean();
        return Napi::String::New(env, guarded(env, [&] { return m->detokenize(toks, special); }));
    }

    Napi::Value js_dispose(const Napi::CallbackInfo & info) {
        model.reset();   // chats keep their own reference until they are disposed
        return info.Env().Undefined();
    }
};

class load_model_worker : public Napi::AsyncWorker {
public:
    load_model_worker(Napi::Env env, std::string path, model_load_options opts)
        : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), path_(std::move(path)), opts_(opts) {}
    Napi::Promise promise() { return deferred_.Promise(); }

    void Execute() override {
        try {
            model_ = fml_model::load(path_, opts_);
        } catch (const fml_error & e) {
            code_ = e.code();
            SetError(e.what());
        } catch (const std::exception & e) {
            code_ = FML_ERR_MODEL_LOAD;
            SetError(e.what());
        }
    }
    void OnOK() override {
        Napi::Env env = Env();
        auto * data = env.GetInstanceData<addon_data>();
        Napi::Object obj = data->model_ctor.New({});
        js_model::Unwrap(obj)->model = model_;
        deferred_.Resolve(obj);
    }
    void OnError(const Napi::Error & e) override {
        deferred_.Reject(make_error(Env(), code_, e.Message()).Value());
    }

private:
    Napi::Promise::Deferred deferred_;
    std::string path_;
    model_load_options opts_;
    std::shared_ptr<fml_model> model_;
    std::string code_;
};

Napi::Value js_load_model(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const std::string path = string_arg(info, 0, "path");
    const model_load_options opts = guarded(env, [&] { return resolve_model_options(options_arg(info, 1), available_cores()); });
    auto * w = new load_model_worker(env, path, opts);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
}

// ---- Chat --------------------------------------------------------------------------------------

Napi::Object stats_to_js(Napi::Env env, const turn_stats & s) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("promptTokens", s.prompt_tokens);
    o.Set("generatedTokens", s.generated_tokens);
    o.Set("prefillMs", s.prefill_ms);
    o.Set("decodeMs", s.decode_ms);
    o.Set("tokensPerSecond", s.tokens_per_second);
    o.Set("policyMs", s.policy_ms);
    o.Set("evictMs", s.evict_ms);
    o.Set("evictedTokens", s.evicted_tokens);
    o.Set("evictions", s.evictions);
    o.Set("retainedTokens", s.retained_tokens);
    o.Set("latencyMs", s.latency_ms);
    o.Set("fallback", s.fallback);
    o.Set("summaryMs", s.summary_ms);
    o.Set("summaryTokens", s.summary_tokens);
    o.Set("policy", s.policy);
    Napi::Array log = Napi::Array::New(env, s.eviction_log.size());
    for (size_t i = 0; i < s.eviction_log.size(); ++i) {
        const eviction_record & r = s.eviction_log[i];
        Napi::Object e = Napi::Object::New(env);
        e.Set("evictedTokens", r.evicted);
        Napi::Array pos = Napi::Array::New(env, r.positions.size());
        for (size_t k = 0; k < r.positions.size(); ++k) {
            Napi::Array pair = Napi::Array::New(env, 2);
            pair[(uint32_t) 0] = Napi::Number::New(env, (double) r.positions[k].begin);
            pair[(uint32_t) 1] = Napi::Number::New(env, (double) r.positions[k].end);
            pos[(uint32_t) k] = pair;
        }
        e.Set("positions", pos);
        e.Set("policyMs", r.policy_ms);
        e.Set("evictMs", r.evict_ms);
        e.Set("fallback", r.fallback);
        e.Set("summaryTokens", r.summary_tokens);
        e.Set("phase", r.during_generation ? "generation" : "prefill");
        log[(uint32_t) i] = e;
    }
    o.Set("evictionLog", log);
    return o;
}

// Claims the chat for one operation; throws CHAT_BUSY when a turn (or another operation) runs.
static void claim_chat(Napi::Env env, chat_session & s, const char * busy_message) {
    bool expected = false;
    if (!s.busy().compare_exchange_strong(expected, true)) {
        throw_error(env, FML_ERR_BUSY, busy_message);
    }
    s.clear_abort();
}

class turn_worker;

class js_chat : public Napi::ObjectWrap<js_chat> {
public:
    static Napi::Function define(Napi::Env env) {
        return DefineClass(env, "NativeChat", {
            InstanceMethod("send", &js_chat::js_send),
            InstanceMethod("abort", &js_chat::js_abort),
            InstanceMethod("stats", &js_chat::js_stats),
            InstanceMethod("memory", &js_chat::js_memory),
            InstanceMethod("cacheState", &js_chat::js_cache_state),
            InstanceMethod("countTurnTokens", &js_chat::js_count_turn_tokens),
            InstanceMethod("reset", &js_chat::js_reset),
            InstanceMethod("dispose", &js_chat::js_dispose),
            InstanceMethod("probeLogits", &js_chat::js_probe_logits),
            InstanceMethod("shiftPositions", &js_chat::js_shift_positions),
            InstanceMethod("evaluateTokens", &js_chat::js_evaluate_tokens),
            InstanceMethod("replayHistory", &js_chat::js_replay_history),
            InstanceMethod("saveCheckpoint", &js_chat::js_save_checkpoint),
            InstanceMethod("ingestExchange", &js_chat::js_ingest_exchange),
            InstanceMethod("resolvedOptions", &js_chat::js_resolved_options),
            InstanceMethod("plainDecode", &js_chat::js_plain_decode),
        });
    }

    // new NativeChat(nativeModel, options)
    explicit js_chat(const Napi::CallbackInfo & info) : Napi::ObjectWrap<js_chat>(info) {
        Napi::Env env = info.Env();
        if (info.Length() >= 1 && info[0].IsExternal()) {
            // Built by model.loadChat from a restored session.
            auto * restored = info[0].As<Napi::External<std::shared_ptr<chat_session>>>().Data();
            session_ = *restored;
            return;
        }
        if (info.Length() < 1 || !info[0].IsObject()) {
            throw_error(env, FML_ERR_INVALID_OPTION, "expected a model");
        }
        auto model = js_model::Unwrap(info[0].As<Napi::Object>())->require(env);
        const chat_options opts = guarded(env, [&] { return resolve_chat_options(options_arg(info, 1), model->default_threads()); });
        session_ = guarded(env, [&] { return std::make_shared<chat_session>(model, opts); });
    }

    std::shared_ptr<chat_session> session_;
    bool dispose_pending_ = false;

    std::shared_ptr<chat_session> require(Napi::Env env) {
        if (!session_) {
            throw_error(env, FML_ERR_DISPOSED, "chat is disposed");
        }
        return session_;
    }

    void on_turn_finished() {
        if (dispose_pending_) {
            session_.reset();
        }
    }

private:
    Napi::Value js_send(const Napi::CallbackInfo & info);

    Napi::Value js_abort(const Napi::CallbackInfo & info) {
        if (session_) {
            session_->request_abort();
        }
        return info.Env().Undefined();
    }

    Napi::Value js_stats(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        auto s = require(env);
        const cumulative_stats & c = s->stats();
        Napi::Object o = Napi::Object::New(env);
        o.Set("turns", (double) c.turns);
        o.Set("tokensSeen", (double) c.tokens_seen);
        o.Set("tokensRetained", (double) s->ledger().size());
        o.Set("tokensEvicted", (double) c.tokens_evicted);
        o.Set("evictions", (double) c.evictions);
        o.Set("fallbackCount", (double) c.fallback_count);
        o.Set("kvBytes", (double) s->kv_bytes());
        o.Set("summary", s->summary_text());
        return o;
    }

    Napi::Value js_memory(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        auto s = require(env);
        const std::vector<memory_entry> mem = s->memory();
        Napi::Array arr = Napi::Array::New(env, mem.size());
        for (size_t i = 0; i < mem.size(); ++i) {
            Napi::Object o = Napi::Object::New(env);
            o.Set("token", mem[i].token);
            o.Set("position", mem[i].pos);
            o.Set("turn", mem[i].turn);
            o.Set("role", token_role_name(mem[i].role));
            o.Set("pinned", mem[i].pinned);
            o.Set("score", mem[i].score);
            o.Set("text", mem[i].text);
            arr[i] = o;
        }
        return arr;
    }

    Napi::Value js_cache_state(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        auto s = require(env);
        Napi::Object o = Napi::Object::New(env);
        o.Set("ledgerTokens", (double) s->ledger().size());
        o.Set("pinnedTokens", (double) s->ledger().pinned_count());
        o.Set("cachePosMin", s->cache_pos_min());
        o.Set("cachePosMax", s->cache_pos_max());
        o.Set("positionsContiguous", s->ledger().positions_contiguous());
        o.Set("contextSize", s->context_size());
        o.Set("carriedTokens", (double) s->carried_tokens());
        o.Set("pendingSystemTokens", (double) s->pending_system_tokens());
        o.Set("attentionRowsChecked", (double) s->capture().attention_rows_checked);
        o.Set("causalViolations", (double) s->capture().causal_violations);
        o.Set("scratchPosMax", s->scratch_pos_max());
        o.Set("kvBytes", (double) s->kv_bytes());
        return o;
    }

    Napi::Value js_count_turn_tokens(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        auto s = require(env);
        const std::string text = string_arg(info, 0, "text");
        return Napi::Number::New(env, (double) guarded(env, [&] { return s->count_turn_tokens(text); }));
    }

    Napi::Value js_reset(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        auto s = require(env);
        if (s->busy().load()) {
            throw_error(env, FML_ERR_BUSY, "cannot reset while a turn is running");
        }
        guarded(env, [&] { s->reset(); return 0; });
        return env.Undefined();
    }

    Napi::Value js_dispose(const Napi::CallbackInfo & info) {
        if (session_) {
            if (session_->busy().load()) {
                session_->request_abort();
                dispose_pending_ = true;   // the running turn drops the session when it finishes
            } else {
                session_.reset();
            }
        }
        return info.Env().Undefined();
    }

    Napi::Value js_probe_logits(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        auto s = require(env);
        if (s->busy().load()) {
            throw_error(env, FML_ERR_BUSY, "chat is busy");
        }
        const int32_t token = (int32_t) info[0].ToNumber().Int32Value();
        const std::vector<float> logits = guarded(env, [&] { return s->probe_logits(token); });
        Napi::Float32Array arr = Napi::Float32Array::New(env, logits.size());
        std::copy(logits.begin(), logits.end(), arr.Data());
        return arr;
    }

    // Synchronous on purpose: a benchmark/test hook, not part of the public API.
    Napi::Value js_evaluate_tokens(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        auto s = require(env);
        if (s->busy().load()) {
            throw_error(env, FML_ERR_BUSY, "chat is busy");
        }
        if (info.Length() < 2 || !info[0].IsTypedArray()) {
            throw_error(env, FML_ERR_INVALID_OPTION, "evaluateTokens(Int32Array, chunk)");
        }
        Napi::Int32Array arr = info[0].As<Napi::Int32Array>();
        std::vector<int32_t> toks(arr.Data(), arr.Data() + arr.ElementLength());
        const size_t chunk = (size_t) info[1].ToNumber().Int64Value();
        const std::vector<float> logits = guarded(env, [&] { return s->evaluate_tokens(toks, chunk); });
        Napi::Float32Array out = Napi::Float32Array::New(env, logits.size());
        std::copy(logits.begin(), logits.end(), out.Data());
        return out;
    }

    Napi::Value js_save_checkpoint(const Napi::CallbackInfo & info);
    Napi::Value js_ingest_exchange(const Napi::CallbackInfo & info);

    Napi::Value js_resolved_options(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        return from_option_map(env, chat_options_to_map(require(env)->options(), false));
    }

    // Benchmark hooks (synchronous on purpose; not part of the public API).
    Napi::Value js_replay_history(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        auto s = require(env);
        if (s->busy().load()) {
            throw_error(env, FML_ERR_BUSY, "chat is busy");
        }
        return Napi::Number::New(env, guarded(env, [&] { return s->replay_history(); }));
    }

    Napi::Value js_plain_decode(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        auto s = require(env);
        if (s->busy().load()) {
            throw_error(env, FML_ERR_BUSY, "chat is busy");
        }
        const int32_t n = (int32_t) info[0].ToNumber().Int32Value();
        return Napi::Number::New(env, guarded(env, [&] { return s->plain_decode(n); }));
    }

    Napi::Value js_shift_positions(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        auto s = require(env);
        if (s->busy().load()) {
            throw_error(env, FML_ERR_BUSY, "chat is busy");
        }
        s->shift_positions((int32_t) info[0].ToNumber().Int32Value());
        return env.Undefined();
    }
};

class turn_worker : public Napi::AsyncProgressQueueWorker<char> {
public:
    turn_worker(Napi::Env env, js_chat * chat, Napi::Object chat_obj, std::shared_ptr<chat_session> session,
                std::string text, generation_options gen, Napi::Function on_piece)
        : Napi::AsyncProgressQueueWorker<char>(env),
          deferred_(Napi::Promise::Deferred::New(env)),
          chat_(chat), session_(std::move(session)), text_(std::move(text)), gen_(std::move(gen)) {
        chat_ref_ = Napi::Persistent(chat_obj);   // keeps the JS chat alive while the turn runs
        if (!on_piece.IsEmpty()) {
            on_piece_ = Napi::Persistent(on_piece);
        }
    }
    Napi::Promise promise() { return deferred_.Promise(); }

    void Execute(const ExecutionProgress & progress) override {
        try {
            result_ = session_->run_turn(text_, gen_, [&](const std::string & piece) {
                progress.Send(piece.data(), piece.size());
            });
        } catch (const fml_error & e) {
            code_ = e.code();
            SetError(e.what());
        } catch (const std::exception & e) {
            code_ = FML_ERR_INTERNAL;
            SetError(e.what());
        }
    }

    void OnProgress(const char * data, size_t count) override {
        if (on_piece_.IsEmpty() || data == nullptr) {
            return;
        }
        Napi::Env env = Env();
        try {
            on_piece_.Call({ Napi::String::New(env, data, count) });
        } catch (const Napi::Error & e) {
            // A throwing callback stops the turn; the error is reported by the promise.
            if (callback_error_.IsEmpty()) {
                callback_error_ = Napi::Persistent(e.Value());
            }
            session_->request_abort();
        }
    }

    void OnOK() override {
        Napi::Env env = Env();
        finish();
        if (!callback_error_.IsEmpty()) {
            deferred_.Reject(callback_error_.Value());
            return;
        }
        Napi::Object o = Napi::Object::New(env);
        o.Set("response", result_.response);
        o.Set("stopReason", stop_reason_name(result_.reason));
        Napi::Object stats = stats_to_js(env, result_.stats);
        const char * signal = importance_signal_name(session_->signal());
        stats.Set("importanceSignal", *signal ? Napi::Value(Napi::String::New(env, signal)) : env.Null());
        o.Set("stats", stats);
        deferred_.Resolve(o);
    }

    void OnError(const Napi::Error & e) override {
        finish();
        deferred_.Reject(make_error(Env(), code_, e.Message()).Value());
    }

private:
    void finish() {
        session_->busy().store(false);
        chat_->on_turn_finished();
    }

    Napi::Promise::Deferred deferred_;
    js_chat * chat_;
    Napi::ObjectReference chat_ref_;
    Napi::FunctionReference on_piece_;
    Napi::ObjectReference callback_error_;
    std::shared_ptr<chat_session> session_;
    std::string text_;
    generation_options gen_;
    turn_result result_;
    std::string code_;
};

Napi::Value js_chat::js_send(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    auto s = require(env);
    const std::string text = string_arg(info, 0, "message");
    const generation_options gen = guarded(env, [&] { return resolve_generation_options(options_arg(info, 1)); });
    Napi::Function on_piece = info.Length() > 2 && info[2].IsFunction() ? info[2].As<Napi::Function>() : Napi::Function();

    claim_chat(env, *s, "a turn is already running on this chat; await it (or abort it) before sending again");
    auto * w = new turn_worker(env, this, Value(), s, text, gen, on_piece);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
}

// ---- checkpoints -------------------------------------------------------------------------------

// A chat operation other than a turn (checkpoint save, transcript ingest) on the thread pool. The
// chat is claimed busy before it is queued; the worker releases it (and completes a dispose requested
// meanwhile) when done, and rejects with the core error's code.
class chat_task_worker : public Napi::AsyncWorker {
public:
    chat_task_worker(Napi::Env env, js_chat * chat, Napi::Object chat_obj, std::shared_ptr<chat_session> session)
        : Napi::AsyncWorker(env), session_(std::move(session)), deferred_(Napi::Promise::Deferred::New(env)), chat_(chat) {
        chat_ref_ = Napi::Persistent(chat_obj);   // keeps the JS chat alive while the task runs
    }
    Napi::Promise promise() { return deferred_.Promise(); }
    void Execute() override {
        try {
            run();
        } catch (const fml_error & e) {
            code_ = e.code();
            SetError(e.what());
        } catch (const std::exception & e) {
            code_ = FML_ERR_INTERNAL;
            SetError(e.what());
        }
    }
    void OnOK() override {
        release();
        deferred_.Resolve(result(Env()));
    }
    void OnError(const Napi::Error & e) override {
        release();
        deferred_.Reject(make_error(Env(), code_, e.Message()).Value());
    }

protected:
    virtual void run() = 0;                                    // worker thread
    virtual Napi::Value result(Napi::Env env) { return env.Undefined(); }   // JS thread
    std::shared_ptr<chat_session> session_;

private:
    void release() {
        session_->busy().store(false);
        chat_->on_turn_finished();
    }
    Napi::Promise::Deferred deferred_;
    js_chat * chat_;
    Napi::ObjectReference chat_ref_;
    std::string code_;
};

template <typename Worker, typename... Args>
static Napi::Value queue_chat_task(Napi::Env env, Args &&... args) {
    auto * w = new Worker(env, std::forward<Args>(args)...);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
}

class save_checkpoint_worker : public chat_task_worker {
public:
    save_checkpoint_worker(Napi::Env env, js_chat * chat, Napi::Object chat_obj, std::shared_ptr<chat_session> session, std::string path)
        : chat_task_worker(env, chat, chat_obj, std::move(session)), path_(std::move(path)) {}
protected:
    void run() override {
        const chat_state state = session_->export_state();
        write_checkpoint(path_, session_->model_fingerprint(), state);
    }
private:
    std::string path_;
};

Napi::Value js_chat::js_save_checkpoint(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    auto s = require(env);
    const std::string path = string_arg(info, 0, "path");
    claim_chat(env, *s, "a turn is running on this chat; save the checkpoint after it");
    return queue_chat_task<save_checkpoint_worker>(env, this, Value(), s, path);
}

class ingest_worker : public chat_task_worker {
public:
    ingest_worker(Napi::Env env, js_chat * chat, Napi::Object chat_obj, std::shared_ptr<chat_session> session, std::string user, std::string reply)
        : chat_task_worker(env, chat, chat_obj, std::move(session)), user_(std::move(user)), reply_(std::move(reply)) {}
protected:
    void run() override { tokens_ = session_->ingest_exchange(user_, reply_); }
    Napi::Value result(Napi::Env env) override { return Napi::Number::New(env, (double) tokens_); }
private:
    std::string user_;
    std::string reply_;
    size_t tokens_ = 0;
};

Napi::Value js_chat::js_ingest_exchange(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    auto s = require(env);
    const std::string user = string_arg(info, 0, "user message");
    const std::string reply = string_arg(info, 1, "assistant message");
    claim_chat(env, *s, "a turn is running on this chat");
    return queue_chat_task<ingest_worker>(env, this, Value(), s, user, reply);
}

class load_checkpoint_worker : public Napi::AsyncWorker {
public:
    load_checkpoint_worker(Napi::Env env, std::shared_ptr<fml_model> model, std::string path, int32_t threads)
        : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), model_(std::move(model)), path_(std::move(path)), threads_(threads) {}
    Napi::Promise promise() { return deferred_.Promise(); }
    void Execute() override {
        try {
            chat_state state = read_checkpoint(path_, model_->info().fingerprint);
            if (threads_ > 0) {
                state.options.threads = threads_;
            }
            try {
                session_ = std::make_shared<chat_session>(model_, state.options);
            } catch (const fml_error & e) {
                throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, std::string("the checkpoint's options are not valid: ") + e.what());
            }
            session_->import_state(state);
        } catch (const fml_error & e) {
            code_ = e.code();
            SetError(e.what());
        } catch (const std::exception & e) {
            code_ = FML_ERR_INTERNAL;
            SetError(e.what());
        }
    }
    void OnOK() override {
        Napi::Env env = Env();
        auto * data = env.GetInstanceData<addon_data>();
        auto holder = Napi::External<std::shared_ptr<chat_session>>::New(env, &session_);
        deferred_.Resolve(data->chat_ctor.New({ holder }));
    }
    void OnError(const Napi::Error & e) override {
        deferred_.Reject(make_error(Env(), code_, e.Message()).Value());
    }
private:
    Napi::Promise::Deferred deferred_;
    std::shared_ptr<fml_model> model_;
    std::string path_;
    int32_t threads_;
    std::shared_ptr<chat_session> session_;
    std::string code_;
};

// loadChat(model, path, threads) -> Promise<NativeChat>
Napi::Value js_load_chat(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    if (info.Length() < 2 || !info[0].IsObject()) {
        throw_error(env, FML_ERR_INVALID_OPTION, "loadChat(model, path, threads)");
    }
    auto model = js_model::Unwrap(info[0].As<Napi::Object>())->require(env);
    const std::string path = string_arg(info, 1, "path");
    // An override of the stored thread count, validated like createChat's.
    int32_t threads = 0;
    if (info.Length() > 2 && !info[2].IsUndefined()) {
        const option_map m = { { "threads", to_option_value(info[2]) } };
        threads = guarded(env, [&] { return resolve_chat_options(m, 1).threads; });
    }
    auto * w = new load_checkpoint_worker(env, model, path, threads);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
}

// ---- module ------------------------------------------------------------------------------------

// planEviction(policyOptions, entries[{pinned}], need, want) -> [[begin, end], ...]
// Runs a policy on a synthetic ledger, so policies are testable without a model or a KV cache.
Napi::Value js_plan_eviction(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const policy_options opts = guarded(env, [&] { return resolve_chat_options(options_arg(info, 0), 1).policy; });
    if (info.Length() < 4 || !info[1].IsArray()) {
        throw_error(env, FML_ERR_INVALID_OPTION, "planEviction(options, entries, need, want)");
    }
    Napi::Array entries = info[1].As<Napi::Array>();
    token_ledger ledger;
    size_t dim = 0;
    if (entries.Length() > 0) {
        Napi::Value emb = entries.Get((uint32_t) 0).As<Napi::Object>().Get("embedding");
        if (emb.IsArray()) {
            dim = emb.As<Napi::Array>().Length();
            ledger.set_embedding_dim(dim);
        }
    }
    for (uint32_t i = 0; i < entries.Length(); ++i) {
        Napi::Object e = entries.Get(i).As<Napi::Object>();
        const token_role role = (token_role) (int) get_number(e, "role", TOKEN_ROLE_USER);
        ledger.append((int32_t) get_number(e, "token", 0), (uint32_t) get_number(e, "turn", 0), role, e.Get("pinned").ToBoolean(),
                      e.Get("sentenceEnd").ToBoolean());
        ledger.at(i).score[SCORE_IMPORTANCE] = (float) get_number(e, "score", 0.0);
        Napi::Value emb = e.Get("embedding");
        if (dim > 0 && emb.IsArray() && emb.As<Napi::Array>().Length() == dim) {
            Napi::Array a = emb.As<Napi::Array>();
            float * out = ledger.embedding_mut(i);
            for (uint32_t k = 0; k < dim; ++k) {
                out[k] = (float) a.Get(k).ToNumber().DoubleValue();
            }
        }
    }
    const eviction_request req{ (size_t) info[2].ToNumber().Int64Value(), (size_t) info[3].ToNumber().Int64Value() };
    const eviction_plan plan = guarded(env, [&] { return make_policy(opts)->plan(ledger, req); });
    Napi::Array ranges = Napi::Array::New(env, plan.ranges.size());
    for (size_t i = 0; i < plan.ranges.size(); ++i) {
        Napi::Array r = Napi::Array::New(env, 2);
        r[(uint32_t) 0] = Napi::Number::New(env, (double) plan.ranges[i].begin);
        r[(uint32_t) 1] = Napi::Number::New(env, (double) plan.ranges[i].end);
        ranges[i] = r;
    }
    Napi::Object out = Napi::Object::New(env);
    out.Set("ranges", ranges);
    out.Set("summarize", plan.summarize);
    return out;
}

// ---- benchmark hooks (bench/evict.ts) -----------------------------------------------------------

class evict_bench_worker : public Napi::AsyncWorker {
public:
    evict_bench_worker(Napi::Env env, std::shared_ptr<fml_model> model, int32_t context, std::vector<int32_t> counts, int32_t reps, int32_t threads)
        : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), model_(std::move(model)),
          context_(context), counts_(std::move(counts)), reps_(reps), threads_(threads) {}
    Napi::Promise promise() { return deferred_.Promise(); }
    void Execute() override {
        try {
            result_ = run_evict_bench(*model_, context_, counts_, reps_, threads_);
        } catch (const std::exception & e) {
            SetError(e.what());
        }
    }
    void OnOK() override {
        Napi::Env env = Env();
        Napi::Object o = Napi::Object::New(env);
        o.Set("context", result_.context);
        o.Set("fillMs", result_.fill_ms);
        o.Set("kvBytes", result_.kv_bytes);
        o.Set("kBytes", result_.k_bytes);
        Napi::Array cases = Napi::Array::New(env, result_.cases.size());
        for (size_t i = 0; i < result_.cases.size(); ++i) {
            const evict_bench_case & c = result_.cases[i];
            Napi::Object x = Napi::Object::New(env);
            x.Set("pattern", c.pattern);
            x.Set("evicted", c.evicted);
            x.Set("rmAddMs", c.rm_add_ms);
            x.Set("nextDecodeMs", c.next_decode_ms);
            x.Set("plainDecodeMs", c.plain_decode_ms);
            x.Set("seqRmCalls", c.seq_rm_calls);
            x.Set("seqAddCalls", c.seq_add_calls);
            cases[(uint32_t) i] = x;
        }
        o.Set("cases", cases);
        deferred_.Resolve(o);
    }
    void OnError(const Napi::Error & e) override { deferred_.Reject(e.Value()); }
private:
    Napi::Promise::Deferred deferred_;
    std::shared_ptr<fml_model> model_;
    int32_t context_;
    std::vector<int32_t> counts_;
    int32_t reps_;
    int32_t threads_;
    evict_bench_result result_;
};

// benchEvict(model, context, evictCounts, reps, threads) -> Promise
Napi::Value js_bench_evict(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    auto model = js_model::Unwrap(info[0].As<Napi::Object>())->require(env);
    std::vector<int32_t> counts;
    Napi::Array a = info[2].As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i) {
        counts.push_back(a.Get(i).ToNumber().Int32Value());
    }
    auto * w = new evict_bench_worker(env, model, info[1].ToNumber().Int32Value(), counts, info[3].ToNumber().Int32Value(),
                                      info[4].ToNumber().Int32Value());
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
}

// benchPolicyPlan(options, n, want, embdDim, reps) -> median ms
Napi::Value js_bench_policy_plan(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const policy_options opts = guarded(env, [&] { return resolve_chat_options(options_arg(info, 0), 1).policy; });
    return Napi::Number::New(env, guarded(env, [&] {
        return run_policy_plan_bench(opts, info[1].ToNumber().Int32Value(), info[2].ToNumber().Int32Value(),
                                     info[3].ToNumber().Int32Value(), info[4].ToNumber().Int32Value());
    }));
}

Napi::Value js_bench_memcpy(const Napi::CallbackInfo & info) {
    return Napi::Number::New(info.Env(), run_memcpy_bench((size_t) info[0].ToNumber().Int64Value(), info[1].ToNumber().Int32Value()));
}

// Live native objects (tests check that finalizers free what GC collects).
Napi::Value js_live_objects(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    Napi::Object o = Napi::Object::New(env);
    o.Set("chats", (double) chat_session::live_count());
    o.Set("models", (double) fml_model::live_count());
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

// resolveChatOptions(raw, defaultThreads) -> the resolved options (throws INVALID_OPTION).
Napi::Value js_resolve_chat_options(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const int32_t threads = info.Length() > 1 && info[1].IsNumber() ? info[1].ToNumber().Int32Value() : 1;
    const chat_options o = guarded(env, [&] { return resolve_chat_options(options_arg(info, 0), threads); });
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

Napi::Value js_system_info(const Napi::CallbackInfo & info) {
    return Napi::String::New(info.Env(), llama_print_system_info());
}

Napi::Object init(Napi::Env env, Napi::Object exports) {
    install_llama_log();
    llama_backend_init();
    auto * data = new addon_data();
    Napi::Function model_ctor = js_model::define(env);
    Napi::Function chat_ctor = js_chat::define(env);
    data->model_ctor = Napi::Persistent(model_ctor);
    data->chat_ctor = Napi::Persistent(chat_ctor);
    env.SetInstanceData(data);
    exports.Set("NativeModel", model_ctor);
    exports.Set("NativeChat", chat_ctor);
    exports.Set("loadModel", Napi::Function::New(env, js_load_model));
    exports.Set("planEviction", Napi::Function::New(env, js_plan_eviction));
    exports.Set("loadChat", Napi::Function::New(env, js_load_chat));
    exports.Set("liveObjects", Napi::Function::New(env, js_live_objects));
    exports.Set("gpuDeviceCount", Napi::Function::New(env, js_gpu_device_count));
    exports.Set("benchEvict", Napi::Function::New(env, js_bench_evict));
    exports.Set("benchPolicyPlan", Napi::Function::New(env, js_bench_policy_plan));
    exports.Set("benchMemcpy", Napi::Function::New(env, js_bench_memcpy));
    exports.Set("systemInfo", Napi::Function::New(env, js_system_info));
    exports.Set("resolveChatOptions", Napi::Function::New(env, js_resolve_chat_options));
    exports.Set("optionDocs", Napi::Function::New(env, js_option_docs));
    exports.Set("removeStaleCheckpointTemps", Napi::Function::New(env, js_remove_stale_checkpoint_temps));
    exports.Set("llamaCppVersion", Napi::String::New(env, "v0.4.0 (node-llama-cpp@3.21.1 bundle)"));
    return exports;
}

} // namespace

NODE_API_MODULE(finite_memory_llm, init)
