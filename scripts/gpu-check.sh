#!/usr/bin/env bash
# For a machine with an NVIDIA GPU and a CUDA toolkit with cuBLAS: build (or reuse) the CUDA variant,
# run the test suite on the CUDA backend, run the eviction and concurrency benchmarks, print the results.
#   bash scripts/gpu-check.sh            (FML_CUDA_ARCHS=90 to build for one architecture only;
#                                         FML_CUDA_ROOT / FML_CUBLAS_ROOT when they are not found)
set -euo pipefail
cd "$(dirname "$0")/.."
export NODE_LLAMA_CPP_SKIP_DOWNLOAD=true
nvidia-smi || { echo "[gpu-check] nvidia-smi failed: no usable GPU here"; exit 1; }
command -v nvcc >/dev/null || export PATH="${FML_CUDA_ROOT:-/usr/local/cuda}/bin:$PATH"
# cuBLAS: inside the toolkit, or FML_CUBLAS_ROOT, or NVIDIA's pip wheel (nvidia/cu13 or nvidia/cublas).
if [ -z "${FML_CUBLAS_ROOT:-}" ] && [ ! -f "$(dirname "$(command -v nvcc)")/../include/cublas_v2.h" ]; then
  for d in $(python3 -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null); do
    for c in "$d/cu13" "$d/cublas"; do
      [ -f "$c/include/cublas_v2.h" ] && export FML_CUBLAS_ROOT="$c" && break 2
    done
  done
  [ -n "${FML_CUBLAS_ROOT:-}" ] || { echo "[gpu-check] no cuBLAS found: install it or set FML_CUBLAS_ROOT"; exit 1; }
fi
if [ -n "${FML_CUBLAS_ROOT:-}" ]; then
  echo "[gpu-check] cuBLAS from $FML_CUBLAS_ROOT"
  export LD_LIBRARY_PATH="$FML_CUBLAS_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
[ -d node_modules ] || npm ci --no-audit --no-fund
if [ ! -f prebuilds/linux-x64-cuda/finite-memory-llm.node ]; then
  FML_JOBS="${FML_JOBS:-$(nproc)}" npm run prebuildify:cuda
fi
npm run build:ts
echo "[gpu-check] CUDA variant:"
FINITE_MEMORY_BACKEND=cuda node -e "import('./dist/index.js').then(m => console.log(m.systemInfo()))"
echo "[gpu-check] test suite on the CUDA backend (the test build of the CUDA variant, with probes)"
FML_ADDON_PATH="$PWD/build-cuda/Probes/finite_memory_llm_probes.node" FINITE_MEMORY_BACKEND=cuda npx vitest run
echo "[gpu-check] eviction benchmark on the CUDA backend (gpuLayers auto: weights and KV cache on the GPU)"
FML_ADDON_PATH="$PWD/build-cuda/Probes/finite_memory_llm_probes.node" FINITE_MEMORY_BACKEND=cuda FML_BENCH_GPU_LAYERS=auto npx tsx bench/evict.ts --no-write | tee /tmp/gpu-evict.md
echo "[gpu-check] concurrency benchmark, K = 8, on the GPU (llama-server too when build-tools/llama-server was built with FML_CUDA=1)"
FML_ADDON_PATH="$PWD/build-cuda/Probes/finite_memory_llm_probes.node" FINITE_MEMORY_BACKEND=cuda npx tsx bench/concurrency.ts --k=8 --gpu --no-write | tee /tmp/gpu-concurrency.md
echo "[gpu-check] done: copy /tmp/gpu-evict.md and /tmp/gpu-concurrency.md into bench/RESULTS.md under a 'GPU' heading"
