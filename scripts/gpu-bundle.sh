#!/usr/bin/env bash
# Writes build-gpu-bundle/ (git-ignored): everything scripts/gpu-check.sh needs on a GPU machine that
# has CUDA's compiler, CMake, ninja and Python but no Node.js or npm and can fetch nothing, well under
# the 64 MiB a device call carries:
#   node.xz              this machine's node binary (it links only glibc and libstdc++)
#   llama.cpp.tar.xz     the pinned llama.cpp's sources the build needs (library, ggml, vendor, and
#                        common + tools for llama-server), from deps/llama.cpp's git tree
#   project.tar.xz       the addon's sources: native/, CMakeLists.txt (and test/native, which it declares)
#   node-api/            the Node-API headers (node-api-headers, node-addon-api)
#   app/                 the library, the benchmarks the check runs and the check (scripts/gpu/check.ts),
#                        compiled to JavaScript, with the npm packages they import at run time
#   gpu-check.sh         the entry point: bash build-gpu-bundle/gpu-check.sh
# The models are generated there (the bundle has the GGUF writer). Nothing of it is committed.
#   bash scripts/gpu-bundle.sh [OUT]         (OUT defaults to build-gpu-bundle)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build-gpu-bundle}
[ -f deps/llama.cpp/include/llama.h ] || node scripts/fetch-llama.mjs
[ -d node_modules/node-api-headers ] || { echo "[gpu-bundle] node_modules missing: npm ci first"; exit 1; }
rm -rf "$out"
mkdir -p "$out/node-api" "$out/app/node_modules"

npx tsc -p scripts/gpu/tsconfig.json --outDir "$out/app"
cp package.json "$out/app/"                       # "type": "module"
for p in prom-client tdigest bintrees @opentelemetry/api; do  # what app/ imports at run time (prom-client's tree)
  mkdir -p "$out/app/node_modules/$p" && cp -R "node_modules/$p/." "$out/app/node_modules/$p/"
done
cp -R node_modules/node-api-headers/include "$out/node-api/include"
mkdir -p "$out/node-api/node-addon-api" && cp node_modules/node-addon-api/*.h "$out/node-api/node-addon-api/"

tar -cJf "$out/project.tar.xz" native CMakeLists.txt test/native   # test/native: a target CMakeLists.txt declares
git -C deps/llama.cpp archive --format=tar HEAD CMakeLists.txt cmake ggml src include vendor common tools scripts/ui-assets.cmake licenses LICENSE |
  xz -6 -T0 > "$out/llama.cpp.tar.xz"
xz -6 -T0 -c "$(command -v node)" > "$out/node.xz"
cp scripts/gpu-check.sh "$out/gpu-check.sh"
echo "[gpu-bundle] $out: $(du -sh "$out" | cut -f1) ($(cd "$out" && du -sh node.xz llama.cpp.tar.xz project.tar.xz app node-api | tr '\t\n' ' '))"
