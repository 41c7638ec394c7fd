#!/usr/bin/env bash
# The native core's dependency rules, checked (npm test runs this):
#   - only native/binding includes napi.h (the core is usable and testable without Node);
#   - only native/kv calls llama_memory_* / llama_state_seq_* (what mutates or snapshots the KV cache)
#     and includes llama.cpp's internal headers (src/llama-*.h); native/probes (test build only) may too;
#   - policies see only the token ledger (and each other): they decide what to evict, kv-ops does it.
# And the TypeScript layers: src/shared/ imports no other folder of src/; local/ and remote/ do not
# import each other or the server (the server builds on local/). And every repository path named in
# code, comments or docs exists.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
bad() { echo "dependency rule broken: $1"; printf '  %s\n' $2; fail=1; }

napi=$(grep -rl '#include <napi.h>\|#include "napi.h"' native --include='*.cpp' --include='*.h' | grep -v '^native/binding/' || true)
[ -z "$napi" ] || bad "napi.h outside native/binding/" "$napi"

mem=$(grep -rlE '\bllama_(memory|state_seq)_[a-z_]+\s*\(' native --include='*.cpp' --include='*.h' | grep -vE '^native/(kv|probes)/' || true)
[ -z "$mem" ] || bad "llama_memory_* / llama_state_seq_* called outside native/kv/" "$mem"

internals=$(grep -rlE '#include "llama-[a-z-]+\.h"' native --include='*.cpp' --include='*.h' | grep -v '^native/kv/' || true)
[ -z "$internals" ] || bad "llama.cpp internal headers included outside native/kv/" "$internals"

policy=$(grep -rhE '#include "' native/policies | grep -vE '#include "(policies/|kv/token-ledger\.h|util/error\.h)' || true)
[ -z "$policy" ] || bad "a policy includes more than the ledger" "$policy"

shared=$(grep -rlE "from '\.\./(local|remote|server|gguf)/" src/shared || true)
[ -z "$shared" ] || bad "src/shared/ imports another folder of src/" "$shared"

layers=$(grep -rlE "from '\.\./(remote|server)/" src/local || true; grep -rlE "from '\.\./(local|server)/" src/remote || true)
[ -z "$layers" ] || bad "src/local/ and src/remote/ import each other or the server" "$layers"

# A repository path named in code, comments or docs must exist (paths under another root, like
# $here/app/... or ${LLAMA_CPP_DIR}/src/..., are not this repository's and are skipped).
stale=$( (grep -rhoP '(?<![\w./${}-])(native|src|test|scripts|bench|docs)/[A-Za-z0-9_./-]+\.(cpp|h|ts|mjs|js|sh|md|json|py)\b' \
          native src test scripts bench docs .ci CMakeLists.txt README.md package.json --exclude=RESULTS.md 2>/dev/null || true) | sort -u |
        while read -r f; do [ -e "$f" ] || echo "$f"; done)
[ -z "$stale" ] || bad "paths named in code or docs that do not exist" "$stale"

[ "$fail" = 0 ] && echo "dependency rules hold (napi.h, llama_memory_*, llama.cpp internals, policies, src/ layers, named paths)"
exit "$fail"
