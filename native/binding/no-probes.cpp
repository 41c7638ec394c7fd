// The shipped addon has no probes (binding/probes.cpp is linked into the test build only).
#include <napi.h>

namespace fml {

void register_probes(Napi::Env, Napi::Object) {}

} // namespace fml
