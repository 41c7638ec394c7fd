// N-API glue shared by the binding's files: core errors become JS errors with a `code`, argument
// readers, and the constructors every file needs.
#pragma once

#include <napi.h>

#include "kv/token-ledger.h"
#include "util/error.h"

#include <string>
#include <vector>

namespace fml {

struct addon_data {
    Napi::FunctionReference model_ctor;
    Napi::FunctionReference chat_ctor;
};

inline Napi::Error make_error(Napi::Env env, const std::string & code, const std::string & message) {
    Napi::Error err = Napi::Error::New(env, message);
    err.Set("code", Napi::String::New(env, code));
    return err;
}

[[noreturn]] inline void throw_error(Napi::Env env, const std::string & code, const std::string & message) {
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

// Type tags of the wrapped classes. ObjectWrap::Unwrap trusts an object's class: a NativeChat passed
// where a NativeModel was expected was reinterpreted as one. Every wrapped argument is checked first.
inline constexpr napi_type_tag MODEL_TYPE_TAG = { 0x3f1c9a7e52d04b6bULL, 0x8e2a61c4d7f93a05ULL };
inline constexpr napi_type_tag CHAT_TYPE_TAG = { 0x6b48e0d2a19c5f37ULL, 0xc05d7f3e8a2b1946ULL };

template <typename T>
T * unwrap_tagged(Napi::Env env, const Napi::Value & v, const napi_type_tag & tag, const char * what) {
    if (!v.IsObject() || !v.As<Napi::Object>().CheckTypeTag(&tag)) {
        throw_error(env, FML_ERR_INVALID_OPTION, std::string("expected a ") + what);
    }
    return T::Unwrap(v.As<Napi::Object>());
}

inline std::string string_arg(const Napi::CallbackInfo & info, size_t i, const char * what) {
    if (info.Length() <= i || !info[i].IsString()) {
        throw_error(info.Env(), FML_ERR_INVALID_OPTION, std::string("expected a string for ") + what);
    }
    return info[i].As<Napi::String>().Utf8Value();
}

// Index ranges as [[begin, end], ...].
inline Napi::Array ranges_to_js(Napi::Env env, const std::vector<index_range> & ranges) {
    Napi::Array out = Napi::Array::New(env, ranges.size());
    for (size_t k = 0; k < ranges.size(); ++k) {
        Napi::Array pair = Napi::Array::New(env, 2);
        pair[(uint32_t) 0] = Napi::Number::New(env, (double) ranges[k].begin);
        pair[(uint32_t) 1] = Napi::Number::New(env, (double) ranges[k].end);
        out[(uint32_t) k] = pair;
    }
    return out;
}

// An AsyncWorker that settles a promise, rejecting with the core error's code.
class promise_worker : public Napi::AsyncWorker {
public:
    explicit promise_worker(Napi::Env env) : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)) {}
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
    void OnOK() override { deferred_.Resolve(result(Env())); }
    void OnError(const Napi::Error & e) override { deferred_.Reject(make_error(Env(), code_, e.Message()).Value()); }

protected:
    virtual void run() = 0;                                              // worker thread
    virtual Napi::Value result(Napi::Env env) { return env.Undefined(); }  // JS thread
    Napi::Promise::Deferred deferred_;

private:
    std::string code_ = FML_ERR_INTERNAL;
};

template <typename Worker, typename... Args>
Napi::Value queue_worker(Napi::Env env, Args &&... args) {
    auto * w = new Worker(env, std::forward<Args>(args)...);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
}

} // namespace fml
