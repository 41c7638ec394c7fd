#!/bin/sh
# prebuildify only knows node-gyp: it spawns "<node-gyp> rebuild --target=.. --devdir=.. --arch=.. --release".
# Run cmake-js instead, with the flags of the variant being built (CMAKE_JS_EXTRA_ARGS, e.g. --CDFML_CUDA=ON).
cd "$(dirname "$0")/.." || exit 1
node scripts/fetch-llama.mjs || exit 1
# shellcheck disable=SC2086
exec npx --no-install cmake-js rebuild --parallel "${FML_JOBS:-2}" ${CMAKE_JS_EXTRA_ARGS}
