#!/usr/bin/env bash
# The GPU check, run from the bundle scripts/gpu-bundle.sh writes (build-gpu-bundle/), on a machine with
# an NVIDIA GPU, CUDA's compiler, CMake, ninja and Python with NVIDIA's cuBLAS wheel, and nothing else
# of ours: no Node.js, no npm, nothing to fetch. One command, under 10 minutes, build included:
#   bash build-gpu-bundle/gpu-check.sh
# 1. unpacks the bundled node and sources; 2. builds the CUDA variant of the addon's test build
# (probes) with CMake directly, for FML_CUDA_ARCHS (default 90: H100/H200) on every core, against the
# wheel's cuBLAS (found through python3); 3. runs scripts/gpu/check.ts (compiled into the bundle):
# backend, K-shift invariance, eviction with the KV cache on the GPU, a hybrid model, greedy output
# CPU vs GPU, the eviction and concurrency benchmarks; 4. with time left, builds llama-server in the
# same tree (reusing its CUDA objects) and runs the concurrency benchmark at K = 8 against it. Everything printed also goes to
# build-gpu-bundle/results/ (fetch it from there); a stage that would pass the deadline
# (FML_GPU_BUDGET_S, default 570 s from the start) is cut and the summary says what finished.
# FML_GPU_REHEARSAL=1 runs the same on the CPU variant (scripts/gpu-rehearsal.sh does, in CI), without
# step 4 unless FML_GPU_SERVER=1 (llama-server on 2 cores takes longer than the rest together).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
start=$(date +%s)
deadline=$((start + ${FML_GPU_BUDGET_S:-570}))
rehearsal=${FML_GPU_REHEARSAL:-0}
jobs=${FML_JOBS:-$(nproc)}
results=$here/results
mkdir -p "$results"
exec > >(tee "$results/gpu-check.log") 2>&1
say() { echo "[gpu-check +$(($(date +%s) - start))s] $*"; }
left() { echo $((deadline - $(date +%s))); }
finished=()
summary() {
  say "finished: ${finished[*]:-nothing}"
  say "results: $(cd "$results" && ls | tr '\n' ' ')"
}
trap summary EXIT

# 1. node and the sources
mkdir -p "$here/bin"
[ -x "$here/bin/node" ] || { xz -dc "$here/node.xz" > "$here/bin/node" && chmod +x "$here/bin/node"; } || { say "FAILED: unpacking node"; exit 1; }
export PATH="$here/bin:$PATH"
for part in llama.cpp project; do
  [ -d "$here/$part" ] || { mkdir -p "$here/$part" && tar -xJf "$here/$part.tar.xz" -C "$here/$part"; } || { say "FAILED: unpacking $part"; exit 1; }
done
say "node $(node -v), $(cmake --version | head -1), $(c++ --version | head -1)"
finished+=(unpack)

# 2. the addon's test build: CUDA, or the CPU variant when rehearsing
cuda=()
if [ "$rehearsal" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { say "FAILED: nvidia-smi: no usable GPU here"; exit 1; }
  command -v nvcc >/dev/null || export PATH="${FML_CUDA_ROOT:-/usr/local/cuda}/bin:$PATH"
  say "$(nvcc --version | tail -2 | head -1)"
  if [ -z "${FML_CUBLAS_ROOT:-}" ]; then
    for d in $(python3 -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null); do
      for c in "$d/cu13" "$d/cublas"; do
        [ -f "$c/include/cublas_v2.h" ] && export FML_CUBLAS_ROOT="$c" && break 2
      done
    done
  fi
  [ -n "${FML_CUBLAS_ROOT:-}" ] || { say "FAILED: no cuBLAS (NVIDIA's nvidia-cublas wheel, or FML_CUBLAS_ROOT)"; exit 1; }
  say "cuBLAS from $FML_CUBLAS_ROOT"
  cuda_root=$(dirname "$(dirname "$(command -v nvcc)")")
  export LD_LIBRARY_PATH="$FML_CUBLAS_ROOT/lib:$cuda_root/lib64:$cuda_root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  cuda=(-DFML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${FML_CUDA_ARCHS:-90}" "-DFML_CUBLAS_ROOT=$FML_CUBLAS_ROOT")
fi
configure() {  # the flags cmake-js gives the addon: Node-API headers, BUILDING_NODE_EXTENSION
  cmake -S "$here/project" -B "$here/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CPP_DIR="$here/llama.cpp" \
    "-DCMAKE_JS_INC=$here/node-api/include;$here/node-api/node-addon-api" -DCMAKE_CXX_FLAGS=-DBUILDING_NODE_EXTENSION \
    -DFML_LLAMA_SERVER=ON "${cuda[@]}"
}
say "building the addon (${cuda[*]:-CPU variant}) with -j$jobs"
if ! configure > "$results/build.log" 2>&1 ||
   ! timeout "$(left)" cmake --build "$here/build" --target finite_memory_llm_probes -j "$jobs" >> "$results/build.log" 2>&1; then
  tail -30 "$results/build.log"
  say "FAILED: building the addon (log: results/build.log)"
  exit 1
fi
addon=$here/build/Probes/finite_memory_llm_probes.node
say "built $addon"
finished+=(build)

# 3. the checks and benchmarks (plain Node; the bundle's compiled JavaScript)
say "checks ($(left) s left)"
FML_ADDON_PATH=$addon FML_GPU_RESULTS=$results FML_GPU_DEADLINE=$deadline FML_GPU_REHEARSAL=$rehearsal \
  timeout "$(left)" node "$here/app/scripts/gpu/check.js"
status=$?
finished+=("checks (exit $status)")

# 4. llama-server from the same build tree (its llama and ggml objects are the addon's), and the
#    concurrency benchmark against it
if { [ "$rehearsal" != 1 ] || [ "${FML_GPU_SERVER:-0}" = 1 ]; } && [ "$(left)" -gt 200 ]; then
  say "building llama-server ($(left) s left)"
  if timeout "$(($(left) - 90))" cmake --build "$here/build" --target llama-server -j "$jobs" > "$results/server-build.log" 2>&1; then
    mkdir -p "$here/app/build-tools/llama-server/bin"
    cp "$(find "$here/build" -name llama-server -type f -perm -u+x | head -1)" "$here/app/build-tools/llama-server/bin/"
    finished+=(llama-server)
    say "concurrency against llama-server, K = 8 ($(left) s left)"
    FML_ADDON_PATH=$addon timeout "$(left)" node "$here/app/bench/concurrency.js" --k=8 --gpu --short-only --no-write > "$results/concurrency-k8-server.md" 2>&1 &&
      finished+=("concurrency K=8 vs llama-server")
    grep -E '^\| 8 ' "$results/concurrency-k8-server.md" || tail -5 "$results/concurrency-k8-server.md"
  else
    tail -5 "$results/server-build.log"
    say "llama-server not built in time (log: results/server-build.log)"
  fi
fi
exit "$status"
