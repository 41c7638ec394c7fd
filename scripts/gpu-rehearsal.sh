#!/usr/bin/env bash
# The GPU check rehearsed on this CPU machine (CI runs it), so that on a GPU machine the only new thing
# is the GPU: scripts/gpu-bundle.sh's bundle, copied into a clean temporary directory and run by its own
# gpu-check.sh with FML_GPU_REHEARSAL=1 (the CPU variant, small models, the quick benchmarks) and a PATH
# that holds only what a GPU machine has: cmake, ninja, a C++ compiler, tar/xz and the basic utilities.
# No node, npm or npx but the bundle's. Its results are copied to build-gpu-bundle/rehearsal/.
#   bash scripts/gpu-rehearsal.sh            (about 5 minutes on 2 cores with a cold compiler cache)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/gpu-bundle.sh build-gpu-bundle
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -R build-gpu-bundle "$work/bundle"
mkdir "$work/bin"
for tool in bash sh env cmake ninja cc c++ gcc g++ cpp ar ranlib ld as nm strip objcopy ccache tar xz mkdir rm cp mv ln cat ls chmod \
            date nproc tee grep sed awk find head tail tr cut sort uniq wc du dirname basename readlink realpath uname timeout sleep \
            touch mktemp expr true false printf python3; do
  if p=$(command -v "$tool"); then ln -s "$p" "$work/bin/$tool"; fi
done
for absent in node npm npx; do
  if PATH="$work/bin" command -v "$absent" >/dev/null; then echo "[gpu-rehearsal] $absent is on the stripped PATH"; exit 1; fi
done
# The compiler cache stays the machine's (a rerun takes seconds); everything else is the clean directory's.
cache=$(ccache -k cache_dir 2>/dev/null || echo "$HOME/.cache/ccache")
status=0
env -i HOME="$work" PATH="$work/bin" CCACHE_DIR="$cache" CCACHE_BASEDIR="$work" FML_GPU_REHEARSAL=1 FML_JOBS="${FML_JOBS:-$(nproc)}" \
  FML_GPU_BUDGET_S="${FML_GPU_BUDGET_S:-1200}" FML_GPU_SERVER="${FML_GPU_SERVER:-0}" bash "$work/bundle/gpu-check.sh" || status=$?
rm -rf build-gpu-bundle/rehearsal
cp -R "$work/bundle/results" build-gpu-bundle/rehearsal
echo "[gpu-rehearsal] exit $status; results in build-gpu-bundle/rehearsal/"
exit "$status"
