// The one options reader: a JS options object becomes an option_map that the core's option table
// (engine/options.cpp) validates; resolved options go back to JS as plain objects.
#pragma once

#include <napi.h>

#include "engine/options.h"

namespace fml {

option_value to_option_value(Napi::Value v, int depth = 0);
// Options argument i: undefined means none; anything but a plain object is an INVALID_OPTION.
option_map options_arg(const Napi::CallbackInfo & info, size_t i);
Napi::Object from_option_map(Napi::Env env, const option_map & m);

} // namespace fml
