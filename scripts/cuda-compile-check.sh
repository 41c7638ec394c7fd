#!/usr/bin/env bash
# Compile-only check of the CUDA configuration, for machines with nvcc but without cuBLAS or a GPU
# (this project's development and CI machines). It configures the addon with FML_CUDA=ON, points
# FML_CUBLAS_ROOT at scripts/cuda-stubs (a declarations-only stand-in for <cublas_v2.h>) with
# FML_CUDA_COMPILE_ONLY=ON, and compiles llama.cpp's ggml-cuda (every .cu file) and our core with
# nvcc for the given architectures. Nothing is linked, so it proves that the configuration and the
# sources compile, not that the result runs: scripts/gpu-check.sh does that on a GPU machine.
#
#   bash scripts/cuda-compile-check.sh        FML_CUDA_ARCHS (default 90), FML_CUDA_ROOT (default
#                                             /usr/local/cuda), FML_JOBS (default nproc)
# Cost: about 18 minutes on 2 cores for one architecture (143 .cu files); ccache makes reruns quick.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_ROOT="${FML_CUDA_ROOT:-/usr/local/cuda}"
ARCHS="${FML_CUDA_ARCHS:-90}"
JOBS="${FML_JOBS:-$(nproc)}"
OUT="${FML_CUDA_CHECK_DIR:-build-cuda-check}"
LLAMA_DIR="${LLAMA_CPP_DIR:-deps/llama.cpp}"

if [ ! -x "$CUDA_ROOT/bin/nvcc" ]; then
  echo "[cuda-check] SKIPPED: no nvcc at $CUDA_ROOT/bin/nvcc (set FML_CUDA_ROOT)"
  exit 0
fi
[ -f "$LLAMA_DIR/include/llama.h" ] || node scripts/fetch-llama.mjs
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)

echo "[cuda-check] $("$CUDA_ROOT/bin/nvcc" --version | tail -2 | head -1); architectures $ARCHS; -j$JOBS"
mkdir -p "$OUT"
start=$(date +%s)
cmake -S . -B "$OUT" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DFML_CUDA=ON -DFML_CUDA_COMPILE_ONLY=ON -DFML_CUDA_ROOT="$CUDA_ROOT" \
  -DFML_CUBLAS_ROOT="$PWD/scripts/cuda-stubs" "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" >"$OUT/fml-configure.log" 2>&1 ||
  { cat "$OUT/fml-configure.log"; echo "[cuda-check] FAILED: configure"; exit 1; }
grep -E "CUDA Toolkit found|Using CMAKE_CUDA_ARCHITECTURES|compile-only" "$OUT/fml-configure.log" | sed 's/^/[cuda-check] /'
# fml_core depends on llama -> ggml -> ggml-cuda, so this compiles every CUDA source and our core.
if ! cmake --build "$OUT" --target fml_core -j "$JOBS" >"$OUT/fml-build.log" 2>&1; then
  grep -E "error|Error" "$OUT/fml-build.log" | head -40
  echo "[cuda-check] FAILED: compile (full log: $OUT/fml-build.log)"
  exit 1
fi
sources=$(find "$LLAMA_DIR/ggml/src/ggml-cuda" -name '*.cu' | wc -l)
objects=$(find "$OUT" -path '*ggml-cuda*' -name '*.cu.o' | wc -l)
lib=$(find "$OUT" -name 'libggml-cuda.a' | head -1)
echo "[cuda-check] OK in $(( $(date +%s) - start )) s: $objects CUDA objects compiled (of $sources .cu files in ggml-cuda;" \
  "unused fattn-vec quant instances are not built), $(du -h "$lib" | cut -f1) $lib, core compiled against the CUDA-enabled ggml"

# The FML_CUBLAS_ROOT branch for a real cuBLAS laid out like NVIDIA's pip wheel (versioned .so files
# only, no libcublas.so): configure against empty stand-in libraries and check that the addon would link
# those exact files and compile with that include directory. Configure only; a few seconds.
wheel="$(cd "$OUT" && pwd)/wheel-layout"
rm -rf "$wheel" "$OUT/real-cublas"
mkdir -p "$wheel/include" "$wheel/lib"
cp scripts/cuda-stubs/include/cublas_v2.h "$wheel/include/"
echo 'void fml_stand_in(void) {}' >"$wheel/stand-in.c"
for lib in libcublas.so.13 libcublasLt.so.13 libcuda.so; do
  cc -shared -fPIC -o "$wheel/lib/$lib" "$wheel/stand-in.c" -Wl,-soname,"$lib"
done
cmake -S . -B "$OUT/real-cublas" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DFML_CUDA=ON \
  -DFML_CUDA_ROOT="$CUDA_ROOT" -DFML_CUBLAS_ROOT="$wheel" -DCUDA_cuda_driver_LIBRARY="$wheel/lib/libcuda.so" \
  "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" >"$OUT/fml-configure-real.log" 2>&1 ||
  { cat "$OUT/fml-configure-real.log"; echo "[cuda-check] FAILED: configure with FML_CUBLAS_ROOT (wheel layout)"; exit 1; }
rules=$(find "$OUT/real-cublas" -maxdepth 1 -name 'build.ninja' -o -maxdepth 1 -name 'Makefile' | head -1)
links=$(grep -rhoE "$wheel/lib/libcublas(Lt)?\.so\.13" "$OUT/real-cublas" --include='*.ninja' --include='link.txt' | sort -u | wc -l)
includes=$(grep -rhoE -e "-I$wheel/include|-isystem[ =]$wheel/include" "$OUT/real-cublas" --include='*.ninja' --include='flags.make' | wc -l)
if [ "$links" -ne 2 ] || [ "$includes" -lt 1 ]; then
  echo "[cuda-check] FAILED: FML_CUBLAS_ROOT (wheel layout): $links of 2 cuBLAS libraries on the link line, $includes compile lines with its include dir ($rules)"
  exit 1
fi
echo "[cuda-check] OK: FML_CUBLAS_ROOT with a wheel layout configures; the addon links its libcublas.so.13 + libcublasLt.so.13 and $includes CUDA compile lines use its include dir"
