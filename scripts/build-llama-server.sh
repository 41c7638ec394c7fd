#!/usr/bin/env bash
# Builds llama-server from the same pinned llama.cpp the addon uses (deps/llama.cpp, the
# node-llama-cpp@3.21.1 bundle) into the git-ignored build-tools/ folder, for side-by-side
# benchmarks (bench/concurrency.ts). CPU only, the addon's flags (GGML_NATIVE=OFF, no OpenMP).
# About 10 minutes on 2 cores the first time; a no-op afterwards. FML_CUDA=1 builds it with CUDA
# (a GPU machine: nvcc and cuBLAS, as for the addon's CUDA variant).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f deps/llama.cpp/include/llama.h ] || node scripts/fetch-llama.mjs
out=build-tools/llama-server
cmake -S deps/llama.cpp -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  ${FML_CUDA:+-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${FML_CUDA_ARCHS:-90}} >/dev/null
cmake --build "$out" --target llama-server -j "${JOBS:-2}"
echo "$out/bin/llama-server"
