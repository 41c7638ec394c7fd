#!/usr/bin/env node
// Produces prebuilt binaries (git-ignored):
//   prebuilds/linux-x64/finite-memory-llm.node        CPU (node-gyp-build finds it)
//   prebuilds/linux-x64-cuda/finite-memory-llm.node   CUDA (--cuda; loaded by path, see src/local/binding.ts)
// CUDA needs nvcc and cuBLAS: FML_CUDA_ARCHS (default "80;86;89;90"); FML_CUDA_ROOT (a toolkit) and
// FML_CUBLAS_ROOT (cuBLAS outside it, e.g. a pip wheel) when cmake would not find them (CMakeLists.txt reads both).
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cuda = process.argv.includes('--cuda');
const env = { ...process.env };
if (cuda) {
  const archs = process.env.FML_CUDA_ARCHS ?? '80;86;89;90';
  env.CMAKE_JS_EXTRA_ARGS = `--out build-cuda --CDFML_CUDA=ON --CDCMAKE_CUDA_ARCHITECTURES=${archs} ${process.env.CMAKE_JS_EXTRA_ARGS ?? ''}`;
}
const run = (cmd, args) => execFileSync(cmd, args, { cwd: root, env, stdio: 'inherit' });
if (!cuda) {
  run('npx', ['--no-install', 'prebuildify', '--napi', '--strip', '--node-gyp', './scripts/cmake-js-for-prebuildify.sh']);
} else {
  // prebuildify always writes prebuilds/<platform>-<arch>/; build the CUDA variant straight with cmake-js
  // and place it where the loader looks for it.
  run('sh', ['./scripts/cmake-js-for-prebuildify.sh']);
  const out = join(root, 'prebuilds', `${process.platform}-${process.arch}-cuda`);
  mkdirSync(out, { recursive: true });
  copyFileSync(join(root, 'build-cuda', 'Release', 'finite_memory_llm.node'), join(out, 'finite-memory-llm.node'));
  run('strip', ['--strip-unneeded', join(out, 'finite-memory-llm.node')]);
  console.log(`[prebuildify] ${join(out, 'finite-memory-llm.node')}`);
}
