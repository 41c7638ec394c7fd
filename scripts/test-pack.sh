#!/usr/bin/env bash
# Packaging check: build the CPU prebuild, pack the package, install the tarball into an empty
# directory with cmake and every compiler hidden from PATH, and run a short chat there.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export NODE_LLAMA_CPP_SKIP_DOWNLOAD=true

npm run build:ts --silent
[ "${FML_SKIP_PREBUILDIFY:-0}" = 1 ] || npm run prebuildify --silent
test -f prebuilds/linux-x64/finite-memory-llm.node

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tarball=$(npm pack --silent --pack-destination "$work" | tail -1)
echo "[test-pack] packed $tarball ($(du -h "$work/$tarball" | cut -f1))"
# (The listing goes into a variable: `tar | grep -q` would fail under pipefail when grep exits early.)
listing=$(tar -tzf "$work/$tarball")
if grep -E '(^|/)deps/llama\.cpp/|\.gguf$|package/build/' <<<"$listing"; then
  echo "[test-pack] FAIL: the tarball contains llama.cpp source, build output or model weights"; exit 1
fi
grep -q 'package/prebuilds/linux-x64/finite-memory-llm.node' <<<"$listing" || { echo "[test-pack] FAIL: no prebuild in the tarball"; exit 1; }
grep -q 'package/dist/index.d.ts' <<<"$listing" || { echo "[test-pack] FAIL: no types in the tarball"; exit 1; }

# Where no prebuild fits, install.mjs builds from the packed sources: they must configure as they are
# (the package has no test/; CMakeLists.txt once listed a unit test from there and could not).
src="$work/src"
mkdir -p "$src"
tar -xzf "$work/$tarball" -C "$src"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
if ! LLAMA_CPP_DIR="$root/deps/llama.cpp" cmake -S "$src/package" -B "$src/build" "${generator[@]}" >"$src/configure.log" 2>&1; then
  tail -20 "$src/configure.log"; echo "[test-pack] FAIL: the packed sources do not configure"; exit 1
fi
echo "[test-pack] the packed sources configure (a source build's first step)"

# A PATH with node and npm but no cmake, make, ninja or C/C++ compiler.
bin="$work/bin"
mkdir -p "$bin"
for tool in node npm npx sh bash env cat ls mkdir rm cp mv ln dirname basename uname tar gzip sed grep head tail chmod; do
  p=$(command -v "$tool" || true)
  [ -n "$p" ] && ln -sf "$(readlink -f "$p")" "$bin/$tool"
done
ln -sf "$(readlink -f "$(command -v npm)")" "$bin/npm"
for tool in cmake cc c++ gcc g++ clang clang++ make ninja; do
  if PATH="$bin" command -v "$tool" >/dev/null 2>&1; then echo "[test-pack] FAIL: $tool still on PATH"; exit 1; fi
done

app="$work/app"
mkdir -p "$app"
cd "$app"
PATH="$bin" npm init -y >/dev/null
PATH="$bin" npm install --no-audit --no-fund "$work/$tarball" 2>&1 | tail -3
cat > run.mjs <<'JS'
import { loadModel, systemInfo } from 'finite-memory-llm';
import { writeLlamaModel } from 'finite-memory-llm/gguf-writer';
import { createServer } from 'finite-memory-llm/server';
writeLlamaModel('tiny.gguf', {});
const model = await loadModel('tiny.gguf', { threads: 1 });
const chat = model.createChat({ maxTokens: 64, windowSize: 16 });
for (let i = 0; i < 10; i++) await chat.send(`hello ${i}`, { maxNewTokens: 8, temperature: 0 });
const s = chat.stats();
console.log(JSON.stringify({ binary: systemInfo().binary, turns: s.turns, retained: s.tokensRetained, evicted: s.tokensEvicted }));
if (s.tokensRetained > 64 || s.turns !== 10) process.exit(1);
if (!systemInfo().binary.includes('/prebuilds/')) { console.error('not loaded from prebuilds'); process.exit(1); }
// The /server entry point resolves from the package and serves a request.
const server = await createServer(model, { chat: { maxTokens: 64, windowSize: 16 } });
const res = await server.app.inject({ method: 'GET', url: '/v1/models' });
await server.close();
if (res.statusCode !== 200) { console.error('server entry point: /v1/models', res.statusCode); process.exit(1); }
JS
PATH="$bin" node run.mjs
echo "[test-pack] OK: installed without a compiler, ran a chat, and the /server entry point answered"
