#include "binding/options.h"

#include "binding/common.h"

namespace fml {

option_value to_option_value(Napi::Value v, int depth) {
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

option_map options_arg(const Napi::CallbackInfo & info, size_t i) {
    option_map m;
    if (info.Length() <= i || info[i].IsUndefined()) {
        return m;
    }
    Napi::Value v = info[i];
    if (!v.IsObject() || v.IsArray() || v.IsFunction()) {
        const char * got = v.IsNull() ? "null" : v.IsArray() ? "object" : v.IsFunction() ? "function" : v.IsString() ? "string" : v.IsNumber() ? "number" : "boolean";
        throw_error(info.Env(), FML_ERR_INVALID_OPTION, std::string("Expected an object for options but received ") + got);
    }
    Napi::Object o = v.As<Napi::Object>();
    Napi::Array keys = o.GetPropertyNames();
    for (uint32_t k = 0; k < keys.Length(); ++k) {
        const std::string key = keys.Get(k).ToString().Utf8Value();
        m.emplace_back(key, to_option_value(o.Get(key)));
    }
    return m;
}

static Napi::Value from_option_value(Napi::Env env, const option_value & v) {
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

} // namespace fml
